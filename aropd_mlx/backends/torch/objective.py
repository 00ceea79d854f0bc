"""The AR-OPD objective on torch tensors: the mirror of `aropd_mlx.objective`.

Same names for the same ideas, public and private (`_masked_sum`, `_anchored_from_logprobs`,
`teacher_views`, `token_losses`, `token_diagnostics`, `finish`, ...), same argument names and
meanings; written from METHOD.md on its own (no mlx import, so it runs on a CUDA box without
mlx). Works on any device; math runs in float32
(float64 stays float64). `settings` is duck-typed: any object with the attributes of
`aropd_mlx.objective.ObjectiveSettings` (lam, clip, alpha, loss_type, student_temperature,
teacher_temperature, skip_first_tokens, reduction; teacher_top_k optional, default 0).

    python -c "import torch; from aropd_mlx.backends.torch.objective import *; \
               x = torch.randn(2, 5); print(generalized_jsd(x, torch.log_softmax(-x, -1), 0.5))"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TOPK_OVERLAP = 16
SAMPLED_KL_LINEAR_FROM = 50.0  # sampled_kl continues exp(d) - d - 1 by its tangent above this d
_LOGPROB_FLOOR = -1e30  # log-probs floored before F - P: -inf in both views gives r = 0, not NaN


@dataclass
class LossOutput:
    loss: torch.Tensor  # () scalar
    weight: torch.Tensor  # () sequences (or tokens) behind `loss`
    per_token: torch.Tensor  # (B, T), zero where masked (after skip_first_tokens)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, T), detached


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(_f32(logits) / temperature, dim=-1)


def _masked_sum(p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """E_p[f] = sum_v p_v f_v with 0 * anything = 0 (f may be +-inf where p == 0)."""
    nonzero = p > 0
    safe_f = torch.where(nonzero, f, torch.zeros_like(f))
    return torch.where(nonzero, p * safe_f, torch.zeros_like(p)).sum(-1)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return _masked_sum(log_p.exp(), log_p - log_q)


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    return -_masked_sum(log_p.exp(), log_p)


def gather_last(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def _anchored_from_logprobs(partial: torch.Tensor, full: torch.Tensor, lam: float, clip) -> torch.Tensor:
    """log_softmax(P + lam * clip(F - P)) with -inf entries at their limits: with a clip,
    P = -inf stays -inf; without one, lam = 0 / 1 give P / F exactly, and any other lam rules
    out a token either view rules out (a row sharing no token falls back to the anchor)."""
    anchor, privileged = partial.clamp_min(_LOGPROB_FLOOR), full.clamp_min(_LOGPROB_FLOOR)
    if clip is not None:
        residual = (privileged - anchor).clamp(-clip, clip)
        return torch.log_softmax(anchor + lam * residual, dim=-1)
    if lam == 0.0 or lam == 1.0:
        return torch.log_softmax(privileged if lam == 1.0 else anchor, dim=-1)
    both = (anchor > _LOGPROB_FLOOR) & (privileged > _LOGPROB_FLOOR)
    floor = torch.full_like(anchor, _LOGPROB_FLOOR)
    mixed = torch.where(both, anchor * (1.0 - lam) + privileged * lam, floor)
    return torch.log_softmax(torch.where(both.any(dim=-1, keepdim=True), mixed, anchor), dim=-1)


def anchored_residual_target(partial_logits, full_logits, lam: float = 0.8, clip=5.0):
    """log_softmax(P + lam * clip(F - P, -clip, clip)); P, F = log_softmax of the views."""
    return _anchored_from_logprobs(log_softmax(partial_logits), log_softmax(full_logits), lam, clip)


def generalized_jsd(student_logits, target_logprobs, alpha: float) -> torch.Tensor:
    """alpha=0: KL(T||S); alpha=1: KL(S||T); else alpha*KL(T||M) + (1-alpha)*KL(S||M),
    M = log(alpha e^T + (1-alpha) e^S). Per position over the last axis."""
    log_s = torch.log_softmax(_f32(student_logits), dim=-1)
    log_t = _f32(target_logprobs).clamp_min(_LOGPROB_FLOOR)  # T = -inf under student mass: huge, not NaN
    if alpha <= 0.0:
        return kl_divergence(log_t, log_s)
    if alpha >= 1.0:
        return kl_divergence(log_s, log_t)
    p_t, p_s = log_t.exp(), log_s.exp()
    gap = log_s - log_t  # log(S/T)
    gap_for_t = torch.where(p_t > 0, gap, torch.zeros_like(gap))
    gap_for_s = torch.where(p_s > 0, gap, torch.zeros_like(gap))
    w_t = torch.full_like(gap, math.log(alpha))
    w_s = torch.full_like(gap, math.log1p(-alpha))
    # log(M/T) = log(alpha + (1-alpha) S/T);  log(M/S) = log(alpha T/S + (1-alpha))
    mix_over_t = torch.logaddexp(w_t, w_s + gap_for_t)
    mix_over_s = torch.logaddexp(w_t - gap_for_s, w_s)
    return alpha * _masked_sum(p_t, -mix_over_t) + (1.0 - alpha) * _masked_sum(p_s, -mix_over_s)


def teacher_views(teacher_logits, full_logits, settings):
    if teacher_logits is None:
        if full_logits is not None:
            raise ValueError("full_logits needs teacher_logits (the anchor / partial view)")
        return None, None, None
    with torch.no_grad():
        partial = log_softmax(teacher_logits, settings.teacher_temperature)
        if full_logits is None:
            return partial, None, partial
        full = log_softmax(full_logits, settings.teacher_temperature)
        return partial, full, _anchored_from_logprobs(partial, full, settings.lam, settings.clip)


def target_logprobs(teacher_logits, full_logits=None, *, settings) -> torch.Tensor:
    """The target T (no gradient): the teacher view at its temperature, or the anchored
    residual target with the teacher as the anchor and full_logits as the full view."""
    return teacher_views(teacher_logits, full_logits, settings)[2]


def response_mask(mask, skip_first_tokens: int) -> torch.Tensor:
    """(B, T) bool: the mask without the first `skip_first_tokens` valid positions of a row."""
    valid = mask.bool()
    order = valid.long().cumsum(dim=-1)  # 1-based rank of each valid position
    return valid & (order > skip_first_tokens)


def reduce_per_token(per_token, mask, reduction: str = "sequence"):
    """(loss, weight): per-sequence means averaged over non-empty sequences (weight = their
    number), or the mean over all valid tokens (weight = their number)."""
    valid = mask.bool()
    vals = _f32(per_token).masked_fill(~valid, 0.0)
    n_tok = valid.sum(dim=-1).to(vals.dtype)
    if reduction == "token":
        total = n_tok.sum()
        return vals.sum() / total.clamp_min(1.0), total
    if reduction != "sequence":
        raise ValueError(f"unknown reduction {reduction!r}")
    has_any = (n_tok > 0).to(vals.dtype)
    means = vals.sum(dim=-1) / n_tok.clamp_min(1.0)
    n_seq = has_any.sum()
    return means.sum() / n_seq.clamp_min(1.0), n_seq


def token_losses(student_logits, tokens, target, settings) -> torch.Tensor:
    kind = settings.loss_type
    scaled = _f32(student_logits) / settings.student_temperature
    if kind == "full_vocab":
        if target is None:
            raise ValueError("loss_type 'full_vocab' needs a teacher view")
        return generalized_jsd(scaled, target, settings.alpha)
    own = gather_last(torch.log_softmax(scaled, dim=-1), tokens)  # log S(y_t)
    if kind == "nll":
        return -own
    if target is None:
        raise ValueError(f"loss_type {kind!r} needs a teacher view")
    gap = gather_last(target, tokens) - own  # T(y) - S(y), gradient through S only
    if kind == "sampled_kl":  # exp(d) - d - 1; past d = 50 its tangent line (no fp32 inf)
        bounded = gap.clamp(max=SAMPLED_KL_LINEAR_FROM)
        excess = (gap - SAMPLED_KL_LINEAR_FROM).clamp(min=0.0)
        return torch.expm1(bounded) - bounded + excess * math.expm1(SAMPLED_KL_LINEAR_FROM)
    if kind == "advantage":
        return -gap.detach() * own
    raise ValueError(f"unknown loss_type {kind!r}")


def top_k_support(partial, full, tokens, k: int):
    """(index, keep): per row top_k(P) | top_k(F) | {y} (F may be None), index (..., K)
    sorted ascending, K = 2k + 1 (k + 1 without F, k capped at V), keep False on repeats."""
    k = min(k, partial.shape[-1])
    parts = [torch.topk(partial, k, dim=-1).indices]
    if full is not None:
        parts.append(torch.topk(full, k, dim=-1).indices)
    parts.append(tokens.long().unsqueeze(-1))
    index = torch.cat(parts, dim=-1).sort(dim=-1).values
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[..., 1:] = index[..., 1:] != index[..., :-1]
    return index, keep


def _on_support(x, index, keep):
    """x at the support's entries, -inf on repeated indices."""
    return _f32(x).gather(-1, index).masked_fill(~keep, -math.inf)


def support_target(partial, full, index, keep, settings):
    """T^k on the gathered support: the anchored target from P and F at the support's
    entries, normalized over the support; -inf on repeated indices."""
    p = _on_support(partial, index, keep)
    if full is None:
        t = p
    else:
        t = _anchored_from_logprobs(p, _on_support(full, index, keep), settings.lam,
                                    settings.clip).masked_fill(~keep, -math.inf)
    return (t - torch.logsumexp(t, dim=-1, keepdim=True)).detach()


def support_losses(student_logits, tokens, partial, full, index, keep, settings):
    """token_losses of the top-k teacher on the gathered support: target and student both
    restricted to the support and renormalized there."""
    t = support_target(partial, full, index, keep, settings)
    z = _on_support(student_logits, index, keep)
    place = (index == tokens.long().unsqueeze(-1)).int().argmax(dim=-1)
    return token_losses(z, place, t, settings)


def support_mask(index, vocab: int):
    """(..., V) bool, True on the support."""
    mask = torch.zeros((*index.shape[:-1], vocab), dtype=torch.bool, device=index.device)
    return mask.scatter(-1, index, True)


def masked_top_k_losses(student_logits, tokens, partial, full, target, settings):
    """The top-k teacher over the whole vocabulary: -inf off the support, target renormalized."""
    index, _ = top_k_support(partial, full, tokens, settings.teacher_top_k)
    mask = support_mask(index, target.shape[-1])
    t = torch.log_softmax(_f32(target).masked_fill(~mask, -math.inf), dim=-1).detach()
    z = _f32(student_logits).masked_fill(~mask, -math.inf)
    return token_losses(z, tokens, t, settings)


def uses_top_k(settings, target) -> bool:
    """teacher_top_k > 0 (duck-typed settings without it: 0) and a loss reading a teacher view."""
    k = getattr(settings, "teacher_top_k", 0) or 0
    return (k > 0 and target is not None and settings.loss_type != "nll"
            and k < target.shape[-1])


def top_k_overlap(a, b, k: int = TOPK_OVERLAP) -> torch.Tensor:
    k = min(k, a.shape[-1])
    top_a = a >= torch.topk(a, k, dim=-1).values[..., -1:]
    top_b = b >= torch.topk(b, k, dim=-1).values[..., -1:]
    shared = (top_a & top_b).sum(-1)
    return shared.to(a.dtype) / torch.maximum(top_a.sum(-1), top_b.sum(-1)).to(a.dtype)


def clip_rate(partial, full, clip) -> torch.Tensor:
    """Share of vocabulary entries where the clip on the residual F - P is active."""
    if clip is None:
        return torch.zeros(partial.shape[:-1], dtype=partial.dtype, device=partial.device)
    residual = full.clamp_min(_LOGPROB_FLOOR) - partial.clamp_min(_LOGPROB_FLOOR)
    return (residual.abs() > clip).to(partial.dtype).mean(-1)


@torch.no_grad()
def token_diagnostics(student_logits, tokens, partial, full, target, settings) -> dict:
    s = log_softmax(student_logits, settings.student_temperature)
    out = {"entropy_student": entropy(s), "student_logprob": gather_last(s, tokens)}
    if full is not None:
        out["kl_full_partial"] = kl_divergence(full, partial)
        out["kl_student_partial"] = kl_divergence(s, partial)
        out["kl_student_full"] = kl_divergence(s, full)
        out["clip_rate"] = clip_rate(partial, full, settings.clip).to(s.dtype)
    if target is not None:
        out["kl_student_target"] = kl_divergence(s, target)
        out["top16_overlap"] = top_k_overlap(s, target)
        out["entropy_target"] = entropy(target)
        out["target_logprob"] = gather_last(target, tokens)
    return out


def naive_loss(student_logits, tokens, mask, teacher_logits=None, full_logits=None, *,
               settings) -> LossOutput:
    """Reference loss on materialized (B, T, V) logits; same meaning as the MLX naive_loss."""
    if hasattr(settings, "validate"):
        settings.validate()
    partial, full, target = teacher_views(teacher_logits, full_logits, settings)
    if uses_top_k(settings, target):
        per_token = masked_top_k_losses(student_logits, tokens, partial, full, target, settings)
    else:
        per_token = token_losses(student_logits, tokens, target, settings)
    diags = token_diagnostics(student_logits, tokens, partial, full, target, settings)
    return finish(per_token, diags, mask, settings)


def finish(per_token, diagnostics: dict, mask, settings) -> LossOutput:
    """Mask per-token values (skip_first_tokens applies to the loss only) and diagnostics
    (kept at every valid position), reduce, and pack a LossOutput."""
    keep = response_mask(mask, settings.skip_first_tokens)
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    loss, weight = reduce_per_token(per_token, keep, settings.reduction)
    valid = mask.bool()
    diags = {name: torch.where(valid, v, torch.zeros_like(v)) for name, v in diagnostics.items()}
    return LossOutput(loss=loss, weight=weight, per_token=per_token, diagnostics=diags)
