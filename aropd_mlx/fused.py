"""The memory-bounded AR-OPD loss: hidden states + the frozen output head in, LossOutput out.

Why: at V = 151,936 one fp32 (T, V) logits tensor is 0.6 GB per sequence, and the naive loss
holds the student, partial, full and target tensors plus their softmaxes and gradient at once.
`fused_loss` walks the B*T rows in chunks of `settings.chunk_size` and, per chunk, computes
the three head projections, the per-token loss, the diagnostics *and* the gradient of each
row's loss with respect to its own hidden state (dl_i/dh_i, a (C, H) array). Only per-row
results leave a chunk, so nothing of size T x V outlives it.

The gradient trick: row i's loss depends on student_h[i] alone, so the vector-Jacobian product
of the per-token losses with cotangent g is exactly g[i] * dl_i/dh_i. The custom VJP therefore
scales the per-row gradients saved by the forward instead of recomputing the chunks; that
costs one (C, V) x (V, H) matmul per chunk in the forward (also when no gradient is asked)
and saves re-running three head projections in the backward. Same FLOPs as the naive
forward + backward.

Evaluate the LossOutput fields and the gradients in one `mx.eval` (one sync point per step):
an unevaluated diagnostic kept alive past an eval of the loss pins its chunk's inputs.

    python -c "from aropd_mlx.bench.objective import *; \
               print(format_objective_bench(bench_objective(vocab=4096, seq=256)))"
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx

from aropd_mlx import objective as obj
from aropd_mlx.objective import LossOutput, ObjectiveSettings


@dataclass(frozen=True)
class OutputHead:
    """The frozen output projection: logits = h @ W.T, W float (V, H) or mx.quantize'd."""

    weight: mx.array  # (V, H) float, or packed (V, H * bits / 32) uint32 when quantized
    scales: mx.array | None = None  # quantized head when not None
    biases: mx.array | None = None
    group_size: int = 64
    bits: int = 4
    mode: str = "affine"

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    def __call__(self, h: mx.array) -> mx.array:  # (..., H) -> (..., V)
        if not self.quantized:
            return h @ self.weight.T
        return mx.quantized_matmul(h, self.weight, self.scales, self.biases, transpose=True,
                                   group_size=self.group_size, bits=self.bits, mode=self.mode)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.weight, self.scales, self.biases) if a is not None]

    def static_key(self) -> tuple:
        return (self.quantized, self.biases is not None, self.group_size, self.bits, self.mode)


def _project(h, arrays, key, transpose):
    """head(h) (transpose=True) or h @ W (transpose=False: the backward of the head)."""
    quantized, has_biases, group_size, bits, mode = key
    if not quantized:
        return h @ arrays[0].T if transpose else h @ arrays[0]
    biases = arrays[2] if has_biases else None
    return mx.quantized_matmul(h, arrays[0], arrays[1], biases, transpose=transpose,
                               group_size=group_size, bits=bits, mode=mode)


# Diagnostic names in the order the chunk body stacks them, per (has teacher, has full view).
def _diag_names(has_teacher: bool, has_full: bool) -> list[str]:
    names = ["entropy_student", "student_logprob"]
    if has_full:
        names += ["kl_full_partial", "kl_student_partial", "kl_student_full", "clip_rate"]
    if has_teacher:
        names += ["kl_student_target", "top16_overlap", "entropy_target", "target_logprob"]
    return names


_CHUNK_BODIES: dict[tuple, object] = {}


def _chunk_body(settings: ObjectiveSettings, head_key: tuple, has_teacher: bool,
                has_full: bool, with_diagnostics: bool = True):
    """The compiled per-chunk function, cached per static setup so that equal shapes never
    retrace. Inputs: h_s (C,H), tokens (C,), lam (), [h_t (C,H)], [h_f (C,H)], *head arrays.
    Outputs: per-row loss (C,), diagnostics (K, C) (K = 0 without diagnostics), per-row
    gradient dl_i/dh_i (C, H).
    lam is an input, not a constant: a lam schedule must not compile a new body every step.
    The diagnostics are extra passes over V (on the CPU backend ~40% of the update at V = 32k,
    BENCHMARKS.md), so the trainer asks for them on logging steps only."""
    # only the static fields the chunk math reads go into the key
    settings = replace(settings, lam=0.0, skip_first_tokens=0, reduction="sequence", chunk_size=1)
    key = (settings, head_key, has_teacher, has_full, with_diagnostics)
    if key in _CHUNK_BODIES:
        return _CHUNK_BODIES[key]

    def body(h_s, tokens, lam, *rest):
        local = replace(settings, lam=lam)
        n_views = int(has_teacher) + int(has_full)
        views, head_arrays = rest[:n_views], rest[n_views:]
        teacher_logits = _project(views[0], head_arrays, head_key, True) if has_teacher else None
        full_logits = _project(views[1], head_arrays, head_key, True) if has_full else None
        partial, full, target = obj.teacher_views(teacher_logits, full_logits, local)
        z = _project(h_s, head_arrays, head_key, True)  # (C, V) student logits

        def row_losses(logits):
            return obj.token_losses(logits, tokens, target, local)

        (losses,), (dz,) = mx.vjp(row_losses, [z], [mx.ones(tokens.shape, mx.float32)])
        grad_h = _project(dz.astype(z.dtype), head_arrays, head_key, False)  # (C, H)
        if not with_diagnostics:
            return losses, mx.zeros((0, tokens.shape[0]), mx.float32), grad_h.astype(mx.float32)
        diags = obj.token_diagnostics(z, tokens, partial, full, target, local)
        names = _diag_names(has_teacher, has_full)
        return losses, mx.stack([diags[n] for n in names]), grad_h.astype(mx.float32)

    compiled = mx.compile(body)
    _CHUNK_BODIES[key] = compiled
    return compiled


def _rows(x: mx.array, n_chunks: int, chunk: int) -> mx.array:
    """(B, T, ...) -> rows, zero-padded to n_chunks*chunk, split as (n_chunks, chunk, ...)."""
    flat = x.reshape(-1, *x.shape[2:])
    pad = n_chunks * chunk - flat.shape[0]
    if pad:
        flat = mx.concatenate([flat, mx.zeros((pad, *flat.shape[1:]), flat.dtype)])
    return flat.reshape(n_chunks, chunk, *flat.shape[1:])


REFERENCE_VOCAB = 32768  # objective.chunk_size counts rows at this vocabulary size or larger


def chunk_rows(chunk_size: int, vocab: int) -> int:
    """Rows per chunk: `chunk_size` at V >= REFERENCE_VOCAB, proportionally more below it, so
    a chunk never holds more logits than chunk_size x REFERENCE_VOCAB and a small vocabulary
    does not pay per-chunk overhead (the lab's V = 99 at 64 rows per chunk: 288 ms for 2560
    rows; at 512 rows: 24 ms)."""
    return chunk_size * max(1, REFERENCE_VOCAB // max(vocab, 1))


_CPU_LANES: list = []


def _lanes() -> list:
    """The streams chunks alternate over. MLX's CPU backend runs an elementwise op on one
    thread, and the chunk body is mostly elementwise work over V; two CPU streams run two
    chunks at once (exp over (256, 32000) twice: 0.195 s on one stream, 0.097 s on two, on a
    2-core machine). On a GPU one stream already fills the device."""
    if mx.default_device() != mx.cpu:
        return [mx.default_stream(mx.default_device())]
    if not _CPU_LANES:  # made once: a new stream is a new thread
        _CPU_LANES.append(mx.new_stream(mx.cpu))
    return [mx.default_stream(mx.cpu), _CPU_LANES[0]]


def _run_chunks(body, student_h, tokens, lam, views, head_arrays, chunk):
    """Apply `body` chunk by chunk; returns per-row losses (N,), diagnostics (K, N) and
    per-row gradients (N, H). The chunks alternate over the lanes (streams); each chunk's
    inputs depend on the outputs of its lane's previous chunk (mx.depends, no arithmetic), so
    a lazy eval walks each lane in order, one chunk per lane at a time. With two lanes each
    chunk is half of `chunk` rows, so the rows in flight, and the peak memory, stay the same."""
    n_rows = tokens.size
    lanes = _lanes()[: None if chunk > 1 else 1]  # one row per chunk: nothing to halve
    chunk = -(-chunk // len(lanes))  # `chunk` rows over V in flight in all, whatever the lanes
    n_chunks = -(-n_rows // chunk)
    h_s = _rows(student_h, n_chunks, chunk)
    tok = _rows(tokens.astype(mx.int32), n_chunks, chunk)
    view_rows = [_rows(v, n_chunks, chunk) for v in views]
    losses, diags, grads = [], [], []
    previous = [None] * len(lanes)
    for i in range(n_chunks):
        lane = i % len(lanes)
        inputs = [h_s[i], tok[i], lam, *(v[i] for v in view_rows)]
        if previous[lane] is not None:
            inputs = mx.depends(inputs, previous[lane])
        with mx.stream(lanes[lane]):
            out = body(*inputs, *head_arrays)
        losses.append(out[0])
        diags.append(out[1])
        grads.append(out[2])
        previous[lane] = list(out)
    cat = mx.concatenate
    return cat(losses)[:n_rows], cat(diags, axis=1)[:, :n_rows], cat(grads)[:n_rows]


def fused_loss(student_h: mx.array, head: OutputHead, tokens: mx.array, mask: mx.array,
               teacher_h: mx.array | None = None, full_h: mx.array | None = None, *,
               settings: ObjectiveSettings | None = None,
               diagnostics: bool = True) -> LossOutput:
    """Equal to naive_loss(head(student_h), tokens, mask, head(teacher_h), head(full_h)) with
    peak memory of one chunk of rows over the vocabulary. student_h (B, T, H) carries the
    gradient; teacher_h (the anchor, or the only teacher view) and full_h get none.
    `diagnostics=False`: the same loss and gradient, no per-token diagnostics (an empty dict),
    and none of their passes over the vocabulary."""
    settings = settings or ObjectiveSettings()
    settings.validate()
    if full_h is not None and teacher_h is None:
        raise ValueError("full_h needs teacher_h (the anchor / partial view)")
    if settings.loss_type != "nll" and teacher_h is None:
        raise ValueError(f"loss_type {settings.loss_type!r} needs teacher_h")
    batch, length = tokens.shape
    names = _diag_names(teacher_h is not None, full_h is not None) if diagnostics else []
    if batch * length == 0:  # nothing to score: zeros of the right shapes, loss 0, weight 0
        zeros = mx.zeros((batch, length), mx.float32)
        return obj.finish(zeros, {n: zeros for n in names}, mask, settings)
    views = [mx.stop_gradient(v) for v in (teacher_h, full_h) if v is not None]
    head_arrays = [mx.stop_gradient(a) for a in head.arrays()]
    body = _chunk_body(settings, head.static_key(), teacher_h is not None, full_h is not None,
                       diagnostics)
    chunk = max(1, min(chunk_rows(settings.chunk_size, head.weight.shape[0]), batch * length))
    lam = mx.array(settings.lam, dtype=mx.float32)

    @mx.custom_function
    def rows(h):
        return _run_chunks(body, h, tokens, lam, views, head_arrays, chunk)

    @rows.vjp
    def rows_vjp(primals, cotangents, outputs):
        # one primal: mlx hands `primals` over as the array itself
        g = cotangents[0][:, None]  # (N, 1) cotangent of each row's loss
        grad = mx.where(g != 0, g * outputs[2], 0.0)  # rows nobody weighs stay exactly 0
        return grad.reshape(student_h.shape).astype(student_h.dtype)

    per_row, diag_rows, _ = rows(student_h)
    diags = {n: diag_rows[i].reshape(batch, length) for i, n in enumerate(names)}
    return obj.finish(per_row.reshape(batch, length), diags, mask, settings)
