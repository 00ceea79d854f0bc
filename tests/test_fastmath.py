"""aropd_mlx.fastmath: each fast path against its plain-MLX reference (values and VJPs, several
shapes, -inf entries) and against float64 numpy. The loss's elementwise time is mostly e^x."""
import mlx.core as mx
import numpy as np
import pytest

from aropd_mlx import fastmath as fm
from aropd_mlx import objective as obj


def test_objective_uses_the_fastmath_kernels():
    assert obj.exp is fm.exp and obj.logsumexp is fm.logsumexp


def sample(shape, seed, scale=10.0):
    r = np.random.default_rng(seed)
    x = (r.normal(size=shape) * scale).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0, :3] = -np.inf  # masked entries
    if len(flat) > 1:
        flat[1, 5] = -1e30  # the objective's log-prob floor
        flat[-1, 7] = 88.0  # near fp32 exp overflow
    return flat.reshape(shape)


SHAPES = [(4, 1024), (2, 3, 2048), (3, 1500), (5000,), (3, 99), (2, 2, 40)]


@pytest.mark.parametrize("shape", SHAPES)
def test_exp_matches_the_reference_and_its_vjp(shape):
    x = mx.array(sample(shape, seed=len(shape) + shape[-1]))
    # rounding x * log2(e) to fp32 costs ~|x| * 6e-8 relative; fp32 exp itself ~1e-7
    size = np.abs(np.array(x)[np.isfinite(np.array(x)) & (np.array(x) > -1e29)]).max()
    assert fm.fast_cpu_path(x) == (mx.default_device() == mx.cpu and shape[-1] >= 1024)
    got, want = np.array(fm.exp(x)), np.array(fm.exp_reference(x))
    np.testing.assert_allclose(got, want, rtol=2e-6 + 1.2e-7 * size, atol=0)
    assert np.array_equal(got == 0, want == 0)  # the same entries vanish (-inf, the floor)
    cot = mx.array(np.random.default_rng(1).normal(size=shape).astype(np.float32))
    (g,) = mx.vjp(fm.exp, [x], [cot])[1]
    (g_ref,) = mx.vjp(fm.exp_reference, [x], [cot])[1]
    g, g_ref = np.array(g), np.array(g_ref)
    assert np.isfinite(g).all() and np.array_equal(g == 0, g_ref == 0)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5 + 1.2e-7 * size, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_logsumexp_matches_the_reference_and_its_vjp(shape):
    x = mx.array(sample(shape, seed=3 * shape[-1]))
    got, want = np.array(fm.logsumexp(x)), np.array(fm.logsumexp_reference(x))
    assert got.shape == want.shape == shape[:-1] + (1,)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    cot = mx.array(np.random.default_rng(2).normal(size=shape[:-1] + (1,)).astype(np.float32))
    (g,) = mx.vjp(fm.logsumexp, [x], [cot])[1]
    (g_ref,) = mx.vjp(fm.logsumexp_reference, [x], [cot])[1]
    g, g_ref = np.array(g), np.array(g_ref)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)


def test_exp_and_logsumexp_match_float64_with_edge_cases():
    """The fast paths against numpy in float64 (not only against the fp32 references)."""
    r = np.random.default_rng(0)
    # a vocabulary-sized last axis: the CPU backend's 2^(x log2 e) path
    x = np.concatenate([r.normal(size=(6, 1100)) * s for s in (1.0, 10.0, 30.0)]).astype(np.float32)
    assert fm.fast_cpu_path(mx.array(x)) == (mx.default_device() == mx.cpu)
    x[0, :3] = -np.inf  # masked entries
    x[1, :] = -np.inf  # a fully masked row
    x[2, 5] = -1e30  # the log-prob floor
    x[3, 7] = 88.0  # near fp32 exp overflow
    got = np.array(fm.exp(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    fin = (want > 1e-37) & (want < 1e38)  # inside fp32 normal range
    # rounding x * log2(e) to fp32 costs ~|x| * 6e-8 relative; fp32 exp itself ~1e-7
    rel = np.abs(got[fin] - want[fin]) / want[fin]
    assert np.all(rel <= 1e-6 + 1.2e-7 * np.abs(x[fin])), rel.max()
    assert np.all(got[~fin & (want == 0)] == 0)
    lse = np.array(fm.logsumexp(mx.array(x)))[:, 0].astype(np.float64)
    with np.errstate(divide="ignore"):
        top = np.max(x.astype(np.float64), axis=-1, keepdims=True)
        want_lse = (np.log(np.exp(x - np.where(np.isinf(top), 0, top)).sum(-1, keepdims=True))
                    + np.where(np.isinf(top), 0, top))[:, 0]
    assert lse[1] == -np.inf
    assert np.array(fm.logsumexp_reference(mx.array(x)))[1, 0] == -np.inf
    ok = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[ok], want_lse[ok], rtol=1e-6, atol=1e-5)
    inf_row = np.array(fm.logsumexp(mx.array(np.r_[0.0, np.inf, np.ones(1100)][None], dtype=mx.float32)))
    assert inf_row[0, 0] == np.inf
    g = np.array(mx.grad(lambda a: fm.logsumexp(a).sum())(mx.array(x[2:4])))
    sm = np.exp(x[2:4].astype(np.float64) - want_lse[2:4, None])
    np.testing.assert_allclose(g, sm, rtol=1e-5, atol=1e-7)
