"""Rollout speed: `aropd_mlx.rollout.sample` against `mlx_lm.generate.batch_generate` on the
same model, prompts, batch and fixed lengths, timed round-robin in one process.

    from aropd_mlx.bench.rollout import bench_rollout
    bench_rollout("lab", rows=32, max_new_tokens=80)      # tiny CPU size: rows=4, max_new_tokens=8

Both sides sample at temperature 1 with the same number of rows decoded together
(completion_batch_size = rows) and EOS stopping off, so each call produces exactly
rows x max_new_tokens tokens; tokens/s = that / wall seconds (prefill included).
"""

from __future__ import annotations

from aropd_mlx.bench.common import (bench_model, interleaved, median, no_eos, ratio,
                                    student_prompts)


def bench_rollout(model_name: str = "lab", rows: int = 32, max_new_tokens: int = 80,
                  repeats: int = 3, seed: int = 0, model_path=None) -> dict:
    """Median seconds and tokens/s of both samplers; `speedup` = ours / batch_generate."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    from aropd_mlx.rollout import RolloutSettings, sample

    path = model_path or bench_model(model_name)
    model, tokenizer = load(str(path))
    prompts = student_prompts(tokenizer, rows, seed)
    settings = RolloutSettings(group_size=1, max_new_tokens=max_new_tokens, temperature=1.0,
                               completion_batch_size=rows)
    counts = {}

    def ours():
        resp = sample(model, tokenizer, prompts, settings, seed=seed)
        counts["ours"] = int(sum(resp.lengths))

    def theirs():
        mx.random.seed(seed)
        out = batch_generate(model, tokenizer, prompts, max_tokens=max_new_tokens,
                             sampler=make_sampler(1.0), completion_batch_size=rows,
                             prefill_batch_size=min(rows, 64), return_token_ids=True)
        counts["batch_generate"] = int(sum(len(t) for t in out.token_ids))

    with no_eos(tokenizer):
        times = interleaved({"ours": ours, "batch_generate": theirs}, repeats=repeats)
    result = {"model": model_name, "rows": rows, "max_new_tokens": max_new_tokens,
              "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts), "repeats": repeats}
    for name, ts in times.items():
        result[f"{name}_seconds"] = median(ts)
        result[f"{name}_tokens"] = counts[name]
        result[f"{name}_tokens_per_s"] = counts[name] / median(ts)
    result["speedup"] = ratio(result["ours_tokens_per_s"], result["batch_generate_tokens_per_s"])
    return result


def format_rollout(r: dict) -> str:
    return (f"rollout [{r['model']}] {r['rows']} rows x {r['max_new_tokens']} tokens: "
            f"ours {r['ours_tokens_per_s']:.0f} tok/s, batch_generate "
            f"{r['batch_generate_tokens_per_s']:.0f} tok/s -> {r['speedup']:.2f}x (goal >= 1.0x)")
