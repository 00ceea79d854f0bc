"""What a step trains on: the method's teacher views, each example's prompts encoded under
them (cached on first draw), and the prompts drawn for step s, a pure function of (seed, s).

    encoder = PromptEncoder(cfg, tokenizer)
    batch = draw_batch(cfg, examples, encoder, step)      # list[Encoded]
    batch[0].prompts["partial"]                            # token ids of that view's prompt
"""

from __future__ import annotations

from dataclasses import dataclass

from aropd_mlx.config import RunConfig
from aropd_mlx.data import Example, batch_at
from aropd_mlx.errors import UserError
from aropd_mlx.views import METHOD_VIEWS, encode_response, encode_views, render_views


@dataclass
class Encoded:
    """An example with its prompt ids per view (and the oracle response ids for SFT)."""

    example: Example
    prompts: dict[str, list[int]]
    oracle: list[int] | None


class PromptEncoder:
    """Prompt ids per view, made when an example is first drawn and cached (large datasets start
    at once). Prompts past data.max_prompt_tokens are skipped and counted, never truncated."""

    def __init__(self, cfg: RunConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.cache: dict[Example, Encoded | None] = {}  # keyed by value: ids may repeat
        self.drawn_skipped: set[Example] = set()  # drawn by a step and too long: never trained on
        method = cfg.train.method
        self.views = {"sft": ("student", "partial", "full") if any(cfg.train.sft_view_mix[1:])
                      else ("student",), "opd": ("student",)}.get(method, ("student",) + METHOD_VIEWS[method])

    @property
    def skipped(self) -> int:
        """How many distinct prompts the steps drew and skipped (the memory plan's sample of
        the data, encoded too, counts only where a step drew it)."""
        return len(self.drawn_skipped)

    def draw(self, ex: Example) -> Encoded | None:
        """A step's draw of `ex`: its encoding, None (and counted) when it is too long."""
        enc = self(ex)
        if enc is None:
            self.drawn_skipped.add(ex)
        return enc

    def __call__(self, ex: Example) -> Encoded | None:
        if ex not in self.cache:
            self.cache[ex] = self._encode(ex)
        return self.cache[ex]

    def _encode(self, ex: Example) -> Encoded | None:
        cfg, method = self.cfg, self.cfg.train.method
        texts = render_views(ex, cfg.views)
        if any(v not in texts for v in self.views):
            raise UserError(f"example {ex.id}: method {method} needs 'solution' and 'answer'")
        prompts = encode_views(self.tokenizer, {v: texts[v] for v in self.views}, cfg.views)
        if max(len(p) for p in prompts.values()) > cfg.data.max_prompt_tokens:
            return None
        oracle = None
        if method == "sft":
            if ex.solution is None or ex.answer is None:
                raise UserError(f"example {ex.id}: sft needs 'solution' and 'answer'")
            oracle = encode_response(self.tokenizer, cfg.views.response_template.format(
                solution=ex.solution, answer=ex.answer))
        return Encoded(ex, prompts, oracle)


def draw_batch(cfg: RunConfig, examples: list[Example], encoder: PromptEncoder,
               step: int, min_size: int = 1) -> list[Encoded]:
    """The prompts of `step`, a pure function of (seed, step). Prompts past
    data.max_prompt_tokens are skipped (and counted); a batch left empty takes the next prompts
    in draw order; no prompt short enough in the whole dataset is an error. `min_size` (the
    world size of a distributed run) tops a batch up the same way so every rank gets a prompt."""
    t, n = cfg.train, len(examples)
    if n == 0:
        raise UserError(f"no examples to train on ({cfg.data.train})")
    start = step * t.batch_size
    batch = [e for e in map(encoder.draw, batch_at(examples, t.batch_size, start, t.seed)) if e is not None]
    position = start + t.batch_size
    while len(batch) < min_size and position < start + t.batch_size + 2 * n:  # 2n positions cover an epoch
        batch += [e for e in map(encoder.draw, batch_at(examples, 1, position, t.seed)) if e is not None]
        position += 1
    if not batch:
        raise UserError(f"all {n} prompts of {cfg.data.train} are longer than data.max_prompt_tokens="
                        f"{cfg.data.max_prompt_tokens} tokens (with the {t.method} views); raise "
                        "data.max_prompt_tokens or shorten the prompts")
    if len(batch) < min_size:
        raise UserError(f"only {len(batch)} prompts of {cfg.data.train} fit data.max_prompt_tokens="
                        f"{cfg.data.max_prompt_tokens}: too few for {min_size} ranks")
    return batch
