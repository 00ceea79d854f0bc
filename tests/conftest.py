"""Shared fixtures: tiny models built on the fly (never downloaded)."""
from pathlib import Path

import pytest

from aropd_mlx.lab.tiny import TinySpec, build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), TinySpec(model_type="llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    spec = TinySpec(model_type="qwen2", tie_word_embeddings=True, seed=1)
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), spec)


@pytest.fixture(scope="module")
def tiny_lab(tmp_path_factory):
    """A small lab (1-layer model, 24 problems) built in a temporary cache, per module."""
    import os

    from aropd_mlx.lab.setup import LabSettings, prepare_lab
    from aropd_mlx.lab.tiny import TinySpec

    root = tmp_path_factory.mktemp("lab")
    old = os.environ.get("AROPD_MLX_CACHE")
    os.environ["AROPD_MLX_CACHE"] = str(root / "cache")  # nothing may touch the user's cache
    try:
        settings = LabSettings(k_min=1, k_max=3, n_train=24, eval_ks=(2, 3), n_eval_per_k=3,
                               spec=TinySpec(hidden=32, layers=1, heads=2, kv_heads=1,
                                             intermediate=64, max_position=256),
                               warm_steps=2, warm_batch=8, warm_student_steps=0)
        yield prepare_lab(settings, root=root / "lab")
    finally:
        if old is None:
            os.environ.pop("AROPD_MLX_CACHE", None)
        else:
            os.environ["AROPD_MLX_CACHE"] = old
