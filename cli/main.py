"""aropd-mlx: the command line.

    aropd-mlx train            # the built-in lab, end to end (offline)
    aropd-mlx doctor           # versions, backend, BLAS and a GEMM figure
    aropd-mlx --help
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from aropd_mlx import __version__

from . import bench, compare, parity, report, train
from .common import handles_errors

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="AR-OPD: anchored residual on-policy distillation with MLX.")
lab_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The built-in lab.")
app.add_typer(lab_app, name="lab")


def _version(value: bool):
    if value:
        typer.echo(f"aropd-mlx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version,
                                                  is_eager=True, help="Print the version.")):
    """AR-OPD: anchored residual on-policy distillation with MLX."""


app.command("train")(train.train_command)
app.command("eval")(train.eval_command)
app.command("compare")(compare.compare_command)
app.command("report")(report.report_command)
app.command("parity")(parity.parity_command)
app.command("bench")(bench.bench_command)


@app.command("doctor")
@handles_errors
def doctor(no_bench: bool = typer.Option(False, "--no-bench", help="Skip the GEMM measurement.")):
    """Versions, backend and device, memory, the BLAS in use and a measured GEMM GFLOP/s."""
    from aropd_mlx.doctor import doctor_info, format_doctor

    typer.echo(format_doctor(doctor_info(bench=not no_bench)))


@lab_app.command("build")
@handles_errors
def lab_build(rebuild: bool = typer.Option(False, "--rebuild", help="Build again from scratch, even if cached or half built.")):
    """Install the shipped lab model and data (or build another AROPD_MLX_LAB recipe); cached.

    AROPD_MLX_LAB=<name> installs a shipped named lab instead (`aropd-mlx lab show --all` lists
    them: long, hindsight, long_sheet_copy, ...); AROPD_MLX_LAB='{"base": "long_distrust", "warm_lr": 0.0005}'
    builds a named lab's recipe with some settings changed (any LabSettings field).

    An interrupted build of a recipe that is not shipped goes on from its last checkpoint
    (every 50 steps) when run again; --rebuild always starts over (and a shipped lab's model
    is installed again by a plain `lab build` after an interrupted --rebuild)."""
    from aropd_mlx.lab.defaults import lab_settings_for
    from aropd_mlx.lab.setup import prepare_lab

    lab = prepare_lab(lab_settings_for(), rebuild=rebuild,
                      on_step=train._build_progress())
    typer.echo(f"lab model: {lab.model_path}\ntrain data: {lab.train_path}\neval data: {lab.eval_path}")


@lab_app.command("measure")
@handles_errors
def lab_measure(json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers here."),
                dev: bool = typer.Option(False, "--dev", help="On dev problems, not the held-out set.")):
    """What the lab's self-teacher can do on held-out problems, by k: greedy all-steps-correct
    under the student, partial and full views, temperature-1 samples of the student view, and the
    slip probe: after a slip, does each view ask for the response's value or its reference's?"""
    from aropd_mlx.lab.defaults import lab_settings_for
    from aropd_mlx.lab.measure import format_measure, measure_lab
    from aropd_mlx.lab.setup import prepare_lab

    from aropd_mlx.jsonio import output_path, write_json

    json_out = output_path(json_out) if json_out else None  # before the measure, not after
    lab = prepare_lab(lab_settings_for(), on_step=train._build_progress())
    numbers = measure_lab(lab, dev=dev)
    typer.echo(format_measure(numbers))
    if json_out:
        write_json(json_out, numbers)


@lab_app.command("show")
@handles_errors
def lab_show(all_labs: bool = typer.Option(False, "--all", help="List the default lab and every named one."),
             json_out: bool = typer.Option(False, "--json", help="Print JSON instead.")):
    """The lab AROPD_MLX_LAB selects: its key, whether its model is shipped, built or not built
    yet, its lengths, and its recipe as JSON (give it back to AROPD_MLX_LAB edited, or write
    '{"base": "<named lab>", ...}' with only what changes)."""
    from aropd_mlx.lab.catalog import catalog, describe, format_catalog, format_description
    from aropd_mlx.lab.defaults import selected_lab

    name, settings = selected_lab()
    found = catalog() if all_labs else describe(settings, name)
    if json_out:
        typer.echo(json.dumps(found, indent=2))
    else:
        typer.echo(format_catalog(found) if all_labs else format_description(found))


def main() -> None:
    from aropd_mlx.platform import ensure_fast_blas

    ensure_fast_blas()  # Linux: re-exec once with a fast BLAS preloaded (PLATFORM.md)
    no_args, usage, abort = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except no_args as e:  # `aropd-mlx` alone: the help, exit 0
        typer.echo(e.ctx.get_help())
        code = 0
    except usage as e:  # a bad flag or value: one line, like every other input error
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        typer.echo(f"aropd-mlx: error: {e.format_message()}{hint}", err=True)
        code = 2
    except abort:
        typer.echo("aropd-mlx: interrupted", err=True)
        code = 130
    raise SystemExit(code if isinstance(code, int) else 0)


def _click_exceptions():
    """Usage-error classes of the click that typer runs on (recent typer vendors its own)."""
    try:
        from typer._click import exceptions as ex
    except ImportError:
        from click import exceptions as ex
    no_args = getattr(ex, "NoArgsIsHelpError", ())
    return no_args, ex.UsageError, getattr(ex, "Abort", KeyboardInterrupt)


if __name__ == "__main__":
    main()
