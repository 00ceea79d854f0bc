"""`aropd-mlx bench memory`: the memory plan's prediction beside the measured peak, per phase.

Random-weight models at Qwen2.5 shapes are written in Hugging Face format (qwen2, tied
embeddings, grouped-query attention, V = 151,936; a character tokenizer padded with dummy
entries to 151,936; nothing downloaded), optionally cut to their first few layers. One AR-OPD
step runs at real per-row shapes on replayed rollouts (random response tokens, no generation):
student prompt 256 tokens, privileged views 768, rollouts 1024, 4 responses per prompt, LoRA
rank 16 on every linear layer. Each phase is measured on its own (mx.reset_peak_memory before,
mx.get_peak_memory after, less the arrays other work in the process held before; the peak
includes the weights, adapters, optimizer state and whatever the phase holds):
- rollout: the student's real decode path (prefix.prefill with the cache allocated at full
  length, expand to the rows, then ROLLOUT_STEPS decode steps with sampling). The cache never
  grows after the start, so the peak of the first steps is the rollout's peak;
- scoring: scoring.score_views under the teacher, both views, at the plan's micro-batch;
- update: trainer.accumulate + apply_update (fused loss, gradients, AdamW) at the plan's
  micro-batch and checkpointing.

    aropd-mlx bench memory --quick                    # 0.5B shape, 2 layers, short rows: < 2 min
    aropd-mlx bench memory                            # 0.5B at 4 layers and full depth, 1.5B at 4
    python -c "from aropd_mlx.bench.memory import *; \
               print(format_memory(bench_memory('qwen2.5-0.5b', layers=2, rows=4, \
               student_prompt=32, view_prompt=64, response=64)))"
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

QWEN_VOCAB = 151936
SHAPES = {  # the published Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate)
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960),
}
ROLLOUT_STEPS = 8
PHASES = ("rollout", "scoring", "update")


def build_qwen_shaped(name: str, layers: int | None = None, dtype: str = "bfloat16",
                      root: Path | None = None, seed: int = 0) -> Path:
    """An HF-format qwen2 model at a Qwen2.5 shape (the first `layers` layers), random weights,
    cached under the bench directory."""
    import mlx.core as mx

    from aropd_mlx.bench.common import bench_root, publish
    from aropd_mlx.lab.tiny import TinySpec, _config, write_tokenizer

    shape = dict(SHAPES[name])
    shape["layers"] = layers or shape["layers"]
    key = hashlib.sha256(repr((name, shape, dtype, seed, QWEN_VOCAB, 1)).encode()).hexdigest()[:10]
    path = (Path(root) if root else bench_root()) / f"model-{name}-{shape['layers']}l-{dtype}-{key}"
    if (path / "done").is_file():
        return path
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    spec = TinySpec(model_type="qwen2", tie_word_embeddings=True, max_position=32768, **shape)
    write_tokenizer(tmp)
    _pad_tokenizer(tmp / "tokenizer.json", QWEN_VOCAB)
    cfg = _config(spec, QWEN_VOCAB)
    cfg.update(torch_dtype=dtype, dtype=dtype, rope_theta=1000000.0)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    mx.random.seed(seed)
    dt = getattr(mx, dtype)
    h, i, hd = shape["hidden"], shape["intermediate"], shape["hidden"] // shape["heads"]
    hq, hkv = shape["heads"] * hd, shape["kv_heads"] * hd

    def normal(*s):
        return (0.02 * mx.random.normal(s)).astype(dt)

    w = {"model.embed_tokens.weight": normal(QWEN_VOCAB, h), "model.norm.weight": mx.ones((h,), dt)}
    for n in range(shape["layers"]):
        p = f"model.layers.{n}."
        w.update({p + "input_layernorm.weight": mx.ones((h,), dt),
                  p + "post_attention_layernorm.weight": mx.ones((h,), dt),
                  p + "self_attn.q_proj.weight": normal(hq, h), p + "self_attn.q_proj.bias": normal(hq),
                  p + "self_attn.k_proj.weight": normal(hkv, h), p + "self_attn.k_proj.bias": normal(hkv),
                  p + "self_attn.v_proj.weight": normal(hkv, h), p + "self_attn.v_proj.bias": normal(hkv),
                  p + "self_attn.o_proj.weight": normal(h, hq),
                  p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
                  p + "mlp.down_proj.weight": normal(h, i)})
        mx.eval(w)
    mx.save_safetensors(str(tmp / "model.safetensors"), w, metadata={"format": "pt"})
    del w
    return publish(tmp, path)


def _pad_tokenizer(path: Path, vocab_size: int) -> None:
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    taken = set(vocab.values()) | {a["id"] for a in tok.get("added_tokens", [])}
    for n in range(max(taken) + 1, vocab_size):
        vocab[f"<extra_{n}>"] = n  # unreachable by the char BPE: pure padding of the table
    path.write_text(json.dumps(tok, ensure_ascii=False))


def _measure(fn):
    import mlx.core as mx

    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = fn()
    return out, mx.get_peak_memory(), time.perf_counter() - t0


def default_dtype() -> str:
    """bfloat16 (what Qwen2.5 ships) on a GPU; float32 on the CPU backend, whose bf16 matmuls
    run about 10x slower (the plan's bytes per activation follow the dtype)."""
    import mlx.core as mx

    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def bench_memory(model_name: str = "qwen2.5-0.5b", layers: int | None = 4, rows: int = 8,
                 group: int = 4, student_prompt: int = 256, view_prompt: int = 768,
                 response: int = 1024, lora_rank: int = 16, fine_tune: str = "lora",
                 dtype: str | None = None, scoring_rows: int | None = None,
                 update_rows: int | None = None, checkpoint: bool | None = None,
                 memory_limit: str | None = None, seed: int = 0, model_path=None) -> dict:
    """One AR-OPD step at these shapes; per phase the plan's prediction and the measured peak.
    Micro-batches and checkpointing: as given, else the plan's choice under `memory_limit`
    (default: the plan's default, a share of this machine's memory) for the model at FULL
    depth, so a cut model measures what the full-depth run would hold per layer and its
    "at full depth" extrapolation is that run's peak."""
    import gc

    import mlx.core as mx

    from aropd_mlx import trainer as tr
    from aropd_mlx.batches import Encoded
    from aropd_mlx.config import load_config
    from aropd_mlx.head import head_from_model
    from aropd_mlx.memory import (MemoryPlan, ModelShape, RunShape, make_plan,
                                  memory_limit as limit_of, predict)
    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.optimizer import make_optimizer
    from aropd_mlx.prefix import dedupe, expand, prefill
    from aropd_mlx.rollout import make_rollout_sampler, pad_responses
    from aropd_mlx.scoring import score_views

    dtype = dtype or default_dtype()
    gc.collect()
    mx.clear_cache()
    other = mx.get_active_memory()  # arrays of whatever ran before in this process: not ours
    path = model_path or build_qwen_shaped(model_name, layers, dtype)
    over = {"model.path": str(path), "model.fine_tune_type": fine_tune,
            "model.lora_rank": lora_rank, "train.method": "ar-opd",
            "train.batch_size": max(1, rows // group), "rollout.group_size": group,
            "rollout.max_new_tokens": response, "train.seed": seed,
            "train.scoring_micro_batch": scoring_rows, "train.micro_batch_size": update_rows,
            "train.grad_checkpoint": checkpoint, "train.memory_limit": memory_limit}
    cfg = load_config(overrides={k: v for k, v in over.items() if v is not None})
    model, tok = load_student(cfg.model, seed=seed)
    teacher = Teacher.create(model, tok, cfg.model)
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    mshape = ModelShape.from_model(model)
    run = RunShape.from_config(cfg, student_prompt, {"partial": view_prompt, "full": view_prompt})
    limit, note = limit_of(cfg)
    full = mshape.layers if model_path else SHAPES[model_name]["layers"]
    # the micro-batches and checkpointing a full-depth run would use under the limit, so the
    # extrapolation below is the peak of that run; the cut model's measurement is checked
    # against its own prediction at the same settings
    if None in (scoring_rows, update_rows, checkpoint):
        chosen = make_plan(replace(mshape, layers=full), run, cfg.train, limit, note)
        plan = replace(chosen, phases=predict(mshape, run, chosen.scoring_rows,
                                              chosen.update_rows, chosen.checkpoint))
    else:  # nothing to choose (and no limit to check): the prediction at these settings
        plan = MemoryPlan(limit, note, scoring_rows, update_rows, checkpoint,
                          predict(mshape, run, scoring_rows, update_rows, checkpoint), run.rows,
                          ("all settings given",))
    cfg = plan.apply(cfg)
    n = cfg.train.batch_size * group
    rng = np.random.default_rng(seed)
    vocab_hi = min(mshape.vocab, 100)  # char tokens; the ids only need to be valid

    def ids(k):
        return [1] + rng.integers(3, vocab_hi, size=k - 1).tolist()

    batch = [Encoded(None, {"student": ids(student_prompt), "partial": ids(view_prompt),
                            "full": ids(view_prompt)}, None) for _ in range(cfg.train.batch_size)]
    rows_ = {v: [e.prompts[v] for e in batch for _ in range(group)] for v in batch[0].prompts}
    resp = pad_responses([rng.integers(3, vocab_hi, size=response).tolist() for _ in range(n)],
                         [False] * n, tok.pad_token_id or 0)
    mx.eval(model.parameters(), optimizer.state, teacher.params)

    def rollout():  # the decode path of rollout._decode, for its first steps
        unique, index = dedupe(rows_["student"][: min(n, cfg.rollout.completion_batch_size)])
        cache, _ = prefill(model, [p[:-1] for p in unique], tok.pad_token_id or 0, room=response)
        expand(cache, index)
        sampler = make_rollout_sampler(1.0)
        y = mx.array([p[-1] for p in rows_["student"][: len(index)]])
        for _ in range(ROLLOUT_STEPS):
            y = sampler(model(y[:, None], cache=cache)[:, -1, :])
            mx.eval(y)

    def scoring():
        with teacher.active(model) as scorer:
            th = score_views(scorer, {v: rows_[v] for v in ("partial", "full")},
                             np.array(resp.tokens), resp.lengths, tok.pad_token_id or 0,
                             micro_batch=cfg.train.scoring_micro_batch)
            return tr.Scored(rows_, resp, th, head_from_model(scorer), tok.pad_token_id or 0)

    def update(scored):
        acc = tr.accumulate(cfg, model, scored, tr.objective_for(cfg), diagnostics=False)
        tr.apply_update(cfg, model, optimizer, acc)

    measured, seconds = {}, {}
    resident = mx.get_active_memory() - other  # weights, adapters, teacher, optimizer state
    _, measured["rollout"], seconds["rollout"] = _measure(rollout)
    scored, measured["scoring"], seconds["scoring"] = _measure(scoring)
    _, measured["update"], seconds["update"] = _measure(lambda: update(scored))
    measured = {k: v - other for k, v in measured.items()}
    optimizer.__dict__.pop("_aropd_step", None)  # the compiled step holds the model: free it now
    at_full = predict(replace(mshape, layers=full), run, plan.scoring_rows, plan.update_rows,
                      plan.checkpoint)
    return {"model": Path(model_path).name if model_path else model_name, "layers": mshape.layers, "full_layers": full, "dtype": dtype, "fine_tune": fine_tune,
            "rows": n, "group": group, "student_prompt": student_prompt,
            "view_prompt": view_prompt, "response": response, "lora_rank": lora_rank,
            "scoring_rows": plan.scoring_rows, "update_rows": plan.update_rows,
            "checkpoint": plan.checkpoint, "plan_line": plan.line(), "resident": resident,
            "predicted": dict(plan.phases), "measured": measured, "seconds": seconds,
            "ratio": {p: measured[p] / plan.phases[p] for p in PHASES},
            # the per-layer extrapolation: the plan at full depth, and the measured peak plus
            # the plan's per-layer part for the missing layers
            "predicted_full_depth": at_full,
            "extrapolated_full_depth": {p: measured[p] + at_full[p] - plan.phases[p]
                                        for p in PHASES}}


def format_memory(r: dict) -> str:
    head = (f"memory [{r['model']} {r['layers']} layers {r['dtype']} {r['fine_tune']}] "
            f"{r['rows']} rows (G={r['group']}), prompts {r['student_prompt']}/{r['view_prompt']}, "
            f"rollouts {r['response']}: scoring {r['scoring_rows']} rows, update "
            f"{r['update_rows']}, checkpointing {'on' if r['checkpoint'] else 'off'}")
    from functools import partial

    from aropd_mlx.memory import gb

    gb = partial(gb, digits=2)

    out = [head, f"  resident before the step (weights, adapters, teacher, AdamW) "
                 f"{gb(r['resident'])}"]
    for p in PHASES:
        out.append(f"  {p:8} predicted {gb(r['predicted'][p]):>9}  measured "
                   f"{gb(r['measured'][p]):>9}  measured/predicted "
                   f"{r['ratio'][p]:.2f}  ({r['seconds'][p]:.1f}s)")
    if r["layers"] < r["full_layers"]:
        out.append(f"  at full depth ({r['full_layers']} layers): planned "
                   f"{gb(max(r['predicted_full_depth'].values()))}, extrapolated from "
                   f"the measured {gb(max(r['extrapolated_full_depth'].values()))}")
    return "\n".join(out)
