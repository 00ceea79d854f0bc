"""Peer benchmark: aropd-mlx `opd` against TRL's on-policy distillation (torch CPU or CUDA).

Same HF-format model (the bench "lab" or "56m" llama), same prompts, batch, rollout length,
number of steps; reverse KL (alpha = beta = 1); a frozen self-teacher; full fine-tuning; fp32;
fixed-length rollouts. TRL runs in child processes (aropd_mlx.bench.peer_trl) as:
  gkd-default      trl.experimental.gkd.GKDTrainer, lmbda=1, TRL's defaults otherwise
                   (gradient_checkpointing=True, so generation runs without a KV cache)
  gkd-tuned        the same with gradient_checkpointing=False (KV cache on)
  distill-default  trl.DistillationTrainer (when this TRL has it), its defaults
  distill-tuned    the same with gradient_checkpointing=False
Ours runs in this process through `aropd_mlx.trainer.run_step`.

Interleaved rounds. Every side is set up and warmed up first (ours in this process, each TRL
configuration in a child that stays alive: peer_trl's stdin/stdout protocol). Then `rounds`
rounds, each running `steps_per_round` timed steps of every side in turn (ours, TRL A, TRL B,
...), the idle sides blocked, so all sides see the machine in the same state and no start-up
or warm-up is timed. Per side: the median s/step of each round, and over rounds their median
and spread. Per TRL configuration: the ratio TRL s/step / ours s/step *within each round*
(ours is N x as fast), over rounds its median and spread. A ratio's verdict against its goal
is "yes" only when the whole spread (min..max over rounds) clears the goal, "NO" when all of
it misses, and "straddles" otherwise: the run does not support a claim either way.
Those statistics are in aropd_mlx.bench.peer_stats, the parent's side of the protocol with the
children in aropd_mlx.bench.peer_child; this module runs the benchmark and prints it.

Goals: ours >= 1.5x TRL's fastest configuration on the 56m model (>= 1.2x on the lab
model), and >= 3x TRL GKD with its defaults.

TRL is not a dependency of aropd-mlx: when it is missing the benchmark installs it with
`python -m pip install trl torch==<pinned>` (never an unpinned torch, which would pull a CUDA
build) or, with pip unavailable or install=False, skips with a note.

    from aropd_mlx.bench.peer import bench_peer
    bench_peer("lab", rows=16, max_new_tokens=80, rounds=5, steps_per_round=2)
    # tiny: rows=2, max_new_tokens=8, rounds=2, steps_per_round=1
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from typing import Callable

from aropd_mlx.bench.common import bench_model, median, no_eos
from aropd_mlx.bench.peer_child import PeerChild, PeerError, child_env, trl_command
from aropd_mlx.bench.peer_stats import FASTEST, OURS, aggregate, peer_goals

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


# ----------------------------------------------------------------------------- the sides

class Ours:
    """aropd-mlx `opd` (reverse KL, frozen self-teacher, full fine-tuning) kept loaded; each
    call of `measure(k)` times k more steps."""

    def __init__(self, model_path, rows: int, max_new_tokens: int, seed: int = 0,
                 warmup: int = 1):
        from aropd_mlx.bench.step import setup_run
        from aropd_mlx.optimizer import make_optimizer

        self.cfg, self.model, self.tok, self.teacher, self.encoded = setup_run(
            "peer", "opd", batch=rows, group=1, max_new_tokens=max_new_tokens,
            fine_tune="full", alpha=1.0, model_path=model_path, seed=seed)
        self.optimizer = make_optimizer(self.cfg)
        self.optimizer.init(self.model.trainable_parameters())
        self.rows, self.step, self.lines = rows, 0, []
        for _ in range(max(warmup, 1)):
            self.measure(0)  # untimed warm-up: compiles

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
        self.completion_tokens_mean = line["response_tokens"] / self.rows
        return {"step_seconds": wall, "step_cpu_seconds": cpu}

    def split(self) -> dict:
        return {f"{p}_seconds": median([l[f"time_{p}"] for l in self.lines])
                for p in ("rollout", "scoring", "update")}


def interleave(sides: dict[str, Callable[[], dict]], rounds: int,
               log: Callable[[str], None] | None = None):
    """Run `rounds` rounds; in each, every side's round function in turn (dict order).
    Returns ({name: [round results]}, {name: error}, order of calls as (round, name)).
    A side that raises is dropped from the later rounds and recorded as an error."""
    out = {n: [] for n in sides}
    errors, order = {}, []
    for r in range(rounds):
        for name, fn in sides.items():
            if name in errors:
                continue
            order.append((r, name))
            try:
                out[name].append(fn())
            except Exception as e:  # noqa: BLE001 - one side failing must not end the run
                errors[name] = str(e) if isinstance(e, PeerError) else f"{type(e).__name__}: {e}"
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {median(out[n][-1]['step_seconds']):.3f}s" for n in sides
                if n not in errors and out[n]))
    return out, errors, order


def bench_peer(model_name: str = "lab", rows: int = 16, max_new_tokens: int = 80,
               rounds: int = 5, steps_per_round: int = 2, warmup: int = 1,
               peers: tuple[str, ...] = PEERS, install: bool = True, seed: int = 0,
               model_path=None, device: str = "cpu", child_cmd=trl_command,
               ours_factory=None, log: Callable[[str], None] | None = None,
               timeout: float = 1800) -> dict:
    """Interleaved rounds of ours and every TRL configuration (module docstring): s/step per
    side with its spread over rounds, TRL / ours ratios per round with theirs, and verdicts.

    device: where TRL runs ("cpu" or "cuda"); MLX runs on its default device (the caller
    chooses it: aropd_mlx.bench.common.use_device). child_cmd(spec) -> argv of one TRL child;
    ours_factory(path, rows, max_new_tokens, seed, warmup) -> an object with measure(k)
    (tests substitute fakes for both)."""
    if rounds < 1 or steps_per_round < 1:
        raise ValueError("rounds and steps_per_round must be >= 1")
    path = str(model_path or bench_model(model_name))
    result = {"model": model_name, "rows": rows, "max_new_tokens": max_new_tokens,
              "rounds": rounds, "steps_per_round": steps_per_round, "warmup": warmup,
              "device": device, "runs": {}, "ratios": {}, "speedups": {}}
    tokens = rows * max_new_tokens
    if child_cmd is trl_command:
        why = ensure_trl(install)
        if why:
            result["skipped"] = why
            peers = ()
        elif any(p.startswith("distill") for p in peers) and not has_distillation_trainer():
            result["note"] = "this TRL has no DistillationTrainer: distill-* skipped"
            peers = tuple(p for p in peers if not p.startswith("distill"))
    ours = (ours_factory or Ours)(path, rows, max_new_tokens, seed, warmup)
    sides: dict[str, Callable[[], dict]] = {OURS: lambda: ours.measure(steps_per_round)}
    children, errors = [], {}
    try:
        for name in peers:  # one at a time: each loads and warms up while the others wait
            trainer, mode = name.split("-")
            spec = {"trainer": trainer, "mode": mode, "model": path, "rows": rows,
                    "max_new_tokens": max_new_tokens, "seed": seed, "warmup": warmup,
                    "rounds": rounds, "steps_per_round": steps_per_round, "device": device}
            child = PeerChild(f"trl {name}", child_cmd(spec), child_env(), timeout, timeout)
            if log:
                log(f"  starting {child.name} (load + {warmup} warm-up step)")
            try:
                child.start()
            except (PeerError, OSError) as e:
                errors[child.name] = str(e)
                child.close(kill=True)
                continue
            children.append(child)
            sides[child.name] = child.run_round
        per_round, round_errors, order = interleave(sides, rounds, log)
    except BaseException:  # interrupted: no child outlives us
        for child in children:
            child.close(kill=True)
        raise
    errors.update(round_errors)
    meta = {c.name: c.finish() for c in children}
    done = {n: rs for n, rs in per_round.items() if n not in errors and len(rs) == rounds}
    if OURS not in done:
        raise RuntimeError(f"peer: our side failed: {errors.get(OURS)}")
    agg = aggregate(done, tokens, model_name)
    result["order"] = [f"{r}:{n}" for r, n in order]
    result["runs"] = agg["runs"]
    result["ratios"] = agg["ratios"]
    result["speedups"] = {n: r["median"] for n, r in agg["ratios"].items() if n != FASTEST}
    result["speedups_cpu"] = {n: r["cpu_median"] for n, r in agg["ratios"].items()
                              if "cpu_median" in r and n != FASTEST}
    mine = result["runs"][OURS]
    mine["completion_tokens_mean"] = getattr(ours, "completion_tokens_mean", None)
    if hasattr(ours, "split"):
        mine.update(ours.split())
    for name, m in meta.items():
        if name in result["runs"] and m:
            result["runs"][name].update({k: v for k, v in m.items() if k not in result["runs"][name]})
    runs = result["runs"]
    for name, err in errors.items():
        runs[name] = {"error": err}
    order = [OURS] + [f"trl {p}" for p in peers]
    result["runs"] = {n: runs[n] for n in order if n in runs}
    return result


def _range(s: dict, fmt: str) -> str:
    return f"[{s['min']:{fmt}}-{s['max']:{fmt}}]"


def format_peer(r: dict) -> str:
    sides = ", ".join(r["runs"]) or OURS
    out = [f"peer [{r['model']}] {r['rows']} rows x {r['max_new_tokens']} tokens, TRL on "
           f"{r.get('device', 'cpu')}: {r['rounds']} rounds x {r['steps_per_round']} timed steps "
           f"per side after {r.get('warmup', 1)} warm-up step, round-robin ({sides})",
           f"  {'side':24} {'s/step median':>13} {'[min-max over rounds]':>22} {'tok/s':>9}"]
    for name, run in r["runs"].items():
        if "error" in run:
            out.append(f"  {name:24} error: {run['error']}")
            continue
        out.append(f"  {name:24} {run['seconds_per_step']:13.3f} "
                   f"{_range(run['spread'], '.3f'):>22} {run['tokens_per_s'] or 0:9.1f}")
    if r.get("ratios"):
        out.append(f"  {'ours N x as fast (TRL/ours)':29} {'median':>8} {'[min-max over rounds]':>22}"
                   f"   goal     verdict")
        for name, q in r["ratios"].items():
            label = f"vs {name}" + (f" ({q['config'][4:]})" if "config" in q else "")
            goal = f">= {q['goal']:g}x" if q.get("goal") else "-"
            v = q["verdict"]
            if v == "straddles":
                v = "STRADDLES: the spread crosses the goal, no claim either way"
            out.append(f"  {label:29} {q['median']:7.2f}x {_range(q, '.2f'):>22}   {goal:8} {v}")
    for key in ("skipped", "note"):
        if key in r:
            out.append(f"  ({r[key]})")
    g = peer_goals(r["model"])
    out.append(f"  goals: ours >= {g[FASTEST]:g}x TRL's fastest configuration on this model, "
               f">= {g['trl gkd-default']:g}x TRL GKD defaults; a verdict is yes/NO only when "
               "every round agrees")
    return "\n".join(out)
