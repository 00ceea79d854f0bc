"""The torch mirror of the objective against the MLX one on the same numpy inputs."""
import importlib.util
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

torch = pytest.importorskip("torch")

from aropd_mlx import objective as mobj  # noqa: E402
from aropd_mlx.backends.torch import objective as tobj  # noqa: E402
from aropd_mlx.objective import ObjectiveSettings  # noqa: E402


def inputs(b=3, t=6, v=30, seed=0, scale=2.0):
    r = np.random.default_rng(seed)
    z, zt, zf = (r.normal(size=(b, t, v)).astype(np.float32) * scale for _ in range(3))
    tok = r.integers(0, v, size=(b, t))
    mask = np.ones((b, t), bool)
    mask[1, t // 2:] = False
    mask[2, :] = False
    return z, zt, zf, tok, mask


def as_np(x):
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.array(x)


def agree(a, b, rtol=1e-5, atol=1e-5, msg=""):
    np.testing.assert_allclose(as_np(a), as_np(b), rtol=rtol, atol=atol, err_msg=msg)


def test_the_mirror_imports_without_mlx(monkeypatch):
    """A CUDA box may lack mlx: load the mirror's file afresh with mlx unimportable."""
    for name in [n for n in sys.modules if n == "mlx" or n.startswith("mlx.")]:
        monkeypatch.setitem(sys.modules, name, None)
    spec = importlib.util.spec_from_file_location("mirror_without_mlx", tobj.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)  # dataclasses look their module up
    spec.loader.exec_module(fresh)
    with pytest.raises(ImportError):
        import mlx.core  # noqa: F401  (the block works)
    x = torch.randn(2, 5)
    assert float(fresh.generalized_jsd(x, torch.log_softmax(x, -1), 0.5).abs().max()) < 1e-6


@pytest.mark.parametrize("lam,clip", [(0.0, 5.0), (0.8, 5.0), (1.0, None), (1.3, 0.5)])
def test_anchored_target_parity(lam, clip):
    _, zt, zf, _, _ = inputs(scale=4.0)
    agree(tobj.anchored_residual_target(torch.tensor(zt), torch.tensor(zf), lam, clip),
          mobj.anchored_residual_target(mx.array(zt), mx.array(zf), lam, clip))


@pytest.mark.parametrize("clip", [None, 5.0])
@pytest.mark.parametrize("lam", [0.0, 0.8, 1.0, 1.4])
def test_anchored_target_parity_with_minus_inf(lam, clip):
    """-inf entries in either view (and a row whose views share no token): same target."""
    r = np.random.default_rng(7)
    p, f = (r.normal(size=(5, 40)).astype(np.float32) * 3 for _ in range(2))
    p[r.random(p.shape) < 0.3], f[r.random(f.shape) < 0.3] = -np.inf, -np.inf
    p[:, 0], f[:, 0] = 0.0, 0.0
    p[-1, 20:], f[-1, :20] = -np.inf, -np.inf
    t = tobj.anchored_residual_target(torch.tensor(p), torch.tensor(f), lam, clip)
    m = np.array(mobj.anchored_residual_target(mx.array(p), mx.array(f), lam, clip), np.float64)
    agree(t.double().exp().sum(-1), np.ones(5))
    live = m > -1e20
    assert np.array_equal(live, as_np(t) > -1e20)
    agree(as_np(t)[live], m[live], atol=2e-5)


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.2, 0.5, 0.9, 1 - 1e-6, 1.0])
def test_jsd_parity_and_gradient(alpha):
    z, zt, _, _, _ = inputs()
    t_lp = np.array(mobj.log_softmax(mx.array(zt)))
    zt_ = torch.tensor(z, requires_grad=True)
    tv = tobj.generalized_jsd(zt_, torch.tensor(t_lp), alpha)
    tv.sum().backward()
    mv, mg = mx.value_and_grad(lambda x: mobj.generalized_jsd(x, mx.array(t_lp), alpha).sum())(
        mx.array(z))
    agree(tv, mobj.generalized_jsd(mx.array(z), mx.array(t_lp), alpha), rtol=1e-4, atol=1e-6)
    agree(zt_.grad, mg, atol=1e-6, rtol=1e-4)


def test_jsd_mirror_survives_extreme_logits():
    z = torch.tensor([[1e4, -1e4, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, -float("inf"), -1e30, -1e4], [-1e4, -1e-4, -30.0, -float("inf")]])
    t = torch.log_softmax(t, -1)
    for alpha in (0.0, 1e-7, 0.5, 1.0):
        v = tobj.generalized_jsd(z, t, alpha)
        (g,) = torch.autograd.grad(v.sum(), z)
        assert torch.isfinite(v).all() and torch.isfinite(g).all()


CASES = [("full_vocab", 0.0, "ar-opd"), ("full_vocab", 0.5, "ar-opd"), ("full_vocab", 1.0, "one"),
         ("sampled_kl", 0.0, "ar-opd"), ("advantage", 0.0, "one"), ("nll", 0.0, "none"),
         ("nll", 0.0, "ar-opd")]


@pytest.mark.parametrize("loss_type,alpha,views", CASES)
@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_naive_loss_parity_with_gradients(loss_type, alpha, views, reduction):
    z, zt, zf, tok, mask = inputs()
    s = ObjectiveSettings(loss_type=loss_type, alpha=alpha, reduction=reduction, clip=1.0,
                          student_temperature=1.2, teacher_temperature=0.8, skip_first_tokens=2)
    t_views = {"ar-opd": (zt, zf), "one": (zt, None), "none": (None, None)}[views]

    def m_loss(x):
        out = mobj.naive_loss(x, mx.array(tok), mx.array(mask),
                              *(None if v is None else mx.array(v) for v in t_views), settings=s)
        return out.loss, out
    (_, mo), mg = mx.value_and_grad(m_loss)(mx.array(z))
    zt_ = torch.tensor(z, requires_grad=True)
    to = tobj.naive_loss(zt_, torch.tensor(tok), torch.tensor(mask),
                         *(None if v is None else torch.tensor(v) for v in t_views), settings=s)
    to.loss.backward()
    for name in ("loss", "weight", "per_token"):
        agree(getattr(to, name), getattr(mo, name), msg=name)
    assert set(to.diagnostics) == set(mo.diagnostics)
    for k in mo.diagnostics:
        agree(to.diagnostics[k], mo.diagnostics[k], msg=k)
    agree(zt_.grad, mg, atol=1e-7, rtol=1e-4)
    assert zt_.grad.abs().max() > 0


def test_duck_typed_settings_and_other_dtypes():
    z, zt, zf, tok, mask = inputs()
    fields = {f: getattr(ObjectiveSettings(), f) for f in ObjectiveSettings.__dataclass_fields__}
    duck = SimpleNamespace(**fields)
    ref = tobj.naive_loss(torch.tensor(z), torch.tensor(tok), torch.tensor(mask),
                          torch.tensor(zt), torch.tensor(zf), settings=duck)
    wide = tobj.naive_loss(torch.tensor(z).double(), torch.tensor(tok), torch.tensor(mask),
                           torch.tensor(zt).double(), torch.tensor(zf).double(), settings=duck)
    assert wide.loss.dtype == torch.float64
    agree(wide.loss, ref.loss)
    half = tobj.naive_loss(torch.tensor(z).bfloat16(), torch.tensor(tok), torch.tensor(mask),
                           torch.tensor(zt).bfloat16(), torch.tensor(zf).bfloat16(), settings=duck)
    assert half.loss.dtype == torch.float32
    agree(half.loss, ref.loss, rtol=5e-2, atol=5e-2)


def test_masks_and_reduction_mirror():
    mask = np.array([[1, 1, 1, 1, 0], [0, 1, 1, 0, 1], [0, 0, 0, 0, 0]], bool)
    for k in (0, 1, 3):
        assert np.array_equal(tobj.response_mask(torch.tensor(mask), k).numpy(),
                              np.array(mobj.response_mask(mx.array(mask), k)))
    pt = np.random.default_rng(0).normal(size=mask.shape).astype(np.float32)
    for red in ("sequence", "token"):
        tl, tw = tobj.reduce_per_token(torch.tensor(pt), torch.tensor(mask), red)
        ml, mw = mobj.reduce_per_token(mx.array(pt), mx.array(mask), red)
        agree(tl, ml)
        agree(tw, mw)


@hsettings(max_examples=15, deadline=None)
@given(v=st.integers(2, 40), scale=st.sampled_from([0.1, 3.0, 1e3]),
       alpha=st.sampled_from([0.0, 0.3, 0.5, 1.0]), lam=st.floats(0.0, 1.4),
       seed=st.integers(0, 1000))
def test_property_target_and_jsd_parity(v, scale, alpha, lam, seed):
    r = np.random.default_rng(seed)
    z, zt, zf = (r.normal(size=(2, v)).astype(np.float32) * scale for _ in range(3))
    tt = tobj.anchored_residual_target(torch.tensor(zt), torch.tensor(zf), lam)
    mt = mobj.anchored_residual_target(mx.array(zt), mx.array(zf), lam)
    agree(tt, mt, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    tj = tobj.generalized_jsd(torch.tensor(z), tt, alpha)
    mj = mobj.generalized_jsd(mx.array(z), mt, alpha)
    agree(tj, mj, rtol=1e-4, atol=1e-5 * max(1.0, scale))


def test_the_mirror_uses_the_mlx_names():
    """One name per idea, torch mirror included (DESIGN.md): every function, class and constant
    of the mirror has its namesake in aropd_mlx.objective (the MLX side adds only settings)."""
    import inspect

    def names(module):
        return {n for n, v in vars(module).items() if not n.startswith("__") and (
            (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module.__name__
            or n.lstrip("_").isupper())}

    mirror, mlx_side = names(tobj), names(mobj)
    assert mirror <= mlx_side, sorted(mirror - mlx_side)
    assert mlx_side - mirror <= {"ObjectiveSettings", "LOSS_TYPES", "REDUCTIONS", "_is_int"}
