"""Output heads in training: each view projected by its own model's head (a separate teacher of
another size), the tied head's gradient under full fine-tuning, and one definition of the
per-step diagnostics. Expectations come from each model's own full forward (model(ids) logits)
and objective.naive_loss, never from the fused path."""
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from aropd_mlx import trainer
from aropd_mlx.batches import METHOD_VIEWS, PromptEncoder, draw_batch
from aropd_mlx.lab.tiny import TinySpec, build_tiny_model
from aropd_mlx.models import Teacher, load_base, load_student
from aropd_mlx.objective import naive_loss
from aropd_mlx.scoring import score_views

from helpers import lab_examples, tiny_config


def own_logits(model, prompts, tokens: np.ndarray, lengths) -> mx.array:
    """(N, T, V) logits predicting each response token, from the model's own full forward of
    each unpadded row (prompt + response[:-1]); zeros past a row's length."""
    rows = []
    for i, p in enumerate(prompts):
        n = lengths[i]
        ids = list(p) + [int(t) for t in tokens[i, :max(n - 1, 0)]]
        z = model(mx.array([ids]))[0, len(p) - 1:len(p) - 1 + n]  # (n, V)
        pad = mx.zeros((tokens.shape[1] - n, z.shape[-1]), z.dtype)
        rows.append(mx.concatenate([z, pad]) if tokens.shape[1] > n else z)
    return mx.stack(rows)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Separate teachers on the lab tokenizer: another hidden size, and the student's size with
    other weights (the case the student's head scored silently wrong)."""
    root = tmp_path_factory.mktemp("teachers")
    found = {h: build_tiny_model(root / f"h{h}", TinySpec(hidden=h, intermediate=2 * h, seed=7))
             for h in (32, 64)}
    found["padded"] = padded_copy(found[32], root / "padded", extra=24)
    return found


def padded_copy(src, dst, extra: int):
    """A copy of a tiny model whose embedding and head have `extra` rows past its tokenizer (as
    Qwen2.5-7B's 152,064 rows against the 151,936 of its smaller siblings, the same tokenizer)."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["vocab_size"] += extra
    (dst / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(dst / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name]
        weights[name] = mx.concatenate([w, mx.random.normal((extra, w.shape[1]), key=mx.random.key(3))])
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


@pytest.mark.parametrize("hidden", [32, 64, "padded"])
def test_a_separate_teacher_is_scored_through_its_own_head(hidden, teachers, tiny_llama,
                                                           tmp_path, monkeypatch):
    """train() with --teacher PATH: the loss of the step equals naive_loss on the student's
    logits and the teacher's OWN logits (teacher_model(ids), each view; a head padded past the
    tokenizer: over the student's rows)."""
    seen = {}
    real_accumulate, real_fused = trainer.accumulate, trainer.fused_loss

    def accumulate(cfg, model, scored, settings, **kw):
        seen.update(scored=scored, settings=settings)
        return real_accumulate(cfg, model, scored, settings, **kw)

    def fused(*a, **kw):
        out = real_fused(*a, **kw)
        seen["per_token"], seen["loss"] = out.per_token, out.loss
        return out

    monkeypatch.setattr(trainer, "accumulate", accumulate)
    monkeypatch.setattr(trainer, "fused_loss", fused)
    cfg = tiny_config(tiny_llama, tmp_path / "run", **{
        "train.method": "ar-opd", "train.steps": 1, "model.teacher": str(teachers[hidden])})
    model, tok = load_student(cfg.model)
    student, _ = load_student(cfg.model)  # the same start (lora_b = 0: the base)
    teacher = Teacher.create(model, tok, cfg.model)
    summary = trainer.train(cfg, model, tok, lab_examples(8), teacher=teacher)
    assert summary["steps_done"] == 1 and np.isfinite(summary["final_loss"])

    scored, settings = seen["scored"], seen["settings"]
    resp, rows = scored.resp, scored.rows
    tokens = np.array(resp.tokens)
    other, _ = load_base(str(teachers[hidden]))
    mine = own_logits(student, rows["student"], tokens, resp.lengths)
    partial, full = (own_logits(other, rows[v], tokens, resp.lengths)[..., :mine.shape[-1]]
                     for v in ("partial", "full"))
    want = naive_loss(mine, resp.tokens, resp.mask, partial, full, settings=settings)
    np.testing.assert_allclose(np.array(seen["per_token"]), np.array(want.per_token),
                               rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(float(seen["loss"]), float(want.loss), rtol=1e-4)
    assert float(want.loss) > 0


def _batch(cfg, model, tok):
    """A step's rows, responses and frozen-teacher hidden states (for accumulate)."""
    enc = PromptEncoder(cfg, tok)
    batch = draw_batch(cfg, lab_examples(8), enc, 0)
    rows, resp = trainer.draw_responses(cfg, model, tok, batch, 0)
    pad = tok.pad_token_id or 0
    views = METHOD_VIEWS[cfg.train.method]
    if not views:
        return trainer.Scored(rows, resp, {}, None, pad)
    teacher = Teacher.create(model, tok, cfg.model)
    with teacher.active(model) as scorer:
        th = score_views(scorer, {v: rows[v] for v in views}, np.array(resp.tokens),
                         resp.lengths, pad)
    return trainer.Scored(rows, resp, th, teacher.head(model), pad)


@pytest.mark.parametrize("method", ["ar-opd", "sft"])
def test_full_fine_tune_of_a_tied_model_gets_the_naive_gradient(method, tiny_qwen2, tmp_path):
    """Every parameter's gradient, the tied embedding included (input lookup AND output head),
    equals autodiff through naive_loss on the model's own materialized logits."""
    cfg = tiny_config(tiny_qwen2, tmp_path, **{"train.method": method,
                                                "model.fine_tune_type": "full"})
    model, tok = load_student(cfg.model)
    assert getattr(model, "lm_head", None) is None  # tied
    scored = _batch(cfg, model, tok)
    settings = trainer.objective_for(cfg)
    acc = trainer.accumulate(cfg, model, scored, settings)

    base, _ = load_base(str(tiny_qwen2))  # the frozen teacher at step 0: the base weights
    resp, rows, tokens = scored.resp, scored.rows, np.array(scored.resp.tokens)
    views = METHOD_VIEWS[method]
    targets = [mx.stop_gradient(own_logits(base, rows[v], tokens, resp.lengths)) for v in views]

    def naive(m):
        z = own_logits(m, rows["student"], tokens, resp.lengths)
        return naive_loss(z, resp.tokens, resp.mask, *targets, settings=settings).loss

    want = dict(tree_flatten(nn.value_and_grad(model, naive)(model)[1]))
    got = dict(tree_flatten(acc.grads))
    assert set(got) == set(want) and "model.embed_tokens.weight" in got
    for k, w in want.items():
        w, g = np.array(w), np.array(got[k])
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(g / scale, w / scale, rtol=1e-4, atol=1e-4, err_msg=k)
    emb = "model.embed_tokens.weight"
    np.testing.assert_allclose(np.linalg.norm(np.array(got[emb])),
                               np.linalg.norm(np.array(want[emb])), rtol=1e-4)


def test_full_fine_tune_of_a_tied_model_trains(tiny_qwen2, tmp_path):
    """The trainer's path end to end: the tied embedding (the head) trains and stays finite."""
    cfg = tiny_config(tiny_qwen2, tmp_path / "r", **{"model.fine_tune_type": "full",
                                                      "train.steps": 2})
    model, tok = load_student(cfg.model)
    before = np.array(model.model.embed_tokens.weight)
    summary = trainer.train(cfg, model, tok, lab_examples(8),
                            teacher=Teacher.create(model, tok, cfg.model))
    assert summary["steps_done"] == 2 and np.isfinite(summary["final_loss"])
    assert not np.array_equal(before, np.array(model.model.embed_tokens.weight))


def test_step_diagnostics_average_every_response_token(tiny_llama, tmp_path):
    """metrics.jsonl's per-step mean of each diagnostic equals the run tracker's
    (diagnostics.json) mean over the same step's tokens: the first response tokens, which the
    loss skips (skip_first_tokens = 3), are measured too."""
    cfg = tiny_config(tiny_llama, tmp_path / "run", **{"train.method": "ar-opd",
                                                        "train.steps": 1})
    assert cfg.objective.skip_first_tokens > 0
    model, tok = load_student(cfg.model)
    trainer.train(cfg, model, tok, lab_examples(8), teacher=Teacher.create(model, tok, cfg.model))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    acc = json.loads((tmp_path / "run" / "diagnostics.json").read_text())["accumulator"]
    assert acc["steps"] == 1
    names = sorted(acc["sums"])
    assert "kl_full_partial" in names and "entropy_student" in names
    for name in names:
        mean = np.sum(acc["sums"][name]) / np.sum(acc["counts"][name])
        np.testing.assert_allclose(line[name], mean, rtol=1e-5, atol=1e-7, err_msg=name)


def test_the_cli_trains_with_a_teacher_of_another_hidden_size(teachers, tiny_llama, tmp_path):
    """`aropd-mlx train --teacher PATH` with a teacher of hidden size 32 under a 64 student
    (before: a matmul shape error inside the loss)."""
    from typer.testing import CliRunner

    from aropd_mlx.cli.main import app

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q:{i}+1", "solution": f"{i}+1={i + 1}",
                                        "answer": str(i + 1)}) + "\n" for i in range(4)))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", "--model", str(tiny_llama), "--data", str(data), "--out", str(out),
        "--method", "ar-opd", "--teacher", str(teachers[32]), "--steps", "1", "--batch-size",
        "2", "--group-size", "2", "--max-new-tokens", "6", "--no-eval"])
    assert result.exit_code == 0, result.output
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(line["loss"]) and line["kl_full_partial"] >= 0


def test_a_teacher_head_smaller_than_the_students_is_refused(teachers):
    """The student's head padded past the tokenizer, the teacher's not: the teacher cannot
    score the student's extra rows (one line); the other way round it is cut (above)."""
    from aropd_mlx.errors import UserError
    from aropd_mlx.models import ModelSettings

    student, tok = load_base(str(teachers["padded"]))
    settings = ModelSettings(path=str(teachers["padded"]), teacher=str(teachers[32]))
    with pytest.raises(UserError, match="must cover every row of the student's"):
        Teacher.create(student, tok, settings)
    cut = Teacher.create(*load_base(str(teachers[32])),
                         ModelSettings(path=str(teachers[32]), teacher=str(teachers["padded"])))
    assert cut.head(load_base(str(teachers[32]))[0]).vocab == \
        load_base(str(teachers[32]))[0].lm_head.weight.shape[0]
