"""The top-k teacher (objective.teacher_top_k): the target and the student restricted to
top_k(P) | top_k(F) | {y} per row and renormalized there.

Checked against: the exact loss (k >= V), the naive masked form over the whole vocabulary
(fused, gathered on (C, K), equals it in values and gradients), an independent float64 numpy
reference, the torch mirror, and the config's validation."""
import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from aropd_mlx import fused, objective as obj
from aropd_mlx.config import load_config
from aropd_mlx.errors import UserError
from aropd_mlx.objective import ObjectiveSettings, naive_loss

from test_fused import assert_same, both, make

TEACHER_LOSSES = ("full_vocab", "sampled_kl", "advantage")


@pytest.fixture(autouse=True)
def rows_per_chunk_as_given(monkeypatch):
    monkeypatch.setattr(fused, "REFERENCE_VOCAB", 1)  # many chunks on tiny vocabularies


def _settings(**kw):
    base = dict(chunk_size=5, alpha=0.4, student_temperature=1.3, teacher_temperature=0.7,
                skip_first_tokens=1)
    base.update(kw)
    return ObjectiveSettings(**base)


# ------------------------------------------------------------------ (1) k >= V is the exact loss

@pytest.mark.parametrize("loss_type", TEACHER_LOSSES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [33, 40])
def test_top_k_at_least_v_is_the_exact_loss(loss_type, alpha, k):
    head, hs, ht, hf, tok, mask = make(b=3, v=33)
    exact = _settings(loss_type=loss_type, alpha=alpha)
    top = dataclasses.replace(exact, teacher_top_k=k)
    (n_exact, g_exact), (f_exact, gf_exact) = both(head, hs, tok, mask, ht, hf, exact)
    (n_top, g_top), (f_top, gf_top) = both(head, hs, tok, mask, ht, hf, top)
    assert_same((n_exact, g_exact), (n_top, g_top))  # naive top-k == exact
    assert_same((n_exact, g_exact), (f_top, gf_top))  # fused top-k == exact


@pytest.mark.parametrize("loss_type", TEACHER_LOSSES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("one_view", [False, True])
def test_a_support_of_the_whole_vocabulary_is_the_exact_loss(loss_type, alpha, one_view):
    """k >= V takes the exact path; the support machinery itself (both forms), given k = V,
    gives the exact per-token loss and gradient too."""
    z, zt, zf, tok = _logits_with_minus_inf(v=17)
    tok[0, 0] = 15
    zf = None if one_view else mx.array(zf)
    s = _settings(loss_type=loss_type, alpha=alpha, teacher_top_k=17)
    partial, full, target = obj.teacher_views(mx.array(zt), zf, s)
    tokens = mx.array(tok)
    index, keep = obj.top_k_support(partial, full, tokens, 17)
    cot = mx.array(np.random.default_rng(2).normal(size=tok.shape).astype(np.float32))
    forms = {"exact": lambda x: obj.token_losses(x, tokens, target, s),
             "gathered": lambda x: obj.support_losses(x, tokens, partial, full, index, keep, s),
             "masked": lambda x: obj.masked_top_k_losses(x, tokens, partial, full, target, s)}
    got = {k: mx.vjp(f, [mx.array(z)], [cot]) for k, f in forms.items()}
    (want,), (g_want,) = got.pop("exact")
    for name, ((value,), (grad,)) in got.items():
        np.testing.assert_allclose(np.array(value), np.array(want), rtol=1e-5, atol=1e-5,
                                   err_msg=name)
        np.testing.assert_allclose(np.array(grad), np.array(g_want), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


def test_top_k_zero_is_todays_path_bit_for_bit():
    head, hs, ht, hf, tok, mask = make(b=3)
    a = both(head, hs, tok, mask, ht, hf, _settings())
    b = both(head, hs, tok, mask, ht, hf, _settings(teacher_top_k=0))
    for (x, gx), (y, gy) in zip(a, b):
        assert np.array_equal(np.array(x.per_token), np.array(y.per_token))
        assert np.array_equal(np.array(gx), np.array(gy))


def test_nll_ignores_top_k():
    head, hs, ht, hf, tok, mask = make(b=3)
    s = _settings(loss_type="nll", teacher_top_k=3)
    (na, _), (fu, _) = both(head, hs, tok, mask, ht, hf, s)
    ref = naive_loss(head(hs), tok, mask, head(ht), head(hf), settings=_settings(loss_type="nll"))
    np.testing.assert_array_equal(np.array(na.per_token), np.array(ref.per_token))
    np.testing.assert_allclose(np.array(fu.per_token), np.array(ref.per_token), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------ (2) fused top-k == naive top-k

VIEWS = {"ar-opd": True, "one-view": False}


@pytest.mark.parametrize("loss_type", TEACHER_LOSSES)
@pytest.mark.parametrize("views", VIEWS)
@pytest.mark.parametrize("k", [1, 4, 12])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_top_k_equals_naive_top_k(loss_type, views, k, chunk):
    head, hs, ht, hf, tok, mask = make(b=3, v=33)  # right padding and a fully masked row
    s = _settings(loss_type=loss_type, teacher_top_k=k, chunk_size=chunk)
    out = both(head, hs, tok, mask, ht, hf if VIEWS[views] else None, s)
    assert_same(*out)
    exact = both(head, hs, tok, mask, ht, hf if VIEWS[views] else None,
                 dataclasses.replace(s, teacher_top_k=0))[0][0]
    if k < 12:  # a small support really changes the loss
        assert not np.allclose(np.array(out[0][0].per_token), np.array(exact.per_token))
    for name, value in exact.diagnostics.items():  # diagnostics stay over the whole vocabulary
        np.testing.assert_allclose(np.array(out[0][0].diagnostics[name]), np.array(value),
                                   rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", TEACHER_LOSSES)
def test_a_trainable_head_gets_the_naive_top_k_gradient(alpha, loss_type):
    from test_fused import _assert_grads_close, both_with_head
    head, hs, ht, hf, tok, mask = make(b=3, t=5)
    s = _settings(loss_type=loss_type, alpha=alpha, teacher_top_k=3, chunk_size=4)
    (naive, g_naive), (fusd, g_fused) = both_with_head(head.weight, hs, tok, mask, ht, hf, s)
    np.testing.assert_allclose(np.array(fusd.per_token), np.array(naive.per_token), rtol=1e-5,
                               atol=1e-6)
    _assert_grads_close(g_naive, g_fused)


def _logits_with_minus_inf(b=3, t=5, v=17, seed=0):
    r = np.random.default_rng(seed)
    z, zt, zf = (r.normal(size=(b, t, v)).astype(np.float32) * 2 for _ in range(3))
    zt[0, 0, :12] = -np.inf  # the anchor rules out most tokens (fewer than k finite)
    zf[0, 1, 3:9] = -np.inf  # the full view rules out some
    zt[1, 2, 5] = -np.inf
    zf[1, 2, :] = zt[1, 2, :]
    tok = r.integers(0, v, size=(b, t))
    tok[0, 0] = 2  # a sampled token the anchor rules out
    return z, zt, zf, tok


@pytest.mark.parametrize("loss_type", TEACHER_LOSSES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [5.0, None])
def test_gathered_support_equals_masked_vocabulary_with_minus_inf(loss_type, alpha, clip):
    """The fused chunk's form (support_losses on (.., K)) against the naive one (masked over V),
    on logits with -inf entries (a view ruling tokens out): values and gradients."""
    z, zt, zf, tok = _logits_with_minus_inf()
    s = _settings(loss_type=loss_type, alpha=alpha, clip=clip, lam=0.7, teacher_top_k=6)
    partial, full, target = obj.teacher_views(mx.array(zt), mx.array(zf), s)
    tokens = mx.array(tok)
    index, keep = obj.top_k_support(partial, full, tokens, s.teacher_top_k)

    def gathered(x):
        return obj.support_losses(x, tokens, partial, full, index, keep, s)

    def masked(x):
        return obj.masked_top_k_losses(x, tokens, partial, full, target, s)

    cot = mx.array(np.random.default_rng(1).normal(size=tok.shape).astype(np.float32))
    (lg,), (gg,) = mx.vjp(gathered, [mx.array(z)], [cot])
    (lm,), (gm,) = mx.vjp(masked, [mx.array(z)], [cot])
    lg, lm, gg, gm = map(np.array, (lg, lm, gg, gm))
    finite = np.isfinite(lm)
    np.testing.assert_array_equal(finite, np.isfinite(lg))
    np.testing.assert_allclose(lg[finite], lm[finite], rtol=1e-5, atol=1e-5)
    assert not np.isnan(gm).any() and not np.isnan(gg).any()
    scale = max(np.abs(gm).max(), 1e-4)
    np.testing.assert_allclose(gg / scale, gm / scale, rtol=1e-5, atol=1e-5)
    # gradient only on the support
    support = np.array(obj.support_mask(index, z.shape[-1]))
    assert np.all(gm[~support] == 0)


def test_support_is_the_union_of_the_views_top_k_and_the_sampled_token():
    p = mx.array([[0.0, 5.0, 4.0, -1.0, 3.0, -mx.inf]])
    f = mx.array([[6.0, 0.0, 1.0, 2.0, -3.0, -4.0]])
    index, keep = obj.top_k_support(p, f, mx.array([5]), 2)
    chosen = sorted(set(np.array(index)[0][np.array(keep)[0]].tolist()))
    assert chosen == [0, 1, 2, 3, 5]  # top2(P) = {1, 2}, top2(F) = {0, 3}, y = 5
    index, keep = obj.top_k_support(p, f, mx.array([1]), 2)
    assert np.array(keep).sum() == 4 and np.array(index).shape == (1, 5)  # y repeats P's top
    index, keep = obj.top_k_support(p, None, mx.array([1]), 9)  # one view, k capped at V
    assert np.array(index).shape == (1, 7) and np.array(keep).sum() == 6


# ------------------------------------------------------------------ (3) float64 numpy reference

def _np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_top_k_loss(z, zt, zf, y, s):
    """One row, float64, from the definition (METHOD.md "A top-k teacher")."""
    tau = s.teacher_temperature
    p, f = _np_log_softmax(zt / tau), _np_log_softmax(zf / tau)
    r = np.clip(f - p, -s.clip, s.clip)
    t = _np_log_softmax(p + s.lam * r)
    k = s.teacher_top_k
    support = sorted(set(np.argsort(-p)[:k]) | set(np.argsort(-f)[:k]) | {int(y)})
    tk = _np_log_softmax(t[support])  # the target restricted and renormalized
    sk = _np_log_softmax(z[support] / s.student_temperature)  # the student likewise
    at = support.index(int(y))
    pt, ps = np.exp(tk), np.exp(sk)
    if s.loss_type == "sampled_kl":
        d = tk[at] - sk[at]
        return np.expm1(d) - d
    if s.loss_type == "advantage":
        return -(tk[at] - sk[at]) * sk[at]
    if s.alpha == 0.0:
        return (pt * (tk - sk)).sum()
    if s.alpha == 1.0:
        return (ps * (sk - tk)).sum()
    m = np.log(s.alpha * pt + (1 - s.alpha) * ps)
    return s.alpha * (pt * (tk - m)).sum() + (1 - s.alpha) * (ps * (sk - m)).sum()


@pytest.mark.parametrize("loss_type,alpha", [("full_vocab", 0.0), ("full_vocab", 0.3),
                                             ("full_vocab", 1.0), ("sampled_kl", 0.0),
                                             ("advantage", 0.0)])
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_a_float64_numpy_reference(loss_type, alpha, k, seed):
    head, hs, ht, hf, tok, _ = make(b=2, t=6, v=29, seed=seed)
    mask = mx.ones(tok.shape, dtype=mx.bool_)
    s = _settings(loss_type=loss_type, alpha=alpha, teacher_top_k=k, skip_first_tokens=0,
                  lam=1.1, clip=0.8)
    z, zt, zf = (np.array(head(x)).astype(np.float64) for x in (hs, ht, hf))
    y = np.array(tok)
    want = np.array([[_np_top_k_loss(z[b, t], zt[b, t], zf[b, t], y[b, t], s)
                      for t in range(y.shape[1])] for b in range(y.shape[0])])
    (na, _), (fu, _) = both(head, hs, tok, mask, ht, hf, s)
    np.testing.assert_allclose(np.array(na.per_token), want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.array(fu.per_token), want, rtol=2e-5, atol=2e-6)


def test_forward_kl_gradient_against_numpy():
    """d KL(T_k || S_k) / dz = (softmax of z on the support - e^T_k) / tau_s on the support, 0
    elsewhere."""
    r = np.random.default_rng(3)
    v, k = 23, 4
    z, zt, zf = (r.normal(size=(1, 1, v)) * 2 for _ in range(3))
    y = np.array([[7]])
    s = _settings(teacher_top_k=k, alpha=0.0, skip_first_tokens=0)
    g = mx.grad(lambda x: naive_loss(x, mx.array(y), mx.ones((1, 1)), mx.array(zt, mx.float32),
                                     mx.array(zf, mx.float32), settings=s).loss)(
        mx.array(z, mx.float32))
    tau = s.teacher_temperature
    p, f = _np_log_softmax(zt[0, 0] / tau), _np_log_softmax(zf[0, 0] / tau)
    t = _np_log_softmax(p + s.lam * np.clip(f - p, -s.clip, s.clip))
    sup = sorted(set(np.argsort(-p)[:k]) | set(np.argsort(-f)[:k]) | {7})
    want = np.zeros(v)
    want[sup] = (np.exp(_np_log_softmax(z[0, 0, sup] / s.student_temperature))
                 - np.exp(_np_log_softmax(t[sup]))) / s.student_temperature
    np.testing.assert_allclose(np.array(g)[0, 0], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ (4) torch mirror

@pytest.mark.parametrize("loss_type,alpha", [("full_vocab", 0.0), ("full_vocab", 0.5),
                                             ("full_vocab", 1.0), ("sampled_kl", 0.0),
                                             ("advantage", 0.0)])
@pytest.mark.parametrize("views", ["ar-opd", "one-view"])
def test_torch_mirror_parity(loss_type, alpha, views):
    torch = pytest.importorskip("torch")
    from aropd_mlx.backends.torch import objective as tobj
    z, zt, zf, tok = _logits_with_minus_inf(seed=4)
    tok[0, 0] = 15  # a sampled token the anchor rules out is inf/NaN in the exact loss too
    zf_ = zf if views == "ar-opd" else None
    mask = np.ones(tok.shape, bool)
    mask[2, 3:] = False
    s = _settings(loss_type=loss_type, alpha=alpha, teacher_top_k=5, clip=1.0)

    def m_loss(x):
        out = naive_loss(x, mx.array(tok), mx.array(mask), mx.array(zt),
                         None if zf_ is None else mx.array(zf_), settings=s)
        return out.loss, out
    (_, mo), mg = mx.value_and_grad(m_loss)(mx.array(z))
    zt_ = torch.tensor(z, requires_grad=True)
    to = tobj.naive_loss(zt_, torch.tensor(tok), torch.tensor(mask), torch.tensor(zt),
                         None if zf_ is None else torch.tensor(zf_), settings=s)
    to.loss.backward()
    np.testing.assert_allclose(to.per_token.detach().numpy(), np.array(mo.per_token),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(zt_.grad.numpy(), np.array(mg), rtol=1e-4, atol=1e-6)
    # the gathered form of the mirror agrees with its masked form
    tp, tf, tt = tobj.teacher_views(torch.tensor(zt), None if zf_ is None else torch.tensor(zf_), s)
    index, keep = tobj.top_k_support(tp, tf, torch.tensor(tok), 5)
    gathered = tobj.support_losses(torch.tensor(z), torch.tensor(tok), tp, tf, index, keep, s)
    masked = tobj.masked_top_k_losses(torch.tensor(z), torch.tensor(tok), tp, tf, tt, s)
    np.testing.assert_allclose(gathered.numpy(), masked.numpy(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ (5) validation

@pytest.mark.parametrize("bad", [-1, 1.5, True, "8", None])
def test_teacher_top_k_must_be_an_integer_at_least_zero(bad):
    with pytest.raises(UserError, match=r"objective\.teacher_top_k must be an integer >= 0") as e:
        ObjectiveSettings(teacher_top_k=bad).validate()
    assert "\n" not in str(e.value)


def test_teacher_top_k_from_a_config_file(tmp_path):
    assert load_config(overrides={"objective.teacher_top_k": 100}).objective.teacher_top_k == 100
    assert load_config().objective.teacher_top_k == 0
    path = tmp_path / "run.yaml"
    path.write_text("objective:\n  teacher_top_k: -4\n")
    with pytest.raises(UserError, match="teacher_top_k") as e:
        load_config(path)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the bench

def test_bench_objective_top_k_cli(tmp_path):
    import json

    import typer
    from typer.testing import CliRunner

    from aropd_mlx.cli.bench import bench_command

    app = typer.Typer()
    app.command()(bench_command)
    out = tmp_path / "topk.json"
    res = CliRunner().invoke(app, ["objective", "--quick", "--top-k", "4", "--top-k", "200",
                                   "--model", "lab", "--json", str(out)])
    assert res.exit_code == 0, res.output
    runs = json.loads(out.read_text())["top_k"][0]["runs"]
    assert [r["k"] for r in runs] == [0, 4, 200]
    assert runs[2]["loss_rel_diff"] < 1e-5 and runs[2]["support_mass"] > 0.9999  # k >= V
    assert "rel diff" in res.output
    bad = CliRunner().invoke(app, ["rollout", "--top-k", "4"])
    assert bad.exit_code != 0 and "--top-k goes with" in bad.output
