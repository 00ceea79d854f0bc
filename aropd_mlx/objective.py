"""The AR-OPD objective as pure functions over mx.arrays (METHOD.md, "The anchored residual
target" and "The distillation loss").

Everything here works on materialized logits `(..., V)`; `naive_loss` is the plain reference
on `(B, T, V)` tensors. The memory-bounded twin that never holds more than one chunk of rows
over the vocabulary is `aropd_mlx.fused.fused_loss`; it reuses `token_losses` and
`token_diagnostics` from this file on `(C, V)` chunks so the two cannot drift apart.

Shapes: B sequences, T response positions (responses start at position 0), V vocabulary.
All math runs in float32 (bf16/fp16 inputs are upcast), whatever the model dtype. `exp` and
`logsumexp` are e^x and log sum e^x over the last axis; their CPU speed tricks live in
`aropd_mlx.fastmath`, each beside its plain-MLX reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx

from aropd_mlx.errors import UserError
from aropd_mlx.fastmath import exp, logsumexp  # e^x and log-sum-exp (fast CPU paths; references there)

LOSS_TYPES = ("full_vocab", "sampled_kl", "advantage", "nll")
REDUCTIONS = ("sequence", "token")
TOPK_OVERLAP = 16
SAMPLED_KL_LINEAR_FROM = 50.0  # sampled_kl's exp(d) - d - 1 is continued linearly above this d
# log-probs are floored here before the residual F - P so that entries that are -inf in both
# views give r = 0 instead of NaN; e^(-1e30) is exactly 0, so nothing else changes.
_LOGPROB_FLOOR = -1e30


@dataclass(frozen=True)
class ObjectiveSettings:
    """The single source of the objective's defaults (config.py reuses it)."""

    lam: float = 0.8
    clip: float | None = 5.0  # None = no clip
    alpha: float = 0.0  # 0 forward KL(T||S) (paper), 1 reverse KL(S||T), between: JSD
    loss_type: str = "full_vocab"  # full_vocab | sampled_kl | advantage | nll
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    skip_first_tokens: int = 3
    reduction: str = "sequence"  # sequence | token
    # rows (tokens) per chunk in the fused loss: about 29 fp32 (chunk, V) buffers live at once
    # (1.1 GB at V = 152k); 64 took ~10% more CPU time than 128 (T = 256) for half the memory
    chunk_size: int = 64  # fused loss: rows per chunk at V >= 32768 (more rows below: fused.chunk_rows)
    # 0: the target over the whole vocabulary (exact). k > 0: a top-k teacher: per row the
    # loss is scored on the support top_k(P) | top_k(F) | {sampled token}, target and student
    # both renormalized there (see `top_k_support`, METHOD.md "A top-k teacher")
    teacher_top_k: int = 0

    def validate(self) -> None:
        """Raise `UserError` naming the first out-of-range field."""
        checks = [
            ("lam", self.lam >= 0 and math.isfinite(self.lam), "a finite number >= 0"),
            ("clip", self.clip is None or (self.clip > 0 and not math.isnan(self.clip)),
             "> 0 or null (no clip)"),
            ("alpha", 0.0 <= self.alpha <= 1.0, "between 0 and 1"),
            ("loss_type", self.loss_type in LOSS_TYPES, f"one of {', '.join(LOSS_TYPES)}"),
            ("student_temperature", self.student_temperature > 0, "> 0"),
            ("teacher_temperature", self.teacher_temperature > 0, "> 0"),
            ("skip_first_tokens", _is_int(self.skip_first_tokens) and self.skip_first_tokens >= 0,
             "an integer >= 0"),
            ("reduction", self.reduction in REDUCTIONS, f"one of {', '.join(REDUCTIONS)}"),
            ("chunk_size", _is_int(self.chunk_size) and self.chunk_size >= 1, "an integer >= 1"),
            ("teacher_top_k", _is_int(self.teacher_top_k) and self.teacher_top_k >= 0,
             "an integer >= 0 (0: the whole vocabulary)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise UserError(f"objective.{name} must be {want}, got {getattr(self, name)!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class LossOutput:
    loss: mx.array  # () scalar
    weight: mx.array  # () sequences (or tokens) behind `loss`; combine as sum(l*w)/sum(w)
    per_token: mx.array  # (B, T), zero where masked (after skip_first_tokens)
    diagnostics: dict[str, mx.array] = field(default_factory=dict)  # each (B, T), no grad


# ----------------------------------------------------------------------------- basic pieces

def _f32(x: mx.array) -> mx.array:
    return x if x.dtype in (mx.float32, mx.float64) else x.astype(mx.float32)


def log_softmax(logits: mx.array, temperature: float = 1.0) -> mx.array:
    """log_softmax over the last axis, in float32, after dividing by `temperature`."""
    x = _f32(logits)
    if temperature != 1.0:
        x = x / temperature
    return x - logsumexp(x)


def _masked_sum(p: mx.array, value: mx.array) -> mx.array:
    """sum_v p * value, where entries with p == 0 contribute exactly 0 (also in the gradient,
    even where value is +-inf: the inner where keeps inf out of the product)."""
    live = p > 0
    return mx.where(live, p * mx.where(live, value, 0.0), 0.0).sum(axis=-1)


def kl_divergence(p_logprobs: mx.array, q_logprobs: mx.array) -> mx.array:
    """KL(p || q) = sum_v e^p (p - q) over the last axis; 0*log0 = 0."""
    return _masked_sum(exp(p_logprobs), p_logprobs - q_logprobs)


def entropy(logprobs: mx.array) -> mx.array:
    return -_masked_sum(exp(logprobs), logprobs)


def gather_last(x: mx.array, index: mx.array) -> mx.array:
    """x[..., index] for integer index of shape x.shape[:-1]."""
    return mx.take_along_axis(x, index[..., None].astype(mx.int32), axis=-1)[..., 0]


# ----------------------------------------------------------------------------- the target

def _anchored_from_logprobs(partial: mx.array, full: mx.array, lam: float,
                            clip: float | None) -> mx.array:
    """log_softmax(P + lam * clip(F - P, -clip, clip)) from the views' log-probs P and F.

    Entries that are -inf in a view (a token that view rules out) are taken at their limits:
    - with a clip, the residual is bounded: where P = -inf the target is -inf (the anchor's
      support is kept), where only F = -inf it is P - lam * clip;
    - without a clip, P + lam (F - P) = (1 - lam) P + lam F: lam = 0 gives P and lam = 1 gives
      F exactly; any other lam rules out every token that either view rules out (for lam > 1
      the literal formula would give a token the anchor rules out an infinite weight). A row
      where the two views share no token has no such mixture: its target is the anchor.
    """
    p = mx.maximum(partial, _LOGPROB_FLOOR)
    f = mx.maximum(full, _LOGPROB_FLOOR)
    if clip is not None:
        return log_softmax(p + lam * mx.clip(f - p, -clip, clip))
    scalar = isinstance(lam, (int, float))  # else an array: the fused loss's compiled chunk
    if scalar and lam in (0.0, 1.0):  # exactly P or F, even where the other view is -inf
        return log_softmax(f if lam == 1.0 else p)
    shared = (p > _LOGPROB_FLOOR) & (f > _LOGPROB_FLOOR)
    mixed = mx.where(shared, (1.0 - lam) * p + lam * f, _LOGPROB_FLOOR)
    out = mx.where(shared.any(axis=-1, keepdims=True), mixed, p)
    if not scalar:  # the same two exact ends, chosen in the graph (no Python test of an array)
        out = mx.where(lam == 0.0, p, mx.where(lam == 1.0, f, out))
    return log_softmax(out)


def anchored_residual_target(partial_logits: mx.array, full_logits: mx.array,
                             lam: float = 0.8, clip: float | None = 5.0) -> mx.array:
    """T = log_softmax(P + lam * clip(F - P, -clip, clip)) over the last axis, where P and F
    are the log_softmax of the partial view (the anchor) and of the full view."""
    return _anchored_from_logprobs(log_softmax(partial_logits), log_softmax(full_logits),
                                   lam, clip)


def clip_rate(partial: mx.array, full: mx.array, clip: float | None) -> mx.array:
    """Share of vocabulary entries where the clip on the residual F - P is active."""
    if clip is None:
        return mx.zeros(partial.shape[:-1], dtype=mx.float32)
    r = mx.maximum(full, _LOGPROB_FLOOR) - mx.maximum(partial, _LOGPROB_FLOOR)
    return (mx.abs(r) > clip).sum(axis=-1).astype(mx.float32) / r.shape[-1]  # no float copy


def teacher_views(teacher_logits, full_logits, settings):
    """(P, F, T): the teacher view(s) as log-probs at the teacher temperature and the target.
    Without a full view, F is None and T is P (single-view distillation)."""
    if teacher_logits is None:
        if full_logits is not None:
            raise ValueError("full_logits needs teacher_logits (the anchor / partial view)")
        return None, None, None
    tau = settings.teacher_temperature
    partial = log_softmax(teacher_logits, tau)
    if full_logits is None:
        return partial, None, partial
    full = log_softmax(full_logits, tau)
    return partial, full, _anchored_from_logprobs(partial, full, settings.lam, settings.clip)


def target_logprobs(teacher_logits: mx.array, full_logits: mx.array | None = None, *,
                    settings: ObjectiveSettings) -> mx.array:
    """The distillation target T (no gradient): log_softmax(teacher/tau) without a full view,
    else the anchored residual target with the teacher (partial view) as the anchor."""
    return mx.stop_gradient(teacher_views(teacher_logits, full_logits, settings)[2])


# ----------------------------------------------------------------------------- divergence

def generalized_jsd(student_logits: mx.array, target_logprobs: mx.array,
                    alpha: float) -> mx.array:
    """Generalized JSD per position over the last axis (shape = input shape[:-1]).

    alpha = 0: KL(T||S); alpha = 1: KL(S||T); else alpha*KL(T||M) + (1-alpha)*KL(S||M) with
    M = log(alpha e^T + (1-alpha) e^S). Note the endpoints are not the limits of the mixture:
    as alpha -> 0 the JSD tends to 0 like alpha*KL(T||S) (see METHOD.md, TRL's convention).
    """
    s = log_softmax(student_logits)
    # a target entry of -inf where the student has mass makes KL(S||T) infinite and its
    # gradient NaN; the floor keeps both finite (huge) so one such token cannot NaN a step
    t = mx.maximum(_f32(target_logprobs), _LOGPROB_FLOOR)
    d = t - s  # (..., V) log-ratio T - S
    if alpha == 0.0:
        return _masked_sum(exp(t), d)
    if alpha == 1.0:
        return _masked_sum(exp(s), -d)
    log_a, log_b = math.log(alpha), math.log1p(-alpha)
    p_t, p_s = exp(t), exp(s)
    # M - T and M - S computed from d directly (not as M minus a large log-prob), which keeps
    # the tiny differences accurate when alpha is close to 0 or 1.
    d_t = mx.where(p_t > 0, d, 0.0)
    d_s = mx.where(p_s > 0, d, 0.0)
    m_minus_t = mx.logaddexp(mx.array(log_a, mx.float32), log_b - d_t)
    m_minus_s = mx.logaddexp(log_a + d_s, mx.array(log_b, mx.float32))
    kl_t_m = -_masked_sum(p_t, m_minus_t)
    kl_s_m = -_masked_sum(p_s, m_minus_s)
    return alpha * kl_t_m + (1.0 - alpha) * kl_s_m


# ----------------------------------------------------------------------------- per token

def token_losses(student_logits: mx.array, tokens: mx.array, target: mx.array | None,
                 settings: ObjectiveSettings) -> mx.array:
    """Per-position loss (shape = student_logits.shape[:-1]) for settings.loss_type.
    `target` is T (log-probs, no gradient); None only for "nll"."""
    kind = settings.loss_type
    if kind != "nll" and target is None:
        raise ValueError(f"loss_type {kind!r} needs a teacher view")
    z = _f32(student_logits)
    if settings.student_temperature != 1.0:
        z = z / settings.student_temperature
    if kind == "full_vocab":
        return generalized_jsd(z, mx.stop_gradient(target), settings.alpha)
    s_y = gather_last(log_softmax(z), tokens)
    if kind == "nll":
        return -s_y
    d = mx.stop_gradient(gather_last(target, tokens)) - s_y
    if kind == "sampled_kl":
        # exp(d) - d - 1 (expm1: no cancellation near 0), continued linearly past d = cap
        # (a value beyond 5e21) so that fp32 never reaches inf and 0 * inf never NaNs a grad
        cap = SAMPLED_KL_LINEAR_FROM
        low = mx.minimum(d, cap)
        return mx.expm1(low) - low + mx.maximum(d - cap, 0.0) * math.expm1(cap)
    return -mx.stop_gradient(d) * s_y  # "advantage"


# ----------------------------------------------------------------------------- top-k teacher

def top_k_support(partial: mx.array, full: mx.array | None, tokens: mx.array,
                  k: int) -> tuple[mx.array, mx.array]:
    """The top-k teacher's support per row: top_k(P) | top_k(F) | {y} (F absent: top_k(P) |
    {y}), as (index, keep): index (..., K) int32 sorted ascending, K = 2k + 1 (k + 1 without
    F, k capped at V), keep (..., K) bool, False on the repeats of an index (each vocabulary
    entry counts once). top_k takes exactly k entries of each view (mx.argpartition: at a tie
    on the k-th value, which of the tied entries is implementation-defined)."""
    k = min(k, partial.shape[-1])
    parts = [mx.argpartition(-partial, k - 1, axis=-1)[..., :k]]
    if full is not None:
        parts.append(mx.argpartition(-full, k - 1, axis=-1)[..., :k])
    parts.append(tokens[..., None])
    index = mx.sort(mx.concatenate([p.astype(mx.int32) for p in parts], axis=-1), axis=-1)
    first = mx.ones((*index.shape[:-1], 1), dtype=mx.bool_)
    keep = mx.concatenate([first, index[..., 1:] != index[..., :-1]], axis=-1)
    return mx.stop_gradient(index), mx.stop_gradient(keep)


def _on_support(x: mx.array, index: mx.array, keep: mx.array) -> mx.array:
    """x at the support's entries (..., K), -inf on repeated indices."""
    return mx.where(keep, mx.take_along_axis(_f32(x), index, axis=-1), -mx.inf)


def support_target(partial: mx.array, full: mx.array | None, index: mx.array,
                   keep: mx.array, settings: ObjectiveSettings) -> mx.array:
    """T^k on the gathered support (..., K), -inf on repeated indices: the anchored target built
    from the views' full-vocabulary log-probs P and F at the support's entries and normalized
    over the support (log_softmax over K of P + lam * clip(F - P)), which is the exact target
    restricted to the support and renormalized; no pass over V beyond P and F themselves."""
    p = _on_support(partial, index, keep)
    if full is None:
        t = p
    else:
        t = _anchored_from_logprobs(p, _on_support(full, index, keep), settings.lam,
                                    settings.clip)
        t = mx.where(keep, t, -mx.inf)  # repeats: floored entries of no mass, now exactly none
    return mx.stop_gradient(t - logsumexp(t))


def support_losses(student_logits: mx.array, tokens: mx.array, partial: mx.array,
                   full: mx.array | None, index: mx.array, keep: mx.array,
                   settings: ObjectiveSettings) -> mx.array:
    """`token_losses` of the top-k teacher on the gathered support (..., K) instead of the
    vocabulary (the fused chunk's form): the target from `support_target`, the student's
    logits restricted to the support (its log_softmax there is the student renormalized on
    the support), the sampled token found at its (first) place in the sorted index."""
    t = support_target(partial, full, index, keep, settings)
    z = _on_support(student_logits, index, keep)
    place = mx.argmax((index == tokens[..., None].astype(mx.int32)).astype(mx.int32), axis=-1)
    return token_losses(z, place, t, settings)


def support_mask(index: mx.array, vocab: int) -> mx.array:
    """(..., V) bool: True on the support's entries (the naive path's form of the support)."""
    mask = mx.zeros((*index.shape[:-1], vocab), dtype=mx.bool_)
    return mx.put_along_axis(mask, index, mx.array(True), axis=-1)


def masked_top_k_losses(student_logits, tokens, partial, full, target,
                        settings: ObjectiveSettings) -> mx.array:
    """The naive form of the top-k teacher over the whole vocabulary: target and student
    logits set to -inf off the support, the target renormalized (log_softmax) on it."""
    index, keep = top_k_support(partial, full, tokens, settings.teacher_top_k)
    mask = support_mask(index, target.shape[-1])
    t = mx.stop_gradient(log_softmax(mx.where(mask, _f32(target), -mx.inf)))
    z = mx.where(mask, _f32(student_logits), -mx.inf)
    return token_losses(z, tokens, t, settings)


def uses_top_k(settings: ObjectiveSettings, target) -> bool:
    """The top-k teacher applies: 0 < teacher_top_k < V and a loss that reads a teacher view
    (k >= V: the support is the whole vocabulary, the exact loss, computed as such)."""
    return (settings.teacher_top_k > 0 and target is not None and settings.loss_type != "nll"
            and settings.teacher_top_k < target.shape[-1])


def top_k_overlap(a: mx.array, b: mx.array, k: int = TOPK_OVERLAP) -> mx.array:
    """|top_k(a) & top_k(b)| / k over the last axis. top_k(x) = {v : x_v >= k-th largest x};
    with ties at the k-th value a set can exceed k, so divide by the larger set (<= 1)."""
    k = min(k, a.shape[-1])
    in_a = a >= mx.topk(a, k, axis=-1).min(axis=-1, keepdims=True)
    in_b = b >= mx.topk(b, k, axis=-1).min(axis=-1, keepdims=True)
    both = (in_a & in_b).sum(axis=-1).astype(mx.float32)  # bool sums: no float (C, V) copy
    size = mx.maximum(in_a.sum(axis=-1), in_b.sum(axis=-1)).astype(mx.float32)
    return both / size


def token_diagnostics(student_logits, tokens, partial, full, target,
                      settings: ObjectiveSettings) -> dict[str, mx.array]:
    """Per-position diagnostics (METHOD.md "Diagnostics"), at the loss's temperatures.
    partial/full/target are teacher log-probs from `teacher_views` (None when absent)."""
    s = mx.stop_gradient(log_softmax(student_logits, settings.student_temperature))
    out = {"entropy_student": entropy(s), "student_logprob": gather_last(s, tokens)}
    if full is not None:
        out["kl_full_partial"] = kl_divergence(full, partial)
        out["kl_student_partial"] = kl_divergence(s, partial)
        out["kl_student_full"] = kl_divergence(s, full)
        out["clip_rate"] = clip_rate(partial, full, settings.clip)
    if target is not None:
        out["kl_student_target"] = kl_divergence(s, target)
        out["top16_overlap"] = top_k_overlap(s, target)
        out["entropy_target"] = entropy(target)
        out["target_logprob"] = gather_last(target, tokens)
    return out


# ----------------------------------------------------------------------------- masks

def response_mask(mask: mx.array, skip_first_tokens: int) -> mx.array:
    """(B, T) bool: `mask` with the first `skip_first_tokens` valid positions of each row off."""
    valid = mask.astype(mx.bool_)
    if skip_first_tokens <= 0:
        return valid
    seen = mx.cumsum(valid.astype(mx.int32), axis=-1)
    return valid & (seen > skip_first_tokens)


def reduce_per_token(per_token: mx.array, mask: mx.array,
                     reduction: str = "sequence") -> tuple[mx.array, mx.array]:
    """(loss, weight) from (B, T) per-token values. "sequence": mean over each row's valid
    tokens, then over rows that have any; weight = that row count. "token": mean over all
    valid tokens; weight = their count. Empty input gives loss 0, weight 0."""
    valid = mask.astype(mx.bool_)
    values = mx.where(valid, _f32(per_token), 0.0)
    count = valid.astype(mx.float32).sum(axis=-1)  # (B,)
    if reduction == "token":
        weight = count.sum()
        return values.sum() / mx.maximum(weight, 1.0), weight
    if reduction != "sequence":
        raise ValueError(f"unknown reduction {reduction!r}")
    per_seq = values.sum(axis=-1) / mx.maximum(count, 1.0)
    weight = (count > 0).astype(mx.float32).sum()
    return per_seq.sum() / mx.maximum(weight, 1.0), weight


def finish(per_token: mx.array, diagnostics: dict[str, mx.array], mask: mx.array,
           settings: ObjectiveSettings) -> LossOutput:
    """Mask per-token values and diagnostics, reduce, and pack a LossOutput.
    Diagnostics are kept at every valid position (skip_first_tokens applies to the loss only)
    and zeroed elsewhere."""
    keep = response_mask(mask, settings.skip_first_tokens)
    per_token = mx.where(keep, per_token, 0.0)
    loss, weight = reduce_per_token(per_token, keep, settings.reduction)
    valid = mask.astype(mx.bool_)
    diags = {k: mx.stop_gradient(mx.where(valid, v, 0.0)) for k, v in diagnostics.items()}
    return LossOutput(loss=loss, weight=weight, per_token=per_token, diagnostics=diags)


def naive_loss(student_logits: mx.array, tokens: mx.array, mask: mx.array,
               teacher_logits: mx.array | None = None, full_logits: mx.array | None = None,
               *, settings: ObjectiveSettings | None = None) -> LossOutput:
    """The plain reference on materialized logits (B, T, V); logits at position t predict
    tokens[:, t]. teacher_logits = the anchor (partial view) or the only teacher view;
    full_logits = the full view (AR-OPD). Memory grows with B*T*V: use fused_loss to train."""
    settings = settings or ObjectiveSettings()
    settings.validate()
    partial, full, target = teacher_views(teacher_logits, full_logits, settings)
    if target is not None:
        partial, full, target = (None if x is None else mx.stop_gradient(x)
                                 for x in (partial, full, target))
    if uses_top_k(settings, target):
        per_token = masked_top_k_losses(student_logits, tokens, partial, full, target, settings)
    else:
        per_token = token_losses(student_logits, tokens, target, settings)
    diags = token_diagnostics(student_logits, tokens, partial, full, target, settings)
    return finish(per_token, diags, mask, settings)
