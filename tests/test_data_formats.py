"""Data as it is published: JSONL, JSON, Parquet and CSV files, folders and Hub datasets with
splits, column mapping, answers derived from solutions, chat and TRL rows; bad rows named by
file, row and field. Nothing is downloaded: the Hub is a local folder behind monkeypatched
huggingface_hub functions.

Parquet files are written with pyarrow rather than the `datasets` library: pyarrow is what
reads them (the `data` extra), it writes a file in one call with no cache directory or
network, and `datasets` would add a large dependency (and pyarrow under it anyway) to write
a few rows.
"""
import gzip
import json
from pathlib import Path

import pytest

from aropd_mlx.config import DataSettings, load_config
from aropd_mlx.data import load_examples, train_and_eval
from aropd_mlx.errors import UserError

from helpers import fake_hub

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROWS = [{"question": f"What is {i} + 1?", "solution": f"{i} + 1 = {i + 1}", "answer": str(i + 1)}
        for i in range(4)]
ALL = ("question", "solution", "answer")


def write(path: Path, rows, fmt: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "json-data":
        path.write_text(json.dumps({"data": rows}))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        cols = list(rows[0])
        lines = [",".join(cols)] + [",".join(json.dumps(str(r[c])) for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl.gz":
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return path


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "json-data": ".json", "parquet": ".parquet",
          "csv": ".csv", "jsonl.gz": ".jsonl.gz"}


@pytest.mark.parametrize("fmt", sorted(SUFFIX))
def test_every_format_reads_the_same_examples(fmt, tmp_path):
    path = write(tmp_path / f"d{SUFFIX[fmt]}", ROWS, fmt)
    got = load_examples(str(path), need=ALL)
    assert [(e.question, e.solution, e.answer) for e in got] == [
        (r["question"], r["solution"], r["answer"]) for r in ROWS]
    assert [e.id for e in got] == ["0", "1", "2", "3"]


def test_json_lines_under_a_json_name_and_json_by_split(tmp_path):
    lines = write(tmp_path / "lines.json", ROWS, "jsonl")  # the Hub often names JSONL .json
    assert len(load_examples(str(lines), need=ALL)) == 4
    by_split = tmp_path / "splits.json"
    by_split.write_text(json.dumps({"train": ROWS[:3], "test": ROWS[3:]}))
    assert len(load_examples(str(by_split), need=ALL)) == 3
    assert [e.answer for e in load_examples(str(by_split), need=ALL, split="test")] == ["4"]
    assert [e.answer for e in load_examples(str(by_split), need=ALL, split=None)] == ["4"]


# ------------------------------------------------------------------------ bad rows, named
BAD = {  # name: (format, rows, needles)
    "parquet_missing_field": ("parquet", [ROWS[0], {"question": "q", "solution": "s", "answer": None}],
                              ["d.parquet row 1", "'answer'"]),
    "parquet_list_answer": ("parquet", [{"question": "q", "solution": "s", "answer": [1]}],
                            ["d.parquet row 0", "'answer' must be a string, got list"]),
    "json_not_an_object": ("json", [ROWS[0], ROWS[1], "text"],
                           ["d.json row 2", "expected a JSON object, got str"]),
    "json_empty_solution": ("json", [ROWS[0], {"question": "q", "solution": " ", "answer": "1"}],
                            ["d.json row 1", "'solution' is empty"]),
    "csv_empty_answer": ("csv", [ROWS[0], ROWS[1], {**ROWS[2], "answer": ""}],
                         ["d.csv:4", "'answer' is empty"]),
    "csv_missing_question": ("csv", [{"problemo": "q", "solution": "s", "answer": "1"}],
                             ["d.csv:2", "missing field 'question'", "problemo"]),
    "chat_two_user_turns": ("jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                    {"role": "user", "content": "b"}]}],
                            ["d.jsonl:1", "'messages'", "more than one user turn"]),
    "chat_unknown_role": ("jsonl", [{"messages": [{"role": "tool", "content": "a"}]}],
                          ["d.jsonl:1", "'messages'", "'tool'"]),
    "text_row": ("jsonl", [{"text": "plain text"}], ["d.jsonl:1", "'question'", "'text' row"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_row_names_file_row_and_field(name, tmp_path):
    fmt, rows, needles = BAD[name]
    path = write(tmp_path / f"d{SUFFIX[fmt]}", rows, fmt)
    with pytest.raises(UserError) as e:
        load_examples(str(path), need=ALL)
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_csv_rows_spanning_lines_are_named_by_their_first_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('question,solution,answer\n"two\nlines",s,1\nq,s,\n')
    with pytest.raises(UserError, match=r"d\.csv:4: field 'answer' is empty"):
        load_examples(str(path), need=ALL)


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="d.parquet: not a readable Parquet file"):
        load_examples(str(path))


# ------------------------------------------------------------- columns, answers, chat, TRL
NUMINA = [{"problem": "Find x if 2x = 4.", "solution": "Divide by 2: $x = \\boxed{2}$.",
           "source": "synthetic", "messages": [{"role": "user", "content": "ignored"},
                                                {"role": "assistant", "content": "ignored"}]},
          {"problem": "Compute 3 * 3.", "solution": "It is $\\boxed{\\frac{18}{2}}$.",
           "source": "synthetic", "messages": []},
          {"problem": "Prove it.", "solution": "A proof with no boxed answer.", "source": "x",
           "messages": []}]


def test_columns_and_answer_from_boxed_numinamath_style(tmp_path):
    path = write(tmp_path / "numina.parquet", NUMINA, "parquet")
    got = load_examples(str(path), need=ALL, columns={"question": "problem", "solution": "solution"},
                        answer_from="boxed")
    # the third row has no \boxed{}: skipped and counted (a note), not an error
    assert [(e.question, e.answer) for e in got] == [("Find x if 2x = 4.", "2"),
                                                     ("Compute 3 * 3.", "\\frac{18}{2}")]
    # without the rule: the missing answer is an error that says how to derive it
    with pytest.raises(UserError, match=r"numina.parquet row 0: missing field 'answer'.*answer_from"):
        load_examples(str(path), need=ALL)
    # the answer is not needed (opd): rows without one are kept
    assert len(load_examples(str(path), answer_from="boxed")) == 3


def test_answer_rules_gsm8k_and_last_number(tmp_path):
    path = write(tmp_path / "gsm.jsonl", [{"question": "q", "answer_text": "3 + 4 = 7\n#### 7",
                                           "n": "Half of 10 is 5, then 5.5"}], "jsonl")
    ex = load_examples(str(path), need=ALL, columns={"solution": "answer_text"}, answer_from="####")
    assert ex[0].answer == "7" and ex[0].solution == "3 + 4 = 7\n#### 7"
    ex = load_examples(str(path), need=ALL, columns={"solution": "n"}, answer_from="last_number")
    assert ex[0].answer == "5.5"


def test_a_mapped_column_missing_is_named(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS, "jsonl")
    with pytest.raises(UserError, match=r"d.jsonl:1: missing column 'problem' \(data.columns.question"):
        load_examples(str(path), columns={"question": "problem"})


def test_mapped_column_wins_over_an_alias_and_id_mapping(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"prompt": "not this", "q": "this", "solution": "s",
                                          "answer": "1", "uid": "x7"}], "jsonl")
    ex = load_examples(str(path), need=ALL, columns={"question": "q", "id": "uid"})[0]
    assert (ex.question, ex.id) == ("this", "x7")


def test_chat_rows(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "What is 2 + 2?"},
                          {"role": "assistant", "content": "2 + 2 = 4. \\boxed{4}"}]}]
    path = write(tmp_path / "chat.parquet", rows, "parquet")  # list<struct> in Parquet
    ex = load_examples(str(path), need=ALL, answer_from="boxed")[0]
    assert (ex.question, ex.solution, ex.answer) == ("What is 2 + 2?", "2 + 2 = 4. \\boxed{4}", "4")
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 3 + 3?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "6. "},
                                                            {"type": "text", "text": "\\boxed{6}"}]}]},
            {"messages": [{"role": "user", "content": "Only a question"}], "answer": "1"}]
    path = write(tmp_path / "chat.jsonl", rows, "jsonl")  # content as a list of text parts
    got = load_examples(str(path), answer_from="boxed")
    assert (got[0].question, got[0].solution, got[0].answer) == ("What is 3 + 3?", "6. \\boxed{6}", "6")
    assert got[1].question == "Only a question" and got[1].solution is None and got[1].answer == "1"
    with pytest.raises(UserError, match=r"chat.jsonl:2: missing field 'solution'"):
        load_examples(str(path), need=ALL, answer_from="boxed")


def test_trl_rows(tmp_path):
    rows = [  # SDFT/OPSD: prompt + privileged_context (the teacher-only text) -> solution
        {"prompt": "Solve 2+3.", "privileged_context": "2+3 = 5, so \\boxed{5}", "completion": "no"},
        # conversational prompt-completion (SFT-style): completion -> solution
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "Solve 1+1."}],
         "completion": [{"role": "assistant", "content": "1+1 = 2 #### 2"}]},
        # a prompt only (TRL's prompt-only type) with an answer column: fine for opd
        {"prompt": "Solve 4+4.", "answer": "8"}]
    path = write(tmp_path / "trl.jsonl", rows, "jsonl")
    got = load_examples(str(path), answer_from="auto")
    assert [(e.question, e.solution, e.answer) for e in got] == [
        ("Solve 2+3.", "2+3 = 5, so \\boxed{5}", "5"), ("Solve 1+1.", "1+1 = 2 #### 2", "2"),
        ("Solve 4+4.", None, "8")]


# ------------------------------------------------------------------- folders and the Hub
def make_repo(root: Path) -> Path:
    write(root / "data" / "train-00000-of-00002.parquet", ROWS[:2], "parquet")
    write(root / "data" / "train-00001-of-00002.parquet", ROWS[2:3], "parquet")
    write(root / "data" / "test-00000-of-00001.parquet", ROWS[3:], "parquet")
    (root / "README.md").write_text("# a dataset card\n")
    write(root / ".cache" / "train.jsonl", [{"junk": 1}], "jsonl")  # hidden: never read
    return root


def test_a_folder_by_split(tmp_path):
    repo = str(make_repo(tmp_path / "repo"))
    assert [e.answer for e in load_examples(repo, need=ALL)] == ["1", "2", "3"]
    assert [e.answer for e in load_examples(repo, need=ALL, split="test")] == ["4"]
    assert [e.answer for e in load_examples(repo, need=ALL, split=None)] == ["4"]  # eval: test
    with pytest.raises(UserError, match=r"no 'validation' split \(splits here: test, train"):
        load_examples(repo, split="validation")


def test_mlx_lm_folder_and_an_unsplit_folder(tmp_path):
    write(tmp_path / "mlx" / "train.jsonl", ROWS[:3], "jsonl")
    write(tmp_path / "mlx" / "valid.jsonl", ROWS[3:], "jsonl")
    data = DataSettings(train=str(tmp_path / "mlx"), eval=str(tmp_path / "mlx"))
    train, held = train_and_eval(data, ALL)
    assert len(train) == 3 and [e.answer for e in held] == ["4"]  # valid = validation
    write(tmp_path / "flat" / "a.csv", ROWS[:2], "csv")
    write(tmp_path / "flat" / "b.jsonl", ROWS[2:], "jsonl")
    assert len(load_examples(str(tmp_path / "flat"), need=ALL)) == 4  # no split names: one split


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub's list/download functions serving a local folder as OWNER/NAME."""
    return fake_hub(monkeypatch, make_repo(tmp_path / "hub-repo"))


def test_hub_dataset_repo_folder_and_file(hub):
    got = load_examples("hf://datasets/owner/name", need=ALL)
    assert [e.answer for e in got] == ["1", "2", "3"]
    assert not [c for c in hub if c[:2] == ("download", "data/test-00000-of-00001.parquet")]
    assert [e.answer for e in load_examples("hf://datasets/owner/name/data", need=ALL,
                                            split="test")] == ["4"]
    one = "hf://datasets/owner/name/data/test-00000-of-00001.parquet"
    assert [e.answer for e in load_examples(one, need=ALL)] == ["4"]
    assert ("list", "v1") not in hub
    load_examples("hf://datasets/owner/name@v1", need=ALL)
    assert ("list", "v1") in hub


def test_hub_errors_name_the_hub_file_and_row(hub, tmp_path):
    with pytest.raises(UserError, match=r"hf://datasets/owner/name/data/train-00000-of-00002"
                                        r"\.parquet row 0: missing column 'problem'"):
        load_examples("hf://datasets/owner/name", columns={"question": "problem"})
    with pytest.raises(UserError, match="the dataset has no file or folder 'nope'"):
        load_examples("hf://datasets/owner/name/nope")
    with pytest.raises(UserError, match="cannot fetch .*missing.jsonl: the dataset has no such file"):
        load_examples("hf://datasets/owner/name/missing.jsonl")


def test_config_and_flags_carry_the_data_settings(tmp_path, hub):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  train: hf://datasets/owner/name\n  eval: hf://datasets/owner/name\n"
                   "  columns:\n    question: question\n  answer_from: boxed\n")
    c = load_config(cfg)
    assert c.data.columns == {"question": "question"} and c.data.answer_from == "boxed"
    train, held = train_and_eval(c.data, ALL)
    assert len(train) == 3 and len(held) == 1
    cfg.write_text("data:\n  columns:\n    questoin: problem\n")
    with pytest.raises(UserError, match=r"run.yaml:3: data.columns.questoin: unknown field"):
        load_config(cfg)
    cfg.write_text("data:\n  answer_from: boxxed\n")
    with pytest.raises(UserError, match=r"run.yaml:2: data.answer_from must be one of"):
        load_config(cfg)


def test_numinamath_recipe_reads_numina_style_rows(tmp_path):
    recipe = Path(__file__).parent.parent / "examples" / "configs" / "numinamath.yaml"
    path = write(tmp_path / "numina.parquet", NUMINA, "parquet")
    cfg = load_config(recipe, overrides={"data.train": str(path), "data.eval": str(path)})
    train, held = train_and_eval(cfg.data, ALL)
    assert [e.answer for e in train] == ["2", "\\frac{18}{2}"] == [e.answer for e in held]
