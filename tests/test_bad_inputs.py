"""Bad input, a catalogue: every case exits non-zero with ONE line naming the place (file:line
and field, config key or flag), no traceback, and nothing half-written on disk.

The CLI runs in-process (typer's CliRunner on the real app: one import, fast); one case also
runs as a real subprocess. Runtime failures (NaN, a full disk) are injected by monkeypatching.
"""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from aropd_mlx.checkpoint import list_checkpoints, load_checkpoint
from aropd_mlx.cli.main import app

from helpers import last_error

GOOD = [{"id": f"g{i}", "question": f"Q:{i}+1", "solution": f"{i}+1={i + 1}", "answer": str(i + 1)}
        for i in range(8)]
G = json.dumps(GOOD[0])


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
                    + b"\n" for r in rows)


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    """The tiny model, and broken copies of it (each differs in one file)."""
    root = tmp_path_factory.mktemp("bad_models")

    def variant(name, file, edit):
        path = root / name
        shutil.copytree(tiny_llama, path)
        if file:
            data = json.loads((path / file).read_text())
            edit(data)
            (path / file).write_text(json.dumps(data))
        return path

    def swap_two(tok):  # same size, different mapping: a different tokenizer
        vocab = tok["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]

    out = {"good": tiny_llama,
           "no_template": variant("no_template", "tokenizer_config.json",
                                  lambda c: c.pop("chat_template")),
           "other_vocab": variant("other_vocab", "tokenizer.json", swap_two),
           "unknown_arch": variant("unknown_arch", "config.json", lambda c: c.update(
               model_type="mystery", auto_map={"AutoModelForCausalLM": "modeling_m.MForCausalLM"})),
           "custom_tokenizer": variant("custom_tokenizer", "tokenizer_config.json", lambda c: c.update(
               tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})),
           "no_weights": variant("no_weights", None, None)}
    (out["no_weights"] / "model.safetensors").unlink()
    broken = variant("broken_config", None, None)
    (broken / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    out["broken_config"] = broken
    return out


@pytest.fixture
def ws(tmp_path, models):
    """A workspace: good data, a run dir path that must not appear, and the base flags."""
    data = tmp_path / "good.jsonl"
    data.write_bytes(jsonl(*GOOD))
    out = tmp_path / "run"
    base = ["--model", models["good"], "--data", data, "--out", out, "--steps", "2",
            "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "6", "--no-eval"]
    return {"tmp": tmp_path, "data": data, "out": out, "base": base, "models": models}


def cli(*args, env=None):
    return CliRunner().invoke(app, ["train", *map(str, args)], env=env)


def one_error(result, *needles, out=None):
    """Exit 2, exactly one stderr line `aropd-mlx: error: ...` containing every needle."""
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, text
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("aropd-mlx: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    if out is not None:
        assert not Path(out).exists(), sorted(p.name for p in Path(out).rglob("*"))
    return lines[0]


# ------------------------------------------------------------------------------------ data
DATA_CASES = {  # name: (file bytes, extra flags, needles)
    "malformed_json": (jsonl(G, G, '{"question": "x",'), [], ["bad.jsonl:3", "malformed JSON"]),
    "not_an_object": (jsonl(G, '["a", "b"]'), [], ["bad.jsonl:2", "expected a JSON object, got list"]),
    "missing_question": (jsonl({"solution": "s", "answer": "1"}), [], ["bad.jsonl:1", "'question'"]),
    "empty_solution": (jsonl(G, {"question": "q", "solution": "  ", "answer": "1"}), [],
                       ["bad.jsonl:2", "'solution' is empty"]),
    "answer_is_a_list": (jsonl({"question": "q", "solution": "s", "answer": [1]}), [],
                         ["bad.jsonl:1", "'answer' must be a string, got list"]),
    "question_is_bool": (jsonl({"question": True, "solution": "s", "answer": "1"}), [],
                         ["bad.jsonl:1", "'question' must be a string, got bool"]),
    "answer_is_null": (jsonl(G, G, {"question": "q", "solution": "s", "answer": None}), [],
                       ["bad.jsonl:3", "'answer'"]),
    "not_utf8": (jsonl(G, b'{"question": "caf\xe9", "solution": "s", "answer": "1"}'), [],
                 ["bad.jsonl:2", "not UTF-8"]),
    "empty_file": (b"", [], ["bad.jsonl", "no examples"]),
    "only_blank_lines": (b"\n  \n\n", [], ["bad.jsonl", "no examples"]),
    "enormous_line": (jsonl(G, {"question": "x" * (5 << 20), "solution": "s", "answer": "1"}), [],
                      ["bad.jsonl:2", "bytes, more than"]),
    "field_twice_by_alias": (jsonl({"question": "a", "problem": "b", "solution": "s", "answer": "1"}),
                             [], ["bad.jsonl:1", "'question' given twice"]),
    "sft_without_solutions": (jsonl({"question": "q", "answer": "1"}), ["--method", "sft"],
                              ["bad.jsonl:1", "missing field 'solution'"]),
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_data_file(name, ws):
    content, flags, needles = DATA_CASES[name]
    bad = ws["tmp"] / "bad.jsonl"
    bad.write_bytes(content)
    args = [a if a != ws["data"] else bad for a in ws["base"]]
    one_error(cli(*args, *flags), *needles, out=ws["out"])


def test_bad_eval_file_names_its_line(ws):
    bad = ws["tmp"] / "heldout.jsonl"
    bad.write_bytes(jsonl(G, {"question": "q", "solution": "s"}))
    one_error(cli(*ws["base"], "--eval-data", bad), "heldout.jsonl:2", "'answer'", out=ws["out"])


@pytest.mark.parametrize("fmt, flags, needles", [
    ("parquet", [], ["bad.parquet row 1", "'answer'"]),
    ("csv", [], ["bad.csv:3", "'answer'"]),
    ("json", [], ["bad.json row 1", "'answer'"]),
    ("json", ["--columns", "question=problem"], ["bad.json row 0", "missing column 'problem'"]),
    ("json", ["--columns", "question"], ["--columns", "FIELD=COLUMN"]),
    ("json", ["--columns", "questoin=q"], ["--columns", "data.columns.questoin"]),
    ("json", ["--answer-from", "boxxed"], ["--answer-from", "data.answer_from"]),
    ("json", ["--data-split", "test"], ["bad.json", "which one"]),
])
def test_bad_rows_in_other_formats(fmt, flags, needles, ws):
    """Parquet and JSON rows are named by index (from 0), CSV rows by line."""
    rows = [GOOD[0], {"question": "q", "solution": "s", "answer": None if fmt != "csv" else ""}]
    bad = ws["tmp"] / f"bad.{fmt}"
    if fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), bad)
    elif fmt == "csv":
        bad.write_text("id,question,solution,answer\n" + "\n".join(
            ",".join(str(r.get(c, "")) for c in ("id", "question", "solution", "answer"))
            for r in rows) + "\n")
    else:
        bad.write_text(json.dumps({"train": rows, "other": rows} if "--data-split" in flags else rows))
    args = [a if a != ws["data"] else bad for a in ws["base"]]
    one_error(cli(*args, *flags), *needles, out=ws["out"])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache."""
    import huggingface_hub.constants as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


@pytest.mark.parametrize("spec, needles", [
    ("nowhere/missing.jsonl", ["data file not found", "nowhere/missing.jsonl"]),
    ("hf://datasets/aropd-test/no-such-set/train.jsonl", ["hf://datasets/aropd-test", "offline"]),
    ("hf://aropd-test/train.jsonl", ["hf://datasets/OWNER/NAME"]),
])
def test_data_that_cannot_be_found(spec, needles, ws, offline):
    args = [a if a != ws["data"] else spec for a in ws["base"]]
    one_error(cli(*args), *needles, out=ws["out"])


# ---------------------------------------------------------------------------------- config
YAML_CASES = {  # name: (yaml text, needles)
    "unknown_key": ("train:\n  steps: 2\n  stepz: 3\n", ["run.yaml:3", "unknown key 'train.stepz'"]),
    "wrong_type": ("rollout:\n  top_p: 1.0\ntrain:\n  save_every: ten\n", ["run.yaml:4", "train.save_every"]),
    "invalid_yaml": ("train:\n  steps: [1,\n", ["run.yaml:", "invalid YAML"]),
    "key_without_colon": ("train:\n  steps: 2\n  lr 0.1\n  seed: 1\n",  # the bad line is 3
                          ["run.yaml:4", "invalid YAML", "at line 3"]),
    "top_level_list": ("- 1\n- 2\n", ["run.yaml:1", "mapping"]),
    "section_is_scalar": ("train: 5\n", ["run.yaml:1", "train"]),
    "lam_nan": ("objective:\n  lam: .nan\n", ["run.yaml:2", "objective.lam"]),
    "lr_too_big": ("train:\n  learning_rate: 2.0\n", ["run.yaml:2", "train.learning_rate"]),
    "max_prompt_tokens_zero": ("data:\n  max_prompt_tokens: 0\n", ["run.yaml:2", "data.max_prompt_tokens"]),
    "partial_ratio_out_of_range": ("views:\n  partial_ratio: 1.5\n", ["run.yaml:2", "views.partial_ratio"]),
    "int_is_null": ("train:\n  keep_checkpoints: null\n", ["run.yaml:2", "train.keep_checkpoints"]),
    "privileged_without_reference": ('views:\n  privileged_template: "{question} {answer}"\n',
                                     ["run.yaml:2", "views.privileged_template", "{reference}"]),
    "response_bad_placeholder": ('views:\n  response_template: "{soluton} {answer}"\n',
                                 ["run.yaml:2", "views.response_template", "{soluton}"]),
}


@pytest.mark.parametrize("name", sorted(YAML_CASES))
def test_bad_config_file(name, ws):
    text, needles = YAML_CASES[name]
    (ws["tmp"] / "run.yaml").write_text(text)
    one_error(cli("-c", ws["tmp"] / "run.yaml", *ws["base"]), *needles, out=ws["out"])


@pytest.mark.parametrize("flags, needles", [
    (["--lam", "-1"], ["--lam", "objective.lam"]),
    (["--clip", "0"], ["--clip", "objective.clip"]),
    (["--clip", "big"], ["--clip"]),
    (["--alpha", "1.5"], ["--alpha", "objective.alpha"]),
    (["--lr", "0"], ["--lr", "train.learning_rate"]),
    (["--group-size", "0"], ["--group-size", "rollout.group_size"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "rollout.max_new_tokens"]),
    (["--steps", "0"], ["--steps", "train.steps"]),
    (["--method", "dpo"], ["--method", "train.method"]),
    (["-c", "missing.yaml"], ["config file not found", "missing.yaml"]),
])
def test_bad_flag(flags, needles, ws):
    one_error(cli(*ws["base"], *flags), *needles, out=ws["out"])


def test_flag_of_the_wrong_type_is_a_usage_error(ws):
    result = cli(*ws["base"], "--steps", "ten")
    assert result.exit_code == 2 and "Traceback" not in result.stdout + result.stderr
    assert "--steps" in result.stderr.strip().splitlines()[-1]
    assert not ws["out"].exists()


def test_resume_contradictions(ws, monkeypatch):
    monkeypatch.chdir(ws["tmp"])  # `train --resume` alone: the lab's run directory, runs/lab
    one_error(cli("--resume"), "--resume", "runs/lab/config.yaml not found")
    one_error(cli("--resume", "--out", ws["out"]), "--resume", "config.yaml not found", out=ws["out"])
    one_error(cli(*ws["base"], "--resume", "--overwrite"), "give one of them", out=ws["out"])
    assert cli(*ws["base"]).exit_code == 0
    one_error(cli("--resume", "--out", ws["out"], "--lam", "0.3"), "only --steps may change",
              "objective.lam (--lam): saved 0.8, given 0.3")
    assert not (ws["tmp"] / "runs").exists()


# ----------------------------------------------------------------------------------- model
@pytest.mark.parametrize("which, flags, needles", [
    ("missing", [], ["no config.json", "does-not-exist"]),
    ("hub_offline", [], ["aropd-test/no-such-model", "offline"]),
    ("broken_config", [], ["config.json:2", "malformed JSON"]),
    ("no_weights", [], ["cannot load model", "no_weights"]),
    ("unknown_arch", [], ["model_type 'mystery'", "auto_map", "mlx-lm"]),
    ("custom_tokenizer", [], ["--trust-remote-code", "auto_map"]),
    ("no_template", [], ["chat template", "views.use_chat_template"]),
    ("teacher_vocab", ["--teacher", "other_vocab"], ["teacher", "tokenizer differs"]),
    ("teacher_missing", ["--teacher", "/does-not-exist/teacher"], ["--teacher", "no config.json"]),
    ("teacher_typo", ["--teacher", "emaa"], ["--teacher", "frozen, ema or a model", "offline"]),
])
def test_bad_model(which, flags, needles, ws, offline):
    m = ws["models"]
    model = {"missing": "/does-not-exist/model", "hub_offline": "aropd-test/no-such-model"}.get(
        which, m.get(which, m["good"]))
    flags = [m["other_vocab"] if f == "other_vocab" else f for f in flags]
    args = [a if a != m["good"] else model for a in ws["base"]]
    result = cli(*args, *flags)
    (last_error if which == "no_template" else one_error)(result, *needles)
    assert not ws["out"].exists()


def test_trust_remote_code_is_off_unless_asked(ws, offline):
    """With the flag, the custom tokenizer code is tried (and here missing): still one line."""
    args = [a if a != ws["models"]["good"] else ws["models"]["custom_tokenizer"] for a in ws["base"]]
    line = one_error(cli(*args, "--trust-remote-code"), "cannot load model", out=ws["out"])
    assert "--trust-remote-code" not in line


# ------------------------------------------------------------------------------- run dir
@pytest.mark.parametrize("where", ["under_a_file", "is_a_file", "proc"])
def test_output_directory_not_writable(where, ws):
    (ws["tmp"] / "a_file").write_text("x")
    out = {"under_a_file": ws["tmp"] / "a_file" / "run", "is_a_file": ws["tmp"] / "a_file",
           "proc": Path("/proc/aropd-mlx-test-run")}[where]
    args = [a if a != ws["out"] else out for a in ws["base"]]
    one_error(cli(*args), str(out), "out")
    assert (ws["tmp"] / "a_file").read_text() == "x" and not Path("/proc/aropd-mlx-test-run").exists()


# -------------------------------------------------------------------------------- runtime
def test_prompts_too_long_all_is_an_error(ws):
    (ws["tmp"] / "run.yaml").write_text("data:\n  max_prompt_tokens: 5\n")
    last_error(cli("-c", ws["tmp"] / "run.yaml", *ws["base"]), "all 8 prompts",
               "data.max_prompt_tokens=5")
    assert not ws["out"].exists()


def test_prompts_too_long_some_are_skipped_and_counted(ws):
    rows = GOOD[:4] + [{**GOOD[0], "id": "long", "question": "Q:" + "9" * 400}]
    ws["data"].write_bytes(jsonl(*rows))
    (ws["tmp"] / "run.yaml").write_text("data:\n  max_prompt_tokens: 300\n")
    result = cli("-c", ws["tmp"] / "run.yaml", *ws["base"], "--steps", "3")
    assert result.exit_code == 0, result.stderr
    summary = json.loads((ws["out"] / "summary.json").read_text())
    assert summary["skipped_prompts"] == 1 and summary["steps_done"] == 3
    assert "skipped 1 prompts longer than data.max_prompt_tokens=300" in result.stderr


def _poison_loss(monkeypatch, bad_calls):
    """Make the loss NaN on the given (1-based) calls of the fused loss (one per step here)."""
    import aropd_mlx.trainer as trainer

    real, calls = trainer.fused_loss, [0]

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] in bad_calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer, "fused_loss", poisoned)


def test_nan_steps_are_skipped_then_the_run_stops(ws, monkeypatch):
    _poison_loss(monkeypatch, set(range(3, 100)))
    (ws["tmp"] / "run.yaml").write_text("train:\n  max_nonfinite_steps: 2\n  save_every: 1\n")
    last_error(cli("-c", ws["tmp"] / "run.yaml", *ws["base"], "--steps", "6"), "stopped at step 4",
               "NaN/inf", "train.max_nonfinite_steps=2")
    lines = [json.loads(l) for l in (ws["out"] / "metrics.jsonl").read_text().splitlines()]
    assert [l["finite"] for l in lines] == [True, True, False, False]
    assert [l["skipped_updates"] for l in lines] == [0, 0, 1, 2]
    good, skipped = (load_checkpoint(p)["params"] for p in list_checkpoints(ws["out"]))
    for k in good:  # the skipped update left the weights as they were, finite
        assert np.array_equal(np.array(good[k]), np.array(skipped[k])) and np.isfinite(good[k]).all()
    assert not (ws["out"] / "adapters.safetensors").exists()


def test_one_nan_step_is_skipped_and_counted(ws, monkeypatch):
    _poison_loss(monkeypatch, {2})
    assert cli(*ws["base"], "--steps", "3").exit_code == 0
    summary = json.loads((ws["out"] / "summary.json").read_text())
    assert summary["skipped_updates"] == 1 and summary["steps_done"] == 3
    saved = mx.load(str(ws["out"] / "adapters.safetensors"))
    assert all(np.isfinite(np.array(v)).all() for v in saved.values())


def _disk_full_on(monkeypatch, what):
    """Fail one write the way a full disk does (MLX raises RuntimeError, Python OSError)."""
    real_save, real_rename = mx.save_safetensors, os.rename

    def save(path, arrays, *args, **kwargs):
        if (what == "optimizer" and "step-000002" in path and "optimizer" in path) or \
                (what == "adapters" and path.endswith("adapters.tmp.safetensors")):
            raise RuntimeError("[write] Unable to write 8 bytes to file.")
        return real_save(path, arrays, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if what == "rename" and ".tmp-step-000002" in str(src):
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", save)
    monkeypatch.setattr(os, "rename", rename)


@pytest.mark.parametrize("what", ["optimizer", "rename", "adapters"])
def test_disk_full_keeps_the_previous_checkpoint(what, ws, monkeypatch):
    (ws["tmp"] / "run.yaml").write_text("train:\n  save_every: 1\n")
    steps = "2" if what == "adapters" else "3"
    with monkeypatch.context() as m:
        _disk_full_on(m, what)
        result = cli("-c", ws["tmp"] / "run.yaml", *ws["base"], "--steps", steps)
    last_error(result, "adapters" if what == "adapters" else "checkpoint", "--resume")
    found = list_checkpoints(ws["out"])
    assert [p.name for p in found] == (["step-000001", "step-000002"] if what == "adapters"
                                       else ["step-000001"])
    assert load_checkpoint(found[-1])["step"] == len(found)  # intact and loadable
    leftovers = [p.name for p in ws["out"].rglob("*") if "tmp" in p.name]
    assert leftovers == [] and not (ws["out"] / "adapters.safetensors").exists()
    resumed = cli("--out", ws["out"], "--resume", "--no-eval")
    assert resumed.exit_code == 0, resumed.stderr
    assert (ws["out"] / "adapters.safetensors").is_file()


def test_disk_full_on_metrics_is_one_line(ws, monkeypatch):
    import aropd_mlx.trainer as trainer

    def append(path, line):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(trainer, "_append_metrics", append)
    last_error(cli(*ws["base"]), "No space left on device", "metrics.jsonl")


def test_real_subprocess_one_line_no_traceback(ws):
    """The installed entry point, start to exit: bad data -> one line, exit 2, nothing written."""
    bad = ws["tmp"] / "bad.jsonl"
    bad.write_bytes(jsonl(G, "{oops"))
    args = [str(a if a != ws["data"] else bad) for a in ws["base"]]
    env = {**os.environ, "AROPD_MLX_NO_BLAS_FIX": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "aropd_mlx.cli.main", "train", *args],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"aropd-mlx: error: {bad}:2: malformed JSON")
    assert not ws["out"].exists()


def test_a_json_output_that_cannot_be_written_fails_before_the_work(tiny_llama, tmp_path, monkeypatch):
    """eval/lab measure/bench/parity `--json PATH`: a path that cannot be written is one line at
    once (the evaluation never starts), not a traceback after it; results are written whole."""
    from aropd_mlx import evaluate
    from aropd_mlx.jsonio import output_path, write_json

    (tmp_path / "file").write_text("x")
    data = tmp_path / "e.jsonl"
    data.write_bytes(jsonl(*GOOD[:2]))
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated"))
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama), "--data", str(data),
                                   "--json", str(tmp_path / "file" / "r.json")])
    assert "--json" in one_error(res, "cannot make its folder")
    res = CliRunner().invoke(app, ["eval", "--model", str(tiny_llama), "--data", str(data),
                                   "--json", str(tmp_path)])
    one_error(res, "is a directory")
    out = output_path(tmp_path / "new" / "r.json")  # a missing folder is made
    write_json(out, {"a": float("inf")})
    assert json.loads(out.read_text()) == {"a": float("inf")} and not list(out.parent.glob("*.tmp"))


def test_a_final_loss_of_zero_prints_as_zero():
    from aropd_mlx.cli.train import _or_nan

    assert _or_nan(0.0) == 0.0 and _or_nan(None) != _or_nan(None)  # nan only for "none"
