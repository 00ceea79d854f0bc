"""Data sources, the cases the Hub's layouts raise: split names as push_to_hub writes them
(train_sft-00000-of-00001), config folders (gsm8k's main/ and socratic/), a split that is not
there; broken .gz files, NaN cells, a byte order mark, hf:// revisions, one-object .json files.
Nothing is downloaded: the Hub is a local folder behind monkeypatched huggingface_hub functions.
"""
import gzip
import json
from pathlib import Path

import pytest

from aropd_mlx.data import load_examples
from aropd_mlx.errors import UserError

from helpers import fake_hub


def rows(tag: str, n: int = 2) -> list[dict]:
    return [{"question": f"{tag} {i}", "solution": f"s \\boxed{{{i}}}", "answer": str(i)}
            for i in range(n)]


def write_tree(root: Path, files: dict[str, list[dict]]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
    return root


def questions(spec, **kw) -> list[str]:
    return [e.question for e in load_examples(str(spec), **kw)]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """serve(files): huggingface_hub's list/download functions serving them as owner/name;
    returns the calls made, with the revision asked."""
    def serve(files: dict[str, list[dict]]) -> list:
        return fake_hub(monkeypatch, write_tree(tmp_path / "hub-repo", files))

    return serve


# ------------------------------------------------------------------------------ splits
def test_split_names_of_their_own_are_not_merged(tmp_path):
    """ultrachat_200k's layout: train_sft/test_sft shards are two splits, neither is 'train'."""
    repo = write_tree(tmp_path / "sft", {"data/train_sft-00000-of-00001.jsonl": rows("TRAIN"),
                                         "data/test_sft-00000-of-00001.jsonl": rows("TEST")})
    assert questions(repo, split="train_sft") == ["TRAIN 0", "TRAIN 1"]
    assert questions(repo, split="test_sft") == ["TEST 0", "TEST 1"]
    for split in ("train", None, "nope"):
        with pytest.raises(UserError, match=r"sft: no .*split \(splits here: test_sft, train_sft"):
            load_examples(str(repo), split=split)
    # unsharded, the Hub's keyword rule: a standard split named as a word of the file name
    flat = write_tree(tmp_path / "flat", {"train_sft.jsonl": rows("TRAIN"),
                                          "gsm8k-test.jsonl": rows("TEST"), "contest.jsonl": rows("C")})
    assert questions(flat, split="train") == ["TRAIN 0", "TRAIN 1"]
    assert questions(flat, split=None) == ["TEST 0", "TEST 1"]  # eval: validation, else test


def test_a_split_that_is_not_there_is_an_error_even_without_split_names(tmp_path):
    flat = write_tree(tmp_path / "flat", {"a.jsonl": rows("A"), "b.jsonl": rows("B")})
    assert questions(flat) == ["A 0", "A 1", "B 0", "B 1"]  # no split names: one split, train
    assert len(questions(flat, split=None)) == 4  # an eval folder with no split names: all of it
    with pytest.raises(UserError, match=r"flat: no 'nope' split \(no file or folder here names"):
        load_examples(str(flat), split="nope")


def test_config_folders_must_be_chosen(hub):
    """gsm8k's layout: main/ and socratic/, each with its train and test shards."""
    hub({f"{config}/{split}-00000-of-00001.jsonl": rows(f"{config}-{split}")
         for config in ("main", "socratic") for split in ("train", "test")} | {"README.md": []})
    with pytest.raises(UserError) as e:
        load_examples("hf://datasets/owner/name")
    msg = str(e.value)
    assert "\n" not in msg
    assert "'train' split is in 2 folders (configs): main, socratic" in msg
    assert "hf://datasets/owner/name/main" in msg
    with pytest.raises(UserError, match="'test' split is in 2 folders"):
        load_examples("hf://datasets/owner/name", split=None)
    assert questions("hf://datasets/owner/name/main") == ["main-train 0", "main-train 1"]
    assert questions("hf://datasets/owner/name/socratic", split=None) == [
        "socratic-test 0", "socratic-test 1"]
    with pytest.raises(UserError, match=r"no 'nope' split \(splits here: test, train"):
        load_examples("hf://datasets/owner/name/main", split="nope")


@pytest.mark.parametrize("files, want", [
    ({"data/train-00000-of-00002.jsonl": rows("T"), "data/train-00001-of-00002.jsonl": rows("U"),
      "data/test-00000-of-00001.jsonl": rows("X")}, ["T 0", "T 1", "U 0", "U 1"]),
    ({"train.jsonl": rows("T"), "test.jsonl": rows("X")}, ["T 0", "T 1"]),
    ({"gsm8k.jsonl": rows("T")}, ["T 0", "T 1"]),  # one file, no split in its name
    ({"train/part-00000-of-00002.jsonl": rows("T"), "train/part-00001-of-00002.jsonl": rows("U"),
      "test/part-00000-of-00001.jsonl": rows("X")}, ["T 0", "T 1", "U 0", "U 1"]),
])
def test_the_hubs_usual_layouts_still_read(hub, files, want):
    hub(files)
    assert questions("hf://datasets/owner/name") == want


# ------------------------------------------------------------------------- hf:// revisions
@pytest.mark.parametrize("rev, want", [("@refs%2Fconvert%2Fparquet", "refs/convert/parquet"),
                                       ("@main", "main"), ("", None)])
def test_the_revision_is_decoded_once(hub, rev, want):
    calls = hub({"data/train-00000-of-00001.jsonl": rows("T")})
    assert questions(f"hf://datasets/owner/name{rev}/data/train-00000-of-00001.jsonl") == [
        "T 0", "T 1"]
    assert calls == [("download", "data/train-00000-of-00001.jsonl", want)]
    calls.clear()
    assert questions(f"hf://datasets/owner/name{rev}") == ["T 0", "T 1"]
    assert calls == [("list", want), ("download", "data/train-00000-of-00001.jsonl", want)]


# ---------------------------------------------------------------------------- broken .gz
def gz_lines(n: int) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows("q", n)).encode())


@pytest.mark.parametrize("name, data, needles", [
    ("d.jsonl.gz", gz_lines(200)[:-40], ["d.jsonl.gz: not a readable .gz file after line",
                                         "truncated or not gzip"]),
    ("d.json.gz", gz_lines(200)[:-40], ["d.json.gz: not a readable .gz file: truncated"]),
    ("d.csv.gz", gzip.compress(b"question,answer\n" + b"q,1\n" * 500)[:-30],
     ["d.csv.gz: not a readable .gz file"]),
    ("d.jsonl.gz", b'{"question": "not gzip"}\n', ["d.jsonl.gz: not a readable .gz file:",
                                                  "Not a gzipped file"]),
    ("d.json.gz", gz_lines(3)[:10] + b"\x00" * 40, ["d.json.gz: not a readable .gz file"]),
], ids=["truncated-jsonl", "truncated-json", "truncated-csv", "not-gzip", "corrupt"])
def test_a_broken_gz_file_is_one_line_naming_it(tmp_path, name, data, needles):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UserError) as e:
        load_examples(str(path))
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_a_truncated_jsonl_gz_names_the_last_line_read(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gz_lines(200)[:-40])
    with pytest.raises(UserError, match=r"after line (\d+)") as e:
        load_examples(str(path))
    last = int(str(e.value).split("after line ")[1].split(":")[0])
    assert 0 < last < 200


# ------------------------------------------------------------------------- NaN, BOM, .json
def test_a_nan_answer_is_missing_not_the_text_nan(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "solution": "x = \\\\boxed{5}", "answer": NaN}\n'
                    '{"question": "r", "answer": Infinity}\n')
    got = load_examples(str(path), answer_from="boxed")
    assert [(e.question, e.answer) for e in got] == [("q", "5"), ("r", None)]
    with pytest.raises(UserError, match=r"d.jsonl:1: missing field 'answer'"):
        load_examples(str(path), need=("question", "answer"))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["a", "b"], "answer": [3.5, float("nan")]}),
                   tmp_path / "d.parquet")
    assert [e.answer for e in load_examples(str(tmp_path / "d.parquet"))] == ["3.5", None]


def test_a_float_answer_is_written_as_a_person_writes_it(tmp_path):
    """A JSON number answer in Python's shortest form could be scientific (1e-05), which no
    response ('0.00001') matches: it is read positionally; 3.0 stays 3.0 (it matches 3)."""
    from aropd_mlx.evaluate import answers_match

    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "a", "answer": 1e-05}\n{"question": "b", "answer": 1e16}\n'
                    '{"question": "c", "answer": 3.0}\n{"question": "d", "answer": 42}\n')
    answers = [e.answer for e in load_examples(str(path))]
    assert answers == ["0.00001", "10000000000000000", "3.0", "42"]
    assert answers_match("0.00001", answers[0]) and answers_match("3", answers[2])


@pytest.mark.parametrize("name", ["d.jsonl", "d.json"])
def test_a_byte_order_mark_on_json_lines(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows("q")).encode())
    assert questions(path) == ["q 0", "q 1"]


def test_one_object_json_with_list_fields_is_one_row(tmp_path):
    chat = {"messages": [{"role": "user", "content": "2 + 2?"},
                         {"role": "assistant", "content": "\\boxed{4}"}], "tags": ["easy"]}
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    got = load_examples(str(tmp_path / "chat.json"), answer_from="boxed")
    assert [(e.question, e.solution, e.answer) for e in got] == [("2 + 2?", "\\boxed{4}", "4")]
    (tmp_path / "tags.json").write_text(json.dumps({"question": "q", "answer": "1", "tags": []}))
    assert questions(tmp_path / "tags.json") == ["q"]
    # lists of rows are still splits, an empty one included
    (tmp_path / "splits.json").write_text(json.dumps({"train": [], "test": rows("X", 1)}))
    assert questions(tmp_path / "splits.json", split="test") == ["X 0"]
    with pytest.raises(UserError, match="no examples"):
        load_examples(str(tmp_path / "splits.json"))
