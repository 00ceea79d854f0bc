"""`aropd-mlx bench plan-cost`: what fitting a memory limit costs in time.

One AR-OPD step (the real `trainer.run_step`) on the 56M bench llama, three ways, on the same
replayed rollout: *unconstrained* (every row in one scoring forward and one update, no
checkpointing), and the memory plan's settings under two limits: `share` of the
unconstrained step's predicted peak (the plan picks micro-batches, and checkpointing only if
no micro-batch fits without it) and the *tightest* limit the step can fit (one row at a time,
checkpointing on). The three run in turn, round after round (round 0 compiles and is
dropped); the rollout, the same for all three, is timed in the same rounds and added to each.
Goal (issue 15): the step at the plan's settings within 1.3x of the unconstrained step.

    aropd-mlx bench plan-cost --json /tmp/plan_cost.json
    python -c "from aropd_mlx.bench.plan_cost import *; print(format_plan_cost(bench_plan_cost()))"
"""

from __future__ import annotations

from aropd_mlx.bench.common import median, ratio
from aropd_mlx.bench.step import interleaved_steps, setup_run

GOAL = 1.3
SIDES = ("unconstrained", "planned", "tightest")


def side_settings(shape, run, train, share: float) -> dict:
    """The three sides' (scoring rows, update rows, checkpointing), plans and predicted peaks."""
    from dataclasses import replace

    from aropd_mlx.memory import make_plan, predict

    free = replace(train, scoring_micro_batch=None, micro_batch_size=None, grad_checkpoint=None)
    top = max(predict(shape, run, run.rows, run.rows, False).values())
    least = max(predict(shape, run, 1, 1, True).values())
    out = {"unconstrained": {"scoring_rows": run.rows, "update_rows": run.rows,
                             "checkpoint": False, "predicted_peak": top, "limit": None}}
    # (a tiny model's smallest settings may need more than `share`: then both limits meet)
    for side, limit in (("planned", max(share * top, 1.001 * least)), ("tightest", 1.001 * least)):
        plan = make_plan(shape, run, free, int(limit), f"{side} limit")
        out[side] = {"scoring_rows": plan.scoring_rows, "update_rows": plan.update_rows,
                     "checkpoint": plan.checkpoint, "predicted_peak": plan.peak,
                     "limit": int(limit), "plan_line": plan.line()}
    return out


def bench_plan_cost(model_name: str = "56m", batch: int = 4, group: int = 2,
                    max_new_tokens: int = 128, repeats: int = 3, share: float = 0.6,
                    fine_tune: str = "lora", seed: int = 0, model_path=None) -> dict:
    from aropd_mlx.config import with_overrides
    from aropd_mlx.memory import ModelShape, run_shape

    cfg, model, tok, teacher, encoded = setup_run(
        model_name, "ar-opd", batch=batch, group=group, max_new_tokens=max_new_tokens,
        fine_tune=fine_tune, seed=seed, model_path=model_path)
    sides = side_settings(ModelShape.from_model(model), run_shape(cfg, lambda e: e, encoded),
                          cfg.train, share)
    cfgs = {name: with_overrides(cfg, train={"scoring_micro_batch": s["scoring_rows"],
                                             "micro_batch_size": s["update_rows"],
                                             "grad_checkpoint": s["checkpoint"]})
            for name, s in sides.items()}
    lines, rollout_times, _ = interleaved_steps(cfgs, model, tok, teacher, encoded, repeats,
                                                seed)
    rollout_s = median(rollout_times[1:])
    result = {"model": model_name, "rows": batch * group, "max_new_tokens": max_new_tokens,
              "fine_tune": fine_tune, "repeats": repeats, "share": share,
              "rollout_seconds": rollout_s, "sides": sides}
    for name in cfgs:
        timed = lines[name][1:]
        s = sides[name]
        s["scoring_seconds"] = median([l["time_scoring"] for l in timed])
        s["update_seconds"] = median([l["time_update"] for l in timed])
        s["step_seconds"] = rollout_s + s["scoring_seconds"] + s["update_seconds"]
        s["peak_gb"] = max(l["peak_memory_gb"] for l in timed)
    base = sides["unconstrained"]
    for name in ("planned", "tightest"):
        s = sides[name]
        s["step_ratio"] = ratio(s["step_seconds"], base["step_seconds"])
        s["update_ratio"] = ratio(s["update_seconds"], base["update_seconds"])
        s["peak_ratio"] = ratio(s["peak_gb"], base["peak_gb"])
    return result


def format_plan_cost(r: dict) -> str:
    out = [f"plan-cost [{r['model']} {r['fine_tune']}] {r['rows']} rows x {r['max_new_tokens']} "
           f"tokens, median of {r['repeats']} interleaved rounds; rollout "
           f"{r['rollout_seconds']:.2f}s (the same for every side)"]
    for name in SIDES:
        s = r["sides"][name]
        head = (f"  {name:13} scoring {_rows(s['scoring_rows'])}, update {_rows(s['update_rows'])}, "
                f"ckpt {'on ' if s['checkpoint'] else 'off'}: scoring {s['scoring_seconds']:.2f}s "
                f"update {s['update_seconds']:.2f}s step {s['step_seconds']:.2f}s, step peak "
                f"{s['peak_gb']:.2f} GB (planned {s['predicted_peak'] / 1e9:.2f})")
        if name != "unconstrained":
            head += (f"; step {s['step_ratio']:.2f}x, update {s['update_ratio']:.2f}x, peak "
                     f"{s['peak_ratio']:.2f}x of unconstrained (goal step <= {GOAL}x)")
        out.append(head)
    return "\n".join(out)


def _rows(n: int) -> str:
    return f"{n} row{'s' if n != 1 else ''}"
