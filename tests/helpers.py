"""Small builders shared by tests: lab-style examples and a tiny run config."""
import numpy as np

from aropd_mlx.config import load_config
from aropd_mlx.data import Example
from aropd_mlx.lab import task
from aropd_mlx.lab.defaults import view_overrides


def lab_examples(n=32, k_min=1, k_max=3, seed=0):
    return [Example(**d) for d in task.generate(n, k_min, k_max, seed=seed)]


def tiny_config(model_path, out, **overrides):
    base = {**view_overrides(4), "model.path": str(model_path), "out": str(out),
            "train.steps": 3, "train.batch_size": 4, "train.save_every": 2,
            "rollout.group_size": 2, "rollout.max_new_tokens": 12}
    return load_config(overrides={**base, **overrides})


# What the code promises about numbers (README "Numerics"): the same computation on the same
# machine and BLAS repeats bit for bit (resume, teacher snapshots). Two *different*
# computations of one value (two CPU lanes vs one, a prefix cache vs full sequences, the
# fused vs the naive loss) may sum in another order: a multithreaded BLAS blocks a GEMM by
# shape, thread count and concurrent streams. Those agree to float32 rounding, which grows
# with the length of the sums involved and the magnitude of the values summed.
F32_EPS = float(np.finfo(np.float32).eps)


def float32_tolerance(*sum_lengths: int, magnitude: float = 1.0, safety: float = 4.0) -> float:
    """Absolute tolerance between two float32 computations that differ only in summation order:
    `safety` x eps x (total length of the sums along the path) x the largest magnitude summed.
    (The classical bound on a recursive sum is n * eps * sum |x_i|; blocked and pairwise sums
    do far better, so this is loose for real bugs' O(1e-2..1) errors but never flaky.)"""
    return safety * F32_EPS * max(sum(sum_lengths), 1) * max(magnitude, 1.0)


def last_error(result, *needles):
    """A failure after training started: info lines may precede it, one error line, last."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text and result.exit_code == 2, text
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("aropd-mlx: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def fake_hub(monkeypatch, repo) -> list:
    """huggingface_hub's list/download functions serving the folder `repo` as the dataset
    owner/name (offline); returns the calls: ("list", revision), ("download", file, revision)."""
    import huggingface_hub

    calls = []

    def list_repo_files(repo_id, repo_type=None, revision=None, **_):
        assert (repo_id, repo_type) == ("owner/name", "dataset")
        calls.append(("list", revision))
        return sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())

    def hf_hub_download(repo_id, filename, repo_type=None, revision=None, **_):
        assert (repo_id, repo_type) == ("owner/name", "dataset")
        calls.append(("download", filename, revision))
        if not (repo / filename).is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not found")
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls
