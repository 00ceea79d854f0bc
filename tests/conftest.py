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
