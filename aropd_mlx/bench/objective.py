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
