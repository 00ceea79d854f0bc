"""What the benchmarks share: the bench models, prompts, timing, FLOP counting.

Two models, both random-initialised llamas written in Hugging Face format (so mlx-lm and
transformers load the very same weights, nothing downloaded):
- "lab": the built-in lab's architecture (hidden 128, 3 layers, the char vocabulary, ~0.1M);
- "56m": hidden 512, 8 layers, 8 heads, intermediate 1376, vocabulary 32,000 (~58M with both
  embedding tables). The char tokenizer is padded with dummy tokens to 32,000 entries, so the
  tokenizer and the model agree; prompts are lab questions (characters), rollouts are free.

Rollouts are fixed-length in every benchmark: EOS stopping is switched off (MLX: an empty
eos set; transformers: min_new_tokens = max_new_tokens), so every implementation processes
exactly rows x max_new_tokens response tokens and the ratios compare equal work.

    from aropd_mlx.bench.common import bench_model
    path = bench_model("56m")          # cached under the system temp dir
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aropd_mlx.jsonio import read_json

MODELS = ("lab", "56m")
BENCH_VOCAB_56M = 32000


def bench_root() -> Path:
    root = Path(os.environ.get("AROPD_MLX_BENCH_DIR", Path(tempfile.gettempdir()) / "aropd-mlx-bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def lab_spec():
    from aropd_mlx.lab.defaults import LabSettings

    return LabSettings().spec


def spec_56m():
    from aropd_mlx.lab.tiny import TinySpec

    return TinySpec(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376,
                    max_position=2048, seed=0)


def _pad_vocab(path: Path, vocab_size: int, seed: int) -> None:
    """Grow a tiny char model's tokenizer and embedding tables to `vocab_size` entries."""
    from safetensors.numpy import load_file, save_file

    tok = read_json(path / "tokenizer.json")
    vocab = tok["model"]["vocab"]
    taken = set(vocab.values()) | {a["id"] for a in tok.get("added_tokens", [])}
    nxt = max(taken) + 1
    for i in range(nxt, vocab_size):
        vocab[f"<extra_{i}>"] = i  # unreachable by the char BPE: pure padding of the table
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = read_json(path / "config.json")
    cfg["vocab_size"] = vocab_size
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    weights = load_file(str(path / "model.safetensors"))
    rng = np.random.default_rng(seed + 1)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            w = weights[name]
            extra = (rng.standard_normal((vocab_size - w.shape[0], w.shape[1])) * 0.02).astype(w.dtype)
            weights[name] = np.concatenate([w, extra])
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})


def publish(tmp: Path, path: Path) -> Path:
    """Mark a model built in `tmp` complete and move it to `path` (a concurrent builder that
    won the race keeps its copy)."""
    (tmp / "done").write_text("ok")
    try:
        os.replace(tmp, path)
    except OSError:  # another process won the race
        pass
    return path


def bench_model(name: str, root: Path | None = None) -> Path:
    """Path of the bench model `name` ("lab" or "56m"), built once per spec and cached."""
    from aropd_mlx.lab.tiny import build_tiny_model

    if name not in MODELS:
        raise ValueError(f"bench model must be one of {MODELS}, got {name!r}")
    spec = lab_spec() if name == "lab" else spec_56m()
    root = Path(root) if root else bench_root()
    key = hashlib.sha256(repr((spec, BENCH_VOCAB_56M, 1)).encode()).hexdigest()[:10]
    path = root / f"model-{name}-{key}"
    if (path / "done").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    build_tiny_model(tmp, spec)
    if name == "56m":
        _pad_vocab(tmp, BENCH_VOCAB_56M, spec.seed)
    return publish(tmp, path)


def lab_examples(n: int, seed: int = 0, k_min: int = 4, k_max: int = 12):
    """n lab problems (question, solution, answer) as data.Example."""
    from aropd_mlx.data import Example
    from aropd_mlx.lab import task

    return [Example(**r) for r in task.generate(n, k_min, k_max, seed, prefix="bench")]


def lab_view_overrides() -> dict:
    from aropd_mlx.lab.defaults import LabSettings, view_overrides

    return view_overrides(LabSettings().k_max)


def student_prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """Chat-templated lab questions: the student prompts every benchmark uses."""
    from aropd_mlx.config import load_config
    from aropd_mlx.views import encode_prompt, render_views

    views = load_config(overrides=lab_view_overrides()).views
    return [encode_prompt(tokenizer, render_views(e, views)["student"], views)
            for e in lab_examples(n, seed)]


@contextlib.contextmanager
def no_eos(tokenizer):
    """Fixed-length rollouts with mlx-lm: no stop tokens while inside."""
    saved = set(tokenizer.eos_token_ids)
    tokenizer.eos_token_ids = set()
    try:
        yield tokenizer
    finally:
        tokenizer.eos_token_ids = saved


# ----------------------------------------------------------------------------- timing

def measure(fn, repeats: int = 3, warmup: int = 1) -> list[float]:
    """Wall seconds of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict, repeats: int = 3, warmup: int = 1) -> dict[str, list[float]]:
    """Time several functions round-robin (a, b, a, b, ...) so that the noise of a shared
    machine hits each of them alike; returns all timed runs per name."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@dataclass(frozen=True)
class FlopModel:
    """Matmul parameters of a model: FLOPs per token are 2N forward, 6N forward + backward
    (embedding lookups are free; attention's T^2 term is left out: <5% at these lengths)."""

    n_matmul: int  # parameters that multiply activations (all but the input embedding)
    n_total: int

    @classmethod
    def of(cls, model) -> "FlopModel":
        from mlx.utils import tree_flatten

        total, embed = 0, 0
        for name, v in tree_flatten(model.parameters()):
            if name.endswith("lora_a") or name.endswith("lora_b"):
                continue
            total += v.size
            if "embed_tokens" in name:
                embed = v.size
        tied = getattr(model, "lm_head", None) is None
        return cls(n_matmul=total if tied else total - embed, n_total=total)


def gemm_peak_gflops() -> float:
    """This machine's measured float32 GEMM speed (the MFU denominator): best of 1024^3 and
    2048^3, median of a few runs each."""
    from aropd_mlx.doctor import gemm_gflops

    return max(gemm_gflops(1024, repeats=5), gemm_gflops(2048, repeats=3))


def blas_line() -> str:
    from aropd_mlx.platform import blas_fix_status

    return blas_fix_status()


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def use_device(device: str = "auto") -> str:
    """Put MLX on `device` and return where the benchmarks' torch side should run.

    "auto": "cuda" when MLX has its CUDA backend (mlx[cuda12] / mlx[cuda13]), else "cpu"
    (MLX's default device is then left alone: Metal on a Mac). "cpu": MLX's CPU device (even
    where a GPU backend exists), torch on CPU. "cuda": MLX's GPU through CUDA; an error when
    this MLX has no CUDA backend (a CPU-vs-GPU comparison would mean nothing)."""
    import mlx.core as mx

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    has_cuda = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    if device == "auto":
        device = "cuda" if has_cuda else "cpu"
        if device == "cpu":
            return device
    if device == "cuda":
        if not has_cuda:
            raise ValueError("device cuda: this MLX has no CUDA backend "
                             "(pip install 'mlx[cuda12]' or 'mlx[cuda13]')")
        mx.set_default_device(mx.gpu)
    else:
        mx.set_default_device(mx.cpu)
    return device
