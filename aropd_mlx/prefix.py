"""Shared prompt prefixes: run each distinct prompt once, then fan its KV cache out to rows.

On-policy distillation draws G responses per prompt and scores them under every teacher view,
so each prompt is repeated G times in the rollout and in scoring. Running a prompt once and
gathering its keys and values for every row that continues it is the same arithmetic at the
same positions, at 1/G of the prompt's cost: prompts of different lengths are left-padded into
mlx-lm's `BatchKVCache`, whose per-row offsets keep every token at its natural RoPE position
and whose mask hides the padding.

This needs every layer to use a plain `KVCache` (llama, qwen2, ...); models with
sliding-window (RotatingKVCache) or recurrent (ArraysCache) layers do not qualify, and the
callers keep their full-sequence paths for them (`supports_prefix_cache`).

    cache, h_last = prefill(model, unique_prompts, pad_id)   # h_last: (U, H)
    expand(cache, row_to_prompt)                              # one cache row per output row
    h = model.model(next_tokens, cache=cache)
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache


def supports_prefix_cache(model) -> bool:
    """True when the model's decoder takes a per-layer cache list of plain KV caches."""
    if not hasattr(model, "model") or not hasattr(model, "layers"):
        return False
    if not hasattr(model, "make_cache"):
        return True  # mlx-lm's make_prompt_cache then gives a KVCache per layer
    return all(type(c) is KVCache for c in model.make_cache())


def dedupe(prompts: list) -> tuple[list[list[int]], np.ndarray]:
    """The distinct prompts (first-seen order) and each row's index into them."""
    seen: dict[tuple, int] = {}
    index = np.array([seen.setdefault(tuple(p), len(seen)) for p in prompts], dtype=np.int32)
    return [list(p) for p in seen], index


def prefill(model, prompts: list[list[int]], pad_id: int = 0,
            room: int = 0) -> tuple[list, mx.array | None]:
    """Left-padded forward of `prompts` through the decoder into fresh per-layer BatchKVCaches
    sized for `room` more positions (so `expand` copies no unused buffer and the tokens that
    follow are written in place).

    Returns the caches and the final hidden state at each prompt's last token (B, H): it
    predicts the first token after the prompt. Empty prompts are allowed when some are not
    (their row holds only padding); all-empty gives untouched caches and None."""
    width = max(len(p) for p in prompts)
    pads = [width - len(p) for p in prompts]
    cache = [BatchKVCache(pads) for _ in model.layers]
    for c in cache:
        c.step = max(width + room, 1)  # the buffer grows in steps of this many positions
    if width == 0:
        return cache, None
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    for i, p in enumerate(prompts):
        ids[i, pads[i]:] = p
    h = model.model(mx.array(ids), cache=cache)
    return cache, h[:, -1]


def expand(cache: list, index) -> None:
    """Make row r of every layer's cache a copy of row index[r] (in place; repeats allowed)."""
    rows = mx.array(np.asarray(index, dtype=np.int32))
    for c in cache:
        c.filter(rows)
