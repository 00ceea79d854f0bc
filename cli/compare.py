"""`aropd-mlx compare`: base, SFT, OPD, Partial OPD, Full OPD and AR-OPD on the built-in lab.

    aropd-mlx compare --quick                        # 2 seeds x 30 steps (docs/EVALUATION.md)
    aropd-mlx compare --seeds 5 --steps 100          # the final comparison of docs/LAB.md
    aropd-mlx compare --lams 0.6,0.8,1.2 --partial-ratios 0.25,0.5 --out runs/sweep
    aropd-mlx compare --methods full-opd,ar-opd --seeds 1 --steps 2   # a smoke run
    aropd-mlx compare --setting other-writer --set train.learning_rate=1e-4
    AROPD_MLX_LAB=hindsight aropd-mlx compare --partial-ratios 0   # a full view with hindsight
    AROPD_MLX_LAB=long_distrust aropd-mlx compare --length-buckets 64,128,192  # long rollouts
    AROPD_MLX_LAB=stronger_writer aropd-mlx compare --setting stronger-writer --sft-steps 2176 \
        --methods base,sft,full-opd,ar-opd      # references the student cannot copy (LAB.md)
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from aropd_mlx.errors import UserError

from .common import handles_errors


def parse_list(values: Optional[List[str]], kind=float, name: str = "") -> Optional[tuple]:
    """'--lams 0.6,0.8' and '--lams 0.6 --lams 0.8' alike; None when not given."""
    if not values:
        return None
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    try:
        return tuple(kind(v) for v in items)
    except ValueError:
        raise UserError(f"--{name}: expected a comma-separated list, got {','.join(values)!r}") from None


# the run settings compare chooses per run (run_overrides), and the flag that sets each
COMPARE_SETS = {"train.method": "--methods", "train.steps": "--steps or --sft-steps",
                "train.seed": "--seeds and --first-seed", "train.save_every": "nothing (one "
                "checkpoint at the end)", "out": "--out", "objective.lam": "--lams",
                "views.partial_ratio": "--partial-ratios"}


def parse_sets(values: Optional[List[str]]) -> dict:
    """'--set train.learning_rate=1e-4' -> {"train.learning_rate": 1e-4} (YAML scalars), each
    key checked against the run config at once."""
    import yaml

    from aropd_mlx.config import load_config

    out = {}
    for item in values or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"--set {key.strip()}: cannot read the value {text!r}") from None
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as text
            try:
                value = float(value)
            except ValueError:
                pass
        if key.strip() in COMPARE_SETS:  # compare sets it per run: a --set would be dropped
            raise UserError(f"--set {key.strip()}: compare sets it for each run; use "
                            f"{COMPARE_SETS[key.strip()]}")
        out[key.strip()] = value
    load_config(overrides=out)  # an unknown key or a bad value stops here, in one line
    return out


@handles_errors
def compare_command(
    quick: bool = typer.Option(False, "--quick",
                               help="2 seeds x 30 steps (<= 8 min on 2 idle cores): a smoke test of the pipeline; it ranks no methods."),
    seeds: Optional[int] = typer.Option(None, help="Seeds per trained method (default 3)."),
    first_seed: Optional[int] = typer.Option(None, "--first-seed",
                                             help="First seed (default 0): fresh seeds re-check a result."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps per run (default 100)."),
    lams: Optional[List[str]] = typer.Option(None, help="AR-OPD lambda values, e.g. 0.6,0.8,1.2."),
    partial_ratios: Optional[List[str]] = typer.Option(
        None, "--partial-ratios", help="Partial-view ratios for partial-opd and ar-opd, e.g. 0.25,0.5."),
    methods: Optional[List[str]] = typer.Option(
        None, help="Subset of base,sft,opd,partial-opd,full-opd,ar-opd."),
    pool: Optional[int] = typer.Option(None, help="Train on the first N oracle-traced problems only."),
    out: str = typer.Option("runs/compare", help="Output directory."),
    fresh: bool = typer.Option(False, "--fresh", help="Rerun finished (variant, seed) runs too."),
    dev: bool = typer.Option(False, "--dev", help="Evaluate on dev problems (for choosing settings; "
                                                  "the held-out set stays for results)."),
    setting: str = typer.Option("clean", help=(
        "clean: oracle references; other-writer: another writer's notation; stronger-writer: "
        "two operations per line (with AROPD_MLX_LAB=stronger_writer, a teacher that reads "
        "them); for the teacher's views and SFT's targets alike.")),
    sft_steps: Optional[int] = typer.Option(None, "--sft-steps", help=(
        "SFT's own step count (e.g. the steps that match AR-OPD's wall-clock).")),
    length_buckets: Optional[List[str]] = typer.Option(None, "--length-buckets", help=(
        "Token edges of response-length buckets, e.g. 64,128,192: compare.md adds tables by "
        "the length of a correct response (a long-rollout lab, e.g. "
        "AROPD_MLX_LAB=long_sheet_copy; `aropd-mlx lab show --all` lists the labs).")),
    set_: Optional[List[str]] = typer.Option(None, "--set", help=(
        "KEY=VALUE config override for every trained run, repeatable, e.g. "
        "--set train.learning_rate=1e-4 --set model.fine_tune_type=full.")),
):
    """Compare base, SFT, OPD, Partial OPD, Full OPD and AR-OPD on the lab (several seeds)."""
    from dataclasses import replace

    from aropd_mlx.compare import CompareSettings, compare, quick_settings
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import lab_settings_for
    from aropd_mlx.lab.setup import prepare_lab

    from .train import _build_progress

    settings = CompareSettings(out=out, reuse=not fresh, pool=pool, dev=dev, setting=setting,
                               sft_steps=sft_steps, overrides=parse_sets(set_))
    if quick:
        settings = quick_settings(settings)
    given = {"seeds": seeds, "first_seed": first_seed, "steps": steps, "lams": parse_list(lams, float, "lams"),
             "partial_ratios": parse_list(partial_ratios, float, "partial-ratios"),
             "methods": parse_list(methods, str, "methods"),
             "length_buckets": parse_list(length_buckets, int, "length-buckets")}
    settings = replace(settings, **{k: v for k, v in given.items() if v is not None}).validate()
    typer.echo(f"compare: {', '.join(settings.methods)}; {settings.seeds} seed(s) x "
               f"{settings.steps} steps -> {out}", err=True)
    lab = prepare_lab(lab_settings_for(load_config()), on_step=_build_progress())
    result = compare(settings, lab=lab, on_event=lambda msg: typer.echo(msg, err=True))
    typer.echo((Path(out) / "compare.md").read_text())
    typer.echo(f"wrote {out}/compare.json and compare.md in {result['wall_seconds'] / 60:.1f} min; "
               f"plots: aropd-mlx report {out}", err=True)
