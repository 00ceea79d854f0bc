"""Per-step memory in the metrics line, and `bench creep` reading its windows from it."""
import json

import pytest

from aropd_mlx.bench.creep import GOAL, bench_creep, creep_from_metrics
from aropd_mlx.bench.suite import goal_rows
from aropd_mlx.models import Teacher, load_student
from aropd_mlx.trainer import train
from helpers import lab_examples, tiny_config

MEMORY_KEYS = ("peak_memory_gb", "active_memory_gb", "cache_memory_gb")


def test_every_metrics_line_reports_the_steps_memory(tiny_llama, tmp_path):
    cfg = tiny_config(tiny_llama, tmp_path / "run")
    model, tok = load_student(cfg.model)
    train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == cfg.train.steps
    for line in lines:
        assert all(isinstance(line[k], float) and line[k] >= 0 for k in MEMORY_KEYS)
        # the adapters, weights and optimizer state are alive at the step's end
        assert line["active_memory_gb"] > 0
        # the peak is this step's (reset at its start) and covers what is alive at its end
        assert line["peak_memory_gb"] >= line["active_memory_gb"]


def test_creep_windows_and_ratio_come_from_metrics(tiny_lab, tmp_path):
    out = tmp_path / "run"
    r = bench_creep(steps=6, early=(2, 3), late=2, lab=tiny_lab, out=out,
                    overrides={"train.batch_size": 2, "rollout.group_size": 2})
    text = (out / "metrics.jsonl").read_text()
    lines = {l["step"]: l for l in map(json.loads, text.splitlines())}
    assert sorted(lines) == [1, 2, 3, 4, 5, 6] and r["steps"] == 6
    early = max(lines[s]["peak_memory_gb"] for s in (2, 3))
    late = max(lines[s]["peak_memory_gb"] for s in (5, 6))
    assert r["early"]["steps"] == [2, 3] and r["late"]["steps"] == [5, 6]
    assert r["early"]["peak_gb"] == early and r["late"]["peak_gb"] == late
    assert r["ratio"] == pytest.approx(late / early, rel=1e-12)
    assert r["early"]["active_gb_at_end"] == lines[3]["active_memory_gb"]
    assert r["late"]["cache_gb_at_end"] == lines[6]["cache_memory_gb"]
    for k in ("peak", "active", "cache"):
        assert r[f"{k}_gb_by_step"] == [lines[s][f"{k}_memory_gb"] for s in range(1, 7)]
    row, = goal_rows("creep", r)
    assert row["measure"].startswith("peak steps 5-6 / peak steps 2-3")
    assert row["met"] == ("yes" if late / early <= GOAL else "NO")


def test_creep_windows_are_checked():
    lines = [{"step": s, "peak_memory_gb": float(s), "active_memory_gb": 0.0,
              "cache_memory_gb": 0.0} for s in range(1, 11)]
    r = creep_from_metrics(lines, (2, 4), 3)  # steps 8-10 against 2-4
    assert r["late"]["steps"] == [8, 10] and r["ratio"] == 10 / 4
    with pytest.raises(ValueError, match="must not overlap"):
        bench_creep(steps=10, early=(5, 9), late=3)
