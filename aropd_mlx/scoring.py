"""Scoring: hidden states at the response positions, for any prompt view of the same responses.

Sequences are `prompt + response`, right-padded. With a causal mask, right padding never
changes earlier positions, so no attention mask is needed and every row keeps its natural
positions. Row i's response token t is predicted at position len(prompt_i) - 1 + t; we gather
the final hidden states there (B, T, H) and hand them to the fused objective, which projects
them to the vocabulary a chunk at a time: no logits are made for prompt positions.

The teacher's views are scored under no gradient, and there the prompts repeat: row i answers
prompt i // G under every view. `score_views` runs each distinct prompt once (prefix.py: a
left-padded prefill into a KV cache, fanned out to the rows), then all rows' responses on that
cache in one batch (views x N rows): the same hidden states, without G copies of each prompt.
Models whose caches are not plain KV caches keep the full-sequence path.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from aropd_mlx.models import hidden_states
from aropd_mlx.prefix import dedupe, expand, prefill, supports_prefix_cache


def build_inputs(prompts: list[list[int]], tokens: np.ndarray, lengths: list[int],
                 pad_id: int = 0) -> tuple[mx.array, mx.array]:
    """Right-padded `prompt + response[:-1]` ids (N, L) and gather positions (N, T).

    The last response token is never an input (nothing after it is predicted)."""
    n, t = tokens.shape
    width = max(len(p) for p in prompts) + t - 1
    ids = np.full((n, max(width, 1)), pad_id, dtype=np.int32)
    pos = np.zeros((n, t), dtype=np.int32)
    for i, p in enumerate(prompts):
        body = list(p) + list(tokens[i, : max(lengths[i] - 1, 0)])
        ids[i, : len(body)] = body
        pos[i] = np.minimum(len(p) - 1 + np.arange(t), width - 1)
    return mx.array(ids), mx.array(pos)


def response_hidden(model, prompts: list[list[int]], tokens: np.ndarray, lengths: list[int],
                    pad_id: int = 0) -> mx.array:
    """(N, T, H) final hidden states predicting each response token (differentiable)."""
    ids, pos = build_inputs(prompts, tokens, lengths, pad_id)
    h = hidden_states(model, ids)  # (N, L, H)
    return mx.take_along_axis(h, pos[:, :, None], axis=1)


def cached_response_hidden(model, prompts: list[list[int]], tokens: np.ndarray,
                           lengths: list[int], pad_id: int = 0) -> mx.array:
    """`response_hidden` through a shared prefix cache: each distinct prompt runs once."""
    n, t = tokens.shape
    unique, index = dedupe(prompts)
    cache, h_last = prefill(model, unique, pad_id, room=t - 1)
    first = h_last[mx.array(index)][:, None]  # the last prompt position predicts token 0
    if t == 1:
        return first
    rest = np.full((n, t - 1), pad_id, dtype=np.int32)  # response[:-1], right-padded
    for i in range(n):
        k = max(lengths[i] - 1, 0)
        rest[i, :k] = tokens[i, :k]
    expand(cache, index)
    return mx.concatenate([first, model.model(mx.array(rest), cache=cache)], axis=1)


def score_views(model, view_prompts: dict[str, list[list[int]]], tokens: np.ndarray,
                lengths: list[int], pad_id: int = 0, micro_batch: int = 0) -> dict[str, mx.array]:
    """Teacher hidden states for several views of the same responses.

    `view_prompts[name][i]` is row i's prompt under that view. `micro_batch`: response rows
    per forward (every view of those rows in one batch, so 2 x micro_batch sequences for
    AR-OPD); 0 = all rows at once. Each micro-batch shares its own distinct prompts' prefill
    and is evaluated before the next, so the KV caches and activations in flight are those of
    one micro-batch (memory.py). Returns {name: (N, T, H)}, evaluated and detached from any
    graph; equal to one pass up to float32 summation order (a BLAS blocks by batch shape)."""
    names = list(view_prompts)
    n = tokens.shape[0]
    size = n if micro_batch <= 0 else min(micro_batch, n)
    score = cached_response_hidden if supports_prefix_cache(model) else response_hidden
    parts: dict[str, list[mx.array]] = {name: [] for name in names}
    for start in range(0, n, size):
        sl = slice(start, min(start + size, n))
        m = sl.stop - sl.start
        prompts = [p for name in names for p in view_prompts[name][sl]]
        stacked = np.concatenate([tokens[sl]] * len(names), axis=0)
        h = mx.stop_gradient(score(model, prompts, stacked, list(lengths[sl]) * len(names),
                                   pad_id))
        for i, name in enumerate(names):
            parts[name].append(h[i * m:(i + 1) * m])
        mx.eval([p[-1] for p in parts.values()])  # one micro-batch in flight at a time
    out = {name: (p[0] if len(p) == 1 else mx.concatenate(p, axis=0)) for name, p in parts.items()}
    mx.eval(out)
    return out
