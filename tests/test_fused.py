"""fused_loss (chunked, custom VJP, compiled) against naive_loss on materialized logits."""
import dataclasses

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from aropd_mlx import fused, objective as obj
from aropd_mlx.fused import fused_loss
from aropd_mlx.head import OutputHead
from aropd_mlx.objective import ObjectiveSettings, naive_loss

from helpers import float32_tolerance


@pytest.fixture(autouse=True)
def rows_per_chunk_as_given(monkeypatch):
    """These tests use tiny vocabularies; chunk_size rows per chunk there too, so that they
    exercise many chunks (in use, a small vocabulary takes more rows per chunk)."""
    monkeypatch.setattr(fused, "REFERENCE_VOCAB", 1)


def test_small_vocabularies_take_more_rows_per_chunk(monkeypatch):
    monkeypatch.setattr(fused, "REFERENCE_VOCAB", 32768)
    assert fused.chunk_rows(64, 151936) == 64 and fused.chunk_rows(64, 32768) == 64
    assert fused.chunk_rows(64, 32000) == 64 and fused.chunk_rows(64, 4096) == 512
    assert fused.chunk_rows(64, 99) == 64 * 330 and fused.chunk_rows(1, 40000) == 1
    calls = []
    real = fused._run_chunks
    monkeypatch.setattr(fused, "_run_chunks", lambda *a: calls.append(a[-1]) or real(*a))
    head, hs, ht, hf, tok, mask = make(b=3, t=40, v=4096)
    s = ObjectiveSettings(chunk_size=8)
    out = fused_loss(hs, head, tok, mask, ht, hf, settings=s)
    want = naive_loss(head(hs), tok, mask, head(ht), head(hf), settings=s)
    assert calls == [min(8 * 8, 120)]
    np.testing.assert_allclose(np.array(out.per_token), np.array(want.per_token), rtol=1e-5, atol=1e-6)


def make(b=2, t=7, h=8, v=33, seed=0, scale=1.0, quantize=False):
    r = np.random.default_rng(seed)
    w = r.normal(size=(v, h)).astype(np.float32) * scale
    if quantize:
        head = OutputHead(*mx.quantize(mx.array(w), group_size=32, bits=4), group_size=32, bits=4)
    else:
        head = OutputHead(mx.array(w))
    hs, ht, hf = (mx.array(r.normal(size=(b, t, h)).astype(np.float32)) for _ in range(3))
    tok = mx.array(r.integers(0, v, size=(b, t)))
    mask = np.ones((b, t), bool)
    if b > 1:
        mask[1, t // 2:] = False  # right padding
    if b > 2:
        mask[2, :] = False  # a fully masked row
    return head, hs, ht, hf, tok, mx.array(mask)


def both(head, hs, tok, mask, ht, hf, s):
    """(naive, fused) outputs and gradients of the loss w.r.t. student_h."""
    def run(kind):
        def f(h):
            if kind == "naive":
                out = naive_loss(head(h), tok, mask, None if ht is None else head(ht),
                                 None if hf is None else head(hf), settings=s)
            else:
                out = fused_loss(h, head, tok, mask, ht, hf, settings=s)
            return out.loss, out
        (_, out), g = mx.value_and_grad(f)(hs)
        mx.eval(out.loss, out.per_token, out.diagnostics, g)
        return out, g
    return run("naive"), run("fused")


def assert_same(a, b, rtol=1e-5, atol=1e-6, nonzero=True):
    (na, ga), (fu, gf) = a, b
    tol = dict(rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.array(fu.loss), np.array(na.loss), **tol)
    np.testing.assert_allclose(np.array(fu.weight), np.array(na.weight), **tol)
    np.testing.assert_allclose(np.array(fu.per_token), np.array(na.per_token), **tol)
    assert set(fu.diagnostics) == set(na.diagnostics)
    for k in na.diagnostics:
        np.testing.assert_allclose(np.array(fu.diagnostics[k]), np.array(na.diagnostics[k]),
                                   err_msg=k, **tol)
    # gradients are compared relative to their largest entry; below 1e-4 (saturated extreme
    # logits) they are rounding noise of O(1) quantities and are compared absolutely
    scale = max(float(mx.abs(ga).max()), 1e-4)
    np.testing.assert_allclose(np.array(gf) / scale, np.array(ga) / scale, rtol=rtol, atol=atol)
    if nonzero:  # (saturated extreme logits can have an exactly zero gradient)
        assert float(mx.abs(ga).max()) > 0 or float(na.weight) == 0


VIEWS = {"ar-opd": (True, True), "one-view": (True, False), "none": (False, False)}


@pytest.mark.parametrize("loss_type,views", [(lt, v) for lt in obj.LOSS_TYPES for v in VIEWS
                                             if lt == "nll" or v != "none"])
def test_fused_equals_naive_for_every_loss_and_view(loss_type, views):
    has_t, has_f = VIEWS[views]
    head, hs, ht, hf, tok, mask = make(b=3)
    s = ObjectiveSettings(loss_type=loss_type, chunk_size=5, alpha=0.4,
                          student_temperature=1.3, teacher_temperature=0.7, skip_first_tokens=2)
    assert_same(*both(head, hs, tok, mask, ht if has_t else None, hf if has_f else None, s))


@pytest.mark.parametrize("chunk", [1, 3, 7, 8, 64])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_fused_equals_naive_for_chunk_sizes(chunk, alpha, reduction):
    head, hs, ht, hf, tok, mask = make(b=3, t=5)  # 15 rows: padded last chunks
    s = ObjectiveSettings(chunk_size=chunk, alpha=alpha, reduction=reduction, clip=0.5)
    assert_same(*both(head, hs, tok, mask, ht, hf, s))


def test_fused_with_a_quantized_head():
    head, hs, ht, hf, tok, mask = make(h=64, v=40, quantize=True)
    assert head.quantized and head.weight.dtype == mx.uint32
    s = ObjectiveSettings(chunk_size=4, alpha=0.5, skip_first_tokens=0)
    assert_same(*both(head, hs, tok, mask, ht, hf, s))


@pytest.mark.parametrize("loss_type", obj.LOSS_TYPES)
def test_fused_without_diagnostics_equals_naive_loss_and_gradient(loss_type):
    """diagnostics=False (the trainer's non-logging steps) drops only the diagnostics."""
    head, hs, ht, hf, tok, mask = make(b=3)
    s = ObjectiveSettings(loss_type=loss_type, chunk_size=4, alpha=0.3, skip_first_tokens=1)
    views = (None, None) if loss_type == "nll" else (ht, hf)
    (naive, g_naive), _ = both(head, hs, tok, mask, *views, s)

    def f(h):
        out = fused_loss(h, head, tok, mask, *views, settings=s, diagnostics=False)
        return out.loss, out
    (_, out), g = mx.value_and_grad(f)(hs)
    assert out.diagnostics == {}
    np.testing.assert_allclose(np.array(out.per_token), np.array(naive.per_token), rtol=1e-5, atol=1e-6)
    scale = max(float(mx.abs(g_naive).max()), 1e-4)
    np.testing.assert_allclose(np.array(g) / scale, np.array(g_naive) / scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_lanes_give_the_one_lane_result(chunk, monkeypatch):
    """On the CPU, chunks alternate over two streams (fused._lanes); the result must be the
    one-stream result, with every chunk size (odd, 1: a single lane). Not bit for bit: with
    two streams running, a multithreaded BLAS may block the head's GEMMs differently (one ulp,
    seen on AMD); the agreement is float32 rounding over the sums involved (H, then V)."""
    head, hs, ht, hf, tok, mask = make(b=3, t=7)
    s = ObjectiveSettings(chunk_size=chunk, alpha=0.5)

    def run():
        def f(h):
            out = fused_loss(h, head, tok, mask, ht, hf, settings=s)
            return out.loss, out
        (_, out), g = mx.value_and_grad(f)(hs)
        mx.eval(out.per_token, out.diagnostics, g)
        return out, g

    two, g_two = run()
    assert len(fused._lanes()) == 2 and mx.default_device() == mx.cpu
    monkeypatch.setattr(fused, "_lanes", lambda: [mx.default_stream(mx.cpu)])
    one, g_one = run()
    h, v = hs.shape[-1], head.weight.shape[0]
    logit_max = max(float(mx.abs(head(x)).max()) for x in (hs, ht, hf))
    tol = float32_tolerance(h, v, magnitude=logit_max)

    def close(a, b, what):
        a, b = np.array(a), np.array(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=tol * max(np.abs(b).max(), 1.0), err_msg=what)

    close(two.per_token, one.per_token, "per_token")
    close(g_two, g_one, "gradient")
    for k in one.diagnostics:
        close(two.diagnostics[k], one.diagnostics[k], k)
    # a wrong lane order (chunks swapped between rows) moves a value by far more than that
    assert tol * max(float(mx.abs(one.per_token).max()), 1.0) < 1e-2


def test_fused_gradient_for_a_per_token_cotangent():
    """The custom VJP serves any cotangent on per_token, not only the loss's."""
    head, hs, ht, hf, tok, mask = make()
    wts = mx.array(np.random.default_rng(3).normal(size=tok.shape).astype(np.float32))
    s = ObjectiveSettings(chunk_size=4)

    def naive(h):
        return (naive_loss(head(h), tok, mask, head(ht), head(hf), settings=s).per_token
                * wts).sum()

    def fusd(h):
        return (fused_loss(h, head, tok, mask, ht, hf, settings=s).per_token * wts).sum()

    np.testing.assert_allclose(np.array(mx.grad(fusd)(hs)), np.array(mx.grad(naive)(hs)),
                               rtol=1e-5, atol=1e-7)


def test_no_gradient_reaches_the_teacher_views():
    head, hs, ht, hf, tok, mask = make()
    s = ObjectiveSettings(chunk_size=4)
    g = mx.grad(lambda t, f: fused_loss(hs, head, tok, mask, t, f, settings=s).loss,
                argnums=(0, 1))(ht, hf)
    assert all(float(mx.abs(x).max()) == 0 for x in g)


def test_fused_under_an_outer_compile():
    head, hs, ht, hf, tok, mask = make()
    s = ObjectiveSettings(chunk_size=3)
    step = mx.compile(mx.value_and_grad(
        lambda h: fused_loss(h, head, tok, mask, ht, hf, settings=s).loss))
    loss, g = step(hs)
    (ref, _), (_, gref) = both(head, hs, tok, mask, ht, hf, s)
    np.testing.assert_allclose(float(loss), float(ref.loss), rtol=1e-5)
    np.testing.assert_allclose(np.array(g), np.array(gref), rtol=1e-5, atol=1e-7)


def test_same_shapes_do_not_retrace(monkeypatch):
    traces = []
    real = obj.token_losses
    monkeypatch.setattr(obj, "token_losses", lambda *a: traces.append(1) or real(*a))
    fused._CHUNK_BODIES.clear()
    head, hs, ht, hf, tok, mask = make(b=2, t=6)
    s = ObjectiveSettings(chunk_size=4, lam=0.77)  # 12 rows: 3 chunks, one shape
    mx.eval(fused_loss(hs, head, tok, mask, ht, hf, settings=s).loss)
    first = len(traces)
    assert first > 0
    runs = []
    for t, lam in ((6, 0.5), (5, 1.2), (3, 0.0)):  # other lengths pad to the same chunk
        args = (hs[:, :t], tok[:, :t], mask[:, :t], ht[:, :t], hf[:, :t])  # shape; lam (a
        s2 = dataclasses.replace(s, reduction="token", skip_first_tokens=1, lam=lam)  # schedule)
        out = fused_loss(args[0], head, *args[1:], settings=s2)  # is an input, not a constant
        mx.eval(out.per_token)
        runs.append((args, s2, out))
    assert len(traces) == first and len(fused._CHUNK_BODIES) == 1
    for (h2, t2, m2, p2, f2), s2, out in runs:
        ref = naive_loss(head(h2), t2, m2, head(p2), head(f2), settings=s2)
        np.testing.assert_allclose(np.array(out.per_token), np.array(ref.per_token), rtol=1e-5,
                                   atol=1e-6)


def test_fused_on_an_empty_batch():
    head, hs, ht, hf, tok, mask = make(b=2, t=0)
    out = fused_loss(hs, head, tok, mask, ht, hf)
    assert float(out.loss) == 0 and float(out.weight) == 0 and out.per_token.shape == (2, 0)


def test_fused_rejects_missing_views():
    head, hs, ht, hf, tok, mask = make()
    with pytest.raises(ValueError, match="needs teacher_h"):
        fused_loss(hs, head, tok, mask, None, hf)
    with pytest.raises(ValueError, match="needs teacher_h"):
        fused_loss(hs, head, tok, mask, settings=ObjectiveSettings(loss_type="sampled_kl"))


def _peak(fn):
    mx.eval(fn())  # warm up (compile)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - base


def test_peak_memory_does_not_grow_with_length():
    """Loss, diagnostics and gradient evaluated together, as a trainer does."""
    v, h, chunk = 2048, 16, 32
    s = ObjectiveSettings(chunk_size=chunk)

    def step(kind, t):
        head, hs, ht, hf, tok, mask = make(b=1, t=t, h=h, v=v, seed=t)

        def f(x):
            out = (fused_loss(x, head, tok, mask, ht, hf, settings=s) if kind == "fused" else
                   naive_loss(head(x), tok, mask, head(ht), head(hf), settings=s))
            return out.loss, out.diagnostics
        return lambda: mx.value_and_grad(f)(hs)

    one_row = v * 4  # bytes of one fp32 row over the vocabulary
    fused128, fused512 = _peak(step("fused", 128)), _peak(step("fused", 512))
    naive512 = _peak(step("naive", 512))
    assert fused512 < 1.2 * fused128  # bounded by the chunk, not by T
    assert fused512 < 40 * chunk * one_row  # a few dozen (chunk, V) buffers at most
    assert naive512 > 10 * 512 * one_row and fused512 < 0.15 * naive512


@hsettings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 6), v=st.integers(2, 20), chunk=st.integers(1, 9),
       scale=st.sampled_from([0.1, 1.0, 30.0]), loss_type=st.sampled_from(obj.LOSS_TYPES),
       alpha=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 1000),
       mask_bits=st.integers(0, 2 ** 18 - 1))
def test_property_fused_equals_naive(b, t, v, chunk, scale, loss_type, alpha, seed, mask_bits):
    head, hs, ht, hf, tok, _ = make(b=b, t=t, h=4, v=v, seed=seed, scale=scale)
    bits = [(mask_bits >> i) & 1 for i in range(b * t)]
    mask = mx.array(np.array(bits, bool).reshape(b, t))
    s = ObjectiveSettings(chunk_size=chunk, loss_type=loss_type, alpha=alpha, skip_first_tokens=1)
    # Extreme logits (scale 30: |z| up to ~250) make the comparison ill-conditioned: the
    # naive and fused paths sum in other orders, and a saturated softmax's log-ratios amplify
    # one rounding of a logit by |z|. Tolerance: float32 rounding over the sums in play (H, V)
    # at the largest logit, with the |z| amplification of the log-space divergences.
    logit_max = max(float(mx.abs(head(x)).max()) for x in (hs, ht, hf))
    tol = float32_tolerance(4, v, magnitude=logit_max, safety=16.0)
    assert_same(*both(head, hs, tok, mask, ht, hf, s), rtol=1e-5, atol=max(tol, 1e-6),
                nonzero=False)


def test_bench_runs_small_and_formats():
    from aropd_mlx.bench.objective import bench_objective, format_objective_bench
    r = bench_objective(vocab=512, hidden=16, seq=48, chunk_size=16, repeats=0)
    assert r["chunk_size"] == 16 and r["fused_peak_extra_bytes"] < r["naive_peak_extra_bytes"]
    text = format_objective_bench(r)
    assert "fused/naive" in text and "V=512" in text


# ---------------------------------------------------------------------------- heads per view

def teacher_of_another_size(h=12, v=33, seed=5, quantize=False):
    """A separate teacher: its own head and hidden size (h), the student's vocabulary."""
    r = np.random.default_rng(seed)
    w = r.normal(size=(v, h)).astype(np.float32)
    head = (OutputHead(*mx.quantize(mx.array(w), group_size=32, bits=4), group_size=32, bits=4)
            if quantize else OutputHead(mx.array(w)))
    return head, *(mx.array(r.normal(size=(3, 7, h)).astype(np.float32)) for _ in range(2))


@pytest.mark.parametrize("student_q,teacher_q", [(False, False), (True, False), (False, True)])
def test_each_view_goes_through_its_own_models_head(student_q, teacher_q):
    """The target is built from the teacher's own logits (its head, its hidden size), the
    student's logits from the student's head: equal to naive_loss on each model's logits."""
    head, hs, _, _, tok, mask = make(b=3, h=64 if student_q else 8, quantize=student_q)
    t_head, ht, hf = teacher_of_another_size(h=64 if teacher_q else 12, quantize=teacher_q)
    s = ObjectiveSettings(chunk_size=4, alpha=0.3, skip_first_tokens=1)

    def naive(h):
        out = naive_loss(head(h), tok, mask, t_head(ht), t_head(hf), settings=s)
        return out.loss, out

    def fusd(h):
        out = fused_loss(h, head, tok, mask, ht, hf, teacher_head=t_head, settings=s)
        return out.loss, out

    (_, want), g_want = mx.value_and_grad(naive)(hs)
    (_, got), g_got = mx.value_and_grad(fusd)(hs)
    assert_same((want, g_want), (got, g_got))
    # the student's head would give another target (and another hidden size: no target at all)
    if not student_q and not teacher_q:
        with pytest.raises(ValueError):
            mx.eval(fused_loss(hs, head, tok, mask, ht, hf, settings=s).loss)


def test_a_teacher_head_of_another_vocabulary_is_refused():
    head, hs, _, _, tok, mask = make()
    t_head, ht, hf = teacher_of_another_size(v=40)
    with pytest.raises(ValueError, match="vocabulary"):
        fused_loss(hs, head, tok, mask, ht, hf, teacher_head=t_head)


def both_with_head(w, hs, tok, mask, ht, hf, s, teacher_head=None, cotangent=None):
    """(naive, fused) gradients w.r.t. (student_h, W) of the loss (or of per_token . cotangent)
    with a trainable student head W; the teacher views go through `teacher_head` (default:
    the same W as a constant, as a self-teacher whose head is the student's)."""
    def run(kind):
        def f(h, weight):
            head = OutputHead(weight, trainable=True)
            if kind == "naive":
                th = teacher_head or OutputHead(mx.stop_gradient(weight))
                out = naive_loss(head(h), tok, mask, None if ht is None else th(ht),
                                 None if hf is None else th(hf), settings=s)
            else:
                out = fused_loss(h, head, tok, mask, ht, hf, teacher_head=teacher_head,
                                 settings=s)
            value = out.loss if cotangent is None else (out.per_token * cotangent).sum()
            return value, out
        (_, out), grads = mx.value_and_grad(f, argnums=(0, 1))(hs, w)
        mx.eval(out.loss, out.per_token, grads)
        return out, grads
    return run("naive"), run("fused")


def _assert_grads_close(want, got, rtol=1e-5, atol=1e-6):
    for a, b in zip(want, got):
        scale = max(float(mx.abs(a).max()), 1e-4)
        assert float(mx.abs(a).max()) > 0
        np.testing.assert_allclose(np.array(b) / scale, np.array(a) / scale, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
@pytest.mark.parametrize("loss_type", obj.LOSS_TYPES)
def test_a_trainable_head_gets_the_naive_gradient(chunk, loss_type):
    """A tied embedding under full fine-tuning: the head weight's gradient (dW = sum of
    dl/dz (x) h over rows, chunk by chunk) equals autodiff through naive_loss, and so does
    the hidden states' gradient; the target (teacher views through W) stays a constant."""
    head, hs, ht, hf, tok, mask = make(b=3, t=5)
    s = ObjectiveSettings(chunk_size=chunk, loss_type=loss_type, alpha=0.4, skip_first_tokens=1)
    views = (None, None) if loss_type == "nll" else (ht, hf)
    (naive, g_naive), (fusd, g_fused) = both_with_head(head.weight, hs, tok, mask, *views, s)
    np.testing.assert_allclose(np.array(fusd.per_token), np.array(naive.per_token), rtol=1e-5,
                               atol=1e-6)
    _assert_grads_close(g_naive, g_fused)


def test_a_trainable_head_with_a_separate_teacher_and_any_cotangent():
    head, hs, _, _, tok, mask = make(b=3)
    t_head, ht, hf = teacher_of_another_size()
    wts = mx.array(np.random.default_rng(3).normal(size=tok.shape).astype(np.float32))
    s = ObjectiveSettings(chunk_size=4, alpha=0.5)
    (_, g_naive), (_, g_fused) = both_with_head(head.weight, hs, tok, mask, ht, hf, s,
                                                teacher_head=t_head, cotangent=wts)
    _assert_grads_close(g_naive, g_fused)


def test_a_frozen_or_quantized_head_gets_no_gradient():
    head, hs, ht, hf, tok, mask = make()
    g = mx.grad(lambda w: fused_loss(hs, OutputHead(w), tok, mask, ht, hf).loss)(head.weight)
    assert float(mx.abs(g).max()) == 0  # not trainable: a constant, as before
    t_head, _, _ = teacher_of_another_size(h=8)
    g = mx.grad(lambda w: fused_loss(hs, head, tok, mask, ht, hf,
                                     teacher_head=OutputHead(w)).loss)(t_head.weight)
    assert float(mx.abs(g).max()) == 0  # the teacher's head: never
    q = mx.quantize(mx.zeros((33, 64)), group_size=32, bits=4)
    with pytest.raises(ValueError, match="quantized"):
        OutputHead(*q, group_size=32, bits=4, trainable=True)


def test_trainable_head_memory_is_bounded_by_the_chunk():
    """The head gradient walks the chunks again: peak memory stays a few chunks plus the
    (V, H) accumulators, far below one (T, V) tensor, and does not grow like T (two lanes
    may run a little apart: some slack)."""
    v, h, chunk = 2048, 16, 32
    s = ObjectiveSettings(chunk_size=chunk)

    def step(t):
        head, hs, ht, hf, tok, mask = make(b=1, t=t, h=h, v=v, seed=t)

        def f(x, w):
            return fused_loss(x, OutputHead(w, trainable=True), tok, mask, ht, hf,
                              settings=s).loss
        return lambda: mx.value_and_grad(f, argnums=(0, 1))(hs, head.weight)

    one_row = v * 4
    small, large = _peak(step(512)), _peak(step(2048))
    assert large < 1.6 * small  # 4x the rows
    assert large < 40 * chunk * one_row + 4 * v * h * 4  # chunks + the (V, H) accumulators
    assert large < 2048 * one_row  # less than ONE (T, V) fp32 tensor (naive: a dozen)


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0, 1.4])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_no_clip_runs_in_the_fused_loss_as_in_the_naive_one(lam, alpha):
    """objective.clip null: λ reaches the compiled chunk as an array, so the ends λ = 0 and 1
    (exactly P, exactly F) are chosen in the graph; a Python test of it failed every such run."""
    head, hs, ht, hf, tok, mask = make(b=3, t=6, v=64, seed=2)
    s = ObjectiveSettings(lam=lam, clip=None, alpha=alpha, skip_first_tokens=0)
    naive, fused_out = both(head, hs, tok, mask, ht, hf, s)
    assert_same(naive, fused_out)
    forward = fused_loss(hs, head, tok, mask, ht, hf, settings=s)  # no gradient: compiled
    np.testing.assert_allclose(np.array(forward.loss), np.array(naive[0].loss), rtol=1e-5)
