"""Reading a JSON object from a file: one helper, one set of error messages.

Every JSON file the project reads (a model's config.json, adapter_config.json, a run's
summary.json, diagnostics.json, a sweep's result.json) holds one object. A malformed or
unreadable file is a `UserError` naming the file and, for bad JSON, the line.

    config = read_json(path / "config.json")                  # missing: a UserError
    summary = read_json(run / "summary.json", missing=None)   # missing: None
"""

from __future__ import annotations

import json
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
