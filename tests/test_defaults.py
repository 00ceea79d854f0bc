"""One place for each default: the method list, the JSON reader, the response length limit,
the lab preset. Each test names the single source and checks the others read from it."""
import inspect
import json
import re
from pathlib import Path

import pytest

from aropd_mlx import views
from aropd_mlx.errors import UserError
from aropd_mlx.jsonio import read_json

ROOT = Path(__file__).parents[1]


def sources():
    return [p for d in ("aropd_mlx", "cli") for p in (ROOT / d).rglob("*.py")]


def test_methods_are_defined_once():
    from aropd_mlx import batches, compare, config
    from aropd_mlx.backends.torch import parity

    assert views.METHODS == ("sft", "opd", "partial-opd", "full-opd", "ar-opd")
    assert config.METHODS is views.METHODS and parity.METHODS is views.METHODS
    assert batches.METHOD_VIEWS is views.METHOD_VIEWS
    assert compare.METHODS == ("base", *views.METHODS)
    # no other copy of the list in the library (cli/train.py's list of the methods that need
    # solutions is a different list; compare.REFERENCES too)
    listed = re.compile(r'"sft",\s*"opd",\s*"partial-opd"')
    spelled = [p.relative_to(ROOT) for p in sources() if p.parts[-2] != "cli"
               and listed.search(p.read_text())]
    assert spelled == [], spelled


def test_read_json_is_the_one_reader(tmp_path):
    from aropd_mlx import compare, diagnostics, report
    from aropd_mlx.backends.torch import model

    from aropd_mlx.lab import shipped

    for module in (compare, diagnostics, report, model, shipped):
        assert module.read_json is read_json, module.__name__
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"a": 1}))
    assert read_json(good) == {"a": 1}
    assert read_json(tmp_path / "none.json", missing=None) is None
    with pytest.raises(UserError, match="none.json"):
        read_json(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(UserError, match=r"bad.json:3: malformed JSON"):
        read_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="bad.json: expected a JSON object"):
        read_json(bad)
    bad.write_bytes(b'{"a": "caf\xe9"}')
    with pytest.raises(UserError, match="bad.json: unreadable"):
        read_json(bad)


def test_broken_adapter_config_is_one_line(tmp_path):
    from aropd_mlx.backends.torch.model import read_adapter_config

    (tmp_path / "adapter_config.json").write_text('{"fine_tune_type": "lora",\n')
    with pytest.raises(UserError, match=r"adapter_config.json:\d+: malformed JSON"):
        read_adapter_config(tmp_path)


def test_max_new_tokens_default_is_one_constant():
    from aropd_mlx.evaluate import evaluate
    from aropd_mlx.rollout import MAX_NEW_TOKENS, RolloutSettings

    assert RolloutSettings().max_new_tokens == MAX_NEW_TOKENS
    assert inspect.signature(evaluate).parameters["max_new_tokens"].default == MAX_NEW_TOKENS
