"""The built-in lab end to end at a small size: build, evaluate before/after, summary, run dir."""
import json

import pytest
from typer.testing import CliRunner

from aropd_mlx.cli.main import app
from aropd_mlx.lab.setup import LabSettings, prepare_lab

SMALL = {"n_train": 64, "k_max": 3, "eval_ks": [2, 3], "n_eval_per_k": 4, "warm_steps": 4,
         "warm_batch": 8, "warm_student_steps": 0, "spec": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1,
                                   "intermediate": 64, "max_position": 256}}


@pytest.fixture
def small_lab(tmp_path, monkeypatch):
    monkeypatch.setenv("AROPD_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AROPD_MLX_LAB", json.dumps(SMALL))
    return tmp_path


def test_default_train_runs_the_lab_end_to_end(small_lab):
    out = small_lab / "run"
    result = CliRunner().invoke(app, ["train", "--steps", "2", "--out", str(out),
                                      "--batch-size", "2", "--group-size", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    for when in ("eval_before", "eval_after"):
        s = summary[when]
        assert s["n"] == 8 and set(s["by_k"]) == {"2", "3"}
        assert 0.0 <= s["accuracy"] <= 1.0 and "shortcut_rate" in s
    assert (out / "adapters.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert "acc before" in result.output and "k=3" in result.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_a_resumed_lab_run_is_evaluated_with_the_lab_checker(small_lab):
    """The lab run is recorded (lab.json): a resumed run's 'after' comes from the lab's checker
    (all-steps-correct, shortcuts, by k), as 'before' did; `eval --adapter RUN` alike."""
    out = small_lab / "run"
    args = ["train", "--out", str(out), "--batch-size", "2", "--group-size", "2"]
    assert CliRunner().invoke(app, [*args, "--steps", "1"]).exit_code == 0
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--steps", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 2
    for when in ("eval_before", "eval_after"):
        assert set(summary[when]["by_k"]) == {"2", "3"} and "shortcut_rate" in summary[when]
    assert "all-steps after" in result.output and "k=3" in result.output
    assert json.loads((out / "lab.json").read_text())["settings"]["k_max"] == 3
    (out / "lab.json").unlink()  # a run made before lab.json: found from its model's lab cache
    result = CliRunner().invoke(app, ["eval", "--adapter", str(out)])
    assert result.exit_code == 0, result.output
    assert "k=3" in result.stdout and "shortcut" in result.stdout
    assert "the lab's held-out set" not in result.stderr and "eval.jsonl" in result.stderr


def test_lab_is_built_once_and_cached(small_lab):
    from aropd_mlx.lab.defaults import lab_settings_for

    settings = lab_settings_for()
    assert settings.k_max == 3 and settings.spec.hidden == 32
    lab = prepare_lab(settings)
    stamp = (lab.model_path / "model.safetensors").stat().st_mtime_ns
    again = prepare_lab(settings)
    assert again.root == lab.root
    assert (again.model_path / "model.safetensors").stat().st_mtime_ns == stamp
    other = prepare_lab(LabSettings(**{**settings.__dict__, "seed": 1}))
    assert other.root != lab.root  # a different setting is a different cache entry


def test_bad_lab_override_is_one_line(small_lab, monkeypatch):
    monkeypatch.setenv("AROPD_MLX_LAB", '{"warm_stepz": 3}')
    result = CliRunner().invoke(app, ["lab", "build"])
    assert result.exit_code == 2 and "AROPD_MLX_LAB" in result.output
    monkeypatch.setenv("AROPD_MLX_LAB", '{"warm_hint_styles": ["oracle", "sideways"]}')
    result = CliRunner().invoke(app, ["lab", "build"])
    assert result.exit_code == 2 and "unknown reference style 'sideways'" in result.output
    monkeypatch.setenv("AROPD_MLX_LAB", '{"base": "lnog", "k_max": 8}')
    result = CliRunner().invoke(app, ["lab", "build"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "AROPD_MLX_LAB" in result.output and "\"base\" must name a lab" in result.output


def test_teacher_uses_its_privileged_context(tmp_path):
    """After a short warm start the oracle trace is clearly more likely under the partial and
    full views than under the student view: the self-teacher reads its privileged context."""
    from aropd_mlx.config import load_config
    from aropd_mlx.data import load_examples
    from aropd_mlx.lab.setup import view_logprobs, view_overrides
    from aropd_mlx.lab.tiny import TinySpec
    from aropd_mlx.models import ModelSettings, load_student

    settings = LabSettings(n_train=2000, k_max=3, eval_ks=(3,), n_eval_per_k=16, warm_steps=150,
                           warm_batch=32, warm_view_mix=(0.2, 0.2, 0.6), warm_student_steps=0,
                           warm_hint_styles=("oracle",),
                           spec=TinySpec(hidden=64, layers=2, heads=4, kv_heads=4,
                                         intermediate=128, max_position=256))
    lab = prepare_lab(settings, root=tmp_path / "lab")
    model, tok = load_student(ModelSettings(path=str(lab.model_path)))
    views = load_config(overrides=view_overrides(3)).views
    lp = view_logprobs(model, tok, load_examples(str(lab.eval_path)), views)
    assert lp["full"] > lp["student"] + 0.2  # measured: +0.6 nats per token
    assert lp["partial"] > lp["student"] + 0.1


def test_examples_lab_yaml_is_the_default_run(tmp_path):
    """examples/configs/lab.yaml spells out exactly what `aropd-mlx train` alone runs."""
    from pathlib import Path

    from aropd_mlx.cli.train import _lab_paths
    from aropd_mlx.config import load_config, to_dict
    from aropd_mlx.lab.defaults import lab_preset
    from aropd_mlx.lab.setup import Lab

    lab = Lab(LabSettings(), tmp_path)
    default = load_config(base=lab_preset(lab))
    yaml_path = Path(__file__).parents[1] / "examples" / "configs" / "lab.yaml"
    spelled = _lab_paths(load_config(yaml_path), lab)
    assert to_dict(spelled) == to_dict(default)


def test_the_lab_preset_has_one_source():
    """lab/defaults.py holds the lab's settings and run preset; setup.py only re-exports them."""
    import inspect
    import re

    from aropd_mlx.lab import defaults, setup

    assert setup.LabSettings is defaults.LabSettings
    assert setup.view_overrides is defaults.view_overrides
    source = inspect.getsource(setup)
    for key in ("max_prompt_tokens", "max_new_tokens", "rollout.", "views.privileged_template"):
        assert key not in source, key
    assert not re.search(r"\bclass LabSettings\b", source)


def test_the_lab_loss_covers_the_first_step(tmp_path):
    """With character tokens, the response's first tokens are the first step's operands and
    operator: the lab's loss mask keeps them (a skip of 3 let the operator drift), while the
    general default still skips the paper's 3 template tokens."""
    import mlx.core as mx

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import lab_preset
    from aropd_mlx.lab.setup import Lab
    from aropd_mlx.objective import response_mask

    cfg = load_config(base=lab_preset(Lab(LabSettings(), tmp_path)))
    mask = mx.array([[1, 1, 1, 1, 1, 0]])
    assert response_mask(mask, cfg.objective.skip_first_tokens).tolist() == [[True] * 5 + [False]]
    assert response_mask(mask, load_config().objective.skip_first_tokens).tolist() == \
        [[False, False, False, True, True, False]]


def test_a_lab_with_partial_outline_writes_outlines_and_its_runs_show_them(tmp_path):
    """LabSettings.partial_outline: the lab's train, held-out and dev problems carry task.outline,
    the run preset turns views.partial_outline on, and the partial prompt of a run then holds
    the outline's lines past its cut (the full one the oracle's); off, the lab's files, its
    key and its preset are as before the field existed."""
    from dataclasses import replace

    from aropd_mlx.config import load_config
    from aropd_mlx.data import load_examples
    from aropd_mlx.lab.defaults import LATER_FIELDS, lab_preset
    from aropd_mlx.lab.measure import dev_examples
    from aropd_mlx.lab.setup import Lab, write_data
    from aropd_mlx.lab.task import outline
    from aropd_mlx.views import render_views

    off = LabSettings(n_train=30, k_max=8, eval_ks=(8,), n_eval_per_k=3, question_last=True)
    on = replace(off, partial_outline=True)
    assert LATER_FIELDS["partial_outline"] is False and off.key() != on.key()
    for settings, name in ((off, "off"), (on, "on")):
        (tmp_path / name).mkdir()
        write_data(settings, tmp_path / name)
    for split in ("train.jsonl", "eval.jsonl"):
        plain = load_examples(str(tmp_path / "off" / split))
        withit = load_examples(str(tmp_path / "on" / split))
        assert all(e.outline is None for e in plain)
        assert [e.outline for e in withit] == [outline(e.question) for e in withit]
        assert [e.question for e in plain] == [e.question for e in withit]
    assert all(e.outline == outline(e.question) for e in dev_examples(on))
    assert "views.partial_outline" not in lab_preset(Lab(off, tmp_path / "off"))
    views = load_config(overrides=lab_preset(Lab(on, tmp_path / "on"))).views
    assert views.partial_outline
    ex = load_examples(str(tmp_path / "on" / "eval.jsonl"))[0]  # k = 8: a cut of 4 lines
    steps, rest = ex.solution.split("\n"), ex.outline.split("\n")
    texts = render_views(ex, views)
    assert texts["partial"].startswith("\n".join(steps[:4] + rest[4:]) + "\n")
    assert texts["full"].startswith(ex.solution + "\n")


def test_a_lab_with_a_student_sheet_shows_every_view_one_layout_within_its_prompt_limit(tmp_path):
    """LabSettings.student_sheet: the lab's problems carry the outline with its start digit, the
    preset turns views.student_outline on with the privileged layout, every view of a problem
    then has the same token length, the longest question's prompts fit the run's
    data.max_prompt_tokens (k_max = 64 is past the 512 of shorter labs), and the sheet needs
    question_last; off, the key is as before the field existed."""
    from dataclasses import replace

    from aropd_mlx.config import load_config
    from aropd_mlx.data import load_examples
    from aropd_mlx.errors import UserError
    from aropd_mlx.lab.defaults import LATER_FIELDS, lab_max_prompt_tokens, lab_preset
    from aropd_mlx.lab.setup import Lab, write_data
    from aropd_mlx.lab.task import outline
    from aropd_mlx.lab.tiny import TinySpec, build_tiny_model
    from aropd_mlx.views import encode_views, render_views

    off = LabSettings(n_train=20, k_min=60, k_max=64, eval_ks=(64,), n_eval_per_k=2,
                      question_last=True, partial_outline=True)
    on = replace(off, student_sheet=True)
    assert LATER_FIELDS["student_sheet"] is False and off.key() != on.key()
    with pytest.raises(UserError, match="student_sheet needs question_last"):
        replace(on, question_last=False)
    write_data(on, tmp_path)
    examples = load_examples(str(tmp_path / "eval.jsonl")) + load_examples(
        str(tmp_path / "train.jsonl"))
    assert all(e.outline == outline(e.question, with_start=True) for e in examples)
    preset = lab_preset(Lab(on, tmp_path))
    cfg = load_config(overrides=preset)
    assert cfg.views.student_outline and not load_config(
        overrides=lab_preset(Lab(off, tmp_path))).views.student_outline
    tokenizer_dir = build_tiny_model(tmp_path / "m", TinySpec(hidden=16, layers=1, heads=2,
                                                              kv_heads=2, intermediate=32))
    from mlx_lm import load

    _, tokenizer = load(str(tokenizer_dir))
    longest = max(examples, key=lambda e: len(e.question))
    ids = encode_views(tokenizer, render_views(longest, cfg.views), cfg.views)
    assert len({len(v) for v in ids.values()}) == 1
    assert 512 < len(ids["student"]) <= cfg.data.max_prompt_tokens == lab_max_prompt_tokens(64)
    assert render_views(longest, cfg.views)["student"].startswith(longest.outline + "\n")
