"""Crash safety: SIGKILL a training process at 10 moments (start-up, rollout, update, halfway
through a checkpoint write, the final adapter write), `train --out DIR --resume` each time, and
end with adapters byte-for-byte equal to an uninterrupted run's, and the same per-step losses.

The training processes run the real CLI (`app(["train", ...])`). They are forked from a
forkserver that has imported mlx-lm and transformers once, so each start costs milliseconds,
not the seconds of a fresh interpreter (a plain fork of this process is unsafe once MLX has run
here). Each child counts, in shared memory, how often it entered each phase; the parent kills
it when the chosen count is reached, plus a random delay.
"""
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

from aropd_mlx.checkpoint import list_checkpoints
from aropd_mlx.lab.tiny import build_tiny_model

PHASES = {"time": 0, "rollout": 1, "update": 2, "checkpoint": 3, "adapters": 4}
STEPS = 12
HOLD_S = 0.04  # a pause before each file of a checkpoint: kills land mid-checkpoint
PRELOAD_ROOTS = {"mlx", "mlx_lm", "transformers", "tokenizers", "huggingface_hub", "jinja2",
                 "safetensors", "aropd_mlx", "numpy", "yaml", "typer", "click", "rich"}


def _child(args: list[str], counters, log: str) -> None:
    """One training process: the real CLI, instrumented to report which phase it is in."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    print(f"child start {time.time():.3f}", flush=True)
    import aropd_mlx.checkpoint as ckpt
    import aropd_mlx.trainer as trainer

    def mark(phase, fn, pause=0.0):
        def wrapped(*a, **k):
            print(f"{phase} {time.time():.3f}", flush=True)
            counters[PHASES[phase]] += 1
            if pause:
                time.sleep(pause)
            return fn(*a, **k)
        return wrapped

    trainer.sample = mark("rollout", trainer.sample)
    trainer.accumulate = mark("update", trainer.accumulate)
    ckpt._save_arrays = mark("checkpoint", ckpt._save_arrays, HOLD_S)
    trainer.save_adapters = mark("adapters", trainer.save_adapters, HOLD_S)
    from aropd_mlx.cli.main import app

    app(["train", *args])


@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    """A multiprocessing context whose server has the heavy modules imported (not run)."""
    from mlx_lm import load

    import aropd_mlx.cli.main  # noqa: F401  (and its lazy imports below)
    import aropd_mlx.cli.train  # noqa: F401
    import aropd_mlx.trainer  # noqa: F401
    import mlx_lm.generate  # noqa: F401

    load(str(build_tiny_model(tmp_path_factory.mktemp("warm"))))  # pulls in lazy imports
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(sorted(m for m in list(sys.modules)
                                      if m.split(".")[0] in PRELOAD_ROOTS))
    return ctx


def _run(ctx, args, log, kill=None, timeout=90.0) -> bool:
    """Run a child; with kill=(phase, count, delay_s) SIGKILL it there. True if it was killed."""
    counters = ctx.Array("i", len(PHASES), lock=False)
    proc = ctx.Process(target=_child, args=([str(a) for a in args], counters, str(log)))
    t0 = time.monotonic()
    proc.start()
    while proc.is_alive():
        if kill is not None:
            phase, count, delay = kill
            due = (time.monotonic() - t0 >= delay) if phase == "time" else \
                counters[PHASES[phase]] >= count
            if due:
                if phase != "time":
                    time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
                return proc.exitcode == -signal.SIGKILL
        assert time.monotonic() - t0 < timeout, Path(log).read_text()[-3000:]
        time.sleep(0.002)
    proc.join()
    assert proc.exitcode == 0, Path(log).read_text()[-3000:]
    return False


def _kill_point(rng: random.Random, phase: str, remaining: int) -> tuple:
    """Where to kill this process. Counts are per process and bounded by the steps left, so the
    kill is always reached before the run could finish; the last kill hits the final adapter
    write. A checkpoint writes 3 files (adapters, optimizer, EMA teacher): count 3k+2 kills it
    halfway, after step k+1's adapters were written and before its optimizer state."""
    if phase == "time" and remaining >= 6:  # start-up, config, model load, restore, a step
        return ("time", 0, rng.uniform(0.05, 0.6))
    if phase == "checkpoint":
        return (phase, 3 * rng.randrange(min(3, remaining)) + rng.choice([1, 2, 3]),
                rng.uniform(0.0, 0.02))
    if phase == "adapters":
        return (phase, 1, rng.uniform(0.0, 0.02))
    return (phase if phase != "time" else "rollout", rng.randint(1, min(4, remaining)),
            rng.uniform(0.0, 0.02))


def _losses(run: Path) -> list[tuple[int, float, float]]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(l["step"], l["loss"], l["grad_norm"]) for l in lines]


def test_sigkill_ten_times_then_resume_equals_uninterrupted(forkserver, tiny_llama, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q:{i}*{i % 5}", "solution": f"{i}*{i % 5}",
                                        "answer": str(i * (i % 5))}) + "\n" for i in range(20)))
    (tmp_path / "run.yaml").write_text("model:\n  lora_dropout: 0.1\n  teacher: ema\n"
                                       "train:\n  save_every: 1\n  keep_checkpoints: 2\n")

    def fresh(out):
        return ["-c", tmp_path / "run.yaml", "--model", tiny_llama, "--data", data, "--out", out,
                "--steps", STEPS, "--batch-size", 2, "--group-size", 2, "--max-new-tokens", 8,
                "--no-eval", "--seed", 3]

    reference, crashed, log = tmp_path / "reference", tmp_path / "crashed", tmp_path / "child.log"
    assert not _run(forkserver, fresh(reference), log)

    rng, history = random.Random(20240607), []
    phases = ["time", "rollout", "update", "checkpoint", "checkpoint", "time", "rollout", "update",
              "checkpoint"]
    rng.shuffle(phases)
    for phase in phases + ["adapters"]:
        started = (crashed / "config.yaml").is_file()
        args = ["--out", crashed, "--resume", "--no-eval"] if started else fresh(crashed)
        done = list_checkpoints(crashed)
        step = int(done[-1].name.split("-")[1]) if done else 0
        kill = _kill_point(rng, phase, STEPS - step)
        history.append((*kill[:2], step))
        assert _run(forkserver, args, log, kill=kill), f"not killed at {kill}; {history}"
    _run(forkserver, ["--out", crashed, "--resume", "--no-eval"], log)

    assert {"time", "rollout", "update", "checkpoint", "adapters"} <= {h[0] for h in history}
    resumed_from = {h[2] for h in history}
    assert len(resumed_from) >= 4 and max(resumed_from) >= 4, ("resumes too alike", history)
    assert (crashed / "adapters.safetensors").read_bytes() == \
        (reference / "adapters.safetensors").read_bytes(), history
    assert _losses(crashed) == _losses(reference)
    assert [p.name for p in (crashed / "checkpoints").iterdir()] and \
        not [p for p in (crashed / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["steps_done"] == STEPS
