"""Experiment tracking (train.report_to): what metrics.jsonl holds reaches W&B and TensorBoard,
read back from their own files, offline; a resumed run's trackers hold each step once; a
missing package is one line. W&B's and TensorBoard's tests skip where the package is absent;
the fake-module test runs everywhere."""
import glob
import importlib.machinery
import json
import math
import struct
import sys
import time
import types

import numpy as np
import pytest

from aropd_mlx.config import load_config
from aropd_mlx.errors import UserError
from aropd_mlx.models import Teacher, load_student
from aropd_mlx.trainer import train

from helpers import lab_examples, tiny_config

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _train(model_path, out, stop_after=None, resume=False, **over):
    cfg = tiny_config(model_path, out, **over)
    model, tok = load_student(cfg.model)
    return train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model),
                 stop_after=stop_after, resume=resume)


def _lines(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _numeric(line):
    return {k: float(v) for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))}


# ----------------------------------------------------------------------------- TensorBoard

def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_events_hold_every_metrics_line(tiny_llama, tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    _train(tiny_llama, run, **{"train.report_to": "tensorboard", "train.steps": 3})
    acc = _events(run / "tensorboard")
    lines = _lines(run)
    for line in lines:
        for key, value in _numeric(line).items():
            got = {e.step: e.value for e in acc.Scalars(key)}
            assert got[line["step"]] == pytest.approx(np.float32(value), rel=1e-6), key
    # a diagnostic only on the steps that carry it (step 1 and the last, diagnostics_every 10)
    assert [e.step for e in acc.Scalars("kl_full_partial")] == \
        [l["step"] for l in lines if "kl_full_partial" in l] == [1, 3]
    config = acc.Tensors("config")[0].tensor_proto.string_val[0].decode()
    assert "method: ar-opd" in config and "- tensorboard" in config
    if HAS_MPL:  # the report plots at the end
        assert "plots/training_curves" in acc.Tags()["images"]
        assert acc.Images("plots/training_curves")[0].step == 3


@pytest.mark.parametrize("stop_after,save_every", [(3, 2), (2, 4)])
def test_tensorboard_resume_keeps_each_step_once(stop_after, save_every, tiny_llama, tmp_path):
    """Cut at step `stop_after` with checkpoints every `save_every` (2: the resume replays 3
    and 4; 4: no checkpoint yet, it starts again at 1): TensorBoard shows 1..4 once, with
    metrics.jsonl's values (the purge event drops the first copies). Resuming the finished run
    logs its report plots at its last step, not at step 0."""
    pytest.importorskip("tensorboard")
    run, over = tmp_path / "run", {"train.report_to": ["tensorboard"], "train.steps": 4,
                                   "train.save_every": save_every}
    _train(tiny_llama, run, stop_after=stop_after, **over)
    time.sleep(1.1)  # event files are named by the second: the resumed one sorts after
    _train(tiny_llama, run, resume=True, **over)
    assert len(list((run / "tensorboard").iterdir())) == 2
    loss = [(e.step, e.value) for e in _events(run / "tensorboard").Scalars("loss")]
    assert [s for s, _ in loss] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx([l["loss"] for l in _lines(run)], rel=1e-6)
    if HAS_MPL and save_every == 4:
        time.sleep(1.1)
        _train(tiny_llama, run, resume=True, **over)  # finished: nothing to train
        steps = {e.step for e in _events(run / "tensorboard").Images("plots/training_curves")}
        assert steps == {4}


# ----------------------------------------------------------------------------- W&B, offline

def _wandb_records(path):
    """The records of an offline W&B run file (LevelDB-log framing: 7-byte file header, 32 KiB
    blocks, records split into FULL/FIRST/MIDDLE/LAST chunks with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf, out, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _items(items):
    return {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items}


def test_wandb_offline_run_holds_metrics_config_summary_and_plots(tiny_llama, tmp_path,
                                                                  monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, over = tmp_path / "run", {"train.report_to": "wandb", "train.project_name": "p",
                                   "train.steps": 4, "train.save_every": 2}
    _train(tiny_llama, run, stop_after=3, **over)
    _train(tiny_llama, run, resume=True, **over)
    files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb")))
    run_id = json.loads((run / "tracking.json").read_text())["wandb_id"]
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)  # resumed
    history, config, summary = {}, None, {}
    for f in files:
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = _items(r.history.item)
                history.setdefault(int(items["_step"]), {}).update(items)
            elif kind == "run":
                config, project = _items(r.run.config.update), r.run.project
            elif kind == "summary":
                summary.update(_items(r.summary.update))
    assert project == "p" and config["train"]["method"] == "ar-opd"
    assert config["train"]["report_to"] == ["wandb"]
    for line in _lines(run):  # the replayed step 3 repeats every value but timings and memory
        for key, value in _numeric(line).items():
            if not (key.startswith("time_") or key == "tokens_per_s" or key.endswith("_memory_gb")):
                assert history[line["step"]][key] == pytest.approx(value, rel=1e-12), key
            assert key in history[line["step"]]
    assert summary["steps_done"] == 4
    if HAS_MPL:
        assert history[4]["plots/training_curves/_type"] == "image-file"


# ----------------------------------------------------------------------------- a fake W&B

class _FakeRun:
    def __init__(self, calls):
        self.calls, self.step, self.summary = calls, 0, {}

    def log(self, data, step):
        self.calls.append(("log", step, data))
        self.step = step + 1

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code))


def test_the_trackers_get_each_line_through_a_fake_wandb(tiny_llama, tmp_path, monkeypatch):
    """Runs where wandb is not installed: a stand-in module records the calls."""
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or _FakeRun(calls)
    fake.Image = lambda path: ("image", path)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    _train(tiny_llama, run, **{"train.report_to": "wandb", "train.steps": 3})
    init = calls[0][1]
    assert init["project"] == "aropd-mlx" and init["dir"] == str(run) and init["resume"] == "allow"
    assert init["config"]["train"]["steps"] == 3
    logged = [(c[1], c[2]) for c in calls if c[0] == "log" and "loss" in c[2]]
    assert [(l["step"], _numeric(l)) for l in _lines(run)] == logged
    assert calls[-1] == ("finish", 0)
    if HAS_MPL:
        assert any("plots/training_curves" in c[2] for c in calls if c[0] == "log")


def test_a_failed_run_finishes_its_tracker_as_failed(tiny_llama, tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: _FakeRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    import aropd_mlx.trainer as trainer

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "apply_update", boom)
    with pytest.raises(RuntimeError):
        _train(tiny_llama, tmp_path / "run", **{"train.report_to": "wandb"})
    assert calls[-1] == ("finish", 1)


# ----------------------------------------------------------------------------- settings

def test_report_to_takes_a_name_a_list_or_mlx_lms_comma_string(tmp_path):
    assert load_config(overrides={"train.report_to": "wandb"}).train.report_to == ("wandb",)
    assert load_config(overrides={"train.report_to": "wandb, tensorboard"}).train.report_to == \
        ("wandb", "tensorboard")
    assert load_config().train.report_to == ()
    with pytest.raises(UserError, match="train.report_to: 'swanlab'"):
        load_config(overrides={"train.report_to": ["swanlab"]})
    path = tmp_path / "lora.yaml"  # mlx-lm's keys
    path.write_text("model: m\nreport_to: wandb,tensorboard\nproject_name: proj\n")
    t = load_config(path).train
    assert (t.report_to, t.project_name) == (("wandb", "tensorboard"), "proj")
    path.write_text("model: m\nwandb: old-style\nreport_to: null\n")
    t = load_config(path).train
    assert (t.report_to, t.project_name) == (("wandb",), "old-style")
    path.write_text("model: m\nreport_to: wandb,swanlab\n")
    with pytest.raises(UserError, match=r"lora.yaml:2: .*'swanlab'"):
        load_config(path)


def test_a_missing_package_is_one_line(monkeypatch, tiny_llama, tmp_path):
    import aropd_mlx.tracking as tracking
    from typer.testing import CliRunner

    from aropd_mlx.cli.main import app

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"wandb is not installed: pip install 'aropd-mlx\[wandb\]'"):
        tracking.Tracking(load_config(overrides={"train.report_to": "wandb"})).start(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "Q:1+1", "solution": "1+1=2", "answer": "2"}) + "\n")
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_llama), "--data", str(data),
                                      "--report-to", "wandb", "--out", str(tmp_path / "r"),
                                      "--no-eval"])
    assert result.exit_code != 0
    err = result.stderr.strip().splitlines()[-1]
    assert "wandb is not installed" in err and not (tmp_path / "r").exists()  # before training
