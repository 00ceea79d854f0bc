"""Reading a JSON object from a file: one helper, one set of error messages.

Every JSON file the project reads (a model's config.json, adapter_config.json, a run's
summary.json, diagnostics.json, a sweep's result.json) holds one object. A malformed or
unreadable file is a `UserError` naming the file and, for bad JSON, the line.

    config = read_json(path / "config.json")                  # missing: a UserError
    summary = read_json(run / "summary.json", missing=None)   # missing: None

Files written whole or not at all (config.yaml, summary.json, `--json` results, diagnostics)
go through `write_text` / `write_json` (a temp file, then a rename), and a `--json` path is checked with `output_path` before the long
work that fills it, so a path that cannot be written fails at once, not after an hour.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aropd_mlx.errors import UserError

_REQUIRED = object()


def read_json(path: str | Path, *, missing=_REQUIRED) -> dict:
    """The JSON object in `path`. When the file does not exist, `missing` if given, else a
    `UserError`; malformed JSON, undecodable bytes or a non-object are `UserError`s."""
    path = Path(path)
    if missing is not _REQUIRED and not path.is_file():
        return missing
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"malformed JSON ({e.msg})", where=f"{path}:{e.lineno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"unreadable ({e})", where=str(path)) from None
    if not isinstance(data, dict):
        raise UserError("expected a JSON object", where=str(path))
    return data


def output_path(path: str | Path, flag: str = "--json") -> Path:
    """`path`, once its folder exists (made if missing) and can be written; else a UserError
    naming the flag and the path."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot make its folder ({e.strerror or e})") from None
    if not os.access(path.parent, os.W_OK):
        raise UserError(f"{flag} {path}: its folder {path.parent} is not writable")
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` whole or not at all (a temp file beside it, then a rename); an OSError is a
    UserError naming the file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write ({e.strerror or e})", where=str(path)) from None
    return path


def write_json(path: str | Path, data, *, indent: int | None = 2, default=None) -> Path:
    """Write `data` as JSON whole or not at all (`write_text`)."""
    return write_text(path, json.dumps(data, indent=indent, default=default))
