"""What every command shares: one-line errors, the console, small table rendering."""
from __future__ import annotations

import functools
import sys

import typer

from aropd_mlx.errors import UserError


def handles_errors(fn):
    """A UserError becomes one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"aropd-mlx: error: {e}", err=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            how = {"train_command": " (resume with --resume)",
                   "compare_command": " (run it again: finished runs are reused)",
                   "lab_build": " (an unshipped lab's build goes on from its last "
                                "checkpoint when run again; --rebuild starts over)"}
            typer.echo(f"aropd-mlx: interrupted{how.get(fn.__name__, '')}", err=True)
            raise typer.Exit(130)

    return wrapper


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain aligned text table (stable in logs and tests)."""
    if not rows:
        return "(empty)"
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def err(msg: str) -> None:
    print(msg, file=sys.stderr)
