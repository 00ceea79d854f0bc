"""On-policy rollouts: the student samples G responses per prompt with mlx-lm's BatchGenerator.

Two facts about mlx-lm's generator (PLATFORM.md) are handled here: the final EOS is not
returned with the tokens (we put it back, so the student learns to stop), and its log-probs are
of the untempered distribution (we do not use them; the objective rescores every token).

    batch = sample(model, tokenizer, prompts, RolloutSettings(group_size=4), seed=step_seed)
    batch.tokens  # (N, T) int32, right-padded; batch.mask (N, T) 1 on response tokens incl. EOS
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from aropd_mlx.errors import UserError


@dataclass(frozen=True)
class RolloutSettings:
    group_size: int = 4  # responses per prompt (G)
    max_new_tokens: int = 256
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


def sample(model, tokenizer, prompts: list[list[int]], settings: RolloutSettings,
           seed: int) -> Responses:
    """Sample `group_size` responses for every prompt. Deterministic given `seed`."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(seed)  # the sampler draws from MLX's global generator
    eos = sorted(tokenizer.eos_token_ids)
    gen = BatchGenerator(
        model,
        max_tokens=settings.max_new_tokens,
        stop_tokens=[[t] for t in eos],
        sampler=make_sampler(settings.temperature, top_p=settings.top_p),
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
    rows = [out[u] for u in uids]
    return pad_responses(rows, [done[u] for u in uids], pad_id=tokenizer.pad_token_id or 0)
