"""More of the run directory: `--overwrite` takes the files the tool itself writes in a run
(plots, trackers) as the run's own, stages next to the real directory (a symlink, `--out .`),
and a run finds the old run an interrupted non-atomic swap left at `.DIR.replaced`."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aropd_mlx import rundir
from aropd_mlx.cli.main import app
from aropd_mlx.errors import UserError
from aropd_mlx.rundir import RunDir, check_run_start

OWN = ("plots", "tensorboard", "wandb", "tracking.json", "result.json")


def fake_run(path: Path, tag: str) -> dict:
    """A run directory as training leaves it (small files), with `tag` in its config."""
    (path / "checkpoints" / "step-000002").mkdir(parents=True)
    (path / "checkpoints" / "step-000002" / "state.json").write_text('{"step": 2}')
    (path / "config.yaml").write_text(f"tag: {tag}\n")
    (path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    return snapshot(path)


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".run.lock"}


def overwrite(path, tag: str) -> Path:
    """An --overwrite run: staged, one file written, swapped in."""
    with RunDir(path, overwrite=True) as run:
        staged = run.open()
        assert run.staged
        (staged / "config.yaml").write_text(f"tag: {tag}\n")
        return run.commit()


def dot_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------- the tool's own files
def test_overwrite_takes_plots_and_trackers_as_the_runs_own(tmp_path):
    run = tmp_path / "run"
    fake_run(run, "old")
    for name in OWN:  # aropd-mlx report RUN, train.report_to (tracking.py), compare
        if name.endswith(".json"):
            (run / name).write_text("{}")
        else:
            (run / name).mkdir()
            (run / name / "x").write_bytes(b"x")
    check_run_start(run, overwrite=True)
    assert overwrite(run, "new") == run.resolve()
    assert sorted(p.name for p in run.iterdir()) == [".run.lock", "config.yaml"]
    assert (run / "config.yaml").read_text() == "tag: new\n" and dot_entries(tmp_path) == []
    # a file the tool never writes is still the user's: refused
    fake_run(tmp_path / "other", "old")
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="notes.txt"):
        check_run_start(tmp_path / "other", overwrite=True)


# ------------------------------------------------------------- the real directory
def test_overwrite_through_a_symlink_replaces_the_real_directory(tmp_path):
    real, runs = tmp_path / "disk" / "real", tmp_path / "runs"
    real.mkdir(parents=True)
    runs.mkdir()
    link = runs / "link"
    link.symlink_to(real)
    fake_run(real, "old")
    for tag in ("new", "newer"):  # a second --overwrite works as well
        assert overwrite(link, tag) == real
        assert link.is_symlink() and link.resolve() == real
        assert (real / "config.yaml").read_text() == f"tag: {tag}\n"
        assert dot_entries(runs) == [] and dot_entries(real.parent) == []


def test_a_link_or_a_file_at_the_staging_path(tmp_path):
    run, victim = tmp_path / "run", tmp_path / "victim"
    fake_run(run, "old")
    fake_run(victim, "theirs")
    kept = snapshot(victim)
    (tmp_path / ".run.overwrite").symlink_to(victim)  # a link there: removed, not its target
    assert overwrite(run, "new") == run
    assert snapshot(victim) == kept and (run / "config.yaml").read_text() == "tag: new\n"
    assert dot_entries(tmp_path) == []
    # a file there: one line naming it, nothing changed
    old = snapshot(run)
    (tmp_path / ".run.overwrite").write_text("not ours")
    with pytest.raises(UserError, match=r"staging directory .*\.run\.overwrite") as e:
        RunDir(run, overwrite=True).open()
    assert "\n" not in str(e.value)
    assert snapshot(run) == old and (tmp_path / ".run.overwrite").read_text() == "not ours"
    with RunDir(run, resume=True) as again:  # the refused run let go of its lock
        assert again.open() == run


def test_overwrite_with_out_dot_from_inside_the_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    fake_run(run, "old")
    monkeypatch.chdir(run)
    assert overwrite(".", "new") == run
    assert Path("config.yaml").read_text() == "tag: new\n"  # `.` names the new run
    assert Path.cwd() == run and dot_entries(tmp_path) == []


@pytest.fixture
def ws(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"id": f"g{i}", "question": f"Q:{i}+1", "solution": f"{i}+1={i + 1}",
             "answer": str(i + 1)} for i in range(8)]
    (tmp_path / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--model", tiny_llama, "--data", tmp_path / "good.jsonl", "--method", "ar-opd",
            "--save-every", "1", "--seed", "1", "--batch-size", "2", "--group-size", "2",
            "--max-new-tokens", "6", "--no-eval"]


def train(*args):
    result = CliRunner().invoke(app, ["train", *map(str, args)])
    assert result.exit_code == 0, result.stdout + result.stderr
    return result


def test_cli_overwrite_dot_inside_a_run_with_its_plots_and_trackers(ws, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(*ws, "--steps", "2", "--out", run)
    (run / "plots").mkdir()
    (run / "tensorboard").mkdir()
    (run / "tracking.json").write_text("{}")
    monkeypatch.chdir(run)
    train(*ws, "--steps", "3", "--out", ".", "--overwrite")
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and json.loads((run / "summary.json").read_text())["steps_done"] == 3
    assert not (run / "plots").exists() and dot_entries(tmp_path) == []


# --------------------------------------------- an interrupted swap without an exchange
def test_an_interrupted_swap_is_finished_or_the_old_run_put_back(tmp_path):
    """Without renameat2, commit() renames DIR to .DIR.replaced, then .DIR.overwrite to DIR: a
    crash between the two leaves DIR without a run. The new run has its checkpoint: the swap
    is finished (what --overwrite asked). No new run with a checkpoint: the old one goes back.
    Neither is a run lost."""
    run = tmp_path / "run"
    fake_run(tmp_path / ".run.replaced", "old")
    new = fake_run(tmp_path / ".run.overwrite", "new")
    with pytest.raises(UserError, match="already holds a run"):  # the CLI's early check
        check_run_start(run)
    assert snapshot(run) == new and dot_entries(tmp_path) == []
    # no new run left (or none with a checkpoint): the old run is put back, never deleted
    run.rename(tmp_path / ".run.replaced")
    (tmp_path / ".run.overwrite").mkdir()  # a staging folder without a checkpoint
    with pytest.raises(UserError, match="already holds a run"):  # a plain run: refused
        RunDir(run).open()
    assert snapshot(run) == new and not (tmp_path / ".run.replaced").exists()
    # the same with DIR there, empty but for a stale lock; --resume continues that run
    (tmp_path / ".run.replaced").mkdir()
    for name in ("config.yaml", "metrics.jsonl", "checkpoints"):
        (run / name).rename(tmp_path / ".run.replaced" / name)
    with RunDir(run, resume=True) as again:
        assert again.open() == run and snapshot(run) == new
    assert dot_entries(tmp_path) == []


def test_the_fallback_swap_and_a_replaced_run_still_held(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)  # no atomic exchange here
    run = tmp_path / "run"
    fake_run(run, "old")
    assert overwrite(run, "new") == run and dot_entries(tmp_path) == []
    assert (run / "config.yaml").read_text() == "tag: new\n"
    # an --overwrite between its two renames, still running (its lock on the old run held)
    run.rename(tmp_path / ".run.replaced")
    with RunDir(tmp_path / ".run.replaced", resume=True) as holder:
        holder.open()
        with pytest.raises(UserError, match="in use"):
            RunDir(run, resume=True).open()
    assert (tmp_path / ".run.replaced" / "config.yaml").is_file()


def test_cli_resume_right_after_an_interrupted_swap_goes_on_with_the_new_run(ws, tmp_path):
    """`train --resume` reads DIR/config.yaml before anything else: the interrupted swap is
    finished first, and the new run (its checkpoint at step 2) goes on to step 3."""
    run = tmp_path / "run"
    train(*ws, "--steps", "2", "--out", run)
    run.rename(tmp_path / ".run.overwrite")  # the new run, with its checkpoints
    fake_run(tmp_path / ".run.replaced", "old")  # the old run it was replacing
    train(*ws, "--steps", "3", "--out", run, "--resume")
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and dot_entries(tmp_path) == []


def test_resume_from_another_directory_reads_the_runs_own_files(ws, tmp_path, monkeypatch):
    """A run started with relative paths (--data good.jsonl) keeps them absolute in its
    config.yaml: resumed from another directory holding another good.jsonl, it trains on its
    own. A YAML leaving the memory plan's keys null resumes as given."""
    import yaml

    (wd1 := tmp_path / "wd1").mkdir()
    (wd2 := tmp_path / "wd2").mkdir()
    (wd1 / "good.jsonl").write_bytes((tmp_path / "good.jsonl").read_bytes())  # 8 prompts
    (wd2 / "good.jsonl").write_text('{"question": "Q:1+1", "solution": "1+1=2", "answer": "2"}\n')
    (wd1 / "auto.yaml").write_text("train:\n  micro_batch_size: null\n  grad_checkpoint: null\n")
    flags = [a for a in ws if a != tmp_path / "good.jsonl"]
    flags = flags[:flags.index("--data")] + flags[flags.index("--data") + 1:]
    monkeypatch.chdir(wd1)
    train(*flags, "--data", "good.jsonl", "-c", "auto.yaml", "--steps", "2", "--out", "run")
    saved = yaml.safe_load((wd1 / "run" / "config.yaml").read_text())
    assert saved["data"]["train"] == str(wd1 / "good.jsonl")
    monkeypatch.chdir(wd2)
    res = train("--out", "../wd1/run", "-c", "../wd1/auto.yaml", "--resume", "--steps", "3")
    assert "8 prompts" in res.stderr
    steps = [json.loads(l)["step"] for l in (wd1 / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
