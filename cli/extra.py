"""Commands whose rooms are still being built say so plainly (see the open issues)."""
from __future__ import annotations

from typing import List, Optional

import typer


def _not_yet(name: str) -> None:
    typer.echo(f"aropd-mlx {name}: not available in this version yet", err=True)
    raise typer.Exit(2)


def compare_command(quick: bool = typer.Option(False, "--quick")):
    """Compare base, SFT, OPD, Partial OPD, Full OPD and AR-OPD on the lab (several seeds)."""
    _not_yet("compare")


def report_command(run_dirs: List[str] = typer.Argument(None)):
    """PNG plots of one or more runs."""
    _not_yet("report")


def bench_command(what: str = typer.Argument("all")):
    """Benchmarks, ratios measured side by side in one run."""
    _not_yet("bench")
