"""scripts/device-check.sh, CPU path: the same stages as on a GPU machine at tiny sizes
(parity with --device cpu, bench step --quick, bench peer --quick with TRL when installed),
installing nothing; then the JSON files it writes, and a budget overrun failing the run."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "device-check.sh"


def _run(tmp_path, out, **env):
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, DEVICE_CHECK_CPU="1",
                AROPD_MLX_BENCH_DIR=str(tmp_path / "bench"), **env)
    full.pop("DEVICE_CHECK_MODE", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=str(tmp_path), env=full,
                          capture_output=True, text=True, timeout=900)


def _stages(out):
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    return {r[0]: r[1] for r in rows}


@pytest.mark.slow
def test_device_check_cpu_path(tmp_path):
    out = tmp_path / "out"
    done = _run(tmp_path, out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    has_trl = importlib.util.find_spec("trl") is not None
    assert _stages(out) == {"install": "skipped", "env": "ok", "parity": "ok",
                            "bench-step": "ok", "bench-peer": "ok"}
    assert "RESULT: all stages ok" in done.stdout
    env = json.loads((out / "env.json").read_text())
    assert env["mlx_default_device"].startswith("Device(cpu") and env["mlx_cuda"] is False
    parity = json.loads((out / "parity.json").read_text())
    assert parity["pass"] is True and parity["device"] == {"mlx": "cpu", "torch": "cpu"}
    step = json.loads((out / "bench-step.json").read_text())
    assert step["device"] == "cpu" and step["size"] == "quick"
    mfu = step["results"]["step/lab"]
    assert mfu["mfu"] > 0 and mfu["steps"] == 1
    peer = json.loads((out / "bench-peer.json").read_text())["results"]["peer/lab"]
    assert (peer["rounds"], peer["steps_per_round"], peer["device"]) == (2, 1, "cpu")
    ours = peer["runs"]["aropd-mlx opd"]
    assert len(ours["round_seconds_per_step"]) == 2 and ours["seconds_per_step"] > 0
    if has_trl:
        assert "skipped" not in peer and "trl fastest" in peer["ratios"]
        assert all("error" not in r for r in peer["runs"].values()), peer["runs"]
    else:
        assert "TRL not installed" in peer["skipped"]
        assert "our side only" in (out / "stages.tsv").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True and summary["failed"] == []
    assert summary["findings"]["parity"]["pass"] is True
    log = (out / "device-check.log").read_text()
    assert "== parity" in log and "PASS" in log


def test_device_check_budget_overrun_fails_and_goes_on(tmp_path):
    """A budget too small for the later stages: they are recorded (no-time or timeout), the
    summary still prints and writes summary.json, and the exit status is 1."""
    out = tmp_path / "out"
    done = _run(tmp_path, out, DEVICE_CHECK_BUDGET="34")
    assert done.returncode == 1, done.stdout[-3000:]
    stages = _stages(out)
    assert list(stages) == ["install", "env", "parity", "bench-step", "bench-peer"]
    assert stages["env"] == "ok"
    assert stages["bench-step"] == stages["bench-peer"] == "no-time"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and "bench-step" in summary["failed"]
    assert "RESULT: FAILED" in done.stdout
