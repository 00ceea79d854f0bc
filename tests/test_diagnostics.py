"""diagnostics.py: aggregation by relative position and length bucket, merge, JSON, the run hook."""
import json

import mlx.core as mx
import numpy as np
import pytest

from aropd_mlx.diagnostics import DiagnosticsAccumulator, RunDiagnostics, cell_index, load_diagnostics


def _batch():
    # row 0: 4 valid tokens (deciles 0, 2, 5, 7); row 1: 2 valid tokens (deciles 0, 5); both <=256
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=np.float32)
    kl = np.array([[1.0, 2.0, 3.0, 4.0, 99.0], [10.0, 20.0, 99.0, 99.0, 99.0]])
    return mask, kl


def test_deciles_and_buckets_by_hand():
    mask, _ = _batch()
    cell, valid = cell_index(mask)
    assert cell[0, :4].tolist() == [0, 2, 5, 7] and cell[1, :2].tolist() == [0, 5]
    assert valid.sum() == 6
    # a 300-token response sits in bucket 1 ("256-512"): cells 10..19; 256 tokens: bucket 0
    long = np.zeros((2, 300))
    long[0, :300], long[1, :256] = 1, 1
    cell, _ = cell_index(long)
    assert cell[0, 0] == 10 and cell[0, 299] == 19 and cell[0, 29] == 10 and cell[0, 30] == 11
    assert cell[1, 0] == 0 and cell[1, 255] == 9


def test_aggregation_matches_a_hand_computation():
    mask, kl = _batch()
    partial = kl + 1.0  # KL(S||partial) = KL(S||full) + 1 everywhere: residual uptake = 1
    acc = DiagnosticsAccumulator()
    acc.add({"kl_full_partial": mx.array(kl), "kl_student_full": kl, "kl_student_partial": partial},
            mx.array(mask))
    s = acc.summary()
    assert s["overall"]["kl_full_partial"] == pytest.approx((1 + 2 + 3 + 4 + 10 + 20) / 6)
    pos = s["by_position"]["kl_full_partial"]
    assert pos[0] == pytest.approx((1 + 10) / 2) and pos[5] == pytest.approx((3 + 20) / 2)
    assert pos[2] == 2 and pos[7] == 4 and pos[1] is None and pos[9] is None
    assert s["by_length"]["kl_full_partial"]["<=256"] == pytest.approx(40 / 6)
    assert s["by_length"]["kl_full_partial"][">1024"] is None
    assert s["tokens"]["kl_full_partial"] == 6
    std = np.std([1, 2, 3, 4, 10, 20])
    assert s["std"]["kl_full_partial"] == pytest.approx(std)
    assert s["overall"]["residual_uptake"] == pytest.approx(1.0)
    assert s["by_position"]["residual_uptake"][0] == pytest.approx(1.0)
    assert s["by_position"]["residual_uptake"][1] is None
    assert "entropy_gap" not in s["overall"]  # needs both entropies


def test_merge_equals_adding_both_and_json_round_trips():
    mask, kl = _batch()
    a, b, both = DiagnosticsAccumulator(), DiagnosticsAccumulator(), DiagnosticsAccumulator()
    a.add({"x": kl}, mask)
    b.add({"x": kl * 2, "entropy_student": kl, "entropy_target": kl / 2}, mask[::-1] * 0 + 1)
    both.add({"x": kl}, mask)
    both.add({"x": kl * 2, "entropy_student": kl, "entropy_target": kl / 2}, mask[::-1] * 0 + 1)
    merged = a.merge(b)
    assert merged.steps == 2
    assert json.dumps(merged.summary()) == json.dumps(both.summary())
    again = DiagnosticsAccumulator.from_json(json.loads(json.dumps(merged.to_json())))
    assert again.summary() == merged.summary()
    gap = merged.summary()["overall"]["entropy_gap"]
    assert gap == pytest.approx(np.mean(kl) / 2)


def test_run_diagnostics_save_and_resume(tmp_path):
    mask, kl = _batch()
    run = RunDiagnostics(tmp_path)
    run.add({"x": kl}, mask)
    run.save(4)
    data = load_diagnostics(tmp_path)
    assert data["through_step"] == 4 and data["summary"]["tokens"]["x"] == 6
    resumed = RunDiagnostics.resume(tmp_path, 4)
    assert resumed.steps == 1 and resumed.summary() == run.summary()
    mismatched = RunDiagnostics.resume(tmp_path, 6)  # the file is behind the checkpoint
    assert mismatched.steps == 0 and mismatched.from_step == 6
    assert RunDiagnostics.resume(tmp_path, 0).steps == 0  # a fresh run ignores an old file
    assert load_diagnostics(tmp_path / "nowhere") is None


@pytest.mark.parametrize("micro", [None, 3])
def test_training_writes_diagnostics(micro, tiny_llama, tmp_path):
    """`steps` counts optimizer steps, whatever micro-batches a step is cut into."""
    from helpers import lab_examples, tiny_config

    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.trainer import train

    cfg = tiny_config(tiny_llama, tmp_path / "run", **{"train.method": "ar-opd", "train.steps": 2,
                                                         "train.micro_batch_size": micro})
    model, tok = load_student(cfg.model)
    train(cfg, model, tok, lab_examples(8), teacher=Teacher.create(model, tok, cfg.model))
    data = load_diagnostics(tmp_path / "run")
    assert data["through_step"] == 2 and data["accumulator"]["steps"] == 2
    s = data["summary"]
    for key in ("kl_full_partial", "kl_student_target", "clip_rate", "top16_overlap",
                "residual_uptake", "entropy_gap"):
        assert s["overall"][key] is not None, key
    assert s["by_position"]["kl_full_partial"][0] is not None
    assert s["overall"]["kl_full_partial"] >= 0


def test_resumed_run_has_the_diagnostics_of_an_uninterrupted_one(tiny_llama, tmp_path):
    from helpers import lab_examples, tiny_config

    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.trainer import train

    def run(out, **kw):
        cfg = tiny_config(tiny_llama, out, **{"train.method": "ar-opd", "train.steps": 4})
        model, tok = load_student(cfg.model)
        train(cfg, model, tok, lab_examples(8), teacher=Teacher.create(model, tok, cfg.model), **kw)

    run(tmp_path / "whole")
    run(tmp_path / "cut", stop_after=3)  # checkpoint at 2, step 3 is lost with the crash
    assert load_diagnostics(tmp_path / "cut")["through_step"] == 2
    run(tmp_path / "cut", resume=True)
    whole, cut = load_diagnostics(tmp_path / "whole"), load_diagnostics(tmp_path / "cut")
    assert cut["through_step"] == 4 and cut["from_step"] == 0
    assert cut["accumulator"] == whole["accumulator"]
