"""The run directory: `--resume` on the command a user ran, no silent overwrite, one run at a
time (a lock), `--overwrite` that keeps the old run whole until the new one's first checkpoint,
and `eval --adapter RUN` from the run's saved config. The CLI runs in-process (CliRunner)."""
import fcntl
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aropd_mlx.cli.main import app
from aropd_mlx.errors import UserError

from helpers import last_error

# A tiny lab, should anything try to build one (the CLI's eval did, for any --adapter).
TINY_LAB = {"n_train": 16, "k_max": 2, "eval_ks": [2], "n_eval_per_k": 2, "warm_steps": 1,
            "warm_batch": 4, "spec": {"hidden": 16, "layers": 1, "heads": 2, "kv_heads": 1,
                                      "intermediate": 32, "max_position": 128}}
ROWS = [{"id": f"g{i}", "question": f"Q:{i}+1", "solution": f"{i}+1={i + 1}", "answer": str(i + 1)}
        for i in range(8)]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture
def ws(tmp_path, tiny_llama, monkeypatch):
    """A workspace (the working directory): data, held-out data, the base flags of a run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "good.jsonl").write_text(jsonl(ROWS))
    (tmp_path / "heldout.jsonl").write_text(jsonl(ROWS[:3]))
    out = tmp_path / "run"
    base = ["--model", tiny_llama, "--data", tmp_path / "good.jsonl", "--method", "ar-opd",
            "--steps", "2", "--save-every", "1", "--seed", "1", "--out", out, "--batch-size", "2",
            "--group-size", "2", "--max-new-tokens", "6", "--no-eval"]
    return {"tmp": tmp_path, "out": out, "base": base, "model": tiny_llama}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train(*args):
    return cli("train", *args)


def ok(result):
    assert result.exit_code == 0, result.stdout + result.stderr
    return result


def with_steps(args, steps):
    i = args.index("--steps")
    return args[:i + 1] + [str(steps)] + args[i + 2:]


def snapshot(run: Path) -> dict:
    """Every file of a run directory (not its lock) with its bytes."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".run.lock"}


def steps_in(run: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------ 3: resume
def test_the_same_command_plus_resume_continues_the_run(ws):
    """Flag and YAML values equal to the saved ones are accepted, paths as the first run
    resolved them (relative then absolute), numbers however spelled; --steps may change."""
    (ws["tmp"] / "run.yaml").write_text("objective:\n  lam: 0.6\nrollout:\n  temperature: 0.7\n")
    first = [a if a != ws["tmp"] / "good.jsonl" else "good.jsonl" for a in ws["base"]]
    ok(train("-c", "run.yaml", *first, "--lr", "1e-4", "--clip", "none"))
    again = ["-c", ws["tmp"] / "run.yaml", *with_steps(ws["base"], 3), "--lr", "0.0001",
             "--clip", "none", "--resume"]
    ok(train(*again))
    assert steps_in(ws["out"]) == [1, 2, 3]
    assert json.loads((ws["out"] / "summary.json").read_text())["steps_done"] == 3


def test_resume_refuses_only_values_that_differ_and_names_them(ws):
    ok(train(*ws["base"]))
    before = snapshot(ws["out"])
    (ws["tmp"] / "run.yaml").write_text("rollout:\n  temperature: 0.5\n")
    line = last_error(train("-c", "run.yaml", *ws["base"], "--lam", "0.3", "--resume"),
                     "only --steps may change", "objective.lam (--lam): saved 0.8, given 0.3",
                     "rollout.temperature: saved 1.0, given 0.5", "--overwrite")
    assert "data.train" not in line and "model.path" not in line  # equal: not named
    assert snapshot(ws["out"]) == before
    last_error(train(*with_steps(ws["base"], 1), "--resume"),  # 2 steps done: fewer is no resume
               "--resume --steps 1: this run has done 2 steps")
    assert snapshot(ws["out"]) == before


# ------------------------------------------------------- 4: existing runs, lock, overwrite
def test_a_new_run_into_an_existing_run_is_refused(ws):
    ok(train(*ws["base"]))
    before = snapshot(ws["out"])
    held_out = ["--eval-data", ws["tmp"] / "heldout.jsonl"]
    args = [a for a in ws["base"] if a != "--no-eval"] + held_out  # no eval_before.json either
    last_error(train(*args), str(ws["out"]), "already holds a run",
              "use --resume to continue it, --overwrite to replace it")
    assert snapshot(ws["out"]) == before


def _hold_lock(run: Path) -> int:
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / ".run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_second_run_on_a_locked_directory_fails_at_once(ws, tiny_llama):
    fd = _hold_lock(ws["out"])
    try:
        t0 = time.monotonic()
        last_error(train(*ws["base"]), str(ws["out"]), "another run holds its lock")
        assert time.monotonic() - t0 < 10
        # past the CLI's early check (two runs started together): the trainer's own lock
        from helpers import lab_examples, tiny_config

        from aropd_mlx.models import Teacher, load_student
        from aropd_mlx.trainer import train as train_lib

        cfg = tiny_config(tiny_llama, ws["out"])
        model, tok = load_student(cfg.model)
        with pytest.raises(UserError, match="another run holds its lock"):
            train_lib(cfg, model, tok, lab_examples(8), teacher=Teacher.create(model, tok, cfg.model))
        assert sorted(p.name for p in ws["out"].iterdir()) == [".run.lock"]
    finally:
        os.close(fd)


def test_a_run_holds_its_lock_to_the_end(ws, tiny_llama):
    from helpers import lab_examples, tiny_config

    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.rundir import _held_by_another
    from aropd_mlx.trainer import train as train_lib

    cfg = tiny_config(tiny_llama, ws["out"])
    model, tok = load_student(cfg.model)
    seen = []
    train_lib(cfg, model, tok, lab_examples(8), teacher=Teacher.create(model, tok, cfg.model),
              on_step=lambda line: seen.append(_held_by_another(ws["out"])))
    assert seen == [True, True, True] and not _held_by_another(ws["out"])


def test_overwrite_keeps_the_old_run_until_the_new_ones_first_checkpoint(ws, tiny_llama, monkeypatch):
    import aropd_mlx.trainer as trainer
    from helpers import lab_examples, tiny_config

    from aropd_mlx.models import Teacher, load_student

    ok(train(*ws["base"]))
    old = snapshot(ws["out"])
    staging = ws["tmp"] / ".run.overwrite"

    # interrupted (Ctrl-C) before its first checkpoint, with an evaluation before training
    def interrupted(*a, **k):
        assert staging.is_dir() and snapshot(ws["out"]) == old  # writing aside, old run whole
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(trainer.ckpt, "save_checkpoint", interrupted)
        args = [a for a in ws["base"] if a != "--no-eval"]
        result = train(*args, "--eval-data", ws["tmp"] / "heldout.jsonl", "--overwrite")
    assert result.exit_code == 130, result.stdout + result.stderr
    assert snapshot(ws["out"]) == old and not staging.exists()

    # a killed --overwrite leaves its staging directory: the next one sweeps it
    staging.mkdir()
    (staging / "metrics.jsonl").write_text("junk\n")
    cfg = tiny_config(tiny_llama, ws["out"], **{"train.save_every": 2, "train.seed": 7})
    model, tok = load_student(cfg.model)
    states = []

    def watch(line):
        states.append((line["step"], snapshot(ws["out"]) == old, staging.is_dir()))

    trainer.train(cfg, model, tok, lab_examples(8), teacher=Teacher.create(model, tok, cfg.model),
                  overwrite=True, on_step=watch)
    # steps 1-2: the old run untouched; checkpoint 2 swaps the new run in; step 3 is there
    assert states == [(1, True, True), (2, True, True), (3, False, False)]
    assert steps_in(ws["out"]) == [1, 2, 3]
    assert "seed: 7" in (ws["out"] / "config.yaml").read_text()
    assert (ws["out"] / "adapters.safetensors").is_file()
    assert sorted(p.name for p in ws["tmp"].iterdir() if p.name.startswith(".")) == []


def test_overwrite_from_the_cli_replaces_the_run(ws):
    ok(train(*ws["base"]))
    ok(train(*with_steps(ws["base"], 3), "--overwrite"))
    assert steps_in(ws["out"]) == [1, 2, 3]
    assert sorted(p.name for p in (ws["out"] / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert "steps: 3" in (ws["out"] / "config.yaml").read_text()


def test_overwrite_refuses_a_directory_with_other_files(ws):
    ok(train(*ws["base"]))
    (ws["out"] / "notes.txt").write_text("mine")
    before = snapshot(ws["out"])
    last_error(train(*ws["base"], "--overwrite"), "notes.txt", "another --out")
    assert snapshot(ws["out"]) == before


# ------------------------------------------------------------------- 6: eval --adapter RUN
def test_eval_takes_the_base_model_and_views_from_the_run(ws, monkeypatch):
    monkeypatch.setenv("AROPD_MLX_CACHE", str(ws["tmp"] / "cache"))  # the lab is never built
    monkeypatch.setenv("AROPD_MLX_LAB", json.dumps(TINY_LAB))
    ok(train(*ws["base"], "--eval-data", "heldout.jsonl"))
    result = ok(cli("eval", "--adapter", ws["out"], "--data", ws["tmp"] / "good.jsonl",
                    "--json", ws["tmp"] / "e.json"))
    assert "acc" in result.stdout and "len <=256" in result.stdout
    assert json.loads((ws["tmp"] / "e.json").read_text())["summary"]["n"] == 8
    # no --data: the run's data.eval, said so
    result = ok(cli("eval", "--adapter", ws["out"], "--json", ws["tmp"] / "e.json"))
    assert "heldout.jsonl" in result.stderr and "data.eval" in result.stderr
    assert json.loads((ws["tmp"] / "e.json").read_text())["summary"]["n"] == 3
    assert not (ws["tmp"] / "cache").exists()


def test_eval_without_held_out_data_is_one_line(ws, monkeypatch):
    monkeypatch.setenv("AROPD_MLX_CACHE", str(ws["tmp"] / "cache"))
    monkeypatch.setenv("AROPD_MLX_LAB", json.dumps(TINY_LAB))
    ok(train(*ws["base"]))
    last_error(cli("eval", "--adapter", ws["out"]), "--data", "no data.eval")
    last_error(cli("eval", "--model", ws["model"]), "--data")
    bare = ws["tmp"] / "bare"
    bare.mkdir()
    last_error(cli("eval", "--adapter", bare), "no config.yaml", "--model")
    assert not (ws["tmp"] / "cache").exists()
