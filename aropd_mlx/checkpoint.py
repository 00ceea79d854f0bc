"""Checkpoints: written atomically, read back exactly.

A checkpoint is a folder `checkpoints/step-000050/` holding the trainable weights, the
optimizer state, the teacher snapshot (EMA) and `state.json`. It is written under a temporary
name, flushed to disk, then renamed: a crash (or a full disk) mid-write leaves the previous
checkpoint untouched and never a half-written one that `latest` would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from aropd_mlx.errors import UserError

PREFIX = "step-"


def _save_arrays(path: Path, arrays: dict) -> None:
    mx.save_safetensors(str(path), {k: v for k, v in arrays.items()})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: Path, step: int, *, params: dict, optimizer_state: dict,
                    teacher: dict | None, state: dict, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _save_arrays(tmp / "adapters.safetensors", params)
        _save_arrays(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer_state)))
        if teacher is not None:
            _save_arrays(tmp / "teacher.safetensors", teacher)
        with open(tmp / "state.json", "w") as f:
            json.dump({"step": step, **state}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {e.strerror or e} "
                        "(the previous checkpoint is intact)") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: p.name)


def load_checkpoint(path: Path) -> dict:
    """{'step', 'params', 'optimizer_state', 'teacher', 'state'} of one checkpoint folder."""
    state = json.loads((path / "state.json").read_text())
    teacher_file = path / "teacher.safetensors"
    return {
        "step": int(state["step"]),
        "params": mx.load(str(path / "adapters.safetensors")),
        "optimizer_state": tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items())),
        "teacher": mx.load(str(teacher_file)) if teacher_file.is_file() else None,
        "state": state,
    }
