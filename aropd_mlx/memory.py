"""The memory plan: predict each phase's peak from the model's config and the run's shapes, and
choose the micro-batches and checkpointing so the step fits `train.memory_limit`.

    shape = ModelShape.from_model(model)                 # or ModelShape.from_config(config.json)
    run = RunShape.from_config(cfg, student_prompt=256, view_prompts={"partial": 768, ...})
    plan = make_plan(shape, run, cfg)                     # UserError when nothing fits
    print(plan.line())    # memory plan: scoring 4 rows at a time, update 2 rows, ...
    cfg = plan.apply(cfg)                                 # the chosen settings, filled in

Notation: L layers, H hidden, I intermediate, V vocabulary, nh heads, Hq = nh*head_dim,
Hkv = kv_heads*head_dim, E bytes per activation (the model's dtype: 2 for bf16, 4 for fp32;
a quantized model's scales dtype), p bytes per weight (the dtype; quantized: bits/8 plus a
scale and a bias in E bytes per group), R = ceil(batch_size / ranks) x G rows (one rank's
share; SFT: G = 1, one oracle a prompt), G = group_size,
P_s the student prompt, P_v a teacher view's prompt (max over the data sampled), T the max
rollout length (rollout.max_new_tokens), S = P_s + T, nv the method's teacher views,
m / u the scoring / update micro-batches (rows), C the fused loss's rows per chunk.

Persistent (every phase):
    weights   W = p * (V*H*(1 + untied) + L*(H*(Hq + 2 Hkv) + Hq*H + 3*H*I + 2H + biases) + H)
    trainable A = LoRA: 4 bytes * r * sum over adapted linears (in + out) (fp32 adapters);
                  full: every weight but an untied head, p bytes each
    state     W + A (LoRA adapters) + A (the teacher's snapshot: frozen and EMA copy the
              trainable arrays; a separate teacher model counts as a second W) + 2A (AdamW)
Rollout (rows decoded together Rc = min(R, rollout.completion_batch_size), Uc = Rc/G prompts):
    KV   = L * 2 * Hkv * E * (Uc + Rc) * S           the cache is allocated at full length at
                                                     the start (prefix.prefill's room); the Uc
                                                     prefilled rows live until `expand` copies
    peak = state + KV + max(prefill: layer(Uc, P_s, P_s), decode: Rc * V * (E + 8))
Scoring (micro-batch m rows x nv views, b = nv*m sequences, U = nv*ceil(m/G) prompts):
    out  = nv * R * T * H * E                        the hidden states handed to the update
                                                     (x2 when several micro-batches concatenate)
    KV   = L * 2 * Hkv * E * (U + b) * (P_v + T)
    peak = state + out + KV + max(layer(U, P_v, P_v), layer(b, T, P_v + T)) + b * T * H * E
    layer(n, q, k) = n * q * F * E + n * nh * q * k * FWD_SCORES   one layer's transient forward:
                     F = 3I + 4H + Hq + 2Hkv per token, the attention scores in flight
Update (micro-batch u rows). Per layer, what the backward keeps and what it needs in flight:
    keep = u * S * (K_TOK * E + LORA_TOK + nh * S * KEEP_SCORES)    the forward's saved arrays
    bwd  = u * S * (BWD_TOKEN * (K_TOK * E + LORA_TOK) + nh * S * BWD_SCORES)  one layer
           back-propagating: its saved arrays, their gradients, the attention's scores,
           probabilities and theirs
           K_TOK = 2*Hq + 2*Hkv + 5H + 4I elements per token per layer (the inputs of every
           linear, q/k/v for attention, the MLP's gate, up and product); LORA_TOK = 4 bytes *
           (5H + Hq + I) with fp32 adapters on a bf16/fp16 model (each adapted linear keeps
           an fp32 copy of its input), 0 on an fp32 model
    no checkpointing: kept = L * keep,        in the backward (L - 1) * keep + bwd
    checkpointing:    kept = u * S * L * H * E (each layer's input),  in the backward kept + bwd
           (the layer being back-propagated is recomputed from its input)
    loss = C * V * 4 * FUSED_K + u * T * H * (E + 8)   one chunk of rows over V in flight
           (fused.py) + the student's hidden states and their per-row gradients
           (+ 2 * V * H * 4 for a trained tied head: its fp32 accumulators, one per CPU lane)
    peak = state + 2A (the gradient sum and this micro-batch's gradients) + nv*R*T*H*E (the
           teacher's hidden states) + u * S * H * E * 2 (the backward's gradient of one layer)
           + max(kept + loss: the loss's moment, the backward's moment)
Bytes per attention score: the CPU backend's (it materializes the scores; docs/BENCHMARKS.md,
"Memory"); Metal's fused attention keeps fewer (the plan errs safe). FUSED_K: calibrated with
`aropd-mlx bench memory --quick`. An estimate, not a bound, monotone in rows and lengths.
Choice: scoring the largest m that fits; the update the largest u without checkpointing, else
with it. A setting the user gave is kept as given. If even 1 row with checkpointing does not
fit, the run stops before its first step with one line naming what would fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from aropd_mlx.errors import UserError

# Bytes per attention score (CPU backend: the attention materializes its scores, fp32).
# Measured on one Qwen2.5-0.5B-shaped layer alone (s = 256..2048): forward 4.3 (one array:
# the mask and the softmax reuse the scores' buffer), kept for the backward 3.3, in flight
# while the layer back-propagates 12.4 (with 2x the per-token arrays: each and its
# gradient). Whole phases hold more than a layer alone (the incoming gradients, LoRA's
# input gradients, the prefix cache's rows); the values below fit twelve whole-phase
# measurements at Qwen2.5 shapes within 0.83-1.05 (docs/BENCHMARKS.md, "Memory"); the
# per-score and per-token values are at least the lone layer's, so the plan errs safe.
FWD_SCORES = 6
KEEP_SCORES = 4
BWD_SCORES = 12.5
BWD_TOKEN = 3  # the per-token arrays of one layer in flight in its backward, in K_TOK units
FUSED_K = 10  # (C, V) fp32 arrays alive in a fused-loss chunk (logits of 3 views, target,
#               softmaxes, the gradient)
SAFE_SHARE = 0.7  # default limit: this share of the machine's memory
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text, key: str = "memory limit") -> int:
    """'12GB', '12 GB', '800MB', '16GiB', '1.5e10' -> bytes (GB = 1e9, GiB = 2**30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or m.group(2) not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"{key}: expected a size such as 12GB or 800MB, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def gb(n: float, digits: int = 1) -> str:
    """Bytes as GB (one decimal), or MB below 0.1 GB (a tiny model's plan is not "0.0 GB")."""
    return f"{n / 1e9:.{digits}f} GB" if n >= 1e8 else f"{n / 1e6:.{digits}f} MB"


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: read from its config (config.json or mlx-lm's args)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int | None = None
    tied: bool = False
    dtype_bytes: int = 2  # bf16/fp16 2, fp32 4: weights (unquantized) and activations
    quant_bits: int | None = None
    quant_group: int = 64
    attention_bias: bool = False

    @property
    def hq(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def hkv(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        text = c.get("text_config") or {}
        get = lambda k, d=None: c.get(k, text.get(k, d))  # noqa: E731
        dtype = str(get("torch_dtype") or get("dtype") or "bfloat16")
        q = get("quantization") or get("quantization_config") or {}
        heads = int(get("num_attention_heads"))
        return cls(layers=int(get("num_hidden_layers")), hidden=int(get("hidden_size")),
                   heads=heads, kv_heads=int(get("num_key_value_heads", heads)),
                   intermediate=int(get("intermediate_size")), vocab=int(get("vocab_size")),
                   head_dim=get("head_dim"), tied=bool(get("tie_word_embeddings", False)),
                   dtype_bytes=4 if "32" in dtype else 2, quant_bits=q.get("bits"),
                   quant_group=int(q.get("group_size", 64)),
                   attention_bias=bool(get("attention_bias", get("model_type") == "qwen2")))

    @classmethod
    def from_model(cls, model) -> "ModelShape":
        """From a loaded mlx-lm model: its args, the dtype and quantization of its weights."""
        args = dict(vars(model.args))
        layer = model.layers[0]
        proj = layer.mlp.gate_proj if hasattr(layer, "mlp") else None
        base = getattr(proj, "linear", proj)  # under a LoRA wrapper
        quant = {"bits": base.bits, "group_size": base.group_size} if base is not None and \
            "scales" in base else {}
        ref = base.scales if quant else model.model.embed_tokens.weight
        args.update(quantization=quant, dtype="float32" if ref.dtype.size == 4 else "bfloat16",
                    num_hidden_layers=len(model.layers),
                    tie_word_embeddings=getattr(model, "lm_head", None) is None,
                    attention_bias=hasattr(layer, "self_attn") and
                    "bias" in getattr(layer.self_attn.q_proj, "linear", layer.self_attn.q_proj))
        return cls.from_config(args)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of every linear in one layer: q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        return [(h, self.hq), (h, self.hkv), (h, self.hkv), (self.hq, h), (h, i), (h, i), (i, h)]

    def weight_bytes(self) -> float:
        per_layer = sum(a * b for a, b in self.linears())
        bias = (self.hq + 2 * self.hkv) if self.attention_bias else 0
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        if self.quant_bits:
            p = self.quant_bits / 8 + 2 * self.dtype_bytes / self.quant_group
        else:
            p = self.dtype_bytes
        norms = (self.layers * (2 * self.hidden + bias) + self.hidden) * self.dtype_bytes
        return p * (self.layers * per_layer + embed) + norms

    def trainable_bytes(self, fine_tune: str, rank: int, lora_layers: int) -> float:
        if fine_tune == "full":
            untied = 0 if self.tied else self.vocab * self.hidden * self.dtype_bytes
            return self.weight_bytes() - untied
        n = self.layers if lora_layers < 0 else min(lora_layers, self.layers)
        per = sum(rank * (a + b) + (b if fine_tune == "dora" else 0) for a, b in self.linears())
        return 4.0 * n * per


@dataclass(frozen=True)
class RunShape:
    """The step's shapes: rows, prompts, lengths per view, and the settings the plan reads."""

    rows: int
    group: int
    student_prompt: int
    view_prompts: dict  # teacher view -> its longest prompt (tokens)
    response: int
    completion_batch: int = 64
    fine_tune: str = "lora"
    lora_rank: int = 8
    lora_layers: int = -1
    separate_teacher: bool = False
    chunk_size: int = 64
    rollout: bool = True  # SFT trains on the oracle trace: no rollout phase
    ranks: int = 1  # a distributed run: `rows` are one rank's share (the largest)

    @classmethod
    def from_config(cls, cfg, student_prompt: int, view_prompts: dict, ranks: int = 1) -> "RunShape":
        group = 1 if cfg.train.method == "sft" else cfg.rollout.group_size  # SFT: one oracle a prompt
        prompts = -(-cfg.train.batch_size // ranks)  # World.shard: shares differ by one at most
        return cls(rows=prompts * group, group=group, ranks=ranks,
                   student_prompt=student_prompt, view_prompts=dict(view_prompts),
                   response=cfg.rollout.max_new_tokens,
                   completion_batch=cfg.rollout.completion_batch_size,
                   fine_tune=cfg.model.fine_tune_type, lora_rank=cfg.model.lora_rank,
                   lora_layers=cfg.model.lora_layers,
                   separate_teacher=cfg.model.teacher not in ("frozen", "ema"),
                   chunk_size=cfg.objective.chunk_size, rollout=cfg.train.method != "sft")


def _layer(m: ModelShape, n: int, q: int, k: int) -> float:
    """One layer's transient forward over n sequences of q queries against k keys."""
    f = 3 * m.intermediate + 4 * m.hidden + m.hq + 2 * m.hkv
    return n * q * f * m.dtype_bytes + n * m.heads * q * k * FWD_SCORES


def layer_update_terms(m: ModelShape, rows: int, length: int, fine_tune: str) -> tuple[float, float]:
    """(keep, bwd) of one decoder layer in the update (module docstring): what its forward
    saves for the backward, and what is in flight while it back-propagates."""
    e, h = m.dtype_bytes, m.hidden
    k_tok = (2 * m.hq + 2 * m.hkv + 5 * h + 4 * m.intermediate) * e
    lora_tok = 4 * (5 * h + m.hq + m.intermediate) if fine_tune != "full" and e < 4 else 0
    per_tok = k_tok + lora_tok
    return (rows * length * (per_tok + m.heads * length * KEEP_SCORES),
            rows * length * (BWD_TOKEN * per_tok + m.heads * length * BWD_SCORES))


def _kv(m: ModelShape, seqs: float, length: int) -> float:
    return m.layers * 2 * m.hkv * m.dtype_bytes * seqs * length


def predict(m: ModelShape, r: RunShape, scoring_rows: int, update_rows: int,
            checkpoint: bool) -> dict[str, float]:
    """Predicted peak bytes of the rollout, scoring and update phases (module docstring)."""
    e, h, t, s = m.dtype_bytes, m.hidden, r.response, r.student_prompt + r.response
    a = m.trainable_bytes(r.fine_tune, r.lora_rank, r.lora_layers)
    w = m.weight_bytes()
    state = w + (a if r.fine_tune != "full" else 0) + 3 * a + (w if r.separate_teacher else 0)
    # rollout
    rc = min(r.rows, max(r.group, (r.completion_batch // r.group) * r.group))
    uc = math.ceil(rc / r.group)
    rollout = state + _kv(m, uc + rc, s) + max(_layer(m, uc, r.student_prompt, r.student_prompt),
                                               rc * m.vocab * (e + 8)) if r.rollout else 0.0
    # scoring
    nv = len(r.view_prompts)
    mb = max(1, min(scoring_rows or r.rows, r.rows))
    out = nv * r.rows * t * h * e * (1 if mb >= r.rows else 2)
    scoring = 0.0
    if nv:
        pv = max(r.view_prompts.values())
        b, u = nv * mb, nv * math.ceil(mb / r.group)
        scoring = state + out + _kv(m, u + b, pv + t) + b * t * h * e + max(
            _layer(m, u, pv, pv), _layer(m, b, t, pv + t))
    # update
    ub = max(1, min(update_rows or r.rows, r.rows))
    keep, bwd = layer_update_terms(m, ub, s, r.fine_tune)
    if checkpoint:
        kept = ub * s * m.layers * h * e
        backward = kept + bwd
    else:
        kept = m.layers * keep
        backward = (m.layers - 1) * keep + bwd
    from aropd_mlx.fused import chunk_rows

    c = min(chunk_rows(r.chunk_size, m.vocab), ub * t)
    loss = c * m.vocab * 4 * FUSED_K + ub * t * h * (e + 8)
    if r.fine_tune == "full" and m.tied:
        loss += 2 * m.vocab * h * 4
    update = state + 2 * a + nv * r.rows * t * h * e + 2 * ub * s * h * e + max(kept + loss,
                                                                                backward)
    return {"rollout": rollout, "scoring": scoring, "update": update}


@dataclass(frozen=True)
class MemoryPlan:
    limit: int
    limit_note: str  # where the limit comes from
    scoring_rows: int
    update_rows: int
    checkpoint: bool
    phases: dict  # phase -> predicted peak bytes
    rows: int
    explicit: tuple = ()  # the settings the user gave (kept as given)

    @property
    def peak(self) -> float:
        return max(self.phases.values(), default=0.0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit

    def line(self) -> str:
        def rows(n):
            return "all rows" if n >= self.rows else f"{n} row{'s' if n != 1 else ''}"

        phases = ", ".join(f"{k} {gb(v)}" for k, v in self.phases.items() if v)
        if not self.phases:  # a model the plan cannot read: the settings as configured
            return (f"memory plan: no prediction for this model ({self.limit_note}); scoring "
                    f"{rows(self.scoring_rows)} at a time, update {rows(self.update_rows)}, "
                    f"checkpointing {'on' if self.checkpoint else 'off'}, as configured")
        text = (f"memory plan: scoring {rows(self.scoring_rows)} at a time, update "
                f"{rows(self.update_rows)}, checkpointing {'on' if self.checkpoint else 'off'}: "
                f"predicted peak {gb(self.peak)} of {gb(self.limit)} ({phases}; "
                f"limit {self.limit_note})")
        if self.explicit:
            text += f"; as set: {', '.join(self.explicit)}"
        if not self.fits:
            text += " - OVER the limit with the settings as given"
        return text

    def apply(self, cfg):
        """cfg with the planned micro-batches and checkpointing filled in."""
        from aropd_mlx.config import with_overrides

        return with_overrides(cfg, train={"scoring_micro_batch": self.scoring_rows,
                                          "micro_batch_size": self.update_rows,
                                          "grad_checkpoint": self.checkpoint})


def memory_limit(cfg) -> tuple[int, str]:
    """train.memory_limit, or SAFE_SHARE of this machine's memory (and how it was chosen)."""
    if cfg.train.memory_limit:
        return parse_size(cfg.train.memory_limit, "train.memory_limit"), "train.memory_limit"
    from aropd_mlx.doctor import memory_total_bytes

    total = memory_total_bytes() or 16 * 10**9
    return int(SAFE_SHARE * total), f"{int(SAFE_SHARE * 100)}% of this machine's {gb(total)}"


def _largest(fits, n: int) -> int | None:
    """The largest k in 1..n with fits(k) (monotone below n; n itself is checked first, as
    one pass over all rows skips the scoring's concatenation of micro-batches)."""
    if fits(n):
        return n
    if not fits(1):
        return None
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def make_plan(m: ModelShape, r: RunShape, train, limit: int, limit_note: str = "") -> MemoryPlan:
    """Choose the micro-batches and checkpointing (`train`: TrainSettings; a value it sets
    wins) so every phase's predicted peak fits `limit`; UserError naming what would fit when
    even the smallest settings do not."""
    explicit = tuple(f"{k}={getattr(train, k)}" for k in
                     ("scoring_micro_batch", "micro_batch_size", "grad_checkpoint")
                     if getattr(train, k) is not None)

    def peak(phase, sm, um, ck):
        return predict(m, r, sm, um, ck)[phase]

    sm = train.scoring_micro_batch
    if sm is None:
        sm = _largest(lambda k: peak("scoring", k, 1, True) <= limit, r.rows) or 1
    um, ck = train.micro_batch_size, train.grad_checkpoint
    if um is None:
        for c in ([ck] if ck is not None else [False, True]):
            best = _largest(lambda k: peak("update", sm, k, c) <= limit, r.rows)
            if best is not None:
                um, ck = best, c
                break
        else:
            um, ck = 1, True if ck is None else ck
    elif ck is None:
        ck = peak("update", sm, um, False) > limit
    sm, um = (sm or r.rows), (um or r.rows)
    plan = MemoryPlan(limit, limit_note, min(sm, r.rows), min(um, r.rows), bool(ck),
                      predict(m, r, sm, um, bool(ck)), r.rows, explicit)
    if not plan.fits and max(predict(m, r, 1, 1, True).values()) > limit:
        raise UserError(_too_big(m, r, replace(plan, phases=predict(m, r, 1, 1, True))))
    return plan  # over the limit only with settings the user gave (its line says so)


def _too_big(m: ModelShape, r: RunShape, plan: MemoryPlan) -> str:
    """One line: the smallest settings' peak and what would fit instead."""
    worst = max(plan.phases, key=plan.phases.get)
    def fits(mm, rr):
        return max(predict(mm, rr, 1, 1, True).values()) <= plan.limit

    ideas = []
    groups = _largest(lambda k: fits(m, replace(r, rows=k * r.group)), r.rows // r.group)
    if groups and groups * r.group < r.rows:
        ideas.append(f"{groups * r.group} rows{' a rank' if r.ranks > 1 else ''} "
                     f"(train.batch_size {groups * r.ranks})")
    length = _largest(lambda k: fits(m, replace(r, response=k)), r.response)
    if length and length < r.response:
        ideas.append(f"rollouts of {length} tokens (rollout.max_new_tokens)")
    if r.fine_tune == "full" and fits(m, replace(r, fine_tune="lora")):
        ideas.append("LoRA instead of full fine-tuning (model.fine_tune_type lora)")
    if not m.quant_bits and r.fine_tune != "full" and fits(replace(m, quant_bits=4), r):
        ideas.append("a 4-bit quantized base model")
    fix = "; would fit: " + " or ".join(ideas) if ideas else \
        "; nothing smaller in rows, length or precision fits: a machine with more memory"
    return (f"memory plan: even 1 row at a time with checkpointing needs {gb(plan.peak)} "
            f"({worst} phase), over the {gb(plan.limit)} limit ({plan.limit_note}){fix}")


def prompt_lengths(cfg, encoder, examples, views, sample: int = 256) -> dict[str, int]:
    """The longest prompt per view over the data, or over `sample` examples spread evenly
    through it (a longer prompt elsewhere can make the real peak exceed the plan's); and the
    longest oracle response ("oracle", SFT's responses) when the encoder makes them."""
    longest = {v: 1 for v in views}
    for ex in examples[::max(1, len(examples) // sample)][:sample]:
        enc = encoder(ex)
        if enc is None:  # past data.max_prompt_tokens: skipped by the run as well
            continue
        for v in views:
            longest[v] = max(longest[v], len(enc.prompts[v]))
        if enc.oracle is not None:
            longest["oracle"] = max(longest.get("oracle", 1), len(enc.oracle))
    return longest


def run_shape(cfg, encoder, examples, ranks: int = 1) -> RunShape:
    """The step's shapes (one rank's share of `ranks`), its longest prompt per view (`encoder`:
    example -> encoded prompts; already encoded ones pass `lambda e: e`)."""
    from aropd_mlx.views import METHOD_VIEWS

    views = METHOD_VIEWS[cfg.train.method]
    encoded = tuple(getattr(encoder, "views", ())) or ("student",) + tuple(views)
    lengths = prompt_lengths(cfg, encoder, examples, encoded)
    run = RunShape.from_config(cfg, lengths["student"], {v: lengths[v] for v in views}, ranks)
    if cfg.train.method == "sft":  # its prompts may be any encoded view, its responses oracles
        run = replace(run, student_prompt=max(lengths[v] for v in encoded),
                      response=lengths.get("oracle", run.response))
    return run


def plan_for_run(cfg, model, encoder, examples, ranks: int = 1) -> MemoryPlan:
    """A run's plan: the model's shape, the data's prompt lengths, each rank's share."""
    run = run_shape(cfg, encoder, examples, ranks)
    limit, note = memory_limit(cfg)
    note += f"; each of {ranks} ranks plans its share of the batch" if ranks > 1 else ""
    try:
        shape = ModelShape.from_model(model)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as e:
        t = cfg.train  # an architecture whose config the plan cannot read: nothing is chosen
        return MemoryPlan(limit, f"{type(e).__name__}: {e}", t.scoring_micro_batch or run.rows,
                          t.micro_batch_size or run.rows, bool(t.grad_checkpoint), {}, run.rows)
    return make_plan(shape, run, cfg.train, limit, note)
