"""Evaluation: sample answers to held-out questions and check them.

A checker maps (example, response text) to a record with at least `correct`; the lab's checker
(`aropd_mlx.lab.setup.checker`) adds `all_steps_correct`, `shortcut` and `k`. Generic data uses
`answer_checker`: answer extraction plus math-verify (the `math` extra) or a normalizer.

    result = evaluate(model, tokenizer, examples, views, checker=answer_checker, k=4,
                      temperature=1.0)
    s = result.summary()        # accuracy, avg@k, pass@k, by response-length bucket (and by k)
    print(summary_markdown(s))  # a human table; json.dumps(s) is the machine form

Definitions (docs/EVALUATION.md):
- accuracy = avg@k: the mean of `correct` over all k samples of all problems; with greedy
  decoding and k = 1 it is plain accuracy.
- pass@k: the share of problems with at least one correct sample among its k; `pass_at`
  holds the unbiased estimate pass@j = 1 - C(k-c, j)/C(k, j) for j = 1, 2, 4, ... <= k.
- length buckets count response tokens including the EOS; a bucket (lo, hi] holds
  lo < n <= hi, so 256 is in "<=256" and 257 in "256-512"; "> 1024" is open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction
from math import comb
from typing import Callable

import numpy as np

from aropd_mlx.rollout import MAX_NEW_TOKENS, RolloutSettings, sample
from aropd_mlx.views import ViewSettings, encode_prompt, render_views

LENGTH_BUCKETS = ((0, 256), (256, 512), (512, 768), (768, 1024), (1024, None))


def bucket_label(lo: int, hi: int | None) -> str:
    return f">{lo}" if hi is None else f"{lo}-{hi}" if lo else f"<={hi}"


BUCKET_NAMES = tuple(bucket_label(lo, hi) for lo, hi in LENGTH_BUCKETS)


def bucket_index(n_tokens: int) -> int:
    """Index into LENGTH_BUCKETS: buckets are (lo, hi], the first one [0, 256]."""
    for i, (_, hi) in enumerate(LENGTH_BUCKETS):
        if hi is None or n_tokens <= hi:
            return i
    raise AssertionError("the last bucket is open")


def bucket_name(n_tokens: int) -> str:
    """Response-length bucket of METHOD.md: <=256, 256-512, 512-768, 768-1024, >1024 tokens."""
    return BUCKET_NAMES[bucket_index(n_tokens)]


# ----------------------------------------------------------------------------- extraction

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s$]+)")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_WORD = re.compile(r"\b(?:final\s+answer|answer)\s*(?::|is\b\s*:?)\s*([^\n]+)", re.I)
_LAB_ANSWER = re.compile(r"^[ \t]*A[ \t]*:[ \t]*(\S[^\n]*)", re.M)
# a number: thousands groups or digits, a decimal part, an optional /denominator; a minus sign
# only where it cannot be a binary minus ("5-3" ends with the number 3, not -3)
_NUMBER = re.compile(r"(?:(?<![\w)\].])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")


def boxed_contents(text: str) -> list[str]:
    """The contents of every \\boxed{...} (or \\fbox{...}), braces balanced to any depth."""
    out = []
    for m in _BOXED_START.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1].strip())
    return out


def _clean_marked(answer: str) -> str:
    """Text after a marker: boxed inside wins; trailing period and '$' go; 'x = 5' stays."""
    inner = boxed_contents(answer)
    if inner:
        return inner[-1]
    a = answer.strip().strip("*_").strip()  # markdown bold around it: "**Answer:** 7", "**7**"
    a = a.rstrip(".").strip().strip("*_").strip().strip("$").strip()
    # "5 apples" / "12 because ..." -> the leading number, if the rest is words
    m = re.fullmatch(r"(-?[\d,./]+)\s+[A-Za-z][^=]*", a)
    return m.group(1) if m and _NUMBER.fullmatch(m.group(1)) else a


def extract_answer(text: str) -> str | None:
    """The final answer of a response, by the first rule that finds one (its last occurrence):
    \\boxed{} (nested braces) > '#### x' > 'Answer: x' / 'Final answer: x' / 'the answer is x'
    > a line 'A: x' (the lab) > the last number in the text. None when nothing is found."""
    boxed = [b.strip() for b in boxed_contents(text) or _BOXED_BARE.findall(text)]
    boxed = [b for b in boxed if b]  # an empty \boxed{} holds no answer (nor hides one before)
    if boxed:
        return boxed[-1]
    for marker in (_HASHES, _ANSWER_WORD, _LAB_ANSWER):
        found = marker.findall(text)
        if found:
            cleaned = _clean_marked(found[-1])
            if cleaned:
                return cleaned
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def answer_by_rule(text: str, rule: str) -> str | None:
    """The answer written in a reference solution by one rule (data.answer_from): `boxed` (the
    last \\boxed{}), `####` (GSM8K's '#### x'), `last_number`, or `auto` (extract_answer's
    cascade). None when the rule finds nothing."""
    if rule == "boxed":
        found = [b.strip() for b in boxed_contents(text) or _BOXED_BARE.findall(text)]
        found = [b for b in found if b]
        return found[-1] if found else None
    if rule == "####":
        found = _HASHES.findall(text)
        return (_clean_marked(found[-1]) or None) if found else None
    if rule == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else None
    if rule == "auto":
        return extract_answer(text)
    raise ValueError(f"unknown answer rule {rule!r}")


# ----------------------------------------------------------------------------- equivalence

_LATEX_DROP = (r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", r"\ ", r"\displaystyle",
               "^\\circ", "^{\\circ}", r"\%", "%", r"\$", "$")  # \$18.90: a dollar sign
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_THOUSANDS = re.compile(r"(?<![\d.])\d{1,3}(?:,\d{3})+(?![\d])")
_LHS = re.compile(r"^[A-Za-z]\w*\s*=\s*(?=\S)")


def normalize(answer: str) -> str:
    """A canonical form for comparing answers without math-verify: LaTeX spacing, \\text{},
    '$', '%', degrees and a trailing period go; '\\frac{a}{b}', 'a/b' and decimals become one
    rational ('0.5' == '1/2' == '\\frac12'); thousands commas go ('1,234' == '1234') but a
    tuple's commas stay; 'x = 5' becomes '5'; anything else is lower-cased without spaces."""
    a = answer.strip().replace("\u2212", "-")  # a typeset minus sign
    inner = boxed_contents(a)
    a = inner[-1] if inner else a
    a = _WRAPPERS.sub(r"\1", a)
    for token in _LATEX_DROP:
        a = a.replace(token, "")
    a = _FRAC.sub(lambda m: f"({m.group(1) or m.group(2)})/({m.group(3) or m.group(4)})", a)
    a = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), a.strip().rstrip("."))
    a = _LHS.sub("", a.strip())
    a = a.replace(" ", "")
    value = _rational(a)
    if value is not None:
        return str(value)
    return a.lower()


def _rational(a: str) -> Fraction | None:
    """'3', '-0.5', '1/2', '(-1)/(2)', '-(1)/(2)' (a negated \\frac): the number, else None."""
    m = re.fullmatch(r"(-(?=\())?\(?(-?\d+(?:\.\d+)?)\)?(?:/\(?(-?\d+(?:\.\d+)?)\)?)?", a)
    if m is None:
        return None
    sign, num = (-1 if m.group(1) else 1), Fraction(m.group(2))
    if m.group(3) is None:
        return sign * num
    den = Fraction(m.group(3))
    return sign * num / den if den != 0 else None


def _math_verify():
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    return parse, verify


def answers_match(predicted: str | None, reference: str) -> bool:
    """Equal after `normalize`, or equivalent for math-verify when it is installed."""
    if predicted is None:
        return False
    if normalize(predicted) == normalize(reference):
        return True
    mv = _math_verify()
    if mv is None:
        return False
    parse, verify = mv
    try:  # '$...$' makes math-verify read both as LaTeX (plain '1/2' and '\frac12' alike)
        return bool(verify(parse(f"${reference}$"), parse(f"${predicted}$")))
    except Exception:  # a parser failure or timeout is a non-match, not a crash
        return False


def answer_checker(example, response: str) -> dict:
    predicted = extract_answer(response)
    return {"correct": answers_match(predicted, example.answer or ""), "predicted": predicted}


# ----------------------------------------------------------------------------- results

def pass_at(n: int, c: int, j: int) -> float:
    """Unbiased pass@j from n samples with c correct: 1 - C(n-c, j) / C(n, j)."""
    if not 1 <= j <= n:
        raise ValueError(f"pass@{j} needs 1 <= j <= n = {n}")
    return 1.0 - comb(n - c, j) / comb(n, j)


def _rates(records: list[dict]) -> dict:
    """n, accuracy and (when the checker gives them) all-steps-correct and shortcut rates."""
    out = {"n": len(records), "accuracy": float(np.mean([r["correct"] for r in records]))}
    if "all_steps_correct" in records[0]:
        out["all_steps_correct_rate"] = float(np.mean([r["all_steps_correct"] for r in records]))
    if "shortcut" in records[0]:
        out["shortcut_rate"] = float(np.mean([r["shortcut"] is not None for r in records]))
    return out


@dataclass
class EvalResult:
    records: list[dict] = field(default_factory=list)  # one per (example, sample)
    k: int = 1  # samples per problem

    def summary(self) -> dict:
        recs = self.records
        if not recs:
            return {"n": 0}
        out = {**_rates(recs), "samples_per_problem": self.k,
               "mean_response_tokens": float(np.mean([r["tokens"] for r in recs]))}
        if "shortcut" in recs[0]:
            kinds: dict[str, int] = {}
            for r in recs:
                if r["shortcut"] is not None:
                    kinds[r["shortcut"]] = kinds.get(r["shortcut"], 0) + 1
            out["shortcut_counts"] = dict(sorted(kinds.items()))
        by_id: dict = {}  # per problem: its position (two examples may share an id)
        for r in recs:
            by_id.setdefault(r.get("problem", r["id"]), []).append(bool(r["correct"]))
        out["n_problems"] = len(by_id)
        out["avg_at_k"] = float(np.mean([np.mean(v) for v in by_id.values()]))
        out["pass_at_k"] = float(np.mean([any(v) for v in by_id.values()]))
        n = min(len(v) for v in by_id.values())
        out["pass_at"] = {str(j): float(np.mean([pass_at(len(v), sum(v), j) for v in by_id.values()]))
                          for j in (2 ** i for i in range(n.bit_length())) if j <= n}
        out["by_length"] = self.grouped("bucket")
        if "k" in recs[0]:
            out["by_k"] = self.grouped("k")
        return out

    def grouped(self, key: str) -> dict:
        """Rates per value of `key`; length buckets in their natural order, others sorted."""
        groups: dict = {}
        for r in self.records:
            groups.setdefault(r[key], []).append(r)
        if key == "bucket":
            order = [b for b in BUCKET_NAMES if b in groups]
        else:
            order = sorted(groups, key=lambda x: (isinstance(x, str), x))
        return {str(g): _rates(groups[g]) for g in order}


RATE_COLUMNS = {"accuracy": "acc", "all_steps_correct_rate": "all-steps", "shortcut_rate": "shortcut"}


def summary_rows(summary: dict, before: dict | None = None) -> list[dict]:
    """The evaluation table: one row per group (all, then by k when present, then by response
    length), a column per rate. With `before` (the evaluation before training) each rate has a
    'before' and an 'after' column. `aropd-mlx train` and `eval` print this table."""
    keys = [k for k in RATE_COLUMNS if k in summary]
    groups = [("all", summary, before)]
    for field_name, label in (("by_k", "k={}"), ("by_length", "len {}")):
        for g, row in summary.get(field_name, {}).items():
            groups.append((label.format(g), row, (before or {}).get(field_name, {}).get(g)))
    rows = []
    for name, after, prior in groups:
        row = {"group": name, "n": after.get("n", 0)}
        for k in keys:
            if before is None:
                row[RATE_COLUMNS[k]] = after.get(k)
            else:
                row[f"{RATE_COLUMNS[k]} before"] = None if prior is None else prior.get(k)
                row[f"{RATE_COLUMNS[k]} after"] = after.get(k)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub-markdown table (floats with 3 decimals, None as '-')."""
    if not rows:
        return "(empty)\n"
    columns = columns or list(rows[0])

    def fmt(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict) -> str:
    extra = f"avg@{summary.get('samples_per_problem', 1)} {summary.get('avg_at_k', 0):.3f}, " \
            f"pass@{summary.get('samples_per_problem', 1)} {summary.get('pass_at_k', 0):.3f}"
    return markdown_table(summary_rows(summary)) + "\n" + extra + "\n"


def evaluate(model, tokenizer, examples: list, views: ViewSettings,
             checker: Callable[[object, str], dict] = answer_checker, k: int = 1,
             temperature: float = 0.0, max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0,
             batch_size: int = 64) -> EvalResult:
    """k samples per example (temperature 0: greedy, then k = 1 suffices). Each record holds
    id, the problem's position, sample index, response tokens (EOS included), bucket, the text
    and the checker's keys. Batches draw from seed x 1,000,003 + their start: no two seeds share
    a stream."""
    settings = RolloutSettings(group_size=k, max_new_tokens=max_new_tokens,
                               temperature=temperature, completion_batch_size=batch_size)
    result = EvalResult(k=k)
    eos = set(tokenizer.eos_token_ids)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, render_views(e, views)["student"], views) for e in chunk]
        resp = sample(model, tokenizer, prompts, settings, seed=seed * 1_000_003 + start)
        tokens = np.array(resp.tokens)
        for row in range(tokens.shape[0]):
            ex = chunk[row // k]
            n = resp.lengths[row]
            ids = [int(t) for t in tokens[row, :n] if int(t) not in eos]
            text = tokenizer.decode(ids)
            result.records.append({"id": ex.id, "problem": start + row // k, "sample": row % k,
                                   "tokens": n,
                                   "bucket": bucket_name(n), "response": text, **checker(ex, text)})
    return result
