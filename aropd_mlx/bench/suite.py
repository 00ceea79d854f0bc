"""`aropd-mlx bench`: run the benchmarks, compare each result with its goal, write JSON.

    aropd-mlx bench                 # all, default sizes (minutes each on 2 cores)
    aropd-mlx bench scoring --quick --json out.json
    aropd-mlx bench creep --json /tmp/creep.json   # a 300-step lab run's memory creep
    python -c "from aropd_mlx.bench.suite import run_suite; run_suite(['rollout'], quick=True)"

Names: rollout (sample vs batch_generate), scoring (AR-OPD step vs OPD step, time split),
step (full-step MFU on the 56M llama, the rollout against memory bandwidth), objective
(fused vs naive loss, owned by aropd_mlx.bench.objective), peer (opd vs TRL on torch, CPU or CUDA, interleaved rounds),
memory (the memory plan's prediction vs the measured peak per phase at Qwen2.5 shapes), creep
(a 300-step lab run: the step peak over its last 100 steps vs steps 50-100), plan-cost (the
step's time at the memory plan's micro-batches and checkpointing vs unconstrained). Every
ratio is measured inside one run, side by side; absolute seconds depend on the machine and its load (recorded in the JSON).
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

from aropd_mlx import jsonio

BENCHMARKS = ("rollout", "scoring", "step", "objective", "peer", "memory", "creep", "plan-cost")

# (model, sizes) per benchmark: the default run and the --quick smoke run
SIZES = {
    "rollout": {"default": [("lab", dict(rows=32, max_new_tokens=80, repeats=3)),
                            ("56m", dict(rows=8, max_new_tokens=64, repeats=2))],
                "quick": [("lab", dict(rows=4, max_new_tokens=8, repeats=1))]},
    "scoring": {"default": [("lab", dict(batch=8, group=4, max_new_tokens=80, repeats=3)),
                            ("56m", dict(batch=4, group=2, max_new_tokens=64, repeats=2))],
                "quick": [("lab", dict(batch=2, group=1, max_new_tokens=8, repeats=1))]},
    "step": {"default": [("56m", dict(batch=4, group=2, max_new_tokens=64, steps=2))],
             "quick": [("lab", dict(batch=2, group=1, max_new_tokens=8, steps=1))]},
    "objective": {"default": [(None, dict(vocab=151936, hidden=896, seq=1024, repeats=1))],
                  "quick": [(None, dict(vocab=4096, hidden=64, seq=128, repeats=1))]},
    # peer: every side runs rounds x steps_per_round timed steps, interleaved round by round
    "peer": {"default": [("lab", dict(rows=16, max_new_tokens=80, rounds=5, steps_per_round=2)),
                         ("56m", dict(rows=8, max_new_tokens=32, rounds=5, steps_per_round=2))],
             "quick": [("lab", dict(rows=2, max_new_tokens=8, rounds=2, steps_per_round=1))]},
    # memory: real per-row shapes (prompt 256, views 768, rollouts 1024, G = 4, LoRA r16);
    # 0.5B at 4 layers and full depth (the per-layer check), 1.5B at 4 layers, extrapolated
    # (the plan chooses for the model at full depth; full fine-tuning in fp32 fits no 6 GB plan
    # at full depth, so its settings are given)
    "memory": {"default": [("qwen2.5-0.5b", dict(layers=4, memory_limit="6GB")),
                           ("qwen2.5-0.5b", dict(layers=4, response=512, memory_limit="6GB")),
                           ("qwen2.5-0.5b", dict(layers=4, fine_tune="full", scoring_rows=8,
                                                 update_rows=2, checkpoint=False)),
                           ("qwen2.5-0.5b", dict(layers=None, memory_limit="6GB")),
                           ("qwen2.5-1.5b", dict(layers=4, memory_limit="12GB"))],
               "quick": [("qwen2.5-0.5b", dict(layers=2, rows=4, student_prompt=64,
                                               view_prompt=192, response=128)),
                         ("qwen2.5-0.5b", dict(layers=2, rows=4, student_prompt=64,
                                               view_prompt=192, response=128, scoring_rows=2,
                                               update_rows=2, checkpoint=True))]},
    # creep: the highest step peak over the last `late` steps vs over the `early` window
    "creep": {"default": [("lab", dict(steps=300, early=(50, 100), late=100))],
              "quick": [("lab", dict(steps=40, early=(10, 20), late=13))]},
    # plan-cost: unconstrained vs the plan under 60% of its peak and under the tightest limit
    "plan-cost": {"default": [("56m", dict(batch=4, group=2, max_new_tokens=128, repeats=3))],
                  "quick": [("lab", dict(batch=2, group=2, max_new_tokens=16, repeats=1))]},
}
MEMORY_TOLERANCE = 0.15  # the plan within 15% of the measured peak


def _goal(rows, bench, model, measure, value, goal, ok, unit="x"):
    shown = "-" if value is None else (f"{100 * value:.1f}%" if unit == "%" else f"{value:.2f}x")
    rows.append({"benchmark": bench, "model": model or "-", "measure": measure, "result": shown,
                 "goal": goal, "met": "-" if value is None or goal == "-" else
                 ("yes" if ok(value) else "NO")})


def goal_rows(bench: str, r: dict) -> list[dict]:
    """Table rows (benchmark, model, measure, result, goal, met) for one result."""
    rows: list[dict] = []
    m = r.get("model")
    if "skipped" in r and bench != "peer":
        rows.append({"benchmark": bench, "model": m or "-", "measure": r["skipped"],
                     "result": "-", "goal": "-", "met": "-"})
    elif bench == "rollout":
        _goal(rows, bench, m, "sample / batch_generate tok/s", r["speedup"], ">= 1.0x", lambda v: v >= 1.0)
    elif bench == "scoring":
        _goal(rows, bench, m, "AR-OPD / OPD scoring time", r["scoring_ratio"], "-", lambda v: True)
        _goal(rows, bench, m, "AR-OPD / OPD step time", r["step_ratio"], "<= 1.25x", lambda v: v <= 1.25)
        _goal(rows, bench, m, "AR-OPD / OPD useful FLOPs", r["flop_ratio"], "-", lambda v: True)
    elif bench == "step":
        label = f"({r['method']}, {r['fine_tune']})"
        for phase in ("scoring", "update"):
            _goal(rows, bench, m, f"{phase} share of GEMM peak {label}", r[f"{phase}_mfu"],
                  ">= 50%", lambda v: v >= 0.5, unit="%")
        _goal(rows, bench, m, "rollout share of its memory-bandwidth limit",
              r["rollout_bandwidth_share"], ">= 50%", lambda v: v >= 0.5, unit="%")
        _goal(rows, bench, m, f"MFU of GEMM peak, whole step {label}", r["mfu"], ">= 35%",
              lambda v: v >= 0.35, unit="%")
    elif bench == "objective":
        _goal(rows, bench, f"V={r['vocab']}", "fused / naive peak memory", r["memory_ratio"],
              "<= 0.1x", lambda v: v <= 0.1)
        _goal(rows, bench, f"V={r['vocab']}", "fused / naive time", r["time_ratio"], "<= 1.3x",
              lambda v: v <= 1.3)
    elif bench == "memory":
        label = f"{m} {r['layers']}L"
        worst = max(r["ratio"].values(), key=lambda v: abs(v - 1))
        _goal(rows, bench, label, f"measured / planned peak, worst phase (scoring {r['scoring_rows']}"
              f", update {r['update_rows']}, ckpt {'on' if r['checkpoint'] else 'off'})", worst,
              "0.85-1.15x", lambda v: abs(v - 1) <= MEMORY_TOLERANCE)
        if r["layers"] < r["full_layers"] and m == "qwen2.5-1.5b":
            peak = max(r["extrapolated_full_depth"].values()) / 1e9
            rows.append({"benchmark": bench, "model": label, "measure":
                         f"peak at {r['full_layers']} layers, extrapolated (GB)",
                         "result": f"{peak:.2f}", "goal": "<= 12", "met": "yes" if peak <= 12 else "NO"})
        if r["layers"] == r["full_layers"] and m == "qwen2.5-0.5b":
            peak = max(r["measured"].values()) / 1e9
            rows.append({"benchmark": bench, "model": label, "measure": "measured peak (GB)",
                         "result": f"{peak:.2f}", "goal": "<= 6", "met": "yes" if peak <= 6 else "NO"})
    elif bench == "creep":
        from aropd_mlx.bench.creep import GOAL

        (a0, a1), (b0, b1) = r["early"]["steps"], r["late"]["steps"]
        _goal(rows, bench, m, f"peak steps {b0}-{b1} / peak steps {a0}-{a1} ({r['method']})",
              r["ratio"], f"<= {GOAL:.2f}x", lambda v: v <= GOAL)
    elif bench == "plan-cost":
        from aropd_mlx.bench.plan_cost import GOAL

        for side in ("planned", "tightest"):
            q = r["sides"][side]
            _goal(rows, bench, m, f"step time, {side} limit (scoring {q['scoring_rows']}, update "
                  f"{q['update_rows']}, ckpt {'on' if q['checkpoint'] else 'off'}) / unconstrained",
                  q["step_ratio"], f"<= {GOAL}x", lambda v: v <= GOAL)
    elif bench == "peer":
        if "skipped" in r:
            rows.append({"benchmark": bench, "model": m, "measure": r["skipped"], "result": "-",
                         "goal": "-", "met": "-"})
        for name, q in r.get("ratios", {}).items():
            label = name if "config" not in q else f"{name} ({q['config'][4:]})"
            rows.append({"benchmark": bench, "model": m,
                         "measure": f"opd speed vs {label}, median [min-max] of "
                                    f"{q.get('n', '?')} rounds",
                         "result": f"{q['median']:.2f}x [{q['min']:.2f}-{q['max']:.2f}]",
                         "goal": f">= {q['goal']:g}x" if q.get("goal") else "-",
                         "met": q.get("verdict", "-")})
    return rows


# bench name -> (module under aropd_mlx.bench, its bench function, its formatter)
RUNNERS = {
    "rollout": ("rollout", "bench_rollout", "format_rollout"),
    "scoring": ("step", "bench_step", "format_step"),
    "step": ("step", "bench_mfu", "format_mfu"),
    "peer": ("peer", "bench_peer", "format_peer"),
    "creep": ("creep", "bench_creep", "format_creep"),
    "memory": ("memory", "bench_memory", "format_memory"),
    "plan-cost": ("plan_cost", "bench_plan_cost", "format_plan_cost"),
}


def _runner(bench: str) -> tuple[Callable, Callable]:
    if bench in RUNNERS:
        module, run, fmt = RUNNERS[bench]
        found = importlib.import_module(f"aropd_mlx.bench.{module}")
        return getattr(found, run), getattr(found, fmt)
    try:
        from aropd_mlx.bench.objective import bench_objective, format_objective_bench
    except ImportError as e:
        note = f"aropd_mlx.bench.objective unavailable ({e}): skipped"
        return (lambda **kw: {"skipped": note, **kw}), (lambda r: f"objective: {r['skipped']}")
    return bench_objective, format_objective_bench


def machine_info() -> dict:
    from aropd_mlx.bench.common import blas_line

    info = {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "blas": blas_line(),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    try:
        import mlx.core as mx

        info["mlx_device"] = str(mx.default_device())
    except Exception:  # noqa: BLE001 - recorded, never fatal
        info["mlx_device"] = None
    for dist in ("mlx", "mlx-lm", "torch", "transformers", "trl"):
        try:
            from importlib.metadata import version

            info[dist] = version(dist)
        except Exception:  # noqa: BLE001 - optional packages
            info[dist] = None
    return info


def busy_note(machine: dict) -> str | None:
    """A warning when other work loads the machine: ratios then mislead (torch's threads lose
    far more to contention than MLX: BENCHMARKS.md, "A correction")."""
    load, cpus = (machine.get("loadavg_start") or [0.0])[0], machine.get("cpus") or 1
    if load <= 0.75 * cpus:
        return None
    return (f"warning: load average {load:.1f} on {cpus} CPUs before the run: other jobs are "
            "using the machine; the peer ratios in particular are not reliable (run it idle)")


def run_suite(which: list[str], *, quick: bool = False, models: list[str] | None = None,
              install: bool = True, echo: Callable[[str], None] = print,
              sizes: dict | None = None, device: str = "auto",
              peer_options: dict | None = None) -> dict:
    """Run the named benchmarks; returns {"machine", "results", "table"} (JSON-ready).

    device: auto | cpu | cuda (aropd_mlx.bench.common.use_device: MLX's device, and where the
    peer's TRL runs). peer_options: overrides for bench_peer (rounds, steps_per_round)."""
    from aropd_mlx.bench.common import use_device

    device = use_device(device)
    out = {"machine": machine_info(), "size": "quick" if quick else "default",
           "device": device, "results": {}, "table": []}
    if busy_note(out["machine"]):
        echo(busy_note(out["machine"]))
    for bench in which:
        fn, fmt = _runner(bench)
        plan = (sizes or {}).get(bench) or SIZES[bench]["quick" if quick else "default"]
        for model, kwargs in plan:
            if models and model is not None and model not in models:
                continue
            args = dict(kwargs)
            if model is not None:
                args["model_name"] = model
            if bench == "peer":
                args.update(install=install, device=device, log=echo,
                            **{k: v for k, v in (peer_options or {}).items() if v is not None})
            echo(f"== {bench}" + (f" [{model}]" if model else "") + " ...")
            t0 = time.perf_counter()
            result = fn(**args)
            result["wall_seconds"] = time.perf_counter() - t0
            echo(fmt(result))
            key = bench + (f"/{model}" if model else "")
            if bench == "memory":  # one model at several depths and settings
                key += (f"/{result['layers']}L/T{result['response']}/{result['fine_tune']}/"
                        + ("planned" if "scoring_rows" not in kwargs else
                           f"s{result['scoring_rows']}u{result['update_rows']}"))
            out["results"][key] = result
            out["table"].extend(goal_rows(bench, {**result, "model": model}))
    if hasattr(os, "getloadavg"):
        out["machine"]["loadavg_end"] = list(os.getloadavg())
    return out


def write_json(result: dict, path: str | Path) -> None:
    jsonio.write_json(jsonio.output_path(path), result, default=_jsonable)


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)


if __name__ == "__main__":  # python -m aropd_mlx.bench.suite [names...]
    names = [a for a in sys.argv[1:] if not a.startswith("-")] or list(BENCHMARKS)
    res = run_suite(names, quick="--quick" in sys.argv)
    from aropd_mlx.cli.common import table

    print(table(res["table"]))
