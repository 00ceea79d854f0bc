"""Naive vs fused AR-OPD loss, forward + backward (value_and_grad w.r.t. student_h), side by
side in one process: peak memory and median wall time.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \
      python -c "from aropd_mlx.bench.objective import *; \
                 print(format_objective_bench(bench_objective()))"
Tiny CPU check: bench_objective(vocab=4096, hidden=64, seq=128).

Memory is measured with mx.reset_peak_memory()/mx.get_peak_memory(); "extra" is the peak
minus the memory already held by the inputs (head weight, hidden states), i.e. what the loss
itself allocates. The ratios use the extra (the inputs are the same for both). Time is wall
clock and process CPU time (the latter is the fairer ratio on a shared, busy machine).
"""

from __future__ import annotations

import gc
import statistics
import time

import mlx.core as mx

from aropd_mlx.fused import fused_loss
from aropd_mlx.head import OutputHead
from aropd_mlx.objective import ObjectiveSettings, naive_loss


def _inputs(vocab, hidden, seq, batch, seed):
    mx.random.seed(seed)
    weight = mx.random.normal((vocab, hidden)) * hidden ** -0.5
    student_h, partial_h, full_h = (mx.random.normal((batch, seq, hidden)) for _ in range(3))
    tokens = mx.random.randint(0, vocab, (batch, seq))
    mask = mx.ones((batch, seq), dtype=mx.int32)
    arrays = (OutputHead(weight), student_h, partial_h, full_h, tokens, mask)
    mx.eval(weight, student_h, partial_h, full_h, tokens, mask)
    return arrays


def _measure(step, repeats):
    """Run step() `repeats` times (+1 warm-up); each run evaluates loss, grad, diagnostics."""
    times, cpus, peaks = [], [], []
    for i in range(repeats + 1):
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        start, cpu = time.perf_counter(), time.process_time()
        mx.eval(step())  # the sync point: loss, diagnostics and gradient together
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        if i > 0 or repeats == 0:
            times.append(elapsed)
            cpus.append(cpu)
            peaks.append(mx.get_peak_memory() - base)
    return statistics.median(times), statistics.median(cpus), max(peaks), base


def bench_objective(vocab=151936, hidden=896, seq=1024, batch=1, chunk_size=None,
                    repeats=2, seed=0) -> dict:
    """AR-OPD (both views, default settings) naive vs fused; returns a dict of numbers."""
    settings = ObjectiveSettings() if chunk_size is None else ObjectiveSettings(
        chunk_size=chunk_size)
    head, student_h, partial_h, full_h, tokens, mask = _inputs(vocab, hidden, seq, batch, seed)

    def naive(h):
        out = naive_loss(head(h), tokens, mask, head(partial_h), head(full_h), settings=settings)
        return out.loss, out.diagnostics

    def fused(h):
        out = fused_loss(h, head, tokens, mask, partial_h, full_h, settings=settings)
        return out.loss, out.diagnostics

    result = {"vocab": vocab, "hidden": hidden, "seq": seq, "batch": batch,
              "chunk_size": settings.chunk_size, "repeats": repeats}
    for name, fn in (("naive", naive), ("fused", fused)):
        grad_fn = mx.value_and_grad(fn)
        secs, cpu, extra, base = _measure(lambda: grad_fn(student_h), repeats)
        result[f"{name}_seconds"] = secs
        result[f"{name}_cpu_seconds"] = cpu
        result[f"{name}_peak_extra_bytes"] = extra
        result[f"{name}_peak_bytes"] = extra + base
    result["inputs_bytes"] = base
    result["time_ratio"] = result["fused_seconds"] / result["naive_seconds"]
    result["cpu_time_ratio"] = result["fused_cpu_seconds"] / result["naive_cpu_seconds"]
    result["memory_ratio"] = result["fused_peak_extra_bytes"] / result["naive_peak_extra_bytes"]
    result["memory_ratio_total"] = result["fused_peak_bytes"] / result["naive_peak_bytes"]
    return result


def format_objective_bench(result: dict) -> str:
    gib = 1024 ** 3
    lines = [
        f"AR-OPD loss fwd+bwd  V={result['vocab']} H={result['hidden']} "
        f"B={result['batch']} T={result['seq']} chunk={result['chunk_size']} "
        f"(median of {result['repeats']})",
        f"{'':12}{'wall s':>9}{'cpu s':>9}{'peak extra GiB':>16}{'peak total GiB':>16}",
    ]
    for name in ("naive", "fused"):
        lines.append(f"{name:12}{result[name + '_seconds']:>9.2f}"
                     f"{result[name + '_cpu_seconds']:>9.2f}"
                     f"{result[name + '_peak_extra_bytes'] / gib:>16.3f}"
                     f"{result[name + '_peak_bytes'] / gib:>16.3f}")
    lines.append(f"{'fused/naive':12}{result['time_ratio']:>9.2f}{result['cpu_time_ratio']:>9.2f}"
                 f"{result['memory_ratio']:>16.3f}{result['memory_ratio_total']:>16.3f}")
    lines.append(f"inputs held: {result['inputs_bytes'] / gib:.3f} GiB "
                 "(goals: time <= 1.3x, peak <= 0.1x)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- top-k teacher

TOP_KS = (16, 64, 100, 256)


def _support_mass(head, teacher_head, partial_h, full_h, tokens, settings, rows=256) -> float:
    """Mean over response tokens of the exact target's mass on the top-k support (1 = the
    support holds the whole target), row block by row block (no rows x V tensor)."""
    from aropd_mlx import objective as obj

    p_all = partial_h.reshape(-1, partial_h.shape[-1])
    f_all = full_h.reshape(-1, full_h.shape[-1])
    tok = tokens.reshape(-1)
    total = 0.0
    for i in range(0, tok.size, rows):
        partial, full, target = obj.teacher_views(teacher_head(p_all[i:i + rows]),
                                                  teacher_head(f_all[i:i + rows]), settings)
        index, keep = obj.top_k_support(partial, full, tok[i:i + rows], settings.teacher_top_k)
        mass = mx.where(keep, mx.exp(mx.take_along_axis(target, index, axis=-1)), 0.0).sum(-1)
        total += float(mass.sum())
    return total / tok.size


def bench_top_k(model_name: str = "lab", ks=TOP_KS, batch: int = 4, group: int = 4,
                max_new_tokens: int = 96, repeats: int = 2, seed: int = 0,
                model_path=None, overrides: dict | None = None) -> dict:
    """The top-k teacher against the exact target on a bench model's own step-0 AR-OPD batch
    (lab prompts, on-policy rollouts without EOS, the teacher's partial and full views): per k,
    the loss's relative difference, the gradient's cosine with the exact gradient and its
    relative norm error, the target mass on the support, and time and peak memory of the fused
    loss + gradient (no diagnostics, as on a non-logging training step). `overrides`: config
    overrides (e.g. {"objective.teacher_temperature": 0.1}: a more peaked target)."""
    from dataclasses import replace

    import numpy as np

    from aropd_mlx import trainer as tr
    from aropd_mlx.bench.common import no_eos
    from aropd_mlx.bench.step import setup_run
    from aropd_mlx.head import head_from_model
    from aropd_mlx.scoring import response_hidden, score_views

    cfg, model, tok, teacher, encoded = setup_run(
        model_name, "ar-opd", batch=batch, group=group, max_new_tokens=max_new_tokens,
        seed=seed, model_path=model_path, extra=overrides)
    with no_eos(tok):
        rows, resp = tr.draw_responses(cfg, model, tok, encoded, 0)
    pad = tok.pad_token_id or 0
    tokens_np = np.array(resp.tokens)
    with teacher.active(model) as scorer:
        views = score_views(scorer, {v: rows[v] for v in ("partial", "full")}, tokens_np,
                            resp.lengths, pad)
        t_head = head_from_model(scorer)
    student_h = mx.stop_gradient(response_hidden(model, rows["student"], tokens_np,
                                                 resp.lengths, pad))
    head = head_from_model(model)
    mx.eval(student_h, views)
    base = replace(tr.objective_for(cfg), teacher_top_k=0)
    result = {"model": model_name, "overrides": overrides or {}, "vocab": head.vocab, "rows": len(resp.lengths),
              "tokens": int(sum(resp.lengths)), "repeats": repeats, "runs": []}
    exact = None
    for k in (0, *ks):
        s = replace(base, teacher_top_k=k)

        def loss(h, s=s):
            return fused_loss(h, head, resp.tokens, resp.mask, views["partial"], views["full"],
                              teacher_head=t_head, settings=s, diagnostics=False).loss
        grad_fn, last = mx.value_and_grad(loss), []

        def step(grad_fn=grad_fn, last=last):
            last[:] = [grad_fn(student_h)]
            return last[0]
        secs, cpu, extra, _ = _measure(step, repeats)
        value, grad = last[0]
        run = {"k": k, "loss": float(value), "seconds": secs, "cpu_seconds": cpu,
               "peak_extra_bytes": extra}
        if exact is None:
            exact = (float(value), grad)
        else:
            g0 = exact[1].reshape(-1)
            g = grad.reshape(-1)
            run["loss_rel_diff"] = abs(float(value) - exact[0]) / abs(exact[0])
            run["grad_cosine"] = float((g * g0).sum() / mx.sqrt((g * g).sum() * (g0 * g0).sum()))
            run["grad_rel_err"] = float(mx.sqrt(((g - g0) ** 2).sum() / (g0 * g0).sum()))
            run["support_mass"] = _support_mass(head, t_head, views["partial"], views["full"],
                                                resp.tokens, s)
            run["time_ratio"] = secs / result["runs"][0]["seconds"]
            run["memory_ratio"] = extra / max(result["runs"][0]["peak_extra_bytes"], 1)
        result["runs"].append(run)
    return result


def format_top_k(result: dict) -> str:
    mib = 1024 ** 2
    extra = "".join(f" {k}={v}" for k, v in result.get("overrides", {}).items())
    lines = [f"top-k teacher vs exact target, {result['model']}{extra} (V={result['vocab']}), "
             f"{result['rows']} rows, {result['tokens']} tokens, fused loss + gradient "
             f"(median of {result['repeats']})",
             f"{'k':>6}{'loss':>10}{'rel diff':>10}{'grad cos':>10}{'grad err':>10}"
             f"{'T mass':>9}{'wall s':>8}{'x exact':>8}{'peak MiB':>10}{'x exact':>8}"]
    for r in result["runs"]:
        if r["k"] == 0:
            lines.append(f"{'exact':>6}{r['loss']:>10.4f}{'':>10}{'':>10}{'':>10}{'':>9}"
                         f"{r['seconds']:>8.3f}{'':>8}{r['peak_extra_bytes'] / mib:>10.1f}")
            continue
        lines.append(f"{r['k']:>6}{r['loss']:>10.4f}{r['loss_rel_diff']:>10.2%}"
                     f"{r['grad_cosine']:>10.4f}{r['grad_rel_err']:>10.2%}"
                     f"{r['support_mass']:>9.4f}{r['seconds']:>8.3f}{r['time_ratio']:>8.2f}"
                     f"{r['peak_extra_bytes'] / mib:>10.1f}{r['memory_ratio']:>8.2f}")
    return "\n".join(lines)
