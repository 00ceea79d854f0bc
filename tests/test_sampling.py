"""Rollout sampling order: temperature first, then top-p on the tempered distribution (as
Hugging Face's TemperatureLogitsWarper -> TopPLogitsWarper and vLLM do), checked against a
naive numpy reference of HF's order on distributions where the two orders keep different sets."""
import mlx.core as mx
import numpy as np
import pytest

from aropd_mlx.rollout import make_rollout_sampler


def hf_nucleus_probs(logits: np.ndarray, temperature: float, top_p: float) -> np.ndarray:
    """HF's order in float64: softmax(logits / T); sort ascending; drop tokens whose ascending
    cumulative mass is <= 1 - top_p (always keeping the most likely); renormalize."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(p, kind="stable")
    drop = np.cumsum(p[order]) <= 1.0 - top_p
    drop[-1] = False
    keep = np.ones_like(p, dtype=bool)
    keep[order[drop]] = False
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def untempered_first_probs(logits, temperature, top_p):
    """The other order (mlx-lm's make_sampler): nucleus of softmax(logits), then temperature."""
    keep = hf_nucleus_probs(logits, 1.0, top_p) > 0
    z = np.where(keep, logits / temperature, -np.inf)
    p = np.exp(z - z[keep].max())
    return p / p.sum()


def frequencies(sampler, logits: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    mx.random.seed(seed)
    batch = mx.broadcast_to(mx.array(logits, dtype=mx.float32), (n, len(logits)))
    tokens = np.array(sampler(batch))
    return np.bincount(tokens, minlength=len(logits)) / n


CASES = {
    # probs (0.5, 0.3, 0.2) at T = 0.5 -> (0.66, 0.24, 0.11): HF keeps {0}, the other order {0, 1}
    "three_tokens": (np.log(np.array([0.5, 0.3, 0.2])), 0.5, 0.55),
    # a flatter tempered distribution: HF keeps more tokens than the untempered nucleus
    "hot_random_vocab": (np.random.default_rng(0).normal(0.0, 2.0, 40), 1.7, 0.6),
    "cold_random_vocab": (np.random.default_rng(1).normal(0.0, 1.5, 40), 0.6, 0.7),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_top_p_is_chosen_on_the_tempered_distribution(name):
    logits, temperature, top_p = CASES[name]
    want = hf_nucleus_probs(logits, temperature, top_p)
    other = untempered_first_probs(logits, temperature, top_p)
    assert set(np.flatnonzero(want)) != set(np.flatnonzero(other))  # the case tells them apart
    freq = frequencies(make_rollout_sampler(temperature, top_p), logits, 20000)
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))  # nothing outside HF's nucleus
    assert 0.5 * np.abs(freq - want).sum() < 0.03
    assert 0.5 * np.abs(want - other).sum() > 0.1  # ... and the test could see the other order


def test_logit_offset_does_not_change_the_draw():
    """Raw logits (not log-probs) go in: a per-row shift, even a large one, changes nothing."""
    logits, temperature, top_p = CASES["cold_random_vocab"]
    sampler = make_rollout_sampler(temperature, top_p)
    a = frequencies(sampler, logits, 4000, seed=5)
    b = frequencies(sampler, logits + 500.0, 4000, seed=5)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("temperature, top_p", [(0.0, 0.5), (0.0, 1.0)])
def test_temperature_zero_is_greedy(temperature, top_p):
    logits = CASES["hot_random_vocab"][0]
    freq = frequencies(make_rollout_sampler(temperature, top_p), logits, 50)
    assert freq[int(np.argmax(logits))] == 1.0


def test_without_top_p_it_is_plain_tempered_sampling():
    logits = CASES["hot_random_vocab"][0]
    freq = frequencies(make_rollout_sampler(0.8, 1.0), logits, 20000)
    assert 0.5 * np.abs(freq - hf_nucleus_probs(logits, 0.8, 1.0)).sum() < 0.03
