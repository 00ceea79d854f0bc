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
from pathlib import Path
from typing import Iterator

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


def file_split(rel: str) -> str | None:
    for token in _split_tokens(rel):
        canon = _canonical_split(token)
        if canon in SPLIT_NAMES:
            return canon
    return None


def _select_split(files: list[str], split: str | None, shown: str) -> list[str]:
    """The files (paths relative to the folder) of `split` (None: the first of EVAL_SPLITS)."""
    files = sorted(f for f in files if _suffix(f)  # hidden folders (.cache, .git): never data
                   and not any(part.startswith(".") for part in f.split("/")))
    if not files:
        raise UserError(f"{shown}: no data files (.jsonl, .json, .parquet, .csv) there")
    found = {f: file_split(f) for f in files}
    if not any(found.values()):  # no split names: every file is the one split
        return files
    wants = [split] if split is not None else list(EVAL_SPLITS)
    for want in wants:
        canon = _canonical_split(want)
        if canon in SPLIT_NAMES:
            chosen = [f for f in files if found[f] == canon]
        else:  # a split of its own name (cn_k12/, amc_aime-00000.parquet)
            chosen = [f for f in files if want in _split_tokens(f)]
        if chosen:
            return chosen
    have = sorted({s for s in found.values() if s})
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

def _open_text(path: Path) -> bytes:
    with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
        return f.read()


def _jsonl_rows(path: Path, shown: str) -> Iterator[tuple[str, object]]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
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


def _json_rows(path: Path, shown: str, split: str | None) -> Iterator[tuple[str, object]]:
    data = _open_text(path)
    text = _decode(data, shown)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON Lines under a .json name (common on the Hub)
            yield from _jsonl_rows(path, shown)
            return
        raise UserError(f"malformed JSON ({e.msg}, line {e.lineno}, column {e.colno})",
                        where=shown) from None
    if isinstance(obj, dict):
        lists = [k for k, v in obj.items() if isinstance(v, list)]
        key = next((k for k in ([split] if split else list(EVAL_SPLITS)) + ["data"]
                    if k in lists), None)
        if key is None and split is not None:
            key = next((k for k in lists if _canonical_split(k) == _canonical_split(split)), None)
        if key is None and split is None:
            key = next((k for k in lists if _canonical_split(k) in EVAL_SPLITS), None)
        if key is None and lists:
            raise UserError(f"{shown}: lists under {', '.join(map(repr, lists))}: which one? "
                            "(data.split / --data-split)")
        if key is None:  # one object: a one-line JSON Lines file
            yield f"{shown} row 0", obj
            return
        obj = obj[key]
    if not isinstance(obj, list):
        raise UserError(f"{shown}: expected a list of objects, got {type(obj).__name__}")
    for i, row in enumerate(obj):
        yield f"{shown} row {i}", row


def _csv_rows(path: Path, shown: str) -> Iterator[tuple[str, object]]:
    text = _decode(_open_text(path), shown)
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
