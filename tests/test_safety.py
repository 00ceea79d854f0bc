"""Safe loading and no leaked secrets.

- Weights, adapters and optimizer state are read and written only as safetensors (and JSON):
  no pickle anywhere in the package, no torch.load without weights_only=True.
- trust_remote_code is off unless the user passes --trust-remote-code.
- A Hub token in the environment never reaches a log, a config dump, a metrics line, or any
  file of the run directory.
"""
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import aropd_mlx
from aropd_mlx.checkpoint import list_checkpoints
from aropd_mlx.cli.main import app
from aropd_mlx.config import load_config
from aropd_mlx.models import ModelSettings
from aropd_mlx.rundir import LOCK

ROOT = Path(aropd_mlx.__file__).resolve().parent
SOURCES = sorted(list(ROOT.rglob("*.py")) + list((ROOT.parent / "cli").rglob("*.py")))
FAKE_TOKEN = "hf_aropdFAKEtoken0123456789abcdefSECRET"


def _code(path: Path) -> str:
    """Source lines without their comments."""
    return "\n".join(line.split("#")[0] for line in path.read_text().splitlines())


def test_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"checkpoint.py", "models.py", "trainer.py", "train.py"} <= names


@pytest.mark.parametrize("pattern, why", [
    (r"^\s*(import|from)\s+(c?pickle|dill|joblib|cloudpickle|shelve|marshal)\b", "a pickle-like module"),
    (r"\bpickle\.(loads?|Unpickler)\b", "unpickling"),
    (r"allow_pickle\s*=\s*True", "numpy pickle loading"),
    (r"trust_remote_code\s*(:\s*bool\s*)?=\s*True", "trust_remote_code defaulting to True"),
    (r"[\"']trust_remote_code[\"']\s*:\s*True", "trust_remote_code forced on"),
])
def test_no_unsafe_loading_in_the_package(pattern, why):
    hits = [f"{p.relative_to(ROOT.parent)}:{i}" for p in SOURCES
            for i, line in enumerate(_code(p).splitlines(), 1) if re.search(pattern, line)]
    assert not hits, f"{why}: {hits}"


def test_torch_load_only_with_weights_only():
    for p in SOURCES:
        code = _code(p)
        for m in re.finditer(r"\btorch\.load\s*\(", code):
            call = code[m.end(): code.find(")", m.end()) + 1]
            assert re.search(r"weights_only\s*=\s*True", call), f"{p}: torch.load without weights_only"


def test_trust_remote_code_is_off_by_default(monkeypatch, tiny_llama):
    assert ModelSettings().trust_remote_code is False
    assert load_config().model.trust_remote_code is False
    import mlx_lm

    from aropd_mlx.models import load_base

    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(mlx_lm, "load", fake_load)
    with pytest.raises(Exception):
        load_base(str(tiny_llama))
    assert seen["tokenizer_config"]["trust_remote_code"] is False


@pytest.fixture
def tiny_run(tmp_path, tiny_llama):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"question": f"Q:{i}", "solution": f"s{i}", "answer": str(i)})
                            + "\n" for i in range(6)))
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_llama), "--data", str(data), "--out", str(out),
            "--steps", "2", "--save-every", "1", "--batch-size", "2", "--group-size", "2",
            "--max-new-tokens", "6", "--no-eval", "--teacher", "ema"]
    return out, args


def test_run_directory_holds_only_safe_formats(tiny_run):
    out, args = tiny_run
    assert CliRunner().invoke(app, args).exit_code == 0
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file() and p.name != LOCK}  # empty
    assert suffixes <= {".safetensors", ".json", ".jsonl", ".yaml"}, suffixes
    assert {p.name for p in list_checkpoints(out)[-1].iterdir()} == {
        "adapters.safetensors", "optimizer.safetensors", "teacher.safetensors", "state.json"}


def test_a_damaged_checkpoint_is_one_line_naming_it(tiny_run):
    out, args = tiny_run
    assert CliRunner().invoke(app, args).exit_code == 0
    latest = list_checkpoints(out)[-1]
    (latest / "optimizer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--no-eval"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and "Traceback" not in result.stdout + result.stderr
    assert lines[-1].startswith("aropd-mlx: error: checkpoint file ")
    assert str(latest / "optimizer.safetensors") in lines[-1] and "delete" in lines[-1]
    shutil.rmtree(latest)  # as the message says: then it resumes from the one before
    assert CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--no-eval"]).exit_code == 0


def test_no_token_in_logs_or_run_files(tiny_run, monkeypatch):
    out, args = tiny_run
    env = {"HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN, "AROPD_MLX_QUIET": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    captured = []
    for command in (args, ["doctor", "--no-bench"], ["train", "--out", str(out), "--resume", "--no-eval"]):
        result = CliRunner().invoke(app, command, env=env)
        assert result.exit_code == 0, result.stderr
        captured.append(result.stdout + result.stderr)
    bad = [c for c in captured if FAKE_TOKEN in c or FAKE_TOKEN[3:15] in c]
    assert not bad
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 8
    leaked = [str(p) for p in files if FAKE_TOKEN.encode() in p.read_bytes()
              or FAKE_TOKEN[3:15].encode() in p.read_bytes()]
    assert not leaked, leaked
