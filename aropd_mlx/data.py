"""Examples: the schema, loading (local JSONL or a Hub dataset file), validation, splits.

One example per JSONL line:
    {"id": "...", "question": "...", "solution": "<oracle reasoning>", "answer": "<final answer>"}
`id` is optional. Aliases accepted: problem/prompt -> question, reasoning/rationale -> solution,
final_answer -> answer. Anything wrong is a `UserError` naming the file, the line and the field.

    examples = load_examples("data/train.jsonl", need=("question", "solution", "answer"))
    examples = load_examples("hf://datasets/OWNER/NAME/path/train.jsonl")
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from aropd_mlx.errors import UserError

FIELDS = ("question", "solution", "answer")
ALIASES = {
    "problem": "question",
    "prompt": "question",
    "reasoning": "solution",
    "rationale": "solution",
    "final_answer": "answer",
}
MAX_LINE_BYTES = 1 << 22  # 4 MiB: a line past this is a broken file, not an example


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    solution: str | None = None
    answer: str | None = None

    def to_json(self) -> dict:
        return {"id": self.id, "question": self.question, "solution": self.solution,
                "answer": self.answer}


def resolve_path(spec: str) -> Path:
    """A local path, or `hf://datasets/OWNER/NAME/path/in/repo.jsonl` fetched via huggingface_hub."""
    if not spec.startswith("hf://"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"data file not found: {spec}")
        return path
    parts = spec[len("hf://"):].split("/")
    if len(parts) < 4 or parts[0] != "datasets":
        raise UserError(f"a Hub data path looks like hf://datasets/OWNER/NAME/file.jsonl, got {spec}")
    repo_id, filename = "/".join(parts[1:3]), "/".join(parts[3:])
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset"))
    except Exception as e:  # offline, missing repo or file: one line, the reason included
        kind = type(e).__name__
        reason = str(e).strip().splitlines()[0] if str(e).strip() else kind
        if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
            reason = "not in the local Hugging Face cache and the Hub cannot be reached (offline)"
        elif kind in ("RepositoryNotFoundError", "GatedRepoError"):
            reason = f"no such dataset on the Hub, or it is private/gated ({kind})"
        elif kind == "EntryNotFoundError":
            reason = "the dataset has no such file"
        raise UserError(f"cannot fetch {spec}: {reason}") from None


def _parse_line(raw: bytes, where: str, need: tuple[str, ...], index: int) -> Example:
    if len(raw) > MAX_LINE_BYTES:
        raise UserError(f"line is {len(raw)} bytes, more than {MAX_LINE_BYTES}", where=where)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 (byte {e.start})", where=where) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"malformed JSON ({e.msg}, column {e.colno})", where=where) from None
    if not isinstance(obj, dict):
        raise UserError(f"expected a JSON object, got {type(obj).__name__}", where=where)
    fields: dict[str, str] = {}
    for key, value in obj.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            continue
        if name in fields:
            raise UserError(f"field {name!r} given twice (as {key!r})", where=where)
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"field {key!r} must be a string, got {type(value).__name__}", where=where)
        fields[name] = str(value)
    for name in need:
        if name not in fields:
            raise UserError(f"missing field {name!r}", where=where)
        if not fields[name].strip():
            raise UserError(f"field {name!r} is empty", where=where)
    ex_id = obj.get("id", index)
    return Example(id=str(ex_id), **fields)


def load_examples(spec: str, need: tuple[str, ...] = ("question",)) -> list[Example]:
    """Read every example of a JSONL file; `need` lists the fields that must be non-empty."""
    path = resolve_path(spec)
    examples: list[Example] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            examples.append(_parse_line(raw.rstrip(b"\r\n"), f"{spec}:{lineno}", need, len(examples)))
    if not examples:
        raise UserError(f"{spec}: no examples (the file is empty or blank)")
    return examples


def write_examples(path: str | os.PathLike, examples: list[Example] | list[dict]) -> None:
    """Write examples as JSONL atomically (temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex.to_json() if isinstance(ex, Example) else ex) + "\n")
    os.replace(tmp, path)


def split(examples: list[Example], eval_fraction: float) -> tuple[list[Example], list[Example]]:
    """(train, eval): round(eval_fraction * n) examples held out for evaluation, the rest to train.

    Which ones is a pure function of each example's content (a SHA-256 of its id and question),
    not of the file order nor of the run's seed: every seed of a comparison and a resumed run
    hold out the same problems. Both parts keep the file order. A fraction > 0 holds out at
    least one example and always leaves at least one to train on."""
    n = len(examples)
    if eval_fraction <= 0 or n == 0:
        return list(examples), []
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    if n_eval < 1:
        raise UserError(f"data.eval_fraction={eval_fraction} needs at least 2 examples, got {n}")

    def key(i: int) -> tuple[str, int]:
        ex = examples[i]
        return hashlib.sha256(f"{ex.id}\x00{ex.question}".encode()).hexdigest(), i

    held = set(sorted(range(n), key=key)[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def train_and_eval(data, need: tuple[str, ...]) -> tuple[list[Example], list[Example]]:
    """The training and evaluation examples of `data` (config.DataSettings): `data.eval` when
    set; else `data.eval_fraction` of `data.train` held out (see `split`); else none."""
    if data.eval:
        return (load_examples(data.train, need=need),
                load_examples(data.eval, need=("question", "answer")))
    if data.eval_fraction > 0:  # the held-out part is evaluated: it needs answers
        need = tuple(dict.fromkeys((*need, "answer")))
        return split(load_examples(data.train, need=need), data.eval_fraction)
    return load_examples(data.train, need=need), []


@lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order examples are drawn in one epoch: a pure function of (seed, epoch) for resume."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return tuple(order)


def batch_at(examples: list, batch_size: int, position: int, seed: int) -> list:
    """The batch starting at global draw `position` (examples drawn without replacement per epoch)."""
    n = len(examples)
    out = []
    for p in range(position, position + batch_size):
        epoch, i = divmod(p, n)
        out.append(examples[epoch_order(n, seed, epoch)[i]])
    return out
