"""The training step and loop: every method, adapters in mlx-lm's format, exact resume, teachers."""
import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from aropd_mlx.batches import METHOD_VIEWS
from aropd_mlx.config import METHODS
from aropd_mlx.head import head_from_model
from aropd_mlx.models import Teacher, load_student, trainable
from aropd_mlx.scoring import response_hidden
from aropd_mlx.trainer import train

from helpers import lab_examples, tiny_config

METRIC_KEYS = {"step", "loss", "grad_norm", "lr", "lam", "response_len_mean", "tokens_per_s",
               "time_rollout", "time_scoring", "time_update", "response_tokens"}


def _run(model_path, out, **overrides):
    cfg = tiny_config(model_path, out, **overrides)
    model, tok = load_student(cfg.model)
    before = {k: np.array(v) for k, v in trainable(model).items()}
    summary = train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model))
    return cfg, model, tok, before, summary


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_saves(method, tiny_llama, tmp_path):
    cfg, model, _, before, summary = _run(tiny_llama, tmp_path / method, **{"train.method": method})
    lines = [json.loads(l) for l in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    for line in lines:
        assert METRIC_KEYS <= set(line) and np.isfinite(line["loss"])
        # diagnostics_every 10: step 1 and the last step carry them, step 2 does not
        if method == "ar-opd" and line["step"] != 2:
            assert {"kl_full_partial", "clip_rate", "kl_student_target"} <= set(line)
        if method != "sft":
            assert ("kl_student_target" in line) == (line["step"] != 2)
    after = trainable(model)
    assert any(not np.array_equal(before[k], np.array(after[k])) for k in before)
    saved = mx.load(str(tmp_path / method / "adapters.safetensors"))
    assert set(saved) == set(after)
    assert summary["steps_done"] == 3 and (tmp_path / method / "config.yaml").is_file()


def test_diagnostics_every_changes_logging_not_training(tiny_llama, tmp_path):
    """Diagnostics are extra passes over the vocabulary, skipped off logging steps; the loss,
    gradients and so the trained weights must not depend on when they are computed."""
    runs = {}
    for every in (1, 2, 10):
        _, model, _, _, _ = _run(tiny_llama, tmp_path / str(every), **{"train.steps": 4,
                                 "train.diagnostics_every": every})
        lines = [json.loads(l) for l in (tmp_path / str(every) / "metrics.jsonl").read_text().splitlines()]
        runs[every] = ({k: np.array(v) for k, v in trainable(model).items()},
                       [l["loss"] for l in lines], [l["step"] for l in lines if "kl_full_partial" in l])
    assert runs[1][2] == [1, 2, 3, 4] and runs[2][2] == [1, 2, 4] and runs[10][2] == [1, 4]
    for every in (2, 10):
        np.testing.assert_allclose(runs[every][1], runs[1][1], rtol=1e-6)
        for k, v in runs[1][0].items():
            np.testing.assert_allclose(runs[every][0][k], v, rtol=1e-5, atol=1e-7)


def test_adapters_load_in_mlx_lm_and_generate(tiny_llama, tmp_path):
    cfg, model, tok, _, _ = _run(tiny_llama, tmp_path / "r", **{"train.method": "sft"})
    from mlx_lm import generate, load

    loaded, tok2 = load(str(tiny_llama), adapter_path=str(tmp_path / "r"))
    ids = mx.array([tok.apply_chat_template([{"role": "user", "content": "Q:1+2"}],
                                            add_generation_prompt=True)])
    assert mx.allclose(loaded(ids), model(ids), atol=1e-5).item()
    text = generate(loaded, tok2, prompt="Q:1+2\n", max_tokens=5)
    assert isinstance(text, str)


@pytest.mark.parametrize("teacher,checkpoint", [("frozen", False), ("ema", False), ("frozen", True)])
def test_resume_is_bit_identical(teacher, checkpoint, tiny_llama, tmp_path):
    """With LoRA dropout on; with checkpointed layers too (their dropout keys)."""
    over = {"train.steps": 4, "train.save_every": 2, "model.teacher": teacher,
            "model.lora_dropout": 0.1, "train.grad_checkpoint": checkpoint}
    _, full_model, _, _, _ = _run(tiny_llama, tmp_path / "full", **over)
    cfg = tiny_config(tiny_llama, tmp_path / "cut", **over)
    model, tok = load_student(cfg.model)
    train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model), stop_after=3)
    model, tok = load_student(cfg.model, seed=123)  # a fresh process: other init, overwritten
    train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model), resume=True)
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    la = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["loss"] for l in la] == [json.loads(l)["loss"] for l in lb]


OPTIMIZER_SETTINGS = {  # each with every piece of state it can keep
    "adamw": {"train.weight_decay": 0.01}, "adam": {},
    "sgd": {"train.optimizer_config": {"momentum": 0.9}, "train.weight_decay": 0.01},
    "adafactor": {"train.optimizer_config": {"beta_1": 0.9}},
    "muon": {"train.optimizer_config": {"momentum": 0.9}},
}


@pytest.mark.parametrize("name", list(OPTIMIZER_SETTINGS))
def test_resume_is_bit_identical_for_every_optimizer(name, tiny_llama, tmp_path):
    """An interrupted run resumed from its checkpoint ends with the weights of an uninterrupted
    one, bit for bit: the optimizer's whole state (Adafactor's factored moments, Muon's and
    SGD's momentum, the step and the scheduled learning rate) round-trips the safetensors."""
    from aropd_mlx.checkpoint import list_checkpoints, load_checkpoint
    from aropd_mlx.optimizer import make_optimizer

    over = {"train.steps": 4, "train.save_every": 2, "train.optimizer": name,
            "model.lora_dropout": 0.1, **OPTIMIZER_SETTINGS[name]}
    _run(tiny_llama, tmp_path / "full", **over)
    cfg = tiny_config(tiny_llama, tmp_path / "cut", **over)
    model, tok = load_student(cfg.model)
    train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model), stop_after=3)
    saved = load_checkpoint(list_checkpoints(tmp_path / "cut")[-1])["optimizer_state"]
    fresh = make_optimizer(cfg)
    fresh.init(model.trainable_parameters())
    assert {k for k, _ in tree_flatten(saved)} == {k for k, _ in tree_flatten(fresh.state)}
    assert int(saved["step"]) == 2
    model, tok = load_student(cfg.model, seed=123)  # a fresh process: other init, overwritten
    train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model), resume=True)
    a = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    la = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    lb = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["loss"] for l in la] == [json.loads(l)["loss"] for l in lb]
    assert len({json.loads(l)["loss"] for l in la}) == 4  # it trained


def test_frozen_teacher_is_the_base_model(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, tmp_path)
    base, _ = load_student(cfg.model)  # lora_b = 0 at start: exactly the base
    model, tok = load_student(cfg.model)
    teacher = Teacher.create(model, tok, cfg.model)
    rng = np.random.default_rng(0)
    noisy = {k: mx.array(rng.standard_normal(v.shape).astype(np.float32) * 0.1)
             for k, v in trainable(model).items()}
    model.update(tree_unflatten(list(noisy.items())))
    ids = mx.array([[1, 56, 81, 11, 76, 9, 75, 7, 3]])
    student_out = model(ids)
    with teacher.active(model) as scorer:
        teacher_out = scorer(ids)
    assert not mx.allclose(student_out, base(ids), atol=1e-3).item()  # a real LoRA delta
    assert mx.array_equal(teacher_out, base(ids)).item()
    assert mx.array_equal(model(ids), student_out).item()  # the student's weights came back


def test_ema_teacher_tracks_the_student(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, tmp_path, **{"model.teacher": "ema", "model.ema_mixup": 0.25})
    model, tok = load_student(cfg.model)
    teacher = Teacher.create(model, tok, cfg.model)
    start = {k: np.array(v) for k, v in teacher.params.items()}
    new = {k: mx.ones_like(v) for k, v in trainable(model).items()}
    model.update(tree_unflatten(list(new.items())))
    teacher.after_update(model)
    for k, v in teacher.params.items():
        np.testing.assert_allclose(np.array(v), 0.75 * start[k] + 0.25, rtol=1e-6)


def test_micro_batches_make_the_same_update(tiny_llama, tmp_path):
    """Batch 8 in one pass equals 4 micro-batches of 2 (sequence-mean weighting is exact)."""
    results = []
    for mb in (0, 2):
        cfg, model, *_ = _run(tiny_llama, tmp_path / f"mb{mb}", **{"train.micro_batch_size": mb,
                                                                   "train.steps": 1})
        results.append({k: np.array(v) for k, v in trainable(model).items()})
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], atol=2e-6, rtol=1e-4)


def test_response_hidden_matches_the_model_logits(tiny_qwen2, tmp_path):
    """Right padding + gathering gives exactly the logits of each unpadded sequence."""
    cfg = tiny_config(tiny_qwen2, tmp_path)
    model, _ = load_student(cfg.model)
    prompts = [[1, 56, 81], [1, 56, 81, 11, 76, 9]]
    tokens = np.array([[20, 21, 22, 2], [30, 2, 0, 0]], dtype=np.int32)
    h = response_hidden(model, prompts, tokens, [4, 2])
    logits = head_from_model(model)(h)
    for i, (p, n) in enumerate(zip(prompts, [4, 2])):
        full = model(mx.array([p + [int(t) for t in tokens[i, :n - 1]]]))[0, len(p) - 1:]
        np.testing.assert_allclose(np.array(logits[i, :n]), np.array(full), atol=1e-5)


def test_method_views_cover_every_method():
    assert set(METHOD_VIEWS) == set(METHODS)
    assert METHOD_VIEWS["ar-opd"] == ("partial", "full")


def test_quantized_base_trains_with_a_quantized_head(tiny_llama, tmp_path):
    """A 4-bit base from mlx-lm's own converter: LoRA on quantized layers, quantized head."""
    from mlx_lm import convert

    qpath = tmp_path / "q4"
    convert(str(tiny_llama), str(qpath), quantize=True, q_group_size=32, q_bits=4)
    cfg = tiny_config(qpath, tmp_path / "run", **{"train.method": "ar-opd"})
    model, tok = load_student(cfg.model)
    assert head_from_model(model).quantized
    before = {k: np.array(v) for k, v in trainable(model).items()}
    summary = train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model))
    assert summary["steps_done"] == 3 and np.isfinite(summary["final_loss"])
    assert any(not np.array_equal(before[k], np.array(v)) for k, v in trainable(model).items())


def test_full_fine_tune_trains_every_weight_the_untied_head_included(tiny_llama, tmp_path):
    """Every weight trains in a full fine-tune, the embedding and an untied lm_head included
    (a frozen random head capped the lab's from-scratch warm start at a flat distribution).
    A tied head: tests/test_heads.py."""
    cfg, model, _, before, _ = _run(tiny_llama, tmp_path / "r", **{
        "model.fine_tune_type": "full", "train.weight_decay": 0.5, "train.learning_rate": 0.01})
    assert "lm_head.weight" in before and "model.embed_tokens.weight" in before
    changed = {k for k, v in trainable(model).items() if not np.array_equal(before[k], np.array(v))}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert len(changed) == len(before)


def test_a_resumed_run_counts_the_prompts_every_step_skipped(tiny_llama, tmp_path):
    """summary.json's skipped_prompts after a resume: the count of the uninterrupted run (the
    resumed process redraws the steps before its checkpoint), not only its own steps'."""
    # prompts of 35-73 tokens here, 45 skips about half; more examples than the memory plan's
    # sample of 256 (which encodes, and counts, its own in either process)
    examples = lab_examples(600, 1, 8)
    over = {"train.steps": 4, "train.save_every": 2, "data.max_prompt_tokens": 45}

    def run(out, **kw):
        cfg = tiny_config(tiny_llama, tmp_path / out, **over)
        model, tok = load_student(cfg.model)
        return train(cfg, model, tok, examples, teacher=Teacher.create(model, tok, cfg.model), **kw)

    whole = run("full")
    run("cut", stop_after=2)
    resumed = run("cut", resume=True)
    assert whole["steps_done"] == resumed["steps_done"] == 4
    assert resumed["skipped_prompts"] == whole["skipped_prompts"] > 0
