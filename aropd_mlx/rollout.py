"""On-policy rollouts: the student samples G responses per prompt in a plain batched KV-cache loop.

Each distinct prompt is prefilled once and its cache fanned out to its G rows (prefix.py). Each
step feeds the rows' last tokens, samples (`make_rollout_sampler`: greedy at temperature 0, else
temperature then top-p) and queues the next step before looking at this one (`async_eval`). The
tokens stay on the device until the chunk ends. Every few steps the rows that have sampled an
EOS leave the batch (the loop ends when all have); each row's first EOS is found on the host
afterwards, so the result is exactly that of a per-token check. A row keeps its EOS (the
student must learn to stop). Rows are decoded `completion_batch_size` at a time, whole prompt
groups per chunk where possible.

Why not mlx-lm's BatchGenerator: per token it normalizes the log-probs over the vocabulary,
hands back one Python object per row and syncs with the host; at the small batches of a
rollout that bookkeeping is ~10-15% of the decode time (docs/BENCHMARKS.md). It remains the
path for models whose caches are not plain KV caches (sliding windows, recurrent layers).

Sampling order, as in Hugging Face transformers and vLLM: the logits are divided by the
temperature first, and the top-p nucleus is chosen on that *tempered* distribution (the smallest
set of most likely tokens whose tempered mass reaches top_p), then renormalized and sampled.
mlx-lm's `make_sampler` does the opposite (the nucleus on the untempered distribution, then the
temperature), which keeps a different set of tokens whenever temperature != 1 and top_p < 1;
`make_rollout_sampler` reuses its pieces (`apply_top_p`, `categorical_sampling`) in HF's order.

    batch = sample(model, tokenizer, prompts, RolloutSettings(group_size=4), seed=step_seed)
    batch.tokens  # (N, T) int32, right-padded; batch.mask (N, T) 1 on response tokens incl. EOS
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from aropd_mlx.errors import UserError
from aropd_mlx.prefix import dedupe, expand, prefill, supports_prefix_cache

CHECK_EVERY = 8  # decode steps between host checks of "every row has stopped"
MAX_NEW_TOKENS = 256  # the response length limit of rollouts and evaluation unless set


@dataclass(frozen=True)
class RolloutSettings:
    group_size: int = 4  # responses per prompt (G)
    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    completion_batch_size: int = 64

    def validate(self) -> None:
        if self.group_size < 1:
            raise UserError(f"rollout.group_size must be >= 1, got {self.group_size}")
        if self.max_new_tokens < 1:
            raise UserError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"rollout.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Responses:
    """N = prompts x G responses, right-padded; row i answers prompt i // G."""

    tokens: mx.array  # (N, T) int32
    mask: mx.array  # (N, T) float32, 1 on response tokens (EOS included)
    lengths: list[int]  # response lengths incl. EOS
    finished: list[bool]  # ended with EOS (False: cut at max_new_tokens)


def pad_responses(rows: list[list[int]], finished: list[bool], pad_id: int = 0) -> Responses:
    width = max(1, max(len(r) for r in rows))
    tokens = np.full((len(rows), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.float32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        mask[i, : len(r)] = 1.0
    return Responses(mx.array(tokens), mx.array(mask), [len(r) for r in rows], finished)


def make_rollout_sampler(temperature: float, top_p: float = 1.0):
    """logits (N, V) -> sampled tokens (N,): greedy at temperature 0; else softmax(logits /
    temperature) restricted to its top-p nucleus (HF/vLLM order: temperature first)."""
    from mlx_lm.sample_utils import apply_top_p, categorical_sampling, make_sampler

    if temperature == 0 or not 0.0 < top_p < 1.0:
        return make_sampler(temperature)  # no nucleus: the order does not matter
    inverse = 1.0 / temperature

    def sampler(logits: mx.array) -> mx.array:
        tempered = logits * inverse
        # apply_top_p reads e^x: normalized log-probs cannot overflow it
        tempered = tempered - mx.logsumexp(tempered, axis=-1, keepdims=True)
        # categorical at temperature 1: the same random draw as make_sampler's
        return categorical_sampling(apply_top_p(tempered, top_p), 1.0)

    return sampler


def sample(model, tokenizer, prompts: list[list[int]], settings: RolloutSettings,
           seed: int) -> Responses:
    """Sample `group_size` responses for every prompt. Deterministic given `seed` (and the
    completion batch size, which cuts the rows into chunks: each draws from its own stream)."""
    mx.random.seed(seed)  # the sampler draws from MLX's global generator
    eos = sorted(tokenizer.eos_token_ids)
    pad_id = tokenizer.pad_token_id or 0
    sampler = make_rollout_sampler(settings.temperature, settings.top_p)
    if not supports_prefix_cache(model):
        return _sample_batch_generator(model, prompts, settings, sampler, eos, pad_id)
    g, stop_ids = settings.group_size, set(eos)
    rows, finished = [], []
    for i, chunk in enumerate(row_chunks(len(prompts) * g, g, settings.completion_batch_size)):
        if i:  # each chunk its own stream: an earlier chunk that ended early drew fewer numbers
            mx.random.seed(seed * 1_000_003 + i)
        tokens = _decode(model, [prompts[r // g] for r in chunk], sampler, settings, eos, pad_id)
        for row in tokens.tolist():
            stop = next((t for t, tok in enumerate(row) if tok in stop_ids), None)
            rows.append(row if stop is None else row[:stop + 1])
            finished.append(stop is not None)
    return pad_responses(rows, finished, pad_id)


def row_chunks(n_rows: int, group: int, size: int) -> list[range]:
    """Consecutive row ranges of at most `size` rows, holding whole groups when size >= group."""
    step = max(1, (size // group) * group if size >= group else size)
    return [range(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _decode(model, row_prompts: list[list[int]], sampler, settings: RolloutSettings,
            eos: list[int], pad_id: int) -> np.ndarray:
    """(rows, steps) sampled tokens, steps <= max_new_tokens; nothing is cut at EOS here.

    Every CHECK_EVERY steps the rows that have sampled an EOS leave the batch (their cache rows
    are dropped). The sampler still draws for all rows at once, dropped ones fed a stand-in's
    logits: its random numbers depend only on the seed and that fixed shape, so a row's tokens
    do not depend on when the others left, nor on CHECK_EVERY."""
    unique, index = dedupe(row_prompts)
    # the prompts' last tokens start the decoding
    cache, _ = prefill(model, [p[:-1] for p in unique], pad_id, room=settings.max_new_tokens)
    expand(cache, index)
    alive = np.arange(len(row_prompts))  # the rows in the batch, in batch order
    slot = None  # batch position of every row (None: all rows, in order)

    def step(inputs: mx.array) -> mx.array:
        # the raw logits: the sampler normalizes only where top-p needs it (one pass of exp
        # over the vocabulary per token saved at plain temperature sampling)
        logits = model(inputs[:, None], cache=cache)[:, -1, :]
        return sampler(logits if slot is None else logits[slot])  # one token for every row

    stops = mx.array(eos) if eos else None
    done = mx.zeros((len(row_prompts),), dtype=mx.bool_)
    y = step(mx.array([p[-1] for p in row_prompts]))
    mx.async_eval(y)
    out = []
    for t in range(settings.max_new_tokens):
        out.append(y)
        if t + 1 == settings.max_new_tokens:
            break
        if stops is not None:
            done = done | (y[:, None] == stops).any(axis=1)
        y = step(y if slot is None else y[mx.array(alive)])
        mx.async_eval(y, done)  # the next step runs while we look at this one
        if stops is None or (t + 1) % CHECK_EVERY:
            continue
        finished = np.array(done)
        if finished.all():
            break
        if finished[alive].any():  # drop the stopped rows from the batch
            keep = np.flatnonzero(~finished[alive])
            expand(cache, keep)
            alive = alive[keep]
            positions = np.zeros(len(row_prompts), dtype=np.int32)
            positions[alive] = np.arange(len(alive))
            slot = mx.array(positions)
    return np.array(mx.stack(out, axis=1)).astype(np.int32)


def _sample_batch_generator(model, prompts, settings: RolloutSettings, sampler, eos, pad_id):
    """mlx-lm's BatchGenerator: for caches the prefix path cannot batch. It returns the stop
    token with its last response; its log-probs (untempered) are not used."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        max_tokens=settings.max_new_tokens,
        stop_tokens=[[t] for t in eos],
        sampler=sampler,
        completion_batch_size=settings.completion_batch_size,
        prefill_batch_size=min(settings.completion_batch_size, 64),
    )
    flat = [p for p in prompts for _ in range(settings.group_size)]
    uids = gen.insert(flat, [settings.max_new_tokens] * len(flat))
    out = {uid: [] for uid in uids}
    done = {uid: False for uid in uids}
    try:
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))  # the stop token too: the student must learn it
                if r.finish_reason == "stop":
                    done[r.uid] = True
    finally:
        gen.close()
    return pad_responses([out[u] for u in uids], [done[u] for u in uids], pad_id)
