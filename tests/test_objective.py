"""The objective's math against independent float64 numpy expectations (METHOD.md)."""
import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from aropd_mlx import objective as obj
from aropd_mlx.errors import UserError
from aropd_mlx.objective import ObjectiveSettings

RNG = np.random.default_rng(1234)


# ----------------------------------------------------------------------------- numpy truth

def np_logsoftmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_kl(lp, lq):
    p = np.exp(lp)
    return np.where(p > 0, p * (lp - np.where(p > 0, lq, 0)), 0).sum(-1)


def np_jsd(student_logits, target_lp, alpha):
    s, t = np_logsoftmax(student_logits), np.asarray(target_lp, np.float64)
    m = np.log(alpha * np.exp(t) + (1 - alpha) * np.exp(s))
    return alpha * np_kl(t, m) + (1 - alpha) * np_kl(s, m)


def logits(*shape, scale=3.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.array(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- settings

def test_default_settings_are_valid_and_match_the_paper():
    s = ObjectiveSettings()
    s.validate()
    assert (s.lam, s.clip, s.alpha, s.skip_first_tokens) == (0.8, 5.0, 0.0, 3)


@pytest.mark.parametrize("field,value", [
    ("lam", -0.1), ("lam", float("nan")), ("clip", 0.0), ("clip", -1.0), ("alpha", 1.5),
    ("alpha", -0.01), ("student_temperature", 0.0), ("teacher_temperature", -1.0),
    ("skip_first_tokens", -1), ("skip_first_tokens", 1.5), ("chunk_size", 0),
    ("loss_type", "kl"), ("reduction", "mean")])
def test_validate_names_the_bad_field(field, value):
    with pytest.raises(UserError, match=f"objective.{field} must be"):
        dataclasses.replace(ObjectiveSettings(), **{field: value}).validate()


def test_validate_accepts_no_clip_and_alpha_endpoints():
    for kw in ({"clip": None}, {"alpha": 1.0}, {"lam": 1.4}, {"skip_first_tokens": 0}):
        dataclasses.replace(ObjectiveSettings(), **kw).validate()


# ----------------------------------------------------------------------------- target

def test_lam_zero_is_the_partial_view():
    p, f = logits(4, 30), logits(4, 30)
    close(obj.anchored_residual_target(mx.array(p), mx.array(f), lam=0.0), np_logsoftmax(p))


def test_lam_one_with_inactive_clip_is_the_full_view():
    p = logits(4, 30)
    f = p + RNG.uniform(-1.0, 1.0, size=p.shape).astype(np.float32)  # |F - P| < 2 < clip
    close(obj.anchored_residual_target(mx.array(p), mx.array(f), lam=1.0, clip=5.0),
          np_logsoftmax(f))
    close(obj.anchored_residual_target(mx.array(p), mx.array(f), lam=1.0, clip=None),
          np_logsoftmax(f))


def test_active_clip_bounds_the_residual():
    p, f = logits(3, 25, scale=1.0), logits(3, 25, scale=8.0)
    P, F = np_logsoftmax(p), np_logsoftmax(f)
    assert (np.abs(F - P) > 2.0).any()  # the clip is active somewhere
    expect = np_logsoftmax(P + 0.8 * np.clip(F - P, -2.0, 2.0))
    got = obj.anchored_residual_target(mx.array(p), mx.array(f), lam=0.8, clip=2.0)
    close(got, expect)
    unclipped = obj.anchored_residual_target(mx.array(p), mx.array(f), lam=0.8, clip=None)
    close(unclipped, np_logsoftmax(P + 0.8 * (F - P)))
    assert np.abs(np.array(got) - np.array(unclipped)).max() > 0.1


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0, 1.4])
def test_target_rows_are_normalized(lam):
    t = obj.anchored_residual_target(mx.array(logits(2, 5, 40)), mx.array(logits(2, 5, 40)),
                                     lam=lam)
    close(np.exp(np.array(t, np.float64)).sum(-1), np.ones((2, 5)))


def test_target_logprobs_applies_teacher_temperature():
    p, f = logits(2, 3, 20), logits(2, 3, 20)
    s = ObjectiveSettings(teacher_temperature=2.0, lam=0.6, clip=1.5)
    close(obj.target_logprobs(mx.array(p), settings=s), np_logsoftmax(p / 2))
    P, F = np_logsoftmax(p / 2), np_logsoftmax(f / 2)
    close(obj.target_logprobs(mx.array(p), mx.array(f), settings=s),
          np_logsoftmax(P + 0.6 * np.clip(F - P, -1.5, 1.5)))


def test_target_survives_minus_inf_in_both_views():
    p, f = logits(2, 10), logits(2, 10)
    p[:, :3] = -np.inf
    f[:, 1:4] = -np.inf
    for clip in (5.0, None):
        t = np.array(obj.anchored_residual_target(mx.array(p), mx.array(f), lam=1.0, clip=clip))
        assert not np.isnan(t).any()
        close(np.exp(t.astype(np.float64)).sum(-1), [1.0, 1.0])


def np_anchored_target(partial_logits, full_logits, lam, clip):
    """METHOD.md's target in float64 with -inf taken at its limits (no floors): the residual
    F - P is 0 where both views are -inf and +-inf where one is; a clip bounds it; P = -inf
    stays -inf under a clip. Without a clip, (1 - lam) P + lam F with 0 * inf = 0 (lam = 0, 1),
    and any other lam rules out what either view rules out (for lam > 1 the literal form would
    be +inf * ... undefined); a row sharing no token takes the anchor."""
    with np.errstate(invalid="ignore", divide="ignore"):
        P, F = np_logsoftmax(partial_logits), np_logsoftmax(full_logits)
        if clip is not None:
            r = np.where(np.isneginf(P) & np.isneginf(F), 0.0, F - P)
            mixed = np.where(np.isneginf(P), -np.inf, P + lam * np.clip(r, -clip, clip))
        elif lam in (0.0, 1.0):
            mixed = F if lam == 1.0 else P
        else:
            both = np.isfinite(P) & np.isfinite(F)
            mixed = np.where(both, (1 - lam) * P + lam * F, -np.inf)
            mixed = np.where(both.any(-1, keepdims=True), mixed, P)
        return np_logsoftmax(mixed)


def masked_views(rows, v, seed, density=0.3):
    """Two views' logits with independent -inf entries; entry 0 is finite in both views, and
    the last row's views share no token (disjoint supports)."""
    r = np.random.default_rng(seed)
    p, f = (r.normal(size=(rows, v)).astype(np.float32) * 3 for _ in range(2))
    p[r.random(p.shape) < density] = -np.inf
    f[r.random(f.shape) < density] = -np.inf
    p[:, 0], f[:, 0] = 0.5, -0.5
    p[-1, v // 2:], f[-1, : v // 2] = -np.inf, -np.inf
    return p, f


@pytest.mark.parametrize("v", [50, 2048])  # 2048: the CPU's fast exp path
@pytest.mark.parametrize("clip", [None, 5.0])
@pytest.mark.parametrize("lam", [0.0, 0.8, 1.0, 1.4])
def test_target_with_minus_inf_is_normalized_and_matches_float64(lam, clip, v):
    """Reported: clip=None, lam > 1 and -inf entries gave rows summing to 50."""
    p, f = masked_views(6, v, seed=int(lam * 10) + v)
    got = np.array(obj.anchored_residual_target(mx.array(p), mx.array(f), lam=lam, clip=clip),
                   np.float64)
    want = np_anchored_target(p, f, lam, clip)
    assert not np.isnan(got).any()
    close(np.exp(got).sum(-1), np.ones(len(p)), rtol=2e-5)
    live = np.isfinite(want)
    assert live[:-1, 0].all()  # (the last row: entry 0 is -inf in F)
    close(got[live], want[live], rtol=1e-5, atol=2e-4)
    assert (np.exp(got[~live]) == 0).all()  # ruled out by the reference: no mass


# ----------------------------------------------------------------------------- divergence

def test_alpha_zero_is_forward_kl_and_alpha_one_reverse_kl():
    z, t = logits(3, 4, 50), np_logsoftmax(logits(3, 4, 50)).astype(np.float32)
    s = np_logsoftmax(z)
    close(obj.generalized_jsd(mx.array(z), mx.array(t), 0.0), np_kl(t, s))
    close(obj.generalized_jsd(mx.array(z), mx.array(t), 1.0), np_kl(s, t))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_interior_alpha_is_the_mixture_formula(alpha):
    z, t = logits(3, 50), np_logsoftmax(logits(3, 50)).astype(np.float32)
    close(obj.generalized_jsd(mx.array(z), mx.array(t), alpha), np_jsd(z, t, alpha))


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
def test_jsd_is_zero_on_identical_and_positive_otherwise(alpha):
    z = logits(4, 30)
    same = obj.generalized_jsd(mx.array(z), mx.array(np_logsoftmax(z).astype(np.float32)), alpha)
    close(same, np.zeros(4), atol=2e-6)
    other = obj.generalized_jsd(mx.array(z), mx.array(np_logsoftmax(logits(4, 30)), mx.float32),
                                alpha)
    assert (np.array(other) > 1e-3).all()


@pytest.mark.parametrize("alpha", [0.2, 0.5])
def test_jsd_swaps_roles_with_one_minus_alpha(alpha):
    a, b = logits(3, 40), logits(3, 40)
    la, lb = (mx.array(np_logsoftmax(x).astype(np.float32)) for x in (a, b))
    close(obj.generalized_jsd(mx.array(a), lb, alpha),
          obj.generalized_jsd(mx.array(b), la, 1 - alpha), rtol=1e-4)


def test_near_endpoint_alpha_is_continuous_and_accurate():
    """As alpha -> 0 the mixture tends to alpha*KL(T||S) (and (1-alpha)*KL(S||T) at 1):
    the endpoints are KL(T||S), KL(S||T) by definition, the limits of JSD/alpha."""
    z, t = logits(3, 60, scale=2.0), np_logsoftmax(logits(3, 60, scale=2.0)).astype(np.float32)
    s = np_logsoftmax(z)
    for eps in (1e-3, 1e-5, 1e-7):
        lo = np.array(obj.generalized_jsd(mx.array(z), mx.array(t), eps))
        hi = np.array(obj.generalized_jsd(mx.array(z), mx.array(t), 1 - eps))
        close(lo, np_jsd(z, t, eps), rtol=1e-3, atol=0)  # float64 truth, 3 digits at 1e-7
        close(hi, np_jsd(z, t, 1 - eps), rtol=1e-3, atol=0)
    # the endpoint values are the first-order limits (the next term is eps * a chi^2
    # divergence, small for close distributions)
    z, t = logits(3, 60, scale=0.5), np_logsoftmax(logits(3, 60, scale=0.5)).astype(np.float32)
    s = np_logsoftmax(z)
    eps = 1e-5
    close(np.array(obj.generalized_jsd(mx.array(z), mx.array(t), eps)) / eps, np_kl(t, s),
          rtol=1e-3, atol=0)
    close(np.array(obj.generalized_jsd(mx.array(z), mx.array(t), 1 - eps)) / eps, np_kl(s, t),
          rtol=1e-3, atol=0)
    grid = [0.3 + k * 1e-4 for k in range(3)]
    vals = [np.array(obj.generalized_jsd(mx.array(z), mx.array(t), a)) for a in grid]
    assert np.abs(vals[1] - vals[0]).max() < 1e-3 and np.abs(vals[2] - vals[1]).max() < 1e-3


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0])
def test_jsd_survives_extreme_logits(alpha):
    z = np.array([[1e4, -1e4, 0.0, 3.0], [-1e4, -1e4, 1e4, 1e4], [0.0, 0.0, 0.0, 0.0]],
                 np.float32)
    t = np.array([[0.0, -np.inf, -1e30, -1e4], [-0.7, -0.7, -np.inf, -np.inf],
                  [-1e4, -1e-4, -30.0, -9.0]], np.float32)
    t = t - np.log(np.exp(t.astype(np.float64)).sum(-1, keepdims=True)).astype(np.float32)
    val, grad = mx.value_and_grad(lambda x: obj.generalized_jsd(x, mx.array(t), alpha).sum())(
        mx.array(z))
    # row 2 puts student mass where the target has none: KL(S||T) is huge, yet finite
    assert np.isfinite(np.array(val)) and np.isfinite(np.array(grad)).all()


def test_forward_kl_gradient_is_softmax_minus_target():
    z, t = logits(2, 3, 20), np_logsoftmax(logits(2, 3, 20)).astype(np.float32)
    g = mx.grad(lambda x: obj.generalized_jsd(x, mx.array(t), 0.0).sum())(mx.array(z))
    close(g, np.exp(np_logsoftmax(z)) - np.exp(t))


# ----------------------------------------------------------------------------- masks

def test_response_mask_skips_the_first_valid_positions():
    mask = mx.array([[1, 1, 1, 1, 1, 0], [0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 0]])
    want = [[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
    assert np.array(obj.response_mask(mask, 2)).astype(int).tolist() == want
    assert np.array_equal(np.array(obj.response_mask(mask, 0)), np.array(mask).astype(bool))


def test_reduce_per_token_sequence_and_token():
    pt = mx.array([[1.0, 3.0, 9.0], [4.0, 100.0, 100.0], [7.0, 7.0, 7.0]])
    m = mx.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    loss, w = obj.reduce_per_token(pt, m, "sequence")
    assert float(w) == 2 and float(loss) == pytest.approx((2.0 + 4.0) / 2)
    loss, w = obj.reduce_per_token(pt, m, "token")
    assert float(w) == 3 and float(loss) == pytest.approx(8.0 / 3)
    loss, w = obj.reduce_per_token(pt, mx.zeros((3, 3)), "sequence")
    assert float(loss) == 0.0 and float(w) == 0.0


@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_micro_batches_combine_to_the_full_batch(reduction):
    pt = mx.array(RNG.normal(size=(6, 7)).astype(np.float32))
    m = mx.array(RNG.random((6, 7)) > 0.4)
    whole, _ = obj.reduce_per_token(pt, m, reduction)
    parts = [obj.reduce_per_token(pt[i:i + 2], m[i:i + 2], reduction) for i in (0, 2, 4)]
    combined = sum(float(l) * float(w) for l, w in parts) / sum(float(w) for _, w in parts)
    assert combined == pytest.approx(float(whole), rel=1e-6)


# ----------------------------------------------------------------------------- naive_loss

def _case(b=2, t=6, v=24, seed=0):
    r = np.random.default_rng(seed)
    z, zt, zf = (r.normal(size=(b, t, v)).astype(np.float32) * 2 for _ in range(3))
    tok = r.integers(0, v, size=(b, t))
    mask = np.ones((b, t), bool)
    mask[1, t - 2:] = False
    return z, zt, zf, tok, mask


def _pick(x, tok):
    return np.take_along_axis(x, tok[..., None], -1)[..., 0]


@pytest.mark.parametrize("loss_type", obj.LOSS_TYPES)
def test_naive_loss_per_token_matches_hand_formulas(loss_type):
    z, zt, zf, tok, mask = _case()
    s = ObjectiveSettings(loss_type=loss_type, student_temperature=1.5, teacher_temperature=0.5,
                          skip_first_tokens=1, alpha=0.0)
    out = obj.naive_loss(mx.array(z), mx.array(tok), mx.array(mask), mx.array(zt), mx.array(zf),
                         settings=s)
    S = np_logsoftmax(z / 1.5)
    P, F = np_logsoftmax(zt / 0.5), np_logsoftmax(zf / 0.5)
    T = np_logsoftmax(P + 0.8 * np.clip(F - P, -5, 5))
    d = _pick(T, tok) - _pick(S, tok)
    want = {"full_vocab": np_kl(T, S), "sampled_kl": np.exp(d) - d - 1,
            "advantage": -d * _pick(S, tok), "nll": -_pick(S, tok)}[loss_type]
    keep = mask.copy()
    keep[:, 0] = False  # skip_first_tokens=1, rows start valid
    close(out.per_token, np.where(keep, want, 0), atol=1e-5)  # fp32 vs float64 truth
    per_seq = (np.where(keep, want, 0).sum(1) / keep.sum(1))
    close(out.loss, per_seq.mean())
    assert float(out.weight) == 2


def test_naive_diagnostics_match_hand_formulas():
    z, zt, zf, tok, mask = _case(v=40)
    s = ObjectiveSettings(student_temperature=0.8, teacher_temperature=1.2, clip=1.0)
    out = obj.naive_loss(mx.array(z), mx.array(tok), mx.array(mask), mx.array(zt), mx.array(zf),
                         settings=s)
    S, P, F = np_logsoftmax(z / 0.8), np_logsoftmax(zt / 1.2), np_logsoftmax(zf / 1.2)
    T = np_logsoftmax(P + 0.8 * np.clip(F - P, -1, 1))
    top = lambda x: np.argsort(-x, -1)[..., :16]  # noqa: E731
    ts, tt = top(S), top(T)
    overlap = np.array([[len(set(a) & set(b)) / 16 for a, b in zip(ra, rb)]
                        for ra, rb in zip(ts, tt)])
    want = {"kl_full_partial": np_kl(F, P), "kl_student_partial": np_kl(S, P),
            "kl_student_full": np_kl(S, F), "kl_student_target": np_kl(S, T),
            "clip_rate": (np.abs(F - P) > 1.0).mean(-1), "top16_overlap": overlap,
            "entropy_student": -np_kl(S, np.zeros_like(S)),
            "entropy_target": -np_kl(T, np.zeros_like(T)),
            "student_logprob": _pick(S, tok), "target_logprob": _pick(T, tok)}
    assert set(out.diagnostics) == set(want)
    for k, v in want.items():
        close(out.diagnostics[k], np.where(mask, v, 0), rtol=1e-5, atol=2e-6)
    assert 0 < float(out.diagnostics["clip_rate"].max()) < 1


def test_diagnostic_keys_follow_the_views():
    z, zt, _, tok, mask = _case()
    a = mx.array
    one = obj.naive_loss(a(z), a(tok), a(mask), a(zt), settings=ObjectiveSettings())
    assert "kl_student_target" in one.diagnostics and "kl_full_partial" not in one.diagnostics
    sft = obj.naive_loss(a(z), a(tok), a(mask), settings=ObjectiveSettings(loss_type="nll"))
    assert set(sft.diagnostics) == {"entropy_student", "student_logprob"}
    with pytest.raises(ValueError, match="needs a teacher"):
        obj.naive_loss(a(z), a(tok), a(mask), settings=ObjectiveSettings())
    with pytest.raises(ValueError, match="needs teacher_logits"):
        obj.naive_loss(a(z), a(tok), a(mask), None, a(zt), settings=ObjectiveSettings())


@pytest.mark.parametrize("loss_type", ["sampled_kl", "advantage", "nll"])
def test_sampled_gradients_match_closed_forms(loss_type):
    z, zt, _, tok, _ = _case(b=2, t=4)
    T = np_logsoftmax(zt)
    s = ObjectiveSettings(loss_type=loss_type)
    g = mx.grad(lambda x: obj.token_losses(x, mx.array(tok), mx.array(T, mx.float32), s).sum())(
        mx.array(z))
    S = np_logsoftmax(z)
    onehot = np.eye(z.shape[-1])[tok]
    d = _pick(T, tok) - _pick(S, tok)
    coef = {"sampled_kl": np.exp(d) - 1, "advantage": d, "nll": np.ones_like(d)}[loss_type]
    close(g, coef[..., None] * (np.exp(S) - onehot), rtol=1e-4, atol=1e-6)


def test_sampled_kl_is_exact_below_the_cap_and_linear_above():
    s = ObjectiveSettings(loss_type="sampled_kl")
    v = 4
    target = np.full((3, v), -1e4, np.float32)
    target[:, 0] = 0.0  # T(y=0) = 0
    z = np.zeros((3, v), np.float32)
    z[:, 0] = [0.0, -20.0, -120.0]  # S(y) so that d = T(y) - S(y) is moderate, 20, ~120
    tok = mx.zeros((3,), mx.int32)
    val, g = mx.value_and_grad(lambda x: obj.token_losses(x, tok, mx.array(target), s).sum())(
        mx.array(z))
    per = np.array(obj.token_losses(mx.array(z), tok, mx.array(target), s), np.float64)
    d = -np_logsoftmax(z)[:, 0]
    cap = obj.SAMPLED_KL_LINEAR_FROM
    close(per[:2], np.expm1(d[:2]) - d[:2], rtol=1e-5)
    assert d[2] > cap
    close(per[2], np.expm1(cap) - cap + (d[2] - cap) * np.expm1(cap), rtol=1e-5)
    assert np.isfinite(np.array(val)) and np.isfinite(np.array(g)).all()


# ----------------------------------------------------------------------------- properties

@hsettings(max_examples=25, deadline=None)
@given(v=st.integers(2, 40), scale=st.sampled_from([0.1, 3.0, 80.0, 1e4]),
       alpha=st.sampled_from([0.0, 1e-7, 0.3, 0.5, 1 - 1e-7, 1.0]),
       lam=st.floats(0.0, 1.5), seed=st.integers(0, 10_000))
def test_property_target_and_jsd_are_sane(v, scale, alpha, lam, seed):
    r = np.random.default_rng(seed)
    p, f, z = (r.normal(size=(3, v)).astype(np.float32) * scale for _ in range(3))
    t = obj.anchored_residual_target(mx.array(p), mx.array(f), lam=lam)
    close(np.exp(np.array(t, np.float64)).sum(-1), np.ones(3), rtol=1e-4)
    val, g = mx.value_and_grad(lambda x: obj.generalized_jsd(x, t, alpha).sum())(mx.array(z))
    per = np.array(obj.generalized_jsd(mx.array(z), t, alpha))
    assert np.isfinite(per).all() and np.isfinite(np.array(g)).all()
    assert (per >= -1e-5 * np.maximum(1.0, np.abs(per))).all()
