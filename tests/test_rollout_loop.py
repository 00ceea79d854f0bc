"""The rollout loop (rollout.sample): greedy equals a naive re-run per token, EOS kept and
stopping its row, seeds, chunking, and the sampled distribution (temperature, top-p)."""
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load
from mlx_lm.models.cache import RotatingKVCache

from aropd_mlx import rollout
from aropd_mlx.lab.tiny import TinySpec, build_tiny_model
from aropd_mlx.rollout import RolloutSettings, row_chunks, sample

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 20, 21], [1], [1, 30, 31, 32, 33]]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny llama with large weights: peaked next-token distributions, no near-ties."""
    path = build_tiny_model(tmp_path_factory.mktemp("sharp"), TinySpec(init_std=0.3, seed=5))
    return load(str(path))


def _greedy_reference(model, prompt, n, eos):
    """Full forward over the whole sequence for every new token, argmax."""
    seq, out = list(prompt), []
    for _ in range(n):
        t = int(mx.argmax(model(mx.array([seq]))[0, -1]).item())
        out.append(t)
        seq.append(t)
        if t in eos:
            break
    return out


def _rows(resp):
    tokens = np.array(resp.tokens)
    return [tokens[i, :n].tolist() for i, n in enumerate(resp.lengths)]


def _settings(**kw):
    return RolloutSettings(**{"group_size": 2, "max_new_tokens": 10, "temperature": 0.0, **kw})


@pytest.mark.parametrize("batch_size", [64, 3, 1])
def test_greedy_equals_a_naive_rerun(sharp, batch_size):
    model, tok = sharp
    tok.eos_token_ids = set()
    resp = sample(model, tok, PROMPTS, _settings(completion_batch_size=batch_size), seed=0)
    want = [_greedy_reference(model, p, 10, set()) for p in PROMPTS for _ in range(2)]
    assert _rows(resp) == want
    assert resp.lengths == [10] * 8 and resp.finished == [False] * 8
    assert np.array(resp.tokens).dtype == np.int32


def test_eos_is_kept_and_stops_its_row(sharp):
    model, tok = sharp
    tok.eos_token_ids = set()
    free = [_greedy_reference(model, p, 12, set()) for p in PROMPTS]
    eos = free[0][3]  # a token the first prompt's greedy path reaches at step 4
    tok.eos_token_ids = {eos, 97}
    resp = sample(model, tok, PROMPTS, _settings(max_new_tokens=12, group_size=1), seed=0)
    for i, row in enumerate(free):
        stop = next((t + 1 for t, x in enumerate(row) if x in (eos, 97)), None)
        assert _rows(resp)[i] == row[:stop]
        assert resp.finished[i] == (stop is not None)
    assert not all(resp.finished)  # some rows run to max_new_tokens
    assert resp.finished[0] and resp.lengths[0] == free[0].index(eos) + 1 <= 4
    mask = np.array(resp.mask)
    assert (mask.sum(axis=1) == np.array(resp.lengths)).all()
    assert np.array(resp.tokens)[0, resp.lengths[0] - 1] == eos


@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_all_rows_stopping_ends_the_loop_with_the_same_result(sharp, monkeypatch, check_every):
    model, tok = sharp
    tok.eos_token_ids = set()
    free = [_greedy_reference(model, p, 40, set()) for p in PROMPTS]
    tok.eos_token_ids = {row[1] for row in free}  # every row stops by its second token
    monkeypatch.setattr(rollout, "CHECK_EVERY", check_every)
    resp = sample(model, tok, PROMPTS, _settings(max_new_tokens=40, group_size=1), seed=0)
    want = [row[:next(t + 1 for t, x in enumerate(row) if x in tok.eos_token_ids)] for row in free]
    assert _rows(resp) == want and all(resp.finished)
    assert np.array(resp.tokens).shape == (4, max(map(len, want)))


def test_eos_as_the_first_token(sharp):
    model, tok = sharp
    tok.eos_token_ids = set()
    first = _greedy_reference(model, PROMPTS[1], 1, set())[0]
    tok.eos_token_ids = {first}
    resp = sample(model, tok, [PROMPTS[1]], _settings(), seed=0)
    assert _rows(resp) == [[first], [first]] and resp.finished == [True, True]


def test_seeded_sampling_is_deterministic(sharp):
    model, tok = sharp
    tok.eos_token_ids = set()
    s = _settings(temperature=1.0, group_size=4, max_new_tokens=16, completion_batch_size=8)
    a, b = (sample(model, tok, PROMPTS, s, seed=7) for _ in range(2))
    c = sample(model, tok, PROMPTS, s, seed=8)
    assert _rows(a) == _rows(b)
    assert _rows(a) != _rows(c)
    assert len({tuple(r) for r in _rows(a)}) > 1  # the G responses of a prompt differ


def test_rows_leaving_the_batch_do_not_change_the_samples(sharp, monkeypatch):
    """Stopped rows leave the batch at the checks; what the others sample must not depend
    on when that happens (1000: they never leave)."""
    model, tok = sharp
    tok.eos_token_ids = set(range(3, 10))
    for chunk in (64, 4):  # one chunk of rows, and several (each its own random stream)
        s = _settings(temperature=1.0, group_size=4, max_new_tokens=24, completion_batch_size=chunk)
        results = []
        for every in (1, 5, 1000):
            monkeypatch.setattr(rollout, "CHECK_EVERY", every)
            results.append(sample(model, tok, PROMPTS, s, seed=11))
        assert all(_rows(r) == _rows(results[0]) for r in results), chunk
        lengths = results[0].lengths
        assert min(lengths) < 10 and 24 in lengths and any(results[0].finished)


def test_models_without_plain_kv_caches_use_the_batch_generator(sharp, monkeypatch):
    model, tok = sharp
    tok.eos_token_ids = set()
    want = _rows(sample(model, tok, PROMPTS, _settings(), seed=0))
    monkeypatch.setattr(model, "make_cache", lambda: [RotatingKVCache(max_size=256)
                                                      for _ in model.layers], raising=False)
    monkeypatch.setattr(rollout, "_decode", None)  # must not be called
    assert _rows(sample(model, tok, PROMPTS, _settings(), seed=0)) == want


def test_row_chunks_hold_whole_groups():
    assert row_chunks(8, 2, 5) == [range(0, 4), range(4, 8)]
    assert row_chunks(6, 3, 64) == [range(0, 6)]
    assert row_chunks(6, 4, 3) == [range(0, 3), range(3, 6)]  # a group larger than a chunk


def _first_token_frequencies(model, tok, prompt, n, **kw):
    s = RolloutSettings(group_size=n, max_new_tokens=1, completion_batch_size=1000, **kw)
    resp = sample(model, tok, [prompt], s, seed=3)
    return np.bincount(np.array(resp.tokens)[:, 0], minlength=model.lm_head.weight.shape[0]) / n


def _probs(model, prompt, temperature):
    logits = model(mx.array([prompt]))[0, -1].astype(mx.float32)
    return np.array(mx.softmax(logits / temperature))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_frequencies_follow_the_tempered_softmax(sharp, temperature):
    model, tok = sharp
    tok.eos_token_ids = set()
    prompt = PROMPTS[0]
    freq = _first_token_frequencies(model, tok, prompt, 4000, temperature=temperature)
    want = _probs(model, prompt, temperature)
    other = _probs(model, prompt, 1.6 * temperature)
    tv = 0.5 * np.abs(freq - want).sum()
    assert 0.5 * np.abs(want - other).sum() > 0.12  # the test can tell temperatures apart
    assert tv < 0.05, tv


def test_top_p_keeps_only_the_nucleus(sharp):
    model, tok = sharp
    tok.eos_token_ids = set()
    prompt = PROMPTS[0]
    p = _probs(model, prompt, 1.0)
    order = np.argsort(-p)
    nucleus = order[: int(np.searchsorted(np.cumsum(p[order]), 0.5)) + 1]
    freq = _first_token_frequencies(model, tok, prompt, 2000, temperature=1.0, top_p=0.5)
    assert freq[np.setdiff1d(np.arange(len(p)), nucleus)].sum() == 0
    want = np.zeros_like(p)
    want[nucleus] = p[nucleus] / p[nucleus].sum()
    assert 0.5 * np.abs(freq - want).sum() < 0.05
    tiny = _first_token_frequencies(model, tok, prompt, 200, temperature=1.0, top_p=1e-6)
    assert tiny[order[0]] == 1.0  # only the most likely token survives
