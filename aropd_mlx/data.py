"""Examples: the schema, loading data as it is published, validation, splits. Finding the
files of a spec and reading their rows, format by format, is sources.py.

An example is {"id": "...", "question": "...", "solution": "<oracle reasoning>", "answer": "..."}
(and optionally "outline": public lines aligned with the solution's, see views.partial_outline)
(`id` optional). `--data` reads it from:
- a file: JSONL (`.jsonl`, and anything without a known suffix), JSON (`.json`: a list of
  objects, `{"data": [...]}`, `{"train": [...], "test": [...]}` by split, or JSON Lines under a
  .json name), Parquet (`.parquet`, needs pyarrow: the `data` extra) or CSV (`.csv`, a header
  row); `.gz` of the text formats too;
- a folder, or a Hub dataset `hf://datasets/OWNER/NAME[@REV][/path]` (a file, a folder, or the
  whole repository): the files of one split, named as the Hub names them (`train.jsonl`,
  `data/train-00000-of-00002.parquet`, `train/*.csv`, a shard's own name: `train_sft` of
  `data/train_sft-00000-of-00001.parquet`; `data.split`, `--data-split`); files with no split in
  their names are all one split, train; a split that is not there, or one in several config
  folders (gsm8k's `main/` and `socratic/`: name one, `hf://datasets/openai/gsm8k/main`), is an
  error. A revision with a slash is URL-encoded: `@refs%2Fconvert%2Fparquet`.

Which columns are which (first found wins, in this order):
- `data.columns` ({question: problem, solution: solution, answer: ..., id: ...}): the mapped
  column, nothing else, for that field;
- the names and aliases: question|problem|prompt, solution|reasoning|rationale,
  answer|final_answer (two of one field in a row is an error);
- TRL's rows: `prompt` (a string, or a list of chat messages) is the question; the solution is
  `privileged_context` (the text only the teacher sees: the privileged views' reference), else
  `completion` (a demonstration; a string or assistant messages);
- chat rows, `messages: [{role, content}]`: the user turn is the question, the assistant turn
  the solution; a system turn is not part of the question (`views.system_prompt` sets one);
- the answer, when a row has none: `data.answer_from` (boxed | last_number | "####" | auto)
  applied to the solution, by evaluate.py's extraction. A row whose answer cannot be derived
  is skipped and counted (one note), when the answer is needed.
Anything wrong is a `UserError` naming the file, the place (`file.jsonl:LINE`, `file.csv:LINE`,
`file.parquet row N`, `file.json row N`; N counts from 0) and the field.

    examples = load_examples("data/train.jsonl", need=("question", "solution", "answer"))
    examples = load_examples("hf://datasets/AI-MO/NuminaMath-CoT", split="train",
                             answer_from="boxed")
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path

from aropd_mlx.errors import UserError, note
from aropd_mlx.sources import data_files, read_rows

FIELDS = ("question", "solution", "answer")
ALIASES = {
    "problem": "question",
    "prompt": "question",
    "reasoning": "solution",
    "rationale": "solution",
    "final_answer": "answer",
}
COLUMN_FIELDS = ("question", "solution", "answer", "id")  # what data.columns may map
ANSWER_RULES = ("boxed", "last_number", "####", "auto")


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    solution: str | None = None
    answer: str | None = None
    # Optional public outline of the solution, one line per solution line (what each step is to
    # do, nothing it finds): views.partial_outline shows it past the anchor's cut,
    # views.student_outline to the student
    outline: str | None = None

    def to_json(self) -> dict:
        out = {"id": self.id, "question": self.question, "solution": self.solution,
               "answer": self.answer}
        if self.outline is not None:
            out["outline"] = self.outline
        return out


# ------------------------------------------------------------------------------- sources

def _text(value, key: str, where: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise UserError(f"field {key!r} must be a string, got {type(value).__name__}", where=where)
    if isinstance(value, float):  # positional, as a person writes it: 1e-05 -> 0.00001
        return format(Decimal(repr(value)), "f")
    return str(value)


def _content(message, key: str, where: str) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # [{type: text, text: ...}, ...]
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
            raise UserError(f"field {key!r}: only text content can be read", where=where)
        return "".join(texts)
    if not isinstance(content, str):
        raise UserError(f"field {key!r}: each message needs a role and a text content", where=where)
    return content


def _turns(messages, key: str, where: str) -> dict[str, str]:
    """{role: text} of a single-turn chat: at most one system, one user, one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"field {key!r} must be a list of {{role, content}} messages", where=where)
    out: dict[str, str] = {}
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            raise UserError(f"field {key!r}: a message with role {role!r} (system, user or "
                            "assistant)", where=where)
        if role in out:
            raise UserError(f"field {key!r}: more than one {role} turn (one question and one "
                            "answer per row)", where=where)
        out[role] = _content(m, key, where)
    return out


def _derive_answer(solution: str | None, rule: str) -> str | None:
    from aropd_mlx.evaluate import answer_by_rule

    return answer_by_rule(solution, rule) if solution else None


def parse_row(obj, where: str, need: tuple[str, ...], index: int,
              columns: dict[str, str] | None = None, answer_from: str | None = None) -> Example | None:
    """One row (a parsed object) -> an Example; None when the answer must be derived from the
    solution and cannot be (skipped and counted by the caller)."""
    if not isinstance(obj, dict):
        raise UserError(f"expected a JSON object, got {type(obj).__name__}", where=where)
    # NaN (JSON's NaN, a float Parquet/pandas column's empty cell) is a missing value, not "nan"
    obj = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in obj.items()}
    columns = columns or {}
    fields: dict[str, str] = {}
    source: dict[str, str] = {}
    for name, column in columns.items():  # mapped columns: that column and nothing else
        if column not in obj:
            raise UserError(f"missing column {column!r} (data.columns.{name}; columns here: "
                            f"{', '.join(map(str, obj))})", where=where)
        if obj[column] is not None and name != "id":
            fields[name], source[name] = _text(obj[column], column, where), column
    mapped = set(columns.values())
    for key, value in obj.items():  # the names and aliases
        name = ALIASES.get(key, key)
        if name not in FIELDS or name in columns or key in mapped or value is None:
            continue
        if key == "prompt" and isinstance(value, list):  # TRL conversational prompt
            continue
        if name in fields:
            raise UserError(f"field {name!r} given twice (as {key!r})", where=where)
        fields[name], source[name] = _text(value, key, where), key
    if "question" not in fields and isinstance(obj.get("prompt"), list) and "question" not in columns:
        turns = _turns(obj["prompt"], "prompt", where)
        if "user" in turns:
            fields["question"] = turns["user"]
    if "solution" not in fields and "solution" not in columns:
        for key in ("privileged_context", "completion"):  # TRL: teacher-only text, a demonstration
            value = obj.get(key)
            if value is None:
                continue
            if isinstance(value, list):
                value = _turns(value, key, where).get("assistant")
                if value is None:
                    continue
            fields["solution"] = _text(value, key, where)
            break
    if obj.get("messages") is not None and not (
            {"question", "solution"} <= set(fields) or {"question", "solution"} <= set(columns)):
        turns = _turns(obj["messages"], "messages", where)
        for name, role in (("question", "user"), ("solution", "assistant")):
            if name not in fields and name not in columns and role in turns:
                fields[name] = turns[role]
    if answer_from and not (fields.get("answer") or "").strip():
        derived = _derive_answer(fields.get("solution"), answer_from)
        if derived:
            fields["answer"] = derived
        elif "answer" in need:
            return None
        else:
            fields.pop("answer", None)
    for name in need:
        if name not in fields:
            raise UserError(f"missing field {name!r}{_hint(name, obj, answer_from)}", where=where)
        if not fields[name].strip():
            raise UserError(f"field {name!r} is empty", where=where)
    id_key = columns.get("id", "id")
    ex_id = obj.get(id_key)
    if obj.get("outline") is not None:
        fields["outline"] = _text(obj["outline"], "outline", where)
    return Example(id=str(index if ex_id is None else ex_id), **fields)


def _hint(name: str, obj: dict, answer_from: str | None) -> str:
    if name == "answer" and not answer_from:
        return (" (or take it from the solution: data.answer_from: boxed | last_number | "
                "'####' | auto)")
    if name == "question" and "text" in obj:
        return (" (a 'text' row is plain text, no question: give question/solution columns, "
                "messages, or prompt/completion)")
    if name in FIELDS:
        known = ", ".join(map(str, list(obj)[:12]))
        return f" (columns here: {known}; map one with data.columns.{name})"
    return ""


def load_examples(spec: str, need: tuple[str, ...] = ("question",), *, split: str | None = "train",
                  columns: dict[str, str] | None = None,
                  answer_from: str | None = None) -> list[Example]:
    """Every example of `spec` (a file, a folder, an hf:// dataset; the files of `split`, None:
    the first of validation, test); `need` lists the fields that must be non-empty."""
    examples: list[Example] = []
    skipped, first_skipped = 0, None
    files = data_files(spec, split)
    for path, shown in files:
        for where, obj in read_rows(path, shown, split):
            ex = parse_row(obj, where, need, len(examples), columns, answer_from)
            if ex is None:
                skipped += 1
                first_skipped = first_skipped or where
            else:
                examples.append(ex)
    if skipped:
        msg = (f"{spec}: {skipped} rows without an answer data.answer_from={answer_from!r} "
               f"can find in the solution (first: {first_skipped})")
        if not examples:
            raise UserError(msg + ": no examples left")
        note(msg + "; skipped")
    if not examples:
        shown = files[0][1] if len(files) == 1 else spec
        raise UserError(f"{shown}: no examples (the file is empty or blank)")
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


def load_data(data, which: str = "train", need: tuple[str, ...] = ("question",)) -> list[Example]:
    """The examples of `data.train` or `data.eval` (config.DataSettings), read with its split,
    column mapping and answer rule."""
    spec = data.train if which == "train" else data.eval
    return load_examples(spec, need=need, split=data.split if which == "train" else data.eval_split,
                         columns=getattr(data, "columns", None),
                         answer_from=getattr(data, "answer_from", None))


def train_and_eval(data, need: tuple[str, ...]) -> tuple[list[Example], list[Example]]:
    """The training and evaluation examples of `data` (config.DataSettings): `data.eval` when
    set; else `data.eval_fraction` of `data.train` held out (see `split`); else none."""
    if data.eval:
        return load_data(data, "train", need), load_data(data, "eval", ("question", "answer"))
    if data.eval_fraction > 0:  # the held-out part is evaluated: it needs answers
        need = tuple(dict.fromkeys((*need, "answer")))
        return split(load_data(data, "train", need), data.eval_fraction)
    return load_data(data, "train", need), []


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
