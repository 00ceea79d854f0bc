"""`aropd-mlx report`: PNG plots of runs or of a `compare` output.

    aropd-mlx report runs/lab                       # -> runs/lab/plots/*.png
    aropd-mlx report runs/compare --out plots/      # every variant, averaged over seeds
    aropd-mlx report runs/a runs/b                  # several runs side by side
"""
from __future__ import annotations

from typing import List, Optional

import typer

from .common import handles_errors


@handles_errors
def report_command(
    run_dirs: List[str] = typer.Argument(..., help="Run directories or compare outputs."),
    out: Optional[str] = typer.Option(None, help="Where the PNGs go (default: FIRST_DIR/plots)."),
):
    """PNG plots: training curves, accuracy by k / length, diagnostics by position, shortcuts."""
    from aropd_mlx.report import report

    written = report(run_dirs, out)
    if not written:
        typer.echo("report: nothing to plot in these directories", err=True)
    for path in written:
        typer.echo(str(path))
