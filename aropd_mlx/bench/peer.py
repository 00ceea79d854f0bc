"""Peer benchmark: aropd-mlx `opd` against TRL's on-policy distillation on torch CPU.

Same HF-format model (the bench "lab" or "56m" llama), same prompts, batch, rollout length,
number of steps; reverse KL (alpha = beta = 1); a frozen self-teacher; full fine-tuning; fp32;
fixed-length rollouts. TRL runs in child processes (aropd_mlx.bench.peer_trl) as:
  gkd-default      trl.experimental.gkd.GKDTrainer, lmbda=1, TRL's defaults otherwise
                   (gradient_checkpointing=True, so generation runs without a KV cache)
  gkd-tuned        the same with gradient_checkpointing=False (KV cache on)
  distill-default  trl.DistillationTrainer (when this TRL has it), its defaults
  distill-tuned    the same with gradient_checkpointing=False
Ours runs in this process through `aropd_mlx.trainer.run_step`. Speedup = TRL s/step / ours.

TRL is not a dependency of aropd-mlx: when it is missing the benchmark installs it with
`python -m pip install trl torch==<pinned>` (never an unpinned torch, which would pull a CUDA
build) or, with pip unavailable or install=False, skips with a note.

    from aropd_mlx.bench.peer import bench_peer
    bench_peer("lab", rows=16, max_new_tokens=80, steps=3)   # tiny: rows=2, max_new_tokens=8, steps=1
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

from aropd_mlx.bench.common import bench_model, median, no_eos, ratio

TORCH_PIN = "2.13.0"
PEERS = ("gkd-default", "gkd-tuned", "distill-default", "distill-tuned")


def _torch_pin() -> str:
    try:
        from importlib.metadata import version

        return version("torch").split("+")[0]
    except Exception:  # noqa: BLE001 - torch absent: the pinned CPU wheel
        return TORCH_PIN


def ensure_trl(install: bool = True) -> str | None:
    """None when TRL (with torch and datasets) imports, else why the peer run is skipped."""
    need = ("trl", "torch", "transformers", "datasets")
    if all(importlib.util.find_spec(m) for m in need):
        return None
    if not install:
        return "TRL not installed (pip install trl torch==%s)" % _torch_pin()
    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
    if pip.returncode != 0:
        return "TRL not installed and pip is unavailable: skipped"
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "trl", f"torch=={_torch_pin()}"]
    print("installing the peer: " + " ".join(cmd[2:]), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    importlib.invalidate_caches()
    if done.returncode != 0 or not all(importlib.util.find_spec(m) for m in need):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return f"installing TRL failed ({tail[0]}): skipped"
    return None


def has_distillation_trainer() -> bool:
    try:
        import trl  # noqa: F401

        return importlib.util.find_spec("trl.trainer.distillation_trainer") is not None
    except ImportError:
        return False


def run_trl(spec: dict, timeout: float = 1800) -> dict:
    """One TRL configuration in a child process; its JSON result (or {"error": ...})."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # torch brings its own BLAS; keep the MLX preload out of it
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "aropd_mlx.bench.peer_trl", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in done.stdout.splitlines():
        if line.startswith("AROPD_PEER_RESULT "):
            return json.loads(line[len("AROPD_PEER_RESULT "):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: " + " | ".join(tail)}


class Ours:
    """aropd-mlx `opd` (reverse KL, frozen self-teacher, full fine-tuning) kept loaded, so that
    it can be timed again between the TRL runs (the machine's load drifts; each TRL run is
    compared with the mean of our measurements just before and just after it)."""

    def __init__(self, model_path, rows: int, max_new_tokens: int, seed: int = 0):
        from aropd_mlx.bench.step import setup_run
        from aropd_mlx.optimizer import make_optimizer

        self.cfg, self.model, self.tok, self.teacher, self.encoded = setup_run(
            "peer", "opd", batch=rows, group=1, max_new_tokens=max_new_tokens,
            fine_tune="full", alpha=1.0, model_path=model_path, seed=seed)
        self.optimizer = make_optimizer(self.cfg)
        self.optimizer.init(self.model.trainable_parameters())
        self.rows, self.step, self.lines = rows, 0, []
        self.measure(0)  # warm-up: compiles

    def measure(self, steps: int) -> dict:
        from aropd_mlx import trainer as tr

        wall, cpu = [], []
        with no_eos(self.tok):
            for _ in range(steps or 1):  # steps=0: one untimed warm-up step
                t0, c0 = time.perf_counter(), time.process_time()
                line = tr.run_step(self.cfg, self.model, self.tok, self.optimizer, self.teacher,
                                   self.encoded, self.step)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                self.step += 1
                if steps:
                    self.lines.append(line)
        return {"step_seconds": wall, "step_cpu_seconds": cpu,
                "completion_tokens_mean": line["response_tokens"] / self.rows}

    def split(self) -> dict:
        return {f"{p}_seconds": median([l[f"time_{p}"] for l in self.lines])
                for p in ("rollout", "scoring", "update")}


def _summarize(run: dict, tokens: int) -> None:
    timed = run["step_seconds"][1:] or run["step_seconds"]
    run["seconds_per_step"] = median(timed)
    if run.get("step_cpu_seconds"):
        run["cpu_seconds_per_step"] = median(run["step_cpu_seconds"][1:] or run["step_cpu_seconds"])
    run["tokens_per_s"] = tokens / run["seconds_per_step"]


def bench_peer(model_name: str = "lab", rows: int = 16, max_new_tokens: int = 80, steps: int = 2,
               peers: tuple[str, ...] = PEERS, install: bool = True, seed: int = 0,
               model_path=None) -> dict:
    """s/step and tokens/s of ours and of each TRL configuration; speedups over each (median
    wall seconds, median CPU seconds, and best-of wall seconds), each TRL run against our
    measurements bracketing it."""
    path = str(model_path or bench_model(model_name))
    result = {"model": model_name, "rows": rows, "max_new_tokens": max_new_tokens,
              "steps": steps, "runs": {}, "speedups": {}, "speedups_cpu": {}}
    tokens = rows * max_new_tokens
    why = ensure_trl(install)
    if why:
        result["skipped"] = why
        peers = ()
    elif not has_distillation_trainer():
        result["note"] = "this TRL has no DistillationTrainer: distill-* skipped"
        peers = tuple(p for p in peers if not p.startswith("distill"))
    ours = Ours(path, rows, max_new_tokens, seed)
    brackets = [ours.measure(steps)]
    for name in peers:
        trainer, mode = name.split("-")
        run = run_trl({"trainer": trainer, "mode": mode, "model": path, "rows": rows,
                       "max_new_tokens": max_new_tokens, "steps": steps, "seed": seed})
        brackets.append(ours.measure(steps))
        result["runs"][f"trl {name}"] = run
        if "error" in run:
            continue
        _summarize(run, tokens)
        near = {k: brackets[-2][k] + brackets[-1][k] for k in ("step_seconds", "step_cpu_seconds")}
        result["speedups"][f"trl {name}"] = ratio(run["seconds_per_step"],
                                                  median(near["step_seconds"]))
        result.setdefault("speedups_best", {})[f"trl {name}"] = ratio(
            min(run["step_seconds"][1:] or run["step_seconds"]), min(near["step_seconds"]))
        if "cpu_seconds_per_step" in run:
            result["speedups_cpu"][f"trl {name}"] = ratio(run["cpu_seconds_per_step"],
                                                          median(near["step_cpu_seconds"]))
    mine = {"step_seconds": [t for b in brackets for t in b["step_seconds"]],
            "step_cpu_seconds": [t for b in brackets for t in b["step_cpu_seconds"]],
            "completion_tokens_mean": brackets[-1]["completion_tokens_mean"],
            "brackets": [median(b["step_seconds"]) for b in brackets], **ours.split()}
    mine["seconds_per_step"] = median(mine["step_seconds"])
    mine["cpu_seconds_per_step"] = median(mine["step_cpu_seconds"])
    mine["tokens_per_s"] = tokens / mine["seconds_per_step"]
    result["runs"] = {"aropd-mlx opd": mine, **result["runs"]}
    return result


def format_peer(r: dict) -> str:
    out = [f"peer [{r['model']}] {r['rows']} rows x {r['max_new_tokens']} tokens, "
           f"{r['steps']} timed steps (after 1 warm-up); ours timed around every TRL run"]
    for name, run in r["runs"].items():
        if "error" in run:
            out.append(f"  {name:20} error: {run['error']}")
            continue
        sp, spc = r["speedups"].get(name), r.get("speedups_cpu", {}).get(name)
        out.append(f"  {name:20} {run['seconds_per_step']:8.2f} s/step {run['tokens_per_s']:9.1f} "
                   f"tok/s" + (f"   ours {sp:.2f}x as fast" if sp else "")
                   + (f" ({spc:.2f}x in CPU s, {r['speedups_best'][name]:.2f}x best-of)"
                      if spc else ""))
    for key in ("skipped", "note"):
        if key in r:
            out.append(f"  ({r[key]})")
    out.append("  goals: >= 1.2x TRL tuned, >= 3x TRL defaults")
    return "\n".join(out)
