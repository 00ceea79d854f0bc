"""The objective's CPU speed tricks, each beside the plain-MLX reference it must equal.

As mlx-lm's `tuner/losses.py` keeps each Metal kernel beside a plain reference with the same
signature, this file keeps the objective's fast paths apart from its math: `objective.py`
calls `exp` and `logsumexp` and reads like METHOD.md's formulas; tests/test_fastmath.py checks
each against its `*_reference` twin (values and VJPs, several shapes, -inf entries).

Why: on MLX's CPU backend `mx.exp` costs ~11.7 ns per element on x86 while `mx.power(2, x)`
costs ~4.3 (docs/BENCHMARKS.md), and the loss spends most of its elementwise time in e^x over
the vocabulary. On a GPU, and over a short last axis, the references are used as they are.

    from aropd_mlx.fastmath import exp, logsumexp   # drop-in for mx.exp / mx.logsumexp(-1, keepdims)
"""

from __future__ import annotations

import mlx.core as mx

LOG2E = 1.4426950408889634
FAST_MIN_LAST_AXIS = 1024  # below this the extra ops cost more than they save (V = 99: 1.5x slower)


def fast_cpu_path(x: mx.array) -> bool:
    """2^(x log2 e) pays on the CPU over a vocabulary-sized last axis; over a small one its
    extra ops cost more than they save (V = 99: 1.5x slower; V = 4096: 1.47x faster)."""
    return mx.default_device() == mx.cpu and x.ndim > 0 and x.shape[-1] >= FAST_MIN_LAST_AXIS


# ----------------------------------------------------------------------------- references

def exp_reference(x: mx.array) -> mx.array:
    """e^x, elementwise."""
    return mx.exp(x)


def logsumexp_reference(x: mx.array) -> mx.array:
    """log sum_v e^x over the last axis, kept."""
    return mx.logsumexp(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- fast twins

def exp(x: mx.array) -> mx.array:
    """e^x. On the CPU over a last axis of FAST_MIN_LAST_AXIS or more it is 2^(x log2 e): the
    same value within ~1e-6 relative (mx.exp's own error is of that size), 0 at -inf, inf at
    +inf, and the same gradient (e^x). Elsewhere `exp_reference`."""
    if fast_cpu_path(x):
        return mx.power(2.0, x * LOG2E)
    return exp_reference(x)


def logsumexp(x: mx.array) -> mx.array:
    """`logsumexp_reference` through the fast `exp`. A row of -inf gives -inf, a row with +inf
    gives +inf, as mx.logsumexp does; the gradient is the softmax."""
    if not fast_cpu_path(x):
        return logsumexp_reference(x)
    top = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    top = mx.where(mx.isinf(top), 0.0, top)  # all -inf (or an inf): shift by 0, exp decides
    return top + mx.log(exp(x - top).sum(axis=-1, keepdims=True))
