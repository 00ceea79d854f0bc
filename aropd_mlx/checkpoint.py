"""Checkpoints and the run directory: written atomically, read back exactly.

A checkpoint is a folder `checkpoints/step-000050/` holding the trainable weights, the
optimizer state, the teacher snapshot (EMA) and `state.json`, all as safetensors or JSON
(never pickle). It is written under a temporary name, flushed to disk, then renamed: a crash
(or a full disk) mid-write leaves the previous checkpoint untouched and never a half-written
one that `latest` would pick up. Leftover temporary folders are swept on the next start.

    check_run_dir("runs/x")          # before any work: can we write there? (creates nothing)

Creating, locking and replacing the run directory itself: `aropd_mlx.rundir`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from aropd_mlx.errors import UserError

PREFIX = "step-"
TMP_PREFIX = ".tmp-"


def _why(e: BaseException) -> str:
    """A one-line reason for an I/O failure (MLX raises RuntimeError, Python OSError)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_run_dir(path: str | Path) -> None:
    """Raise a UserError unless `path` is (or can be created as) a writable directory.

    Creates nothing that stays: probes with a temporary file in the nearest existing folder,
    so a bad `--out` fails before any model is loaded (root ignores permission bits)."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise UserError(f"output directory {path} {where}, not a directory (out / --out)")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".aropd-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"output directory {path} is not writable ({_why(e)} in {probe}; "
                        "out / --out)") from None


def _save_arrays(path: Path, arrays: dict) -> None:
    mx.save_safetensors(str(path), {k: v for k, v in arrays.items()})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk; best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_temporary(run_dir: Path) -> None:
    """Remove half-written checkpoint folders a crash left behind."""
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, *, params: dict, optimizer_state: dict,
                    teacher: dict | None, state: dict, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{TMP_PREFIX}{PREFIX}{step:06d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_arrays(tmp / "adapters.safetensors", params)
        _save_arrays(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer_state)))
        if teacher is not None:
            _save_arrays(tmp / "teacher.safetensors", teacher)
        with open(tmp / "state.json", "w") as f:
            json.dump({"step": step, **state}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        fsync_dir(root)
    except (OSError, RuntimeError) as e:  # mx.save_safetensors reports a full disk as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {final}: {_why(e)} "
                        "(the previous checkpoint is intact; free space, then --resume)") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint folder's name gives (`step-000050` -> 50); None for another name."""
    digits = Path(path).name[len(PREFIX):]
    return int(digits) if Path(path).name.startswith(PREFIX) and digits.isascii() \
        and digits.isdigit() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of `run_dir`, oldest first by step (a name sorts `step-1000000`
    before `step-999999`: by name, the newest would be pruned and resume would miss it)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir()
            if checkpoint_step(p) is not None and (p / "state.json").is_file()]
    return sorted(done, key=checkpoint_step)


def load_checkpoint(path: Path) -> dict:
    """{'step', 'params', 'optimizer_state', 'teacher', 'state'} of one checkpoint folder.

    Only safetensors and JSON are read (no pickle); a damaged file is a UserError naming it."""
    path = Path(path)
    current = path / "state.json"
    try:
        state = json.loads(current.read_text())
        step = int(state["step"])
        current = path / "adapters.safetensors"
        params = mx.load(str(current))
        current = path / "optimizer.safetensors"
        optimizer_state = tree_unflatten(list(mx.load(str(current)).items()))
        current = path / "teacher.safetensors"
        teacher = mx.load(str(current)) if current.is_file() else None
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint file {current} is unreadable ({_why(e)}); delete "
                        f"{path} to resume from the one before it") from None
    return {"step": step, "params": params, "optimizer_state": optimizer_state,
            "teacher": teacher, "state": state}
