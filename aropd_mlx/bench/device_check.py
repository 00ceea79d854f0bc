"""Helpers of scripts/device-check.sh (the one-call GPU check): environment report, the peer
result's own check, and the final summary. Plain Python so that the shell script stays short.

    python -m aropd_mlx.bench.device_check env OUT/env.json
    python -m aropd_mlx.bench.device_check check-peer OUT/bench-peer.json [--require-trl]
    python -m aropd_mlx.bench.device_check summary OUT      # reads OUT/stages.tsv; exit 1 on a failure

stages.tsv: one line per stage, tab-separated: name, status (ok | failed | timeout | skipped |
no-time), exit code, seconds, note. The summary adds what each stage's JSON says (parity
pass/fail, MFU, peer ratios with their verdicts) and writes OUT/summary.json.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

FAILED = ("failed", "timeout", "no-time")


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - absent
        return None


def env_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "executable": sys.executable}
    for dist in ("aropd-mlx", "mlx", "mlx-cpu", "mlx-cuda-12", "mlx-cuda-13", "mlx-lm", "torch",
                 "transformers", "trl", "datasets"):
        info[dist] = _version(dist)
    try:
        import mlx.core as mx

        info["mlx_default_device"] = str(mx.default_device())
        info["mlx_cuda"] = bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
        if hasattr(mx, "device_info"):
            try:
                info["mlx_device_info"] = {k: v for k, v in mx.device_info().items()
                                           if isinstance(v, (str, int, float))}
            except Exception as e:  # noqa: BLE001
                info["mlx_device_info"] = f"error: {e}"
    except Exception as e:  # noqa: BLE001 - recorded: the stage reports it
        info["mlx_error"] = f"{type(e).__name__}: {e}"
    try:
        import torch

        info["torch_cuda"] = torch.cuda.is_available()
        info["torch_cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            info["torch_device"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001
        info["torch_error"] = f"{type(e).__name__}: {e}"
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                               "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return info


def check_peer(path: Path, require_trl: bool) -> list[str]:
    """Problems in a `bench peer --json` file: missing, our side absent, TRL skipped (when
    required) or a TRL configuration that errored."""
    if not path.is_file():
        return [f"{path} missing"]
    data = json.loads(path.read_text())
    problems = []
    for key, r in data.get("results", {}).items():
        if "aropd-mlx opd" not in r.get("runs", {}):
            problems.append(f"{key}: our side did not run")
        if require_trl and r.get("skipped"):
            problems.append(f"{key}: {r['skipped']}")
        for name, run in r.get("runs", {}).items():
            if "error" in run:
                problems.append(f"{key}: {name}: {run['error']}")
    if not data.get("results"):
        problems.append("no peer result")
    return problems


def _read_stages(out: Path) -> list[dict]:
    rows = []
    f = out / "stages.tsv"
    for line in (f.read_text().splitlines() if f.is_file() else []):
        parts = line.split("\t") + [""] * 5
        rows.append({"stage": parts[0], "status": parts[1], "rc": parts[2],
                     "seconds": parts[3], "note": parts[4]})
    return rows


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def findings(out: Path) -> dict:
    """The headline numbers of each stage's JSON (whatever exists)."""
    found = {}
    env = _load(out / "env.json")
    if env:
        found["env"] = {k: env.get(k) for k in ("mlx", "mlx_default_device", "mlx_cuda", "torch",
                                                "torch_cuda", "torch_device", "trl")}
    par = _load(out / "parity.json")
    if par:
        found["parity"] = {"pass": par.get("pass"), "device": par.get("device")}
    step = _load(out / "bench-step.json")
    if step:
        found["bench_step"] = step.get("table")
    peer = _load(out / "bench-peer.json")
    if peer:
        found["bench_peer"] = peer.get("table")
    return found


def summary(out: Path) -> int:
    stages = _read_stages(out)
    failed = [s["stage"] for s in stages if s["status"] in FAILED]
    result = {"ok": not failed and bool(stages), "failed": failed, "stages": stages,
              "findings": findings(out)}
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    from aropd_mlx.cli.common import table

    print("\ndevice-check summary (" + str(out) + ")")
    print(table(stages, ["stage", "status", "rc", "seconds", "note"]))
    for row in result["findings"].get("bench_step") or []:
        print(f"  step   {row['model']:4} {row['measure']}: {row['result']} (goal {row['goal']})")
    for row in result["findings"].get("bench_peer") or []:
        print(f"  peer   {row['model']:4} {row['measure']}: {row['result']} goal {row['goal']} "
              f"-> {row['met']}")
    par = result["findings"].get("parity")
    if par:
        print(f"  parity {'PASS' if par['pass'] else 'FAIL'} (devices {par['device']})")
    print("RESULT: " + ("all stages ok" if result["ok"] else
                        "FAILED: " + ", ".join(failed or ["no stage ran"])))
    return 0 if result["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "env":
        info = env_info()
        Path(rest[0]).write_text(json.dumps(info, indent=2, default=str))
        print(json.dumps(info, indent=2, default=str))
        return 0 if "mlx_error" not in info else 1
    if cmd == "check-peer":
        problems = check_peer(Path(rest[0]), "--require-trl" in rest)
        for p in problems:
            print(f"peer check: {p}")
        return 1 if problems else 0
    if cmd == "summary":
        return summary(Path(rest[0]))
    print(f"unknown command {cmd!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
