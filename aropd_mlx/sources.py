"""Where examples come from: the files of a `--data` spec (a file, a folder, a Hub dataset
`hf://datasets/OWNER/NAME[@REV][/path]`, one split of it) and their rows, format by format
(JSONL, JSON, Parquet, CSV, `.gz`). data.py turns rows into examples; its docstring has the
formats and the split naming rules.

    for path, shown in data_files("hf://datasets/AI-MO/NuminaMath-CoT", split="train"):
        for where, row in read_rows(path, shown): ...
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote

from aropd_mlx.errors import UserError

MAX_LINE_BYTES = 1 << 22  # 4 MiB: a line past this is a broken file, not an example
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")
# split names as the Hub reads them from file and folder names (canonical: the first)
SPLIT_NAMES = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}
EVAL_SPLITS = ("validation", "test")  # data.eval's split when none is given: the first found


def _suffix(name: str) -> str:
    low = name.lower()
    for suffix in DATA_SUFFIXES:
        if low.endswith(suffix):
            return suffix
    return ""


def _canonical_split(name: str) -> str:
    low = name.lower()
    for canon, names in SPLIT_NAMES.items():
        if low in names:
            return canon
    return low


def _split_tokens(rel: str) -> list[str]:
    """Where a split may be named, most specific first: the file name's first word
    (train-00000-of-00002.parquet, train_0.jsonl, test.csv), then the folders, deepest first."""
    *dirs, name = rel.split("/")
    word = re.split(r"[-.]", name, maxsplit=1)[0]
    return [word, re.sub(r"[-_ ]?\d+$", "", word), *reversed(dirs)]


def _split_and_config(rel: str) -> tuple[str | None, str]:
    """(the split `rel` is a file of, None when nothing names one; the folder above what named
    it: the config, '' at the top). In this order: a standard name (train-00000-of-00002.parquet,
    train.jsonl, train_0.jsonl, valid.jsonl), a folder named by one (train/, data/test/), a
    shard's own split name (data/train_sft-00000-of-00001.parquet: 'train_sft', as the Hub
    reads push_to_hub's files), a standard name as a word of the file name (gsm8k_test.jsonl,
    test_sft.jsonl: 'test', the Hub's keyword rule)."""
    *dirs, name = rel.split("/")
    here, stem = "/".join(dirs), name[: len(name) - len(_suffix(name))]
    shard = re.match(r"(.+?)-\d{5}-of-\d{5}(?![0-9])", stem)
    word = re.split(r"[-.]", stem, maxsplit=1)[0]
    for token in (word, re.sub(r"[-_ ]?\d+$", "", word)):
        if _canonical_split(token) in SPLIT_NAMES:
            return _canonical_split(token), here
    for i in range(len(dirs) - 1, -1, -1):
        if _canonical_split(dirs[i]) in SPLIT_NAMES:
            return _canonical_split(dirs[i]), "/".join(dirs[:i])
    if shard:
        return _canonical_split(shard.group(1)), here
    for token in re.split(r"[^a-zA-Z]+", stem):  # gsm8k_test.jsonl, test_sft.json: the Hub's
        if _canonical_split(token) in SPLIT_NAMES:  # keyword rule reads the standard split
            return _canonical_split(token), here
    return None, here


def file_split(rel: str) -> str | None:
    return _split_and_config(rel)[0]


def _select_split(files: list[str], split: str | None, shown: str) -> list[str]:
    """The files (paths relative to the folder) of `split` (None: the first of EVAL_SPLITS).
    Files with no split name are all one split, train (the Hub's rule); a split in several
    config folders (gsm8k's main/ and socratic/) is an error until one is named in the path."""
    files = sorted(f for f in files if _suffix(f)  # hidden folders (.cache, .git): never data
                   and not any(part.startswith(".") for part in f.split("/")))
    if not files:
        raise UserError(f"{shown}: no data files (.jsonl, .json, .parquet, .csv) there")
    found = {f: _split_and_config(f) for f in files}
    have = sorted({s for s, _ in found.values() if s})
    if not have:  # no split names: every file is the one split
        if split is None or _canonical_split(split) == "train":
            return files
        chosen = [f for f in files if split in _split_tokens(f)]  # a folder of its own (cn_k12/)
        if chosen:
            return chosen
        raise UserError(f"{shown}: no {split!r} split (no file or folder here names a split: "
                        "they are all one split, 'train'; choose it with data.split / --data-split)")
    wants = [split] if split is not None else list(EVAL_SPLITS)
    for want in wants:
        canon = _canonical_split(want)
        chosen = [f for f in files if found[f][0] == canon]
        if not chosen and canon not in SPLIT_NAMES:  # a split of its own name (cn_k12/)
            chosen = [f for f in files if found[f][0] is None and want in _split_tokens(f)]
        if chosen:
            configs = sorted({found[f][1] for f in chosen})
            if len(configs) > 1:
                named = [c for c in configs if c] or configs
                raise UserError(
                    f"{shown}: the {canon!r} split is in {len(configs)} folders (configs): "
                    f"{', '.join(c or '(top)' for c in configs)}; choose one by naming its folder, "
                    f"e.g. {shown.rstrip('/')}/{named[0]}")
            return chosen
    asked = repr(split) if split is not None else "validation or test"
    raise UserError(f"{shown}: no {asked} split (splits here: {', '.join(have)}; "
                    "choose one with data.split / --data-split)")


def _hub_reason(e: Exception) -> str:
    kind = type(e).__name__
    reason = str(e).strip().splitlines()[0] if str(e).strip() else kind
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or isinstance(
            e, (ConnectionError, OSError)) and "offline" in reason.lower():
        return "not in the local Hugging Face cache and the Hub cannot be reached (offline)"
    if kind in ("RepositoryNotFoundError", "GatedRepoError"):
        return f"no such dataset on the Hub, or it is private/gated ({kind})"
    if kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return "the dataset has no such file"
    return reason


def _hub_files(spec: str, split: str | None) -> list[tuple[Path, str]]:
    """(local path, the name errors show) of each file `hf://datasets/OWNER/NAME[@REV][/path]`
    names: one file, or the files of `split` under a folder or the whole repository."""
    import huggingface_hub as hub

    parts = spec[len("hf://"):].split("/")
    if len(parts) < 3 or parts[0] != "datasets" or not parts[1] or not parts[2]:
        raise UserError("a Hub data path looks like hf://datasets/OWNER/NAME (the whole dataset) "
                        f"or hf://datasets/OWNER/NAME/path/file.parquet, got {spec}")
    name, _, revision = parts[2].partition("@")
    revision = unquote(revision)  # the hf:// form of a ref: @refs%2Fconvert%2Fparquet
    repo_id, inner = f"{parts[1]}/{name}", "/".join(p for p in parts[3:] if p)
    base = f"hf://datasets/{parts[1]}/{parts[2]}"

    def download(filename: str) -> Path:
        return Path(hub.hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset",
                                        revision=revision or None))

    try:
        if _suffix(inner):  # one file: fetched (or read from the cache) without a listing
            return [(download(inner), spec)]
        try:
            listing = hub.list_repo_files(repo_id, repo_type="dataset", revision=revision or None)
        except Exception as e:  # offline: what an earlier run downloaded, if anything
            try:
                local = Path(hub.snapshot_download(repo_id, repo_type="dataset",
                                                   revision=revision or None,
                                                   local_files_only=True))
            except Exception:
                raise e from None
            folder = local / inner if inner else local
            if not folder.is_dir():
                raise e from None
            return [(folder / rel, f"{base}/{inner + '/' if inner else ''}{rel}")
                    for rel in _select_split(list_folder(folder), split, spec)]
        prefix = inner + "/" if inner else ""
        under = [f[len(prefix):] for f in listing if f.startswith(prefix)]
        if not under:
            raise UserError(f"cannot fetch {spec}: the dataset has no file or folder {inner!r}")
        return [(download(prefix + rel), f"{base}/{prefix}{rel}")
                for rel in _select_split(under, split, spec)]
    except UserError:
        raise
    except Exception as e:  # offline, missing repo or file: one line, the reason included
        raise UserError(f"cannot fetch {spec}: {_hub_reason(e)}") from None


def list_folder(folder: Path) -> list[str]:
    """Data files under a folder (relative, '/'-separated)."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and _suffix(rel):
            out.append(rel)
    return sorted(out)


def data_files(spec: str, split: str | None = "train") -> list[tuple[Path, str]]:
    """(local path, the name errors show) of every file `spec` names (see the module doc)."""
    if spec.startswith("hf://"):
        return _hub_files(spec, split)
    path = Path(spec).expanduser()
    if path.is_file():
        return [(path, spec)]
    if path.is_dir():
        return [(path / rel, f"{spec.rstrip('/')}/{rel}")
                for rel in _select_split(list_folder(path), split, spec)]
    raise UserError(f"data file not found: {spec}")


def resolve_path(spec: str) -> Path:
    """The local path of a one-file `spec` (a local file or an hf:// file, fetched)."""
    files = data_files(spec)
    if len(files) != 1:
        raise UserError(f"{spec}: {len(files)} files, expected one")
    return files[0][0]


# ---------------------------------------------------------------------------------- rows

GZIP_ERRORS = (OSError, EOFError, zlib.error)  # not gzip (BadGzipFile), truncated, corrupt


def _gzip_error(shown: str, e: Exception, after: int = 0) -> UserError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    read = f" after line {after}" if after else ""
    return UserError(f"{shown}: not a readable .gz file{read}: truncated or not gzip ({reason})")


def _open_text(path: Path, shown: str) -> bytes:
    if not path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except GZIP_ERRORS as e:
        raise _gzip_error(shown, e) from None


def _lines(path: Path, shown: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a text file, gzip read and its errors named (the last line read)."""
    if not path.name.lower().endswith(".gz"):
        with open(path, "rb") as f:
            yield from enumerate(f, start=1)
        return
    lineno = 0
    try:
        with gzip.open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                yield lineno, raw
    except GZIP_ERRORS as e:
        raise _gzip_error(shown, e, lineno) from None


def _jsonl_rows(path: Path, shown: str) -> Iterator[tuple[str, object]]:
    for lineno, raw in _lines(path, shown):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            raw = raw[3:]
        if not raw.strip():
            continue
        where = f"{shown}:{lineno}"
        raw = raw.rstrip(b"\r\n")
        if len(raw) > MAX_LINE_BYTES:
            raise UserError(f"line is {len(raw)} bytes, more than {MAX_LINE_BYTES}", where=where)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"not UTF-8 (byte {e.start})", where=where) from None
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON ({e.msg}, column {e.colno})", where=where) from None


def _decode(data: bytes, shown: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"not UTF-8 (byte {e.start})", where=f"{shown}:{line}") from None


def _rows_list(value) -> bool:
    """A list of row objects (a split of a `{"train": [...], "test": [...]}` file), not a row's
    own list field: chat messages ({role, content}), strings, numbers."""
    return isinstance(value, list) and all(isinstance(r, dict) and "role" not in r for r in value)


def _json_rows(path: Path, shown: str, split: str | None) -> Iterator[tuple[str, object]]:
    data = _open_text(path, shown)
    text = _decode(data, shown)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name (common on the Hub)
            yield from _jsonl_rows(path, shown)
            return
        raise UserError(f"malformed JSON ({e.msg}, line {e.lineno}, column {e.colno})",
                        where=shown) from None
    if isinstance(obj, dict) and any(_rows_list(v) and (v or k == "data" or file_split(k))
                                     for k, v in obj.items()):  # {"train": [...], ...}
        lists = [k for k, v in obj.items() if _rows_list(v)]
        key = next((k for k in ([split] if split else list(EVAL_SPLITS)) + ["data"]
                    if k in lists), None)
        if key is None and split is not None:
            key = next((k for k in lists if _canonical_split(k) == _canonical_split(split)), None)
        if key is None and split is None:
            key = next((k for k in lists if _canonical_split(k) in EVAL_SPLITS), None)
        if key is None:
            raise UserError(f"{shown}: lists under {', '.join(map(repr, lists))}: which one? "
                            "(data.split / --data-split)")
        obj = obj[key]
    elif isinstance(obj, dict):  # one object, one row (its lists are its fields: messages)
        obj = [obj]
    if not isinstance(obj, list):
        raise UserError(f"{shown}: expected a list of objects, got {type(obj).__name__}")
    for i, row in enumerate(obj):
        yield f"{shown} row {i}", row


def _csv_rows(path: Path, shown: str) -> Iterator[tuple[str, object]]:
    text = _decode(_open_text(path, shown), shown)
    reader = csv.reader(io.StringIO(text, newline=""))

    def next_cells(line: int) -> list[str] | None:  # None at the end of the file
        try:
            return next(reader)
        except StopIteration:
            return None
        except csv.Error as e:
            raise UserError(f"malformed CSV ({e})", where=f"{shown}:{line}") from None

    header = next_cells(1)
    if header is None:
        return
    line = reader.line_num + 1
    while (cells := next_cells(line)) is not None:
        where, line = f"{shown}:{line}", reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            raise UserError(f"{len(cells)} cells, the header has {len(header)}", where=where)
        yield where, dict(zip(header, cells))


def _parquet_rows(path: Path, shown: str) -> Iterator[tuple[str, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{shown}: reading Parquet needs pyarrow: pip install 'aropd-mlx[data]' "
                        "(or pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
        i = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{shown} row {i}", row
                i += 1
    except UserError:
        raise
    except Exception as e:  # not a Parquet file, a truncated one
        raise UserError(f"{shown}: not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None


def read_rows(path: Path, shown: str, split: str | None = "train") -> Iterator[tuple[str, object]]:
    """(where, the row as parsed) of every row of one file, by its format."""
    suffix = _suffix(path.name)
    if suffix.startswith(".parquet"):
        return _parquet_rows(path, shown)
    if suffix.startswith(".csv"):
        return _csv_rows(path, shown)
    if suffix.startswith(".json") and not suffix.startswith(".jsonl"):
        return _json_rows(path, shown, split)
    return _jsonl_rows(path, shown)


# ------------------------------------------------------------------------------- fields
