"""The shipped lab model (lab/shipped.py): hashes, install instead of a warm start, and the
measurement the manifest records (lab/measure.py)."""
from dataclasses import replace

import pytest

from aropd_mlx.errors import UserError
from aropd_mlx.lab import defaults, setup, shipped, task
from aropd_mlx.lab.measure import rates_by_k, well_formed
from aropd_mlx.lab.setup import LabSettings, prepare_lab
from aropd_mlx.lab.tiny import TinySpec, build_tiny_model

from helpers import lab_examples
from shipped_checks import assert_reproduces, named_lab

SMALL = LabSettings(n_train=64, n_eval_per_k=2, eval_ks=(1, 2), k_max=2,
                    spec=TinySpec(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64),
                    warm_steps=2, warm_batch=4, warm_student_steps=0,
                    warm_hint_styles=("oracle",))


@pytest.fixture
def ship(tmp_path):
    """A shipped folder holding a tiny model built with SMALL's spec."""
    model = build_tiny_model(tmp_path / "built", SMALL.spec)
    folder = tmp_path / "shipped"
    shipped.export(model, SMALL, {"student": {"all": {"all_steps_correct": 0.5}}}, folder)
    return folder


def test_export_records_recipe_and_hashes(ship, tmp_path):
    found = shipped.verify(ship)
    assert found["recipe"] == shipped.recipe(SMALL)
    assert set(found["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    for name, digest in found["files"].items():  # independent: hashlib over the files
        import hashlib
        assert hashlib.sha256((ship / name).read_bytes()).hexdigest() == digest
    assert shipped.matches(SMALL, ship) and not shipped.matches(replace(SMALL, seed=1), ship)


def test_a_damaged_file_is_named(ship):
    with open(ship / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        byte = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match="model.safetensors is missing or damaged"):
        shipped.verify(ship)


def test_prepare_lab_installs_the_shipped_model_without_a_warm_start(ship, tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "SHIPPED_DIR", ship)
    monkeypatch.setattr(setup, "warm_start", lambda *a, **k: pytest.fail("warm start ran"))
    lab = prepare_lab(SMALL, root=tmp_path / "cache")
    assert (lab.model_path / "model.safetensors").read_bytes() == (ship / "model.safetensors").read_bytes()
    assert lab.train_path.is_file() and lab.eval_path.is_file()
    # another recipe is not the shipped one: it is built (here: the warm start is called)
    called = []
    monkeypatch.setattr(setup, "warm_start", lambda *a, **k: called.append(1) or
                        build_tiny_model(tmp_path / "other" / "model.tmp", SMALL.spec))
    prepare_lab(replace(SMALL, seed=5), root=tmp_path / "other")
    assert called == [1]


def test_a_named_labs_model_is_found_in_its_own_folder(ship, tmp_path, monkeypatch):
    """install() looks in every shipped folder (the default lab's and shipped_<name> of each
    NAMED_LABS entry) and copies the one whose recipe matches; AROPD_MLX_LAB=<name> gives that
    named lab's settings, an unknown name one clear error."""
    other = replace(SMALL, seed=7)
    model = build_tiny_model(tmp_path / "built7", SMALL.spec)
    (tmp_path / "base").mkdir()
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "base" / "shipped")
    monkeypatch.setattr(shipped, "NAMED_LABS", {"small": {}})
    shipped.export(model, other, {}, shipped.shipped_dir("small"))
    assert shipped.shipped_dir("small") == tmp_path / "base" / "shipped_small"
    assert shipped.folders() == [tmp_path / "base" / "shipped", tmp_path / "base" / "shipped_small"]
    assert shipped.install(other, tmp_path / "got")  # the default folder does not even exist
    assert ((tmp_path / "got" / "model.safetensors").read_bytes()
            == (model / "model.safetensors").read_bytes())
    assert not shipped.install(SMALL, tmp_path / "none")
    assert not (tmp_path / "none").exists()

    monkeypatch.setenv("AROPD_MLX_LAB", "long")
    assert defaults.lab_settings_for() == defaults.settings_from(defaults.NAMED_LABS["long"])
    assert defaults.lab_settings_for().partial_outline and defaults.lab_settings_for().k_max == 40
    monkeypatch.setenv("AROPD_MLX_LAB", "hindsight")
    assert defaults.lab_settings_for().full_copy_style == "slipped"
    monkeypatch.setenv("AROPD_MLX_LAB", "lnog")
    with pytest.raises(UserError, match="'lnog' is neither a lab's name \\(.*long"):
        defaults.lab_settings_for()


def test_a_lab_recipe_can_start_from_a_named_lab(monkeypatch):
    """AROPD_MLX_LAB='{"base": <name>, ...}': that lab's settings with some changed; the same
    lab (key) as the recipe spelled out in full."""
    monkeypatch.setenv("AROPD_MLX_LAB", '{"base": "long_hindsight", "full_copy_past_cut": true, '
                       '"anchor_distrust_share": 0.2, "warm_lr": 0.001}')
    assert defaults.lab_settings_for().key() == "9cc63d66dc1b"  # long_distrust's (docs/LAB.md)
    spelled = ('{"warm_init": "hindsight", "warm_student_steps": 0, "warm_steps": 200, '
               '"full_copy_share": 0.3, "full_copy_style": "slipped", "full_copy_past_cut": true, '
               '"anchor_distrust_share": 0.2}')  # README's distrust lab
    monkeypatch.setenv("AROPD_MLX_LAB", spelled)
    full = defaults.lab_settings_for()
    monkeypatch.setenv("AROPD_MLX_LAB", '{"base": "hindsight", "warm_init": "hindsight", '
                       '"warm_student_steps": 0, "warm_steps": 200, "full_copy_past_cut": true, '
                       '"anchor_distrust_share": 0.2}')
    assert defaults.lab_settings_for() == full
    # a spec is laid over the base's spec key by key; the base itself is left as it was
    monkeypatch.setenv("AROPD_MLX_LAB", '{"base": "long", "spec": {"hidden": 256}}')
    spec = defaults.lab_settings_for().spec
    assert (spec.hidden, spec.max_position, spec.rope_theta) == (256, 1024, 500.0)
    assert defaults.NAMED_LABS["long"]["spec"]["hidden"] == 128
    monkeypatch.setenv("AROPD_MLX_LAB", '{"base": "default", "k_max": 8}')
    with pytest.raises(UserError, match="\"base\" must name a lab \\(hindsight, long"):
        defaults.lab_settings_for()


def test_well_formed_and_rates_follow_the_checker():
    assert well_formed("7+5=2\n2*3=6\nA:6") and well_formed("A:3") and well_formed("7+5*3=6\nA:6")
    assert not well_formed("7+5*3-1=5\nA:5")
    assert not well_formed("7+5=2\n2*3=6") and not well_formed("7+5=22\nA:2")
    assert not well_formed("") and not well_formed("7+5=2\nA:12")
    ex = lab_examples(n=6, k_min=2, k_max=2, seed=3)
    from aropd_mlx.lab import task
    oracle = [task.format_response(*task.solve(e.question)) for e in ex]
    r = rates_by_k(ex, oracle)
    assert r["all"]["all_steps_correct"] == 1.0 and r["all"]["well_formed"] == 1.0
    assert r["by_k"]["2"]["n"] == 6
    wrong = ["A:" + str((int(task.solve(e.question)[1]) + 1) % 10) for e in ex]
    r = rates_by_k(ex, wrong)
    assert r["all"]["accuracy"] == 0.0 and r["all"]["shortcut_rate"] == 1.0  # no steps written


def test_warm_start_trains_long_problems_through_privileged_views_only(tmp_path):
    """student_view_k_max: past it, an example's student prompt is its partial view (the
    draw's view mix then picks between partial and full); shorter ones keep all three."""
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides
    from aropd_mlx.lab.setup import warm_encoder

    settings = replace(SMALL, k_max=4, student_view_k_max=2)
    _, tok = load(str(build_tiny_model(tmp_path / "m", SMALL.spec)))
    cfg = load_config(overrides={**view_overrides(4), "train.method": "sft",
                                 "train.sft_view_mix": [0.5, 0.25, 0.25]})
    enc = warm_encoder(settings, cfg, tok)
    short, long = lab_examples(n=1, k_min=2, k_max=2)[0], lab_examples(n=1, k_min=4, k_max=4)[0]
    s, l = enc(short), enc(long)
    assert s.prompts["student"] != s.prompts["partial"]
    assert l.prompts["student"] == l.prompts["partial"] != l.prompts["full"]
    assert warm_encoder(replace(settings, student_view_k_max=0), cfg, tok)(long).prompts[
        "student"] != l.prompts["partial"]


def test_warm_start_writes_hints_in_the_drawn_reference_style(tmp_path):
    """warm_hint_styles: the privileged prompts carry the hint lines in the example's drawn
    style (another writer's notation), the student prompt and the SFT target stay the
    oracle's; the draw is fixed per example and the default key is unchanged."""
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides
    from aropd_mlx.lab.setup import hint_style, warm_encoder

    base = replace(SMALL, k_max=4, student_view_k_max=0)
    other = replace(base, warm_hint_styles=("reversed_notation",))
    assert replace(base, warm_hint_styles=("oracle",)).key() == base.key() != other.key()
    _, tok = load(str(build_tiny_model(tmp_path / "m", SMALL.spec)))
    cfg = load_config(overrides={**view_overrides(4), "train.method": "sft",
                                 "train.sft_view_mix": [0.5, 0.25, 0.25]})
    ex = lab_examples(n=1, k_min=3, k_max=3)[0]
    plain, hinted = warm_encoder(base, cfg, tok)(ex), warm_encoder(other, cfg, tok)(ex)
    reversed_lines = task.reference_variant(
        {"question": ex.question, "solution": ex.solution, "answer": ex.answer},
        "reversed_notation", None)["solution"]
    assert reversed_lines.split("\n")[0] in tok.decode(hinted.prompts["full"])
    assert ex.solution.split("\n")[0] not in tok.decode(hinted.prompts["full"])
    assert hinted.prompts["student"] == plain.prompts["student"]
    assert hinted.oracle == plain.oracle and hinted.prompts["full"] != plain.prompts["full"]
    mixed = replace(base, warm_hint_styles=("oracle", "reversed_notation"))
    many = lab_examples(n=200, k_min=1, k_max=4)
    drawn = [hint_style(mixed, e) for e in many]
    assert drawn == [hint_style(mixed, e) for e in many] and 60 < drawn.count("oracle") < 140


def test_dev_problems_are_apart_from_the_held_out_set():
    from aropd_mlx.lab.measure import dev_examples
    from aropd_mlx.lab.setup import eval_examples

    s = replace(SMALL, eval_ks=(6, 8), n_eval_per_k=40)
    dev, held = dev_examples(s), eval_examples(s)
    assert len(dev) == len(held) == 80
    assert [len(e.question) for e in dev] == [len(e["question"]) for e in held]  # same k layout
    assert len({e.question for e in dev} & {e["question"] for e in held}) <= 2  # drawn apart


@pytest.mark.skipif(shipped.manifest() is None, reason="no lab model shipped in this checkout")
def test_the_shipped_lab_model_is_whole_loads_and_reproduces_its_numbers():
    """The default lab's model: `aropd-mlx train` starts from it."""
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides

    settings = LabSettings()
    views = load_config(overrides=view_overrides(settings.k_max)).views
    assert_reproduces(shipped.SHIPPED_DIR, settings, views,
                      (settings.eval_ks[0], settings.eval_ks[-1]))


@pytest.mark.skipif(shipped.manifest(shipped.shipped_dir("long")) is None,
                    reason="no long lab model shipped in this checkout")
def test_the_shipped_long_lab_model_is_whole_loads_and_reproduces_its_numbers():
    """AROPD_MLX_LAB=long's model: its student view at the shortest and the longest k, and its
    anchor (the partial view) computing past its hint at a middle and the longest k."""
    assert_reproduces(*named_lab("long"), (5, 25, 40), names=("student", "partial"))


def test_a_second_build_of_one_lab_waits_and_builds_nothing(tmp_path, monkeypatch):
    """Two processes asking for one lab: the second waits on the build lock, then finds the
    model the first one built (it never trains, never clears the first one's files)."""
    import fcntl
    import threading
    import time

    root = tmp_path / "lab"
    root.mkdir()
    monkeypatch.setattr(setup, "warm_start", lambda *a, **k: pytest.fail("second build ran"))
    monkeypatch.setattr(shipped, "install", lambda *a, **k: pytest.fail("second install ran"))
    result = {}
    with open(root / setup.BUILD_LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # "the first process" is building
        waiter = threading.Thread(target=lambda: result.update(lab=prepare_lab(SMALL, root=root)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # waiting, not building
        build_tiny_model(root / "model", SMALL.spec)
        setup.write_data(SMALL, root)
        fcntl.flock(held, fcntl.LOCK_UN)
    waiter.join(30)
    assert not waiter.is_alive() and result["lab"].model_path == root / "model"


def test_student_first_warm_start_trains_the_student_view_on_short_problems_first(tmp_path):
    """warm_student_steps: a first phase of student-view-only SFT on problems with
    k <= student_view_k_max, then the mixed warm start; the key of a lab without it is
    unchanged, and the phase changes the weights."""
    import json

    import mlx.core as mx
    import numpy as np

    base = replace(SMALL, k_max=3, eval_ks=(1, 3), student_view_k_max=1)
    assert replace(base, warm_student_steps=0).key() == base.key()
    two = replace(base, warm_student_steps=3)
    lab = prepare_lab(two, root=tmp_path / "two")
    lines = (lab.root / "warm_run_student" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len((lab.root / "warm_run" / "metrics.jsonl").read_text()
                                   .splitlines()) == base.warm_steps
    # phase 1 saw the student view of k = 1 problems only: its oracle responses are one step
    # plus the answer, so every step's mean response length is that of a k = 1 trace
    from aropd_mlx.lab import task as lab_task

    one_step = len(lab_task.format_response(["1+2=3"], "3")) + 1  # + EOS
    assert all(json.loads(l)["response_len_max"] <= one_step for l in lines)
    one = prepare_lab(base, root=tmp_path / "one")
    a = mx.load(str(lab.model_path / "model.safetensors"))
    b = mx.load(str(one.model_path / "model.safetensors"))
    assert any(not np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def assert_phases_on_their_lengths(lab, phases):
    """Each (run name, steps, k limit) phase logged `steps` steps, none with a response longer
    than the oracle's at its limit (+ EOS), and the last saw longer ones than the first."""
    import json

    longest = lambda k: len(task.format_response(["1+2=3"] * k, "3")) + 1  # + EOS
    lengths = []
    for name, steps, k in phases:
        rows = (lab.root / name / "metrics.jsonl").read_text().splitlines()
        lengths.append([json.loads(l)["response_len_max"] for l in rows])
        assert len(rows) == steps and max(lengths[-1]) <= longest(k)
    assert max(lengths[-1]) > longest(phases[0][2])


def test_student_curriculum_runs_each_phase_on_its_lengths(tmp_path):
    """warm_student_schedule: student-view phases of (steps, k limit) in order, each on
    problems up to its limit (the longest oracle response of a phase's steps bounds the k it
    saw); the key of a lab without it is unchanged; a bad schedule is one clear error."""
    import json

    from aropd_mlx.lab.defaults import settings_from

    base = replace(SMALL, k_max=3, eval_ks=(1, 3), n_train=96)
    assert replace(base, warm_student_schedule=()).key() == base.key()
    cur = replace(base, warm_student_schedule=((3, 1), (2, 3)))
    assert cur.key() != base.key()
    assert settings_from(json.loads(json.dumps({"warm_student_schedule": [[3, 1], [2, 3]],
                                                "warm_student_steps": 0}))
                         ).warm_student_schedule == ((3, 1), (2, 3))
    lab = prepare_lab(cur, root=tmp_path / "cur")
    assert_phases_on_their_lengths(lab, (("warm_run_student_1", 3, 1), ("warm_run_student_2", 2, 3)))
    with pytest.raises(UserError, match="replaces warm_student_steps"):
        replace(base, warm_student_steps=5, warm_student_schedule=((3, 1),))
    with pytest.raises(UserError, match=r"not \[steps, k limit\]"):
        replace(base, warm_student_schedule=((3, 0),))


def test_mixed_curriculum_runs_each_all_views_phase_on_its_lengths(tmp_path):
    """warm_mixed_schedule: the all-views warm start as (steps, k limit) phases in order after
    the student ones, each on problems up to its limit and named in the progress lines; the
    key of a lab without it is unchanged; with warm_steps set too it is one clear error."""
    import json

    from aropd_mlx.lab.defaults import settings_from

    base = replace(SMALL, k_max=3, eval_ks=(1, 3), n_train=96)
    assert replace(base, warm_mixed_schedule=()).key() == base.key()
    cur = replace(base, warm_steps=0, warm_mixed_schedule=((3, 1), (2, 5)))
    assert cur.key() != replace(base, warm_steps=0).key()
    assert settings_from(json.loads(json.dumps({"warm_mixed_schedule": [[3, 1], [2, 5]],
                                                "warm_steps": 0}))
                         ).warm_mixed_schedule == ((3, 1), (2, 5))
    seen = []
    lab = prepare_lab(cur, root=tmp_path / "cur", on_step=seen.append)
    assert [(l["phase"], l["phase_steps"]) for l in seen] == (
        [("all views, k <= 1", 3)] * 3 + [("all views, k <= 3", 2)] * 2)  # the limit is capped
    assert not (lab.root / "warm_run").exists()
    assert_phases_on_their_lengths(lab, (("warm_run_mixed_1", 3, 1), ("warm_run_mixed_2", 2, 3)))
    with pytest.raises(UserError, match="replaces warm_steps"):
        replace(base, warm_mixed_schedule=((3, 1),))
    with pytest.raises(UserError, match=r"warm_mixed_schedule phase \[3, 0\] is not"):
        replace(base, warm_steps=0, warm_mixed_schedule=((3, 0),))


def test_an_interrupted_build_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """A lab build killed in its mixed phase goes on from its last checkpoint: the finished
    student phases are not trained again, and the model equals a build that was never stopped
    (bit for bit: one machine, exact resume)."""
    import json

    import mlx.core as mx
    import numpy as np

    monkeypatch.setattr(setup, "WARM_SAVE_EVERY", 2)
    cur = replace(SMALL, k_max=3, eval_ks=(1, 3), n_train=96, warm_steps=5,
                  warm_student_schedule=((3, 1), (2, 3)))
    whole = prepare_lab(cur, root=tmp_path / "whole")

    class Killed(Exception):
        pass

    seen = []

    def kill_in_mixed_phase(line):
        seen.append(line)
        if len(seen) == 3 + 2 + 3:  # both student phases, then 3 of the 5 mixed steps
            raise Killed

    with pytest.raises(Killed):
        prepare_lab(cur, root=tmp_path / "cut", on_step=kill_in_mixed_phase)
    assert not (tmp_path / "cut" / "model").exists()
    assert [(l["phase"], l["phase_steps"]) for l in seen] == (  # what the progress lines name
        [("student view, k <= 1", 3)] * 3 + [("student view, k <= 3", 2)] * 2 + [("all views", 5)] * 3)
    seen.clear()
    cut = prepare_lab(cur, root=tmp_path / "cut", on_step=seen.append)
    assert len(seen) == 5 - 2  # only the mixed steps after its checkpoint at step 2
    rows = (cut.root / "warm_run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in rows] == [1, 2, 3, 4, 5]
    a = mx.load(str(whole.model_path / "model.safetensors"))
    b = mx.load(str(cut.model_path / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def test_build_progress_names_the_phase_every_50_steps_and_at_its_end(capsys):
    """The build's progress lines (cli/train.py): a header once, then a line every 50 steps and
    at each phase's last step, naming the phase, the step, the loss, s/step and the minutes
    left by that step time (none on a phase's last line, "<1" under a minute)."""
    from aropd_mlx.cli.train import _build_progress

    on_step = _build_progress()
    for phase, steps in (("student view, k <= 6", 120), ("all views", 60)):
        for step in range(1, steps + 1):
            on_step({"step": step, "loss": 1.0 / step, "time_step": 2.0, "phase": phase,
                     "phase_steps": steps})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("Building the lab model")
    assert lines[1:] == [
        "  student view, k <= 6: step 50/120  loss 0.020  2.0 s/step, ~2 min left",  # 70 x 2 s
        "  student view, k <= 6: step 100/120  loss 0.010  2.0 s/step, <1 min left",  # 20 x 2 s
        "  student view, k <= 6: step 120/120  loss 0.008  2.0 s/step",
        "  all views: step 50/60  loss 0.020  2.0 s/step, <1 min left",  # 20 s
        "  all views: step 60/60  loss 0.017  2.0 s/step",
    ]


def test_question_last_labs_train_and_run_with_the_question_last_views(tmp_path):
    """LabSettings.question_last: a lab of its own (the key of a lab without it is unchanged)
    whose warm start and runs both render the privileged views question last, padded to the
    width of a k_max question (the warm start's config.yaml and the lab's overrides agree)."""
    import yaml

    from aropd_mlx.config import load_config
    from aropd_mlx.data import Example
    from aropd_mlx.views import render_views

    base = replace(SMALL, k_max=3, eval_ks=(1, 3), n_train=96)
    assert replace(base, question_last=False).key() == base.key()
    last = replace(base, question_last=True)
    assert last.key() != base.key()
    # a lab without it keeps its recipe (the shipped model's match), one with it records it
    assert "question_last" not in shipped.recipe(base) and shipped.recipe(last)["question_last"]
    lab = prepare_lab(last, root=tmp_path / "last")
    views = load_config(overrides=lab.overrides()).views
    warm = yaml.safe_load((lab.root / "warm_run" / "config.yaml").read_text())["views"]
    assert warm["privileged_template"] == views.privileged_template
    assert warm["pad_question_chars"] == views.pad_question_chars == len("Q:1+2+3+4")
    ex = Example(id="x", question="Q:1+2", solution="1+2=3", answer="3")
    assert render_views(ex, views)["full"].endswith("\nA:3\n....Q:1+2")


def test_every_shipped_lab_folder_is_packaged():
    """A wheel carries every shipped model: each folder of shipped.folders() (the default lab's
    and each named lab's) is a package of pyproject.toml with all its files as package data
    (a folder left out installs without its model, and setuptools warns on every install)."""
    import tomllib
    from pathlib import Path

    conf = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    for folder in shipped.folders():
        package = f"aropd_mlx.lab.{folder.name}"
        assert package in conf["packages"] and conf["package-data"].get(package) == ["*"], package
