"""The memory plan (memory.py): monotone in rows and lengths, explicit settings kept, a run that
cannot fit stops before its first step with one line and writes nothing, --dry-run writes
nothing. The prediction against measured peaks: test_bench.py (bench memory)."""
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from typer.testing import CliRunner

from aropd_mlx.cli.main import app
from aropd_mlx.config import TrainSettings
from aropd_mlx.errors import UserError
from aropd_mlx.memory import (ModelShape, RunShape, make_plan, parse_size, predict)

QWEN_05B = ModelShape(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864,
                      vocab=151936, tied=True, dtype_bytes=2, attention_bias=True)
QWEN_15B = replace(QWEN_05B, layers=28, hidden=1536, heads=12, intermediate=8960)
RUN = RunShape(rows=8, group=4, student_prompt=256, view_prompts={"partial": 768, "full": 768},
               response=1024, lora_rank=16)


def test_parse_size():
    assert parse_size("12GB") == 12 * 10**9 and parse_size("800 MB") == 8 * 10**8
    assert parse_size("16GiB") == 16 * 2**30 and parse_size("1.5g") == 15 * 10**8
    for bad in ("twelve", "-1GB", "12 parsecs", ""):
        with pytest.raises(UserError, match="12GB"):
            parse_size(bad)


def test_weights_match_the_published_parameter_counts():
    """Qwen2.5-0.5B: 494M parameters, 1.5B: 1.54B (tied): the weight term is the config's."""
    assert abs(QWEN_05B.weight_bytes() / 2 / 494.0e6 - 1) < 0.01
    assert abs(QWEN_15B.weight_bytes() / 2 / 1543.7e6 - 1) < 0.01
    assert QWEN_05B.trainable_bytes("lora", 16, -1) == 4 * 24 * 16 * sum(
        a + b for a, b in QWEN_05B.linears())


@hsettings(max_examples=60, deadline=None)
@given(shape=st.sampled_from([QWEN_05B, QWEN_15B, replace(QWEN_05B, dtype_bytes=4, tied=False),
                              replace(QWEN_15B, quant_bits=4)]),
       fine_tune=st.sampled_from(["lora", "full"]), rows=st.integers(1, 32),
       extra_rows=st.integers(1, 16), length=st.integers(1, 2048), extra=st.integers(1, 512),
       micro=st.integers(0, 8), checkpoint=st.booleans())
def test_plan_is_monotone_in_rows_and_length(shape, fine_tune, rows, extra_rows, length, extra,
                                             micro, checkpoint):
    """Every phase's prediction grows with rows and with each length, at fixed settings; and
    so the smallest settings that fit a run fit every smaller run."""
    base = replace(RUN, rows=rows, response=length, fine_tune=fine_tune, group=1)
    bigger = [replace(base, rows=rows + extra_rows), replace(base, response=length + extra),
              replace(base, student_prompt=base.student_prompt + extra),
              replace(base, view_prompts={v: n + extra for v, n in base.view_prompts.items()})]
    small = predict(shape, base, micro, micro, checkpoint)
    for big in bigger:
        large = predict(shape, big, micro, micro, checkpoint)
        for phase in small:
            assert large[phase] >= small[phase], (phase, big)
    # the plan's choices: a longer rollout never gets larger micro-batches
    limit = int(max(predict(shape, base, 1, 1, True).values()) * 1.5)
    p_small = make_plan(shape, base, TrainSettings(), limit)
    try:
        p_big = make_plan(shape, replace(base, response=length + extra), TrainSettings(), limit)
    except UserError:
        return
    assert p_big.scoring_rows <= p_small.scoring_rows
    assert (p_big.checkpoint, -p_big.update_rows) >= (p_small.checkpoint, -p_small.update_rows)


def test_the_plan_micro_batches_to_fit_and_says_so():
    unbounded = make_plan(QWEN_05B, RUN, TrainSettings(), 10**15)
    assert (unbounded.scoring_rows, unbounded.update_rows, unbounded.checkpoint) == (8, 8, False)
    assert "scoring all rows at a time, update all rows, checkpointing off" in unbounded.line()
    limit = 12 * 10**9
    plan = make_plan(QWEN_15B, RUN, TrainSettings(), limit, "train.memory_limit")
    assert plan.fits and plan.peak <= limit
    assert plan.update_rows < 8 or plan.checkpoint  # the whole step would not fit in 12 GB
    line = plan.line()
    assert line.startswith("memory plan: scoring ") and "of 12.0 GB" in line and "\n" not in line


def test_explicit_settings_win():
    train = TrainSettings(micro_batch_size=3, scoring_micro_batch=5, grad_checkpoint=True)
    plan = make_plan(QWEN_05B, RUN, train, 10**15)
    assert (plan.scoring_rows, plan.update_rows, plan.checkpoint) == (5, 3, True)
    # over the limit as given, while smaller settings would fit: kept, and the line says so
    tight = int(max(predict(QWEN_05B, RUN, 1, 1, True).values()) * 1.05)
    over = make_plan(QWEN_05B, RUN, TrainSettings(micro_batch_size=8, grad_checkpoint=False), tight)
    assert over.update_rows == 8 and not over.checkpoint and "OVER the limit" in over.line()
    assert make_plan(QWEN_05B, RUN, TrainSettings(), tight).fits  # the planner's own choice fits


def test_a_run_that_cannot_fit_names_what_would():
    with pytest.raises(UserError) as e:
        make_plan(QWEN_15B, replace(RUN, fine_tune="full"), TrainSettings(), 8 * 10**9, "test")
    text = str(e.value)
    assert "\n" not in text and "even 1 row at a time with checkpointing needs" in text
    assert "LoRA instead of full" in text and "would fit" in text
    assert "4-bit" not in text  # a quantized base cannot be fully fine-tuned (models.py)


def test_each_rank_plans_its_share_and_sft_one_row_a_prompt(tiny_llama):
    """A run of 2 ranks: each process holds half the batch (World.shard), so its plan counts
    ceil(batch / 2) prompts x G rows, and a suggested batch size is the global one; SFT trains
    one oracle row a prompt, whatever G."""
    from aropd_mlx.batches import PromptEncoder
    from aropd_mlx.memory import plan_for_run, run_shape
    from aropd_mlx.models import load_student

    from helpers import lab_examples, tiny_config

    cfg = tiny_config(tiny_llama, "/nonexistent/out", **{"train.batch_size": 5,
                                                          "rollout.group_size": 4})
    model, tok = load_student(cfg.model)
    enc, ex = PromptEncoder(cfg, tok), lab_examples(8)
    assert run_shape(cfg, enc, ex).rows == 20 and run_shape(cfg, enc, ex, 2).rows == 12
    assert plan_for_run(cfg, model, enc, ex, 2).rows == 12
    assert "each of 2 ranks" in plan_for_run(cfg, model, enc, ex, 2).line()
    sft = tiny_config(tiny_llama, "/nonexistent/out", **{"train.batch_size": 5, "train.method": "sft",
                                                          "rollout.group_size": 4})
    assert run_shape(sft, PromptEncoder(sft, tok), ex).rows == 5
    share = replace(RUN, rows=32, ranks=2)  # one rank's 8 prompts x G 4 of a batch of 16
    limit = max(predict(QWEN_15B, replace(share, rows=12), 1, 1, True).values()) + 1
    with pytest.raises(UserError, match=r"would fit: 12 rows a rank \(train.batch_size 6\)"):
        make_plan(QWEN_15B, share, TrainSettings(), limit, "t")  # 3 prompts a rank, 6 in all


# ------------------------------------------------------------------------------- the CLI

@pytest.fixture
def run_args(tiny_llama, tmp_path):
    import json

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q{i}+1", "solution": f"{i}+1={i + 1}",
                                        "answer": str(i + 1)}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    return out, ["train", "--model", str(tiny_llama), "--data", str(data), "--out", str(out),
                 "--steps", "1", "--batch-size", "2", "--group-size", "2",
                 "--max-new-tokens", "6", "--no-eval"]


def test_dry_run_prints_the_plan_and_writes_nothing(run_args):
    out, args = run_args
    res = CliRunner().invoke(app, args + ["--dry-run", "--memory-limit", "2GB"])
    assert res.exit_code == 0, res.stdout + res.stderr
    lines = [l for l in res.stdout.splitlines() if l.startswith("memory plan:")]
    assert len(lines) == 1 and "of 2.0 GB" in lines[0] and "limit train.memory_limit" in lines[0]
    assert not Path(out).exists()


def test_a_run_over_the_limit_stops_with_one_line_and_writes_nothing(run_args):
    out, args = run_args
    res = CliRunner().invoke(app, args + ["--memory-limit", "1MB"])
    assert res.exit_code == 2 and "Traceback" not in res.stdout + res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("aropd-mlx: error: memory plan: even 1 row")
    assert not Path(out).exists()
    bad = CliRunner().invoke(app, args + ["--memory-limit", "lots"])
    assert bad.exit_code == 2 and "--memory-limit" in bad.stderr and "12GB" in bad.stderr


def test_training_runs_the_planned_micro_batches(run_args, monkeypatch):
    """A limit between the smallest and the whole-step peak: the run micro-batches, trains,
    and its config.yaml records the settings the plan chose."""
    import yaml

    from aropd_mlx import memory

    out, args = run_args
    real = memory.make_plan

    def squeezed(m, r, train, limit, note=""):  # a limit the whole step just misses
        whole = max(predict(m, r, r.rows, r.rows, False).values())
        least = max(predict(m, r, 1, 1, False).values())
        return real(m, r, train, int((whole + least) / 2), "test")

    monkeypatch.setattr(memory, "make_plan", squeezed)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stdout + res.stderr
    saved = yaml.safe_load((Path(out) / "config.yaml").read_text())["train"]
    chosen = (saved["scoring_micro_batch"], saved["micro_batch_size"], saved["grad_checkpoint"])
    assert min(chosen[:2]) < 4 and all(x is not None for x in chosen), res.stderr
    assert "memory plan:" in res.stderr


def test_a_model_the_plan_cannot_read_keeps_the_configured_settings(tiny_llama):
    from aropd_mlx.batches import PromptEncoder
    from aropd_mlx.memory import plan_for_run
    from aropd_mlx.models import load_student

    from helpers import lab_examples, tiny_config

    cfg = tiny_config(tiny_llama, "/nonexistent/out", **{"train.micro_batch_size": 2})
    model, tok = load_student(cfg.model)
    del model.args.hidden_size  # an architecture whose config the plan does not know
    plan = plan_for_run(cfg, model, PromptEncoder(cfg, tok), lab_examples(4))
    assert plan.update_rows == 2 and not plan.checkpoint and plan.scoring_rows == 8
    assert plan.line().startswith("memory plan: no prediction for this model")


@pytest.mark.parametrize("length", [128, 256])
def test_one_layers_backward_fits_the_planned_terms(length):
    """One qwen2 layer with many heads (so the attention scores dominate), float32 on this
    backend: the peak of its checkpointed backward (recompute + backward, what the plan's
    `bwd` term stands for) and of its forward lie under the plan's terms, within the margin
    the whole-step fit added (docs/BENCHMARKS.md: measured 12.4 bytes per score and 2 per-token
    units in the backward against the plan's 12.5 and 3; 4.3 against 6 in the forward)."""
    import mlx.core as mx
    from mlx_lm.models import qwen2

    from aropd_mlx.memory import ModelShape, _layer, layer_update_terms

    args = qwen2.ModelArgs(model_type="qwen2", hidden_size=64, num_hidden_layers=1,
                           intermediate_size=128, num_attention_heads=16, num_key_value_heads=4,
                           rms_norm_eps=1e-6, vocab_size=32, tie_word_embeddings=True)
    layer = qwen2.Model(args).model.layers[0]
    layer.freeze()
    mx.eval(layer.parameters())
    shape = ModelShape(layers=1, hidden=64, heads=16, kv_heads=4, intermediate=128, vocab=32,
                       tied=True, dtype_bytes=4, attention_bias=True)
    x = mx.random.normal((2, length, 64))
    mx.eval(x)

    def peak(fn):
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    backward = peak(lambda: mx.grad(
        lambda y: (mx.checkpoint(lambda z: layer(z, "causal", None))(y) ** 2).sum())(x))
    forward = peak(lambda: layer(x, "causal", None))
    _, bwd = layer_update_terms(shape, 2, length, "lora")
    fwd = _layer(shape, 2, length, length)
    assert 0.6 * bwd <= backward <= 1.05 * bwd
    assert 0.6 * fwd <= forward <= 1.05 * fwd
