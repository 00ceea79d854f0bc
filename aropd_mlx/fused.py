"""The memory-bounded AR-OPD loss: hidden states + each view's output head in, LossOutput out.

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

Each view is projected by its own model's head: the student's hidden states by the student's
head, the teacher's views by the teacher's (`teacher_head`; a separate teacher model may have
another hidden size, or another quantization). The teacher's head never gets a gradient.

The student's head gets one only when it trains: a tied embedding under full fine-tuning
(`OutputHead.trainable`), where the naive loss would give the embedding the output side of its
gradient too. The head weight is then a second primal of the custom function, and its
cotangent dW = sum over rows of g_i * dl_i/dz_i (x) h_i depends on the row cotangents g, known
only in the backward: the backward walks the chunks again, recomputing each chunk's logits,
and accumulates (g * dz)^T h_s into one (V, H) float32 array per lane (a second pass over V;
memory: the accumulators plus one chunk, never rows x V). Under full fine-tuning the head
trains, tied or not (models.attach_adapters); a quantized head never trains.

A top-k teacher (`objective.teacher_top_k` = k, 0 < k < V) changes only the loss inside a
chunk: the support top_k(P) | top_k(F) | {y} is found per row from the views, and the target,
the student's renormalized log-probs and the loss run on the gathered (C, 2k + 1) entries
(objective.support_losses); the head projections and their backward stay over V.

Evaluate the LossOutput fields and the gradients in one `mx.eval` (one sync point per step):
an unevaluated diagnostic kept alive past an eval of the loss pins its chunk's inputs.

    python -c "from aropd_mlx.bench.objective import *; \
               print(format_objective_bench(bench_objective(vocab=4096, seq=256)))"
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from aropd_mlx import objective as obj
from aropd_mlx.head import OutputHead, n_arrays, project
from aropd_mlx.objective import LossOutput, ObjectiveSettings


# Diagnostic names in the order the chunk body stacks them, per (has teacher, has full view).
def _diag_names(has_teacher: bool, has_full: bool) -> list[str]:
    names = ["entropy_student", "student_logprob"]
    if has_full:
        names += ["kl_full_partial", "kl_student_partial", "kl_student_full", "clip_rate"]
    if has_teacher:
        names += ["kl_student_target", "top16_overlap", "entropy_target", "target_logprob"]
    return names


_CHUNK_BODIES: dict[tuple, object] = {}


def _loss_of_logits(tokens, partial, full, target, local):
    """logits (C, V) -> per-row losses (C,): exact, or on the top-k teacher's support
    (objective.teacher_top_k > 0): the support is found once from the teacher views (no
    gradient); the target and the loss then run on (C, K) gathered entries, K = 2k + 1,
    instead of (C, V) (the full-vocabulary target is never built unless diagnostics ask)."""
    if not obj.uses_top_k(local, target):
        return lambda logits: obj.token_losses(logits, tokens, target, local)
    index, keep = obj.top_k_support(partial, full, tokens, local.teacher_top_k)
    return lambda logits: obj.support_losses(logits, tokens, partial, full, index, keep, local)


def _chunk_views(settings, keys, has_teacher, has_full, h_s, lam, rest):
    """Inside a chunk body: the student logits z (C, V) and the teacher views (partial, full,
    target), each view projected by its own model's head. `rest` = [h_t], [h_f], the student
    head's arrays, then the teacher head's (none when the teacher uses the student's head).
    The target never carries a gradient: the teacher's head arrays are stop_gradient'ed."""
    student_key, teacher_key = keys
    local = replace(settings, lam=lam)
    n_views = int(has_teacher) + int(has_full)
    n_student = n_arrays(student_key)
    views, s_arrays = rest[:n_views], rest[n_views:n_views + n_student]
    t_arrays = rest[n_views + n_student:] if teacher_key is not None else s_arrays
    t_key = student_key if teacher_key is None else teacher_key
    t_arrays = [mx.stop_gradient(a) for a in t_arrays]
    teacher_logits = project(views[0], t_arrays, t_key) if has_teacher else None
    full_logits = project(views[1], t_arrays, t_key) if has_full else None
    partial, full, target = obj.teacher_views(teacher_logits, full_logits, local)
    z = project(h_s, s_arrays, student_key)  # (C, V) student logits
    return local, s_arrays, z, partial, full, target


def _chunk_body(settings: ObjectiveSettings, keys: tuple, has_teacher: bool,
                has_full: bool, with_diagnostics: bool = True):
    """The compiled per-chunk function, cached per static setup so that equal shapes never
    retrace. Inputs: h_s (C,H), tokens (C,), lam (), [h_t (C,H_t)], [h_f (C,H_t)], the student
    head's arrays, [the teacher head's arrays]. `keys` = (student head key, teacher head key or
    None: the teacher views go through the student's head).
    Outputs: per-row loss (C,), diagnostics (K, C) (K = 0 without diagnostics), per-row
    gradient dl_i/dh_i (C, H).
    lam is an input, not a constant: a lam schedule must not compile a new body every step.
    The diagnostics are extra passes over V (on the CPU backend ~40% of the update at V = 32k,
    BENCHMARKS.md), so the trainer asks for them on logging steps only."""
    # only the static fields the chunk math reads go into the key
    settings = replace(settings, lam=0.0, skip_first_tokens=0, reduction="sequence", chunk_size=1)
    key = (settings, keys, has_teacher, has_full, with_diagnostics)
    if key in _CHUNK_BODIES:
        return _CHUNK_BODIES[key]

    def body(h_s, tokens, lam, *rest):
        local, s_arrays, z, partial, full, target = _chunk_views(
            settings, keys, has_teacher, has_full, h_s, lam, rest)

        row_losses = _loss_of_logits(tokens, partial, full, target, local)
        (losses,), (dz,) = mx.vjp(row_losses, [z], [mx.ones(tokens.shape, mx.float32)])
        grad_h = project(dz.astype(z.dtype), s_arrays, keys[0], False)  # (C, H)
        if not with_diagnostics:
            return losses, mx.zeros((0, tokens.shape[0]), mx.float32), grad_h.astype(mx.float32)
        diags = obj.token_diagnostics(z, tokens, partial, full, target, local)
        names = _diag_names(has_teacher, has_full)
        return losses, mx.stack([diags[n] for n in names]), grad_h.astype(mx.float32)

    compiled = mx.compile(body)
    _CHUNK_BODIES[key] = compiled
    return compiled


def _head_grad_body(settings: ObjectiveSettings, keys: tuple, has_teacher: bool, has_full: bool):
    """The compiled per-chunk head gradient (a trainable student head): inputs acc (V,H)
    float32, h_s (C,H), tokens (C,), lam (), g (C,) the cotangent of each row's loss, then as
    `_chunk_body`; output acc + (g * dl/dz)^T h_s. The chunk's logits are recomputed here (a
    second pass over V), so nothing of size rows x V is kept between forward and backward."""
    settings = replace(settings, lam=0.0, skip_first_tokens=0, reduction="sequence", chunk_size=1)
    key = ("head_grad", settings, keys, has_teacher, has_full)
    if key in _CHUNK_BODIES:
        return _CHUNK_BODIES[key]

    def body(acc, h_s, tokens, lam, g, *rest):
        local, _, z, partial, full, target = _chunk_views(
            settings, keys, has_teacher, has_full, h_s, lam, rest)
        weigh = g != 0  # rows nobody weighs add exactly nothing (even a NaN there)
        _, (dz,) = mx.vjp(_loss_of_logits(tokens, partial, full, target, local), [z],
                          [mx.where(weigh, g, 0.0).astype(mx.float32)])
        dz = mx.where(weigh[:, None], dz, 0.0).astype(mx.float32)  # (C, V)
        h = mx.where(weigh[:, None], h_s, 0.0).astype(mx.float32)  # (C, H)
        return mx.addmm(acc, dz.T, h)  # (V, H)

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


def _layout(n_rows: int, chunk: int) -> tuple[list, int, int]:
    """(lanes, rows per chunk, number of chunks). With two lanes each chunk is half of `chunk`
    rows, so the rows over V in flight, and the peak memory, stay the same."""
    lanes = _lanes()[: None if chunk > 1 else 1]  # one row per chunk: nothing to halve
    chunk = -(-chunk // len(lanes))
    return lanes, chunk, -(-n_rows // chunk)


def _run_chunks(body, student_h, tokens, lam, views, head_arrays, chunk):
    """Apply `body` chunk by chunk; returns per-row losses (N,), diagnostics (K, N) and
    per-row gradients (N, H). The chunks alternate over the lanes (streams); each chunk's
    inputs depend on the outputs of its lane's previous chunk (mx.depends, no arithmetic), so
    a lazy eval walks each lane in order, one chunk per lane at a time."""
    n_rows = tokens.size
    lanes, chunk, n_chunks = _layout(n_rows, chunk)
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


def _head_grad(body, student_h, tokens, lam, g, views, head_arrays, chunk) -> mx.array:
    """(V, H) float32 gradient of the rows' losses (cotangent g (N,)) w.r.t. the student head,
    accumulated chunk by chunk: one (V, H) accumulator per lane, each lane in order (every
    chunk's output is its lane's next accumulator), no rows x V tensor outliving a chunk."""
    n_rows = tokens.size
    lanes, chunk, n_chunks = _layout(n_rows, chunk)
    h_s = _rows(student_h, n_chunks, chunk)
    tok = _rows(tokens.astype(mx.int32), n_chunks, chunk)
    g_rows = _rows(g.astype(mx.float32).reshape(1, -1), n_chunks, chunk)  # padding: g = 0
    view_rows = [_rows(v, n_chunks, chunk) for v in views]
    shape = (head_arrays[0].shape[0], student_h.shape[-1])
    acc = [None] * len(lanes)
    for i in range(n_chunks):
        lane = i % len(lanes)
        with mx.stream(lanes[lane]):
            start = mx.zeros(shape, mx.float32) if acc[lane] is None else acc[lane]
            acc[lane] = body(start, h_s[i], tok[i], lam, g_rows[i], *(v[i] for v in view_rows),
                             *head_arrays)
    total = acc[0]
    for a in acc[1:]:
        total = total if a is None else total + a
    return total


def _same_arrays(a: OutputHead, b: OutputHead) -> bool:
    """The same head (the self-teacher's, when only adapters train): project through one."""
    return a.static_key() == b.static_key() and all(
        x is y for x, y in zip(a.arrays(), b.arrays()))


def fused_loss(student_h: mx.array, head: OutputHead, tokens: mx.array, mask: mx.array,
               teacher_h: mx.array | None = None, full_h: mx.array | None = None, *,
               teacher_head: OutputHead | None = None,
               settings: ObjectiveSettings | None = None,
               diagnostics: bool = True) -> LossOutput:
    """Equal to naive_loss(head(student_h), tokens, mask, teacher_head(teacher_h),
    teacher_head(full_h)) with peak memory of one chunk of rows over the vocabulary.

    Each view goes through its own model's head: `head` projects the student's hidden states,
    `teacher_head` (default: `head`, the self-teacher's case) the teacher's views, whose
    hidden size may differ from the student's. student_h (B, T, H) carries the gradient, and
    so does `head.weight` when `head.trainable` (a tied embedding under full fine-tuning: the
    output side of its gradient); teacher_h (the anchor, or the only teacher view), full_h and
    the teacher's head get none (the target is a constant).
    `diagnostics=False`: the same loss and gradient, no per-token diagnostics (an empty dict),
    and none of their passes over the vocabulary."""
    settings = settings or ObjectiveSettings()
    settings.validate()
    if full_h is not None and teacher_h is None:
        raise ValueError("full_h needs teacher_h (the anchor / partial view)")
    if settings.loss_type != "nll" and teacher_h is None:
        raise ValueError(f"loss_type {settings.loss_type!r} needs teacher_h")
    if teacher_head is not None and teacher_head.vocab != head.vocab:
        raise ValueError(f"teacher head vocabulary {teacher_head.vocab} != student's {head.vocab}")
    batch, length = tokens.shape
    has = (teacher_h is not None, full_h is not None)
    names = _diag_names(*has) if diagnostics else []
    if batch * length == 0:  # nothing to score: zeros of the right shapes, loss 0, weight 0
        zeros = mx.zeros((batch, length), mx.float32)
        return obj.finish(zeros, {n: zeros for n in names}, mask, settings)
    views = [mx.stop_gradient(v) for v in (teacher_h, full_h) if v is not None]
    separate = has[0] and teacher_head is not None and not _same_arrays(teacher_head, head)
    keys = (head.static_key(), teacher_head.static_key() if separate else None)
    teacher_arrays = [mx.stop_gradient(a) for a in teacher_head.arrays()] if separate else []
    body = _chunk_body(settings, keys, *has, diagnostics)
    chunk = max(1, min(chunk_rows(settings.chunk_size, head.vocab), batch * length))
    lam = mx.array(settings.lam, dtype=mx.float32)

    def per_row_grad(g, grad_rows):  # g (N,) cotangent of each row's loss
        grad = mx.where(g[:, None] != 0, g[:, None] * grad_rows, 0.0)  # unweighed rows: 0
        return grad.reshape(student_h.shape).astype(student_h.dtype)

    if not head.trainable:
        student_arrays = [mx.stop_gradient(a) for a in head.arrays()]

        @mx.custom_function
        def rows(h):
            return _run_chunks(body, h, tokens, lam, views, student_arrays + teacher_arrays, chunk)

        @rows.vjp
        def rows_vjp(primals, cotangents, outputs):  # one primal: handed over as the array
            return per_row_grad(cotangents[0], outputs[2])

        per_row, diag_rows, _ = rows(student_h)
    else:
        grad_body = _head_grad_body(settings, keys, *has)

        @mx.custom_function
        def rows_and_head(h, w):
            return _run_chunks(body, h, tokens, lam, views, [w] + teacher_arrays, chunk)

        @rows_and_head.vjp
        def rows_and_head_vjp(primals, cotangents, outputs):
            h, w = primals
            grad_w = _head_grad(grad_body, h, tokens, lam, cotangents[0], views,
                                [w] + teacher_arrays, chunk)
            return per_row_grad(cotangents[0], outputs[2]), grad_w.astype(w.dtype)

        per_row, diag_rows, _ = rows_and_head(student_h, head.weight)
    diags = {n: diag_rows[i].reshape(batch, length) for i, n in enumerate(names)}
    return obj.finish(per_row.reshape(batch, length), diags, mask, settings)
