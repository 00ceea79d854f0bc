"""The lab model shipped inside the package, so that every machine starts from the same weights.

A warm start is built by us, once, with `aropd-mlx lab build --rebuild` and the recipe in
`LabSettings`, then copied here with `python scripts/ship_lab.py` (files + `lab.json`: the
recipe, a SHA-256 per file, and the held-out numbers measured when it was shipped). On a
fresh install `prepare_lab` finds that the default settings match the shipped recipe,
checks the hashes and copies the few MB into the cache: no warm start, no minutes of SFT,
and no dependence on this machine's BLAS rounding (a rebuild on another CPU may differ).

    manifest()                       # the shipped lab.json, or None
    install(settings, dest)          # True when a shipped model was copied to dest
    shipped_dir("long")              # a named lab's folder (defaults.NAMED_LABS)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from aropd_mlx.errors import UserError
from aropd_mlx.jsonio import read_json
from aropd_mlx.lab.defaults import NAMED_LABS, without_neutral_later_fields

SHIPPED_DIR = Path(__file__).parent / "shipped"  # the default lab's model
MANIFEST = "lab.json"


def shipped_dir(name: str | None = None) -> Path:
    """Where a lab's model is shipped: the default lab's, or a named one's (NAMED_LABS)."""
    return SHIPPED_DIR if name is None else SHIPPED_DIR.with_name(f"shipped_{name}")


def folders() -> list[Path]:
    """Every shipped lab model's folder (read at call time, like SHIPPED_DIR: tests move it)."""
    return [shipped_dir(), *(shipped_dir(name) for name in NAMED_LABS)]


def _at(folder) -> Path:
    return Path(folder) if folder is not None else SHIPPED_DIR  # read at call time (tests)


def recipe(settings) -> dict:
    """The settings that define a build (JSON-ready, version-independent); a field added
    since the model was shipped is left out at its neutral value, as in LabSettings.key()."""
    return json.loads(json.dumps(without_neutral_later_fields(asdict(settings)), default=str))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(folder: Path | None = None) -> dict | None:
    folder = _at(folder)
    return read_json(folder / MANIFEST, missing=None)


def verify(folder: Path | None = None) -> dict:
    """The manifest, after checking every file's hash; a UserError names a damaged file."""
    folder = _at(folder)
    found = manifest(folder)
    if found is None:
        raise UserError(f"no shipped lab model in {folder}")
    for name, digest in found["files"].items():
        path = folder / name
        if not path.is_file() or sha256(path) != digest:
            raise UserError(f"shipped lab model: {path} is missing or damaged (SHA-256 differs "
                            "from lab.json); reinstall the package or run "
                            "`aropd-mlx lab build --rebuild`")
    return found


def matches(settings, folder: Path | None = None) -> bool:
    folder = _at(folder)
    found = manifest(folder)
    return found is not None and found.get("recipe") == recipe(settings)


def find(settings, folder: Path | None = None) -> Path | None:
    """The shipped folder whose model was built with `settings`: `folder` if it was, or else the
    first of every shipped folder that was; None when none."""
    return next((f for f in ([folder] if folder is not None else folders())
                 if matches(settings, f)), None)


def install(settings, dest: Path, folder: Path | None = None) -> bool:
    """Copy the shipped model built with `settings` to `dest` (atomically), looking in `folder`
    or else in every shipped folder; False when none was built with them."""
    folder = find(settings, folder)
    if folder is None:
        return False
    found = verify(folder)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in found["files"]:
        shutil.copyfile(folder / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return True


def export(model_dir: Path, settings, measured: dict, folder: Path | None = None) -> dict:
    """Write a built lab model into `folder` with its manifest (scripts/ship_lab.py)."""
    folder = _at(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    files = {}
    for src in sorted(Path(model_dir).iterdir()):
        if src.is_file():
            shutil.copyfile(src, folder / src.name)
            files[src.name] = sha256(folder / src.name)
    found = {"recipe": recipe(settings), "files": files, "measured": measured}
    (folder / MANIFEST).write_text(json.dumps(found, indent=2) + "\n")
    return found
