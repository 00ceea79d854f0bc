"""`aropd-mlx bench`: benchmarks with ratios measured side by side in one run.

    aropd-mlx bench                          # everything at default size (a few minutes each)
    aropd-mlx bench rollout --quick          # seconds: a smoke run at tiny sizes
    aropd-mlx bench peer --model lab --json runs/bench.json
    aropd-mlx bench peer --rounds 7 --steps-per-round 3   # interleaved rounds, more steps
    aropd-mlx bench step --quick --device cuda            # MLX's CUDA backend (and TRL on CUDA)
    aropd-mlx bench memory --quick                        # planned vs measured peak per phase
    aropd-mlx bench memory --model qwen2.5-1.5b           # 1.5B shape at 4 layers, extrapolated
    aropd-mlx bench creep --json /tmp/creep.json          # 300 lab steps: does memory creep?
    aropd-mlx bench plan-cost                             # time of the plan's micro-batches
Results and goals: docs/BENCHMARKS.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from aropd_mlx.errors import UserError

from .common import handles_errors, table

CHOICES = ("rollout", "scoring", "step", "objective", "peer", "memory", "creep", "plan-cost",
           "all")
MODELS = ("lab", "56m", "qwen2.5-0.5b", "qwen2.5-1.5b")  # the last two: bench memory


@handles_errors
def bench_command(
    what: str = typer.Argument("all", help="rollout | scoring | step | objective | peer | memory | creep | "
                                                 "plan-cost | all"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write all numbers here (JSON)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes: a smoke run in seconds."),
    model: Optional[List[str]] = typer.Option(None, "--model",
                                              help="Only these bench models (lab, 56m; memory: "
                                                   "qwen2.5-0.5b, qwen2.5-1.5b); repeatable."),
    no_install: bool = typer.Option(False, "--no-install",
                                    help="peer: skip TRL when missing instead of pip-installing it."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=1,
                                         help="peer: interleaved rounds (default 5; --quick 2)."),
    steps_per_round: Optional[int] = typer.Option(
        None, "--steps-per-round", min=1,
        help="peer: timed steps of each side per round (default 2; --quick 1)."),
    device: str = typer.Option("auto", "--device",
                               help="auto | cpu | cuda: MLX's device and where TRL runs (peer)."),
    top_k: Optional[List[int]] = typer.Option(
        None, "--top-k", min=1,
        help="objective: the top-k teacher (objective.teacher_top_k) at these k against the "
             "exact target on the bench models (loss difference, time, memory); repeatable."),
):
    """Benchmarks: rollout speed, AR-OPD vs OPD step, MFU, fused loss, TRL peer, memory plan,
    memory creep over a long lab run, the time cost of the plan's micro-batches."""
    from aropd_mlx.bench.suite import BENCHMARKS, run_suite, write_json

    if what not in CHOICES:
        raise UserError(f"bench: unknown benchmark {what!r} (choose from {', '.join(CHOICES)})")
    for m in model or []:
        if m not in MODELS:
            raise UserError(f"--model must be one of {', '.join(MODELS)}, got {m!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if json_out:
        from aropd_mlx.jsonio import output_path

        json_out = output_path(json_out)  # before the benchmarks, not after
    if top_k:
        if what != "objective":
            raise UserError("--top-k goes with `bench objective`")
        return _bench_top_k(top_k, list(model) if model else ["lab", "56m"], quick, json_out)
    which = list(BENCHMARKS) if what == "all" else [what]
    try:
        result = run_suite(which, quick=quick, models=list(model) if model else None,
                           install=not no_install, echo=typer.echo, device=device,
                           peer_options={"rounds": rounds, "steps_per_round": steps_per_round})
    except ValueError as e:
        if str(e).startswith("device"):
            raise UserError(f"bench: {e}") from None
        raise
    typer.echo("")
    typer.echo(table(result["table"], ["benchmark", "model", "measure", "result", "goal", "met"]))
    if any(r.get("met") == "straddles" for r in result["table"]):
        typer.echo("straddles: that ratio's spread over the rounds (min-max) contains its goal, "
                   "so this run supports no claim either way (rerun on an idle machine, or with "
                   "more --rounds)")
    if quick:
        typer.echo("(--quick: smoke sizes; the goals are judged at the default sizes)")
    m = result["machine"]
    typer.echo(f"\nBLAS: {m['blas']}; load average {m.get('loadavg_start')} -> "
               f"{m.get('loadavg_end')} on {m['cpus']} CPUs")
    if json_out:
        write_json(result, json_out)
        typer.echo(f"wrote {json_out}")


def _bench_top_k(ks: List[int], models: List[str], quick: bool, json_out: Optional[Path]):
    """`bench objective --top-k K ...`: aropd_mlx.bench.objective.bench_top_k per model."""
    import os

    from aropd_mlx.bench.objective import bench_top_k, format_top_k
    from aropd_mlx.bench.suite import machine_info

    for m in models:
        if m not in ("lab", "56m"):
            raise UserError(f"--top-k runs on the lab and 56m bench models, got {m!r}")
    size = dict(batch=1, group=2, max_new_tokens=8, repeats=0) if quick else {}
    machine, results = machine_info(), []
    for m in models:
        results.append(bench_top_k(m, ks=tuple(sorted(set(ks))), **size))
        typer.echo(format_top_k(results[-1]))
        typer.echo("")
    if hasattr(os, "getloadavg"):
        machine["loadavg_end"] = list(os.getloadavg())
    typer.echo(f"BLAS: {machine['blas']}; load average {machine.get('loadavg_start')} -> "
               f"{machine.get('loadavg_end')} on {machine['cpus']} CPUs")
    if json_out:
        from aropd_mlx.jsonio import write_json as write

        write(json_out, {"machine": machine, "top_k": results}, indent=1)
        typer.echo(f"wrote {json_out}")
