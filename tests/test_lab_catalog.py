"""`aropd-mlx lab show`: which lab AROPD_MLX_LAB selects, where its model comes from, and a
recipe that AROPD_MLX_LAB takes back as the same lab."""
import json

import pytest
from typer.testing import CliRunner

from aropd_mlx.cli.main import app
from aropd_mlx.lab import catalog, defaults, shipped
from aropd_mlx.lab.defaults import NAMED_LABS, LabSettings, settings_from


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AROPD_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AROPD_MLX_LAB", raising=False)


def test_every_listed_lab_is_shipped_and_its_recipe_comes_back_as_the_same_lab():
    rows = catalog.catalog()
    assert [r["name"] for r in rows] == ["default", *NAMED_LABS]
    for row in rows:
        settings = LabSettings() if row["name"] == "default" else settings_from(NAMED_LABS[row["name"]])
        assert row["model"] == "shipped" and not row["cached"]
        assert settings_from(json.loads(json.dumps(row["recipe"]))) == settings
        assert row["key"] == settings.key()
        assert shipped.manifest(shipped.shipped_dir(None if row["name"] == "default" else row["name"]))[
            "recipe"] == row["recipe"]
    long = rows[[r["name"] for r in rows].index("long")]
    assert long["k"] == [1, 40] and long["longest_response_tokens"] == 244  # 40 lines of 6, "A:d", EOS


def test_a_custom_lab_is_not_built_until_its_model_is_in_the_cache(monkeypatch):
    monkeypatch.setenv("AROPD_MLX_LAB", '{"base": "long_distrust", "warm_lr": 0.0005}')
    name, settings = defaults.selected_lab()
    d = catalog.describe(settings, name)
    assert (d["name"], d["model"], d["cached"]) == ("custom", "not built", False)
    assert d["recipe"]["warm_lr"] == 0.0005 and d["recipe"]["anchor_distrust_share"] == 0.2
    (catalog.cache_root() / d["key"] / "model").mkdir(parents=True)
    assert catalog.describe(defaults.lab_settings_for())["model"] == "built"


def test_lab_show_prints_the_selected_lab_and_its_recipe_round_trips(monkeypatch):
    monkeypatch.setenv("AROPD_MLX_LAB", "long")
    result = CliRunner().invoke(app, ["lab", "show"])
    assert result.exit_code == 0, result.output
    key = settings_from(NAMED_LABS["long"]).key()
    assert f"key:    {key}" in result.output and "shipped in the package" in result.output
    recipe = result.output.strip().splitlines()[-1]
    monkeypatch.setenv("AROPD_MLX_LAB", recipe)  # the printed recipe, given back
    back = CliRunner().invoke(app, ["lab", "show", "--json"])
    assert back.exit_code == 0, back.output
    assert json.loads(back.output)["key"] == key and json.loads(back.output)["name"] == "custom"
    (catalog.cache_root() / key / "model").mkdir(parents=True)  # as prepare_lab installs it
    monkeypatch.setenv("AROPD_MLX_LAB", "long")
    assert "installed in the cache" in CliRunner().invoke(app, ["lab", "show"]).output
    listed = CliRunner().invoke(app, ["lab", "show", "--all"])
    assert listed.exit_code == 0 and all(name in listed.output for name in NAMED_LABS)
    monkeypatch.setenv("AROPD_MLX_LAB", '{"base": "lnog"}')
    bad = CliRunner().invoke(app, ["lab", "show"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1 and "must name a lab" in bad.output


def test_selected_lab_names_what_aropd_mlx_lab_selects(monkeypatch):
    for raw, name in [("", "default"), ("  ", "default"), (" long ", "long"),
                      ('{"base": "long", "warm_lr": 0.0005}', "custom"), ('{"k_max": 8}', "custom")]:
        monkeypatch.setenv("AROPD_MLX_LAB", raw)
        got, settings = defaults.selected_lab()
        assert got == name and settings == defaults.lab_settings_for()
    monkeypatch.setenv("AROPD_MLX_LAB", "long")
    assert defaults.selected_lab()[1] == defaults.settings_from(defaults.NAMED_LABS["long"])
    monkeypatch.delenv("AROPD_MLX_LAB")
    assert defaults.selected_lab() == ("default", defaults.LabSettings())
