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
    summary still prints and writes summary.json, and the exit status is 1. A stage starts
    only with 30 s left: at 31 the env stage starts, and the bench stages would need env and
    parity together under 2 s (parity alone imports torch and MLX), so they never start. (At
    34 a fast idle machine once ran bench-step in the remaining time.)"""
    out = tmp_path / "out"
    done = _run(tmp_path, out, DEVICE_CHECK_BUDGET="31")
    assert done.returncode == 1, done.stdout[-3000:]
    stages = _stages(out)
    assert list(stages) == ["install", "env", "parity", "bench-step", "bench-peer"]
    assert stages["env"] == "ok"
    assert stages["bench-step"] == stages["bench-peer"] == "no-time"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is False and "bench-step" in summary["failed"]
    assert "RESULT: FAILED" in done.stdout


FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$*" | head -n 1 >> "$FAKE_LOG"
case "$*" in
  *'m.version("torch")'*) echo "2.9.0" ;;  # the distribution's version, no local label
esac
exit 0
"""


@pytest.mark.parametrize("cuda,extra", [("13.0", "cuda13"), ("12.8", "cuda12")])
def test_install_stage_commands(tmp_path, cuda, extra):
    """GPU mode's install stage, dry: a stub nvidia-smi and a python that only logs its
    arguments. Checks the MLX extra from the driver's CUDA version, the offline pip switches,
    mlx-cpu removed before MLX's CUDA wheel, the editable --no-deps install, torch pinned to
    the installed distribution's version (a "+cu130" pin found no wheel offline on the H200)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(
        f"#!/bin/sh\necho '| NVIDIA-SMI 580.00   Driver Version: 580.00   CUDA Version: {cuda}  |'\n")
    fake = bin_dir / "fakepython"
    fake.write_text(FAKE_PYTHON)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(fake),
               FAKE_LOG=str(log), DEVICE_CHECK_WHEELS=str(wheels), OUT=str(tmp_path / "out"))
    env.pop("DEVICE_CHECK_CPU", None)
    env.pop("DEVICE_CHECK_MODE", None)
    done = subprocess.run(["bash", str(SCRIPT), "--stage", "install"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    calls = log.read_text().splitlines()
    installs = [c for c in calls if c.startswith("-m pip install")]
    assert len(installs) == 3
    assert all(f"--no-index --find-links {wheels}" in c for c in installs)
    uninstall = calls.index("-m pip uninstall -y mlx-cpu")
    assert uninstall < calls.index(next(c for c in installs if f"mlx[{extra}]" in c))
    assert installs[1].endswith("-e . --no-deps")
    assert "torch==2.9.0" in installs[2].split() and "trl" in installs[2].split()
    assert "mlx-lm>=0.32.2" in installs[2] and "[cpu]" not in installs[2]
    assert f"MLX extra: {extra}" in done.stdout


@pytest.mark.parametrize("sizes,quick", [("quick", True), ("full", False)])
def test_bench_stages_sizes(tmp_path, sizes, quick):
    """DEVICE_CHECK_SIZES=full runs `bench step` and `bench peer` at their default sizes (and
    peer for 5 rounds); the default stays the smoke sizes."""
    fake = tmp_path / "fakepython"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=str(log), OUT=str(tmp_path / "out"),
               DEVICE_CHECK_SIZES=sizes, DEVICE_CHECK_MODE="gpu")
    env.pop("DEVICE_CHECK_CPU", None)
    for stage in ("bench-step", "bench-peer"):
        done = subprocess.run(["bash", str(SCRIPT), "--stage", stage], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
    step, peer = [c.split() for c in log.read_text().splitlines() if " bench " in c][:2]
    assert step[3] == "step" and peer[3] == "peer"
    assert ("--quick" in step) == quick and ("--quick" in peer) == quick
    assert peer[peer.index("--rounds") + 1] == ("3" if quick else "5")
