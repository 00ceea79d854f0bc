"""What `compare` and the lab settings refuse before any work, in one line (duplicates, an empty
method list, λ not finite, a --set of what compare chooses per run, a lab JSON value of the wrong
kind), and a result.json cut short being run again rather than blocking the compare."""
import json

import pytest
from typer.testing import CliRunner

from aropd_mlx.cli.main import app
from aropd_mlx.compare import CompareSettings
from aropd_mlx.errors import UserError


@pytest.mark.parametrize("kw,needle", [
    (dict(methods=()), "--methods names none"),
    (dict(methods=("base", "ar-opd", "base")), "--methods names base twice"),
    (dict(lams=(0.8, 0.8)), "--lams names 0.8 twice"),
    (dict(partial_ratios=(0.5, 0.5)), "--partial-ratios names 0.5 twice"),
    (dict(lams=(float("nan"),)), "finite"),
    (dict(lams=(float("inf"),)), "finite"),
    (dict(partial_ratios=(float("nan"),)), "[0, 1]"),
])
def test_compare_settings_that_cannot_run_are_refused(kw, needle):
    with pytest.raises(UserError) as e:
        CompareSettings(**kw).validate()
    assert needle in str(e.value)
    assert CompareSettings().validate()  # the defaults pass


@pytest.mark.parametrize("key,flag", [("train.steps=1", "--steps"), ("objective.lam=0.3", "--lams"),
                                      ("out=/tmp/x", "--out"), ("train.seed=3", "--seeds")])
def test_a_set_of_what_compare_chooses_per_run_is_one_line(key, flag):
    res = CliRunner().invoke(app, ["compare", "--set", key])
    assert res.exit_code == 2 and "compare sets it for each run" in res.output and flag in res.output
    assert res.output.count("\n") == 1


@pytest.mark.parametrize("value,needle", [
    ({"k_max": "12"}, "k_max must be an integer >= 1, got '12'"),
    ({"k_max": 12.5}, "k_max must be an integer"),
    ({"warm_hint_styles": [1]}, "warm_hint_styles must be a list, each a string"),
    ({"eval_ks": [None]}, "eval_ks must be a list, each an integer"),
    ({"n_eval_per_k": -3}, "n_eval_per_k must be an integer >= 1"),
    ({"k_min": 5, "k_max": 2}, "1 <= k_min <= k_max"),
    ({"warm_view_mix": [1]}, "warm_view_mix is three shares"),
    ({"spec": {"hidden": "x"}}, "spec: hidden must be an integer"),
    ({"warm_lr": float("nan")}, "warm_lr must be a number"),
])
def test_a_lab_json_value_of_the_wrong_kind_is_one_line(value, needle, monkeypatch, tmp_path):
    monkeypatch.setenv("AROPD_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AROPD_MLX_LAB", json.dumps(value))
    res = CliRunner().invoke(app, ["lab", "show"])
    assert res.exit_code == 2 and needle in res.output, res.output
    assert "Traceback" not in res.output and res.output.count("\n") == 1


def test_a_result_json_cut_short_is_run_again(tmp_path, monkeypatch):
    """A result.json that cannot be read (a crash mid-write, before writes were atomic) means
    the run is not finished: it is made again, not an error that blocks the whole compare."""
    from aropd_mlx import compare

    run_dir = tmp_path / "runs" / "base" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text('{"spec": {"variant": ')
    made = []
    monkeypatch.setattr(compare.shutil, "rmtree", lambda p, **k: made.append(p))

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(compare, "run_overrides", stop)
    lab = type("Lab", (), {"settings": type("S", (), {"key": lambda self: "k"})()})()
    with pytest.raises(Stop):  # past the reuse check: about to run again
        compare.run_one(lab, compare.Variant("base", "base"), 0,
                        CompareSettings(out=str(tmp_path)), {}, lambda line: None)
    assert made == [run_dir]


@pytest.mark.parametrize("name,says", [("train_command", "resume with --resume"),
                                       ("compare_command", "finished runs are reused"),
                                       ("eval_command", "")])
def test_ctrl_c_says_how_to_go_on_for_that_command(name, says, capsys):
    """Only `train` has --resume; compare goes on by running it again."""
    import typer

    from aropd_mlx.cli.common import handles_errors

    def interrupted():
        raise KeyboardInterrupt

    interrupted.__name__ = name
    with pytest.raises(typer.Exit):
        handles_errors(interrupted)()
    err = capsys.readouterr().err
    assert err.startswith("aropd-mlx: interrupted") and says in err
    assert ("--resume" in err) == (name == "train_command")
