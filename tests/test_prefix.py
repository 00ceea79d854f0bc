"""Shared prompt prefixes (prefix.py) and the teacher scoring built on them (scoring.score_views):
the same hidden states as the full-sequence path, for every model variant the trainer scores."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map
from mlx_lm import load
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

from aropd_mlx import scoring
from aropd_mlx.lab.tiny import TinySpec, build_tiny_model
from aropd_mlx.models import ModelSettings, attach_adapters
from aropd_mlx.prefix import dedupe, supports_prefix_cache
from aropd_mlx.scoring import response_hidden, score_views

from helpers import float32_tolerance


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def sharp_model(request, tmp_path_factory):
    """A tiny model with large weights, so attention (and any masking error) moves the output."""
    spec = TinySpec(model_type=request.param, tie_word_embeddings=request.param == "qwen2",
                    init_std=0.3, seed=3)
    return build_tiny_model(tmp_path_factory.mktemp(f"sharp_{request.param}"), spec)


def _variant(path, variant):
    model, _ = load(str(path))
    if variant == "lora":
        attach_adapters(model, ModelSettings(lora_rank=4, lora_scale=2.0), seed=0)
        mx.random.seed(1)  # non-zero lora_b, so the adapters change the output
        model.update(tree_map(lambda v: v + 0.1 * mx.random.normal(v.shape),
                              model.trainable_parameters()))
    elif variant == "quantized":
        nn.quantize(model, group_size=32, bits=4)
    return model


def _batch(seed, b=3, g=3, t=7):
    """Two views of b prompts (different lengths), each repeated g times, responses of
    lengths 1..t (right-padded with junk past the length: it must not matter)."""
    rng = np.random.default_rng(seed)
    short = [[1] + rng.integers(3, 95, size=rng.integers(1, 6)).tolist() for _ in range(b)]
    long = [p + rng.integers(3, 95, size=rng.integers(4, 12)).tolist() for p in short]
    views = {"partial": [short[i // g] for i in range(b * g)],
             "full": [long[i // g] for i in range(b * g)]}
    tokens = rng.integers(3, 95, size=(b * g, t)).astype(np.int32)
    lengths = [t, 1] + rng.integers(1, t + 1, size=b * g - 2).tolist()
    return views, tokens, lengths


def _full_path(model, views, tokens, lengths):
    return {v: response_hidden(model, p, tokens, lengths) for v, p in views.items()}


@pytest.mark.parametrize("variant", ["plain", "lora", "quantized"])
def test_scoring_through_the_prefix_cache_equals_the_full_sequences(sharp_model, variant):
    model = _variant(sharp_model, variant)
    assert supports_prefix_cache(model)
    views, tokens, lengths = _batch(seed=0)
    got = score_views(model, views, tokens, lengths)
    want = _full_path(model, views, tokens, lengths)
    for v in views:
        g, w = np.array(got[v]), np.array(want[v])
        assert g.shape == w.shape == (tokens.shape[0], tokens.shape[1], w.shape[-1])
        assert np.isfinite(g).all()
        for i, n in enumerate(lengths):  # past a row's length: don't care
            np.testing.assert_allclose(g[i, :n], w[i, :n], atol=1e-5, rtol=1e-5)


def test_one_token_responses(sharp_model):
    model = _variant(sharp_model, "plain")
    views, tokens, _ = _batch(seed=1, t=1)
    lengths = [1] * tokens.shape[0]
    got = score_views(model, views, tokens, lengths)
    for v, w in _full_path(model, views, tokens, lengths).items():
        np.testing.assert_allclose(np.array(got[v]), np.array(w), atol=1e-5, rtol=1e-5)


def test_models_without_plain_kv_caches_take_the_full_path(tiny_llama, monkeypatch):
    model = _variant(tiny_llama, "plain")
    views, tokens, lengths = _batch(seed=3)
    want = _full_path(model, views, tokens, lengths)
    model.make_cache = lambda: [RotatingKVCache(max_size=64) for _ in model.layers]
    assert not supports_prefix_cache(model)
    monkeypatch.setattr(scoring, "cached_response_hidden", None)  # must not be called
    got = score_views(model, views, tokens, lengths)
    # the same computation, batched otherwise (both views in one batch): float32 rounding of
    # the sums along the path (every layer's hidden, MLP and attention lengths), not bit
    # identity, under a multithreaded BLAS (tests/helpers.py)
    spec = TinySpec()
    path = spec.layers * (spec.hidden + spec.intermediate + tokens.shape[1] + 16)
    for v in views:
        w = np.array(want[v])
        tol = float32_tolerance(path, magnitude=float(np.abs(w).max()))
        np.testing.assert_allclose(np.array(got[v]), w, rtol=0, atol=tol)
        assert tol < 1e-2  # a masking or position error moves hidden states by O(0.1..1)


def test_supports_prefix_cache():
    class Plain(nn.Module):  # mlx-lm makes a KVCache per layer when there is no make_cache
        model, layers = object(), [0, 0]

    class Recurrent(Plain):
        def make_cache(self):
            return [ArraysCache(2), KVCache()]

    class Attention(Plain):
        def make_cache(self):
            return [KVCache(), KVCache()]

    assert supports_prefix_cache(Plain()) and supports_prefix_cache(Attention())
    assert not supports_prefix_cache(Recurrent())
    assert not supports_prefix_cache(object())


def test_dedupe_keeps_first_seen_order():
    unique, index = dedupe([[1, 2], [3], [1, 2], (3,), [4]])
    assert unique == [[1, 2], [3], [4]]
    assert index.tolist() == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("micro_batch", [1, 2, 4, 9])
def test_micro_batched_scoring_equals_one_pass(sharp_model, micro_batch):
    """train.scoring_micro_batch: any number of rows at a time (2 and 4 cut prompt groups of
    3 apart, 1 is row by row, 9 = all), both views, the same hidden states as one pass up to
    float32 summation order (tests/helpers.py), prefix sharing kept inside each micro-batch."""
    model = _variant(sharp_model, "lora")
    views, tokens, lengths = _batch(seed=5)
    want = score_views(model, views, tokens, lengths)
    got = score_views(model, views, tokens, lengths, micro_batch=micro_batch)
    spec = TinySpec()
    path = spec.layers * (spec.hidden + spec.intermediate + tokens.shape[1] + 16)
    for v in views:
        w, g = np.array(want[v]), np.array(got[v])
        assert g.shape == w.shape
        tol = float32_tolerance(path, magnitude=float(np.abs(w).max()))
        for i, n in enumerate(lengths):
            np.testing.assert_allclose(g[i, :n], w[i, :n], rtol=0, atol=tol)


def test_micro_batched_scoring_shares_prefixes_per_micro_batch(sharp_model, monkeypatch):
    model = _variant(sharp_model, "plain")
    views, tokens, lengths = _batch(seed=6)  # 3 prompts x 3 rows, two views
    seen = []
    real = scoring.prefill

    def spy(model, prompts, *a, **k):
        seen.append(len(prompts))
        return real(model, prompts, *a, **k)

    monkeypatch.setattr(scoring, "prefill", spy)
    score_views(model, views, tokens, lengths, micro_batch=3)
    assert seen == [2, 2, 2]  # each micro-batch: one prompt per view, prefilled once
