"""Training-step benchmarks through the real `aropd_mlx.trainer.run_step`.

- `bench_step`: the AR-OPD step (partial + full teacher views) against the single-view OPD step
  on the same batch. The rollout is drawn once and replayed to both (the trainer's `sample` is
  swapped for a replay), so the two steps score and update exactly the same tokens; the rollout
  itself is timed in the same round-robin. Goal: AR-OPD step <= 1.25x the OPD step.
- `bench_mfu`: full steps (real rollouts) on the ~56M llama, with useful FLOPs counted per phase
  against this machine's measured GEMM speed. Goal: >= 60% of GEMM peak.

    from aropd_mlx.bench.step import bench_step, bench_mfu
    bench_step("lab", batch=8, group=4, max_new_tokens=80)
    bench_mfu("56m", batch=4, group=2, max_new_tokens=64)
Tiny CPU size: bench_step("lab", batch=2, group=1, max_new_tokens=8, repeats=1).

FLOPs (N_body: the decoder's matmul weights, N_head: the output head, per token): a forward
is 2N, the student's backward 2N more for input gradients plus 2N for weight gradients where
weights train (full fine-tuning; the head's weight gradient, tied or not, is not counted; LoRA's own FLOPs are negligible). The student and each teacher view
run the backbone over prompt + response[:-1] and the head over the response only (the teacher views' head projections happen inside the
fused loss, so they count in the update phase); the rollout and the teacher views run each
prompt once per group (prefix.py), then one position per response token. Padding and attention's T^2 term are not counted.
"""

from __future__ import annotations

import contextlib
import time

from aropd_mlx.batches import METHOD_VIEWS, PromptEncoder
from aropd_mlx.bench.common import (FlopModel, bench_model, gemm_peak_gflops, lab_examples,
                                    lab_view_overrides, median, no_eos, ratio)
from aropd_mlx.optimizer import make_optimizer

PHASES = ("rollout", "scoring", "update")


def setup_run(model_name: str, method: str, *, batch: int, group: int, max_new_tokens: int,
              fine_tune: str = "lora", alpha: float | None = None, model_path=None,
              seed: int = 0, extra: dict | None = None):
    """(cfg, model, tokenizer, teacher, encoded batch) for `method` on a bench model."""
    from aropd_mlx.config import load_config
    from aropd_mlx.models import Teacher, load_student

    overrides = {**lab_view_overrides(), "model.path": str(model_path or bench_model(model_name)),
                 "model.fine_tune_type": fine_tune, "train.method": method,
                 "train.batch_size": batch, "rollout.group_size": group,
                 "rollout.max_new_tokens": max_new_tokens, "rollout.completion_batch_size":
                 max(64, batch * group), "train.steps": 1000, "train.seed": seed,
                 # timed steps are typical steps: per-token diagnostics run on logging steps only
                 "train.diagnostics_every": 1000,
                 **({"objective.alpha": alpha} if alpha is not None else {}), **(extra or {})}
    cfg = load_config(overrides=overrides)
    model, tokenizer = load_student(cfg.model)
    teacher = Teacher.create(model, tokenizer, cfg.model)
    encoder = PromptEncoder(cfg, tokenizer)
    encoded = [encoder(e) for e in lab_examples(batch, seed)]
    return cfg, model, tokenizer, teacher, encoded


@contextlib.contextmanager
def replayed_rollouts(responses):
    """Make the trainer's rollout return `responses` (fixed tokens for every step inside)."""
    from aropd_mlx import trainer as tr

    calls = []
    original = tr.sample

    def replay(*args, **kwargs):
        calls.append(1)
        return responses

    tr.sample = replay
    try:
        yield calls
    finally:
        tr.sample = original
    if not calls:
        raise RuntimeError("trainer.run_step no longer calls rollout.sample: update "
                           "aropd_mlx.bench.step.replayed_rollouts")


def interleaved_steps(cfgs: dict, model, tok, teacher, encoded, repeats: int, seed: int = 0):
    """Each config's `trainer.run_step` on one rollout drawn once and replayed, in turn, round
    after round; the rollout itself is timed in each round. Round 0 warms up (compiles): the
    caller drops it. Returns ({name: [metrics line per round]}, [rollout s per round],
    the replayed responses)."""
    from aropd_mlx import trainer as tr
    from aropd_mlx.rollout import sample

    optims = {}
    for name, c in cfgs.items():
        optims[name] = make_optimizer(c)
        optims[name].init(model.trainable_parameters())
    first = next(iter(cfgs.values()))
    prompts = [e.prompts["student"] for e in encoded]
    lines = {name: [] for name in cfgs}
    rollout_times = []
    with no_eos(tok):
        responses = sample(model, tok, prompts, first.rollout, seed=seed)
        with replayed_rollouts(responses):
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                sample(model, tok, prompts, first.rollout, seed=seed)  # the real one: timed
                rollout_times.append(time.perf_counter() - t0)
                for name in cfgs:
                    lines[name].append(tr.run_step(cfgs[name], model, tok, optims[name],
                                                   teacher, encoded, len(lines[name])))
    return lines, rollout_times, responses


def bench_step(model_name: str = "lab", batch: int = 8, group: int = 4, max_new_tokens: int = 80,
               repeats: int = 3, fine_tune: str = "lora", seed: int = 0, model_path=None) -> dict:
    """AR-OPD vs OPD step on one replayed rollout: median seconds per phase, and ratios."""
    from aropd_mlx.config import with_overrides

    cfg, model, tok, teacher, encoded = setup_run(
        model_name, "ar-opd", batch=batch, group=group, max_new_tokens=max_new_tokens,
        fine_tune=fine_tune, seed=seed, model_path=model_path)
    cfgs = {"ar-opd": cfg, "opd": with_overrides(cfg, train={"method": "opd"})}
    lines, rollout_times, responses = interleaved_steps(cfgs, model, tok, teacher, encoded,
                                                        repeats, seed)
    result = {"model": model_name, "rows": batch * group, "max_new_tokens": max_new_tokens,
              "fine_tune": fine_tune, "repeats": repeats,
              "rollout_seconds": median(rollout_times[1:])}
    for name in cfgs:
        timed = lines[name][1:]
        for phase in ("scoring", "update"):
            result[f"{name}_{phase}_seconds"] = median([l[f"time_{phase}"] for l in timed])
        result[f"{name}_step_seconds"] = (result["rollout_seconds"]
                                          + result[f"{name}_scoring_seconds"]
                                          + result[f"{name}_update_seconds"])
    for phase in ("scoring", "update", "step"):
        result[f"{phase}_ratio"] = ratio(result[f"ar-opd_{phase}_seconds"],
                                         result[f"opd_{phase}_seconds"])
    # the floor set by the work itself: privileged prompts are longer than the student's
    from aropd_mlx.head import head_from_model

    fm, head = FlopModel.of(model), head_from_model(model).weight.size
    flops = {name: sum(step_flops(fm, head, encoded, METHOD_VIEWS[name], group,
                                  list(responses.lengths), fine_tune == "full").values())
             for name in cfgs}
    result["prompt_tokens_mean"] = {v: sum(len(e.prompts[v]) for e in encoded) / len(encoded)
                                    for v in encoded[0].prompts}
    result["flop_ratio"] = ratio(flops["ar-opd"], flops["opd"])
    return result


def step_flops(fm: FlopModel, head_params: int, encoded, views, group: int, resp_lengths,
               weight_grads: bool) -> dict:
    """Useful FLOPs of one step, per phase (see the module docstring). The rollout and the
    teacher's scoring run each prompt once for its whole group (prefix.py); the student's
    update runs prompt + response for every row."""
    body = fm.n_matmul - head_params
    student_p = [len(e.prompts["student"]) for e in encoded for _ in range(group)]
    gen = sum(2 * body * (len(e.prompts["student"]) - 1) for e in encoded)  # prefill, once
    gen += sum(2 * body * t + 2 * head_params * t for t in resp_lengths)  # one position per token
    scoring, teacher_head = 0, 0
    for v in views:  # scoring stops at the hidden states: the fused loss projects them
        scoring += sum(2 * body * len(e.prompts[v]) for e in encoded)
        scoring += sum(2 * body * (t - 1) for t in resp_lengths)
        teacher_head += sum(2 * head_params * t for t in resp_lengths)
    k = 6 if weight_grads else 4
    update = teacher_head + sum(k * body * (p + t - 1) + 4 * head_params * t
                                for p, t in zip(student_p, resp_lengths))
    return {"rollout": gen, "scoring": scoring, "update": update}


def bench_mfu(model_name: str = "56m", method: str = "ar-opd", batch: int = 4, group: int = 2,
              max_new_tokens: int = 64, steps: int = 2, fine_tune: str = "full", seed: int = 0,
              model_path=None, peak_gflops: float | None = None,
              bandwidth_gbs: float | None = None) -> dict:
    """Full training steps; achieved GFLOP/s per phase and as a share of the GEMM peak; the
    rollout also against the memory-bandwidth limit of its decode steps."""
    from aropd_mlx import trainer as tr
    from aropd_mlx.head import head_from_model

    cfg, model, tok, teacher, encoded = setup_run(
        model_name, method, batch=batch, group=group, max_new_tokens=max_new_tokens,
        fine_tune=fine_tune, seed=seed, model_path=model_path)
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    fm = FlopModel.of(model)
    head = head_from_model(model).weight
    measure_peak = (lambda: peak_gflops) if peak_gflops else gemm_peak_gflops
    peaks = [measure_peak()]
    lines = []
    with no_eos(tok):
        for s in range(steps + 1):  # step 0 warms up (compiles) and is dropped
            lines.append(tr.run_step(cfg, model, tok, optimizer, teacher, encoded, s))
    peaks.append(measure_peak())
    peak = max(peaks)
    rows = batch * group
    flops = step_flops(fm, head.size, encoded, METHOD_VIEWS[method], group,
                       [max_new_tokens] * rows, fine_tune == "full")
    timed = lines[1:]
    result = {"model": model_name, "method": method, "fine_tune": fine_tune, "rows": rows,
              "max_new_tokens": max_new_tokens, "steps": steps, "params_matmul": fm.n_matmul,
              "params_total": fm.n_total, "gemm_peak_gflops": peak,
              "gemm_peak_samples": peaks}
    total_t = 0.0
    for phase in PHASES:
        t = median([l[f"time_{phase}"] for l in timed])
        total_t += t
        result[f"{phase}_seconds"] = t
        result[f"{phase}_gflop"] = flops[phase] / 1e9
        result[f"{phase}_gflops"] = flops[phase] / 1e9 / t
        result[f"{phase}_mfu"] = flops[phase] / 1e9 / t / peak
    total = sum(flops.values()) / 1e9
    result.update(step_seconds=total_t, step_gflop=total, step_gflops=total / total_t,
                  mfu=total / total_t / peak)
    # the rollout's physical limit is memory: each decode step reads every matmul weight once
    # (fp32 here) for all rows together; prefill and the KV cache are left out (small here)
    from aropd_mlx.doctor import memory_bandwidth_gbs

    bw = bandwidth_gbs or memory_bandwidth_gbs()
    weight_gb = 4 * fm.n_matmul / 1e9
    limit = max_new_tokens * weight_gb / bw
    result.update(bandwidth_gbs=bw, rollout_weight_gb_per_token=weight_gb,
                  rollout_bandwidth_limit_seconds=limit,
                  rollout_bandwidth_share=limit / result["rollout_seconds"])
    return result


def format_step(r: dict) -> str:
    out = [f"step [{r['model']}] {r['rows']} rows x {r['max_new_tokens']} tokens ({r['fine_tune']}),"
           f" replayed rollout {r['rollout_seconds']:.2f}s"]
    for name in ("ar-opd", "opd"):
        out.append(f"  {name:7} scoring {r[name + '_scoring_seconds']:.2f}s  update "
                   f"{r[name + '_update_seconds']:.2f}s  step {r[name + '_step_seconds']:.2f}s")
    out.append(f"  AR-OPD/OPD: scoring {r['scoring_ratio']:.2f}x  update {r['update_ratio']:.2f}x  "
               f"step {r['step_ratio']:.2f}x (goal <= 1.25x); useful-FLOP ratio "
               f"{r['flop_ratio']:.2f}x (prompt tokens: " + ", ".join(
                   f"{k} {v:.0f}" for k, v in r["prompt_tokens_mean"].items()) + ")")
    return "\n".join(out)


def format_mfu(r: dict) -> str:
    out = [f"MFU [{r['model']} {r['method']} {r['fine_tune']}] {r['rows']} rows x "
           f"{r['max_new_tokens']} tokens, GEMM peak {r['gemm_peak_gflops']:.0f} GFLOP/s"]
    for phase in PHASES:
        out.append(f"  {phase:8} {r[phase + '_seconds']:7.2f}s {r[phase + '_gflop']:8.1f} GFLOP "
                   f"{r[phase + '_gflops']:7.1f} GFLOP/s  {100 * r[phase + '_mfu']:5.1f}%")
    out.append(f"  step     {r['step_seconds']:7.2f}s {r['step_gflop']:8.1f} GFLOP "
               f"{r['step_gflops']:7.1f} GFLOP/s  {100 * r['mfu']:5.1f}% (goal >= 35%)")
    out.append(f"  rollout against memory bandwidth ({r['bandwidth_gbs']:.1f} GB/s measured, "
               f"{r['rollout_weight_gb_per_token']:.3f} GB of weights per decode step): limit "
               f"{r['rollout_bandwidth_limit_seconds']:.2f}s, "
               f"{100 * r['rollout_bandwidth_share']:.1f}% of it (goal >= 50%)")
    return "\n".join(out)
