"""Evaluation: sample answers to held-out questions and check them.

A checker maps (example, response text) to a record with at least `correct`; the lab's checker
adds all-steps-correct and shortcut events. Generic data uses answer extraction.

    result = evaluate(model, tokenizer, examples, views, checker=answer_checker, k=1)
    result.summary()   # accuracy overall and by response-length bucket
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from aropd_mlx.rollout import RolloutSettings, sample
from aropd_mlx.views import ViewSettings, encode_prompt, render_views

LENGTH_BUCKETS = ((0, 256), (256, 512), (512, 768), (768, 1024), (1024, None))


def bucket_name(n_tokens: int) -> str:
    """Response-length bucket of METHOD.md: <=256, 256-512, 512-768, 768-1024, >1024 tokens."""
    for lo, hi in LENGTH_BUCKETS:
        if hi is None or n_tokens <= hi:
            return f">{lo}" if hi is None else f"{lo}-{hi}" if lo else f"<={hi}"
    raise AssertionError


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_MARKERS = (re.compile(r"####\s*(.+)"), re.compile(r"(?:Final answer|Answer|A)\s*:\s*(.+)", re.I))
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer of a response: \\boxed{}, '####', 'Answer:'/'Final answer:', last number."""
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    for marker in _MARKERS:
        found = marker.findall(text)
        if found:
            return found[-1].strip().rstrip(".").strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def normalize(answer: str) -> str:
    a = answer.strip().strip("$").replace(",", "").replace(" ", "").rstrip(".")
    try:
        value = float(a)
        return str(int(value)) if value.is_integer() else str(value)
    except ValueError:
        return a.lower()


def answers_match(predicted: str | None, reference: str) -> bool:
    if predicted is None:
        return False
    try:  # math-verify (the `math` extra) knows equivalent forms: 1/2 = 0.5 = \frac{1}{2}
        from math_verify import parse, verify

        return bool(verify(parse(reference), parse(predicted)))
    except ImportError:
        return normalize(predicted) == normalize(reference)


def answer_checker(example, response: str) -> dict:
    predicted = extract_answer(response)
    return {"correct": answers_match(predicted, example.answer or ""), "predicted": predicted}


@dataclass
class EvalResult:
    records: list[dict] = field(default_factory=list)  # one per (example, sample)

    def summary(self) -> dict:
        recs = self.records
        if not recs:
            return {"n": 0}
        out = {"n": len(recs), "accuracy": float(np.mean([r["correct"] for r in recs])),
               "mean_response_tokens": float(np.mean([r["tokens"] for r in recs]))}
        for key in ("all_steps_correct",):
            if key in recs[0]:
                out[f"{key}_rate"] = float(np.mean([r[key] for r in recs]))
        if "shortcut" in recs[0]:
            out["shortcut_rate"] = float(np.mean([r["shortcut"] is not None for r in recs]))
        by_id: dict[str, list[bool]] = {}
        for r in recs:
            by_id.setdefault(r["id"], []).append(bool(r["correct"]))
        out["pass_at_k"] = float(np.mean([any(v) for v in by_id.values()]))
        out["avg_at_k"] = float(np.mean([np.mean(v) for v in by_id.values()]))
        out["by_length"] = self.grouped("bucket")
        if "k" in recs[0]:
            out["by_k"] = self.grouped("k")
        return out

    def grouped(self, key: str) -> dict:
        groups: dict = {}
        for r in self.records:
            groups.setdefault(r[key], []).append(r)
        out = {}
        for g in sorted(groups, key=lambda x: (isinstance(x, str), x)):
            rs = groups[g]
            row = {"n": len(rs), "accuracy": float(np.mean([r["correct"] for r in rs]))}
            if "all_steps_correct" in rs[0]:
                row["all_steps_correct_rate"] = float(np.mean([r["all_steps_correct"] for r in rs]))
            if "shortcut" in rs[0]:
                row["shortcut_rate"] = float(np.mean([r["shortcut"] is not None for r in rs]))
            out[str(g)] = row
        return out


def evaluate(model, tokenizer, examples: list, views: ViewSettings,
             checker: Callable[[object, str], dict] = answer_checker, k: int = 1,
             temperature: float = 0.0, max_new_tokens: int = 256, seed: int = 0,
             batch_size: int = 64) -> EvalResult:
    """k samples per example (temperature 0: greedy, then k=1 suffices)."""
    settings = RolloutSettings(group_size=k, max_new_tokens=max_new_tokens,
                               temperature=temperature, completion_batch_size=batch_size)
    result = EvalResult()
    eos = set(tokenizer.eos_token_ids)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [encode_prompt(tokenizer, render_views(e, views)["student"], views) for e in chunk]
        resp = sample(model, tokenizer, prompts, settings, seed=seed + start)
        tokens = np.array(resp.tokens)
        for row in range(tokens.shape[0]):
            ex = chunk[row // k]
            ids = [int(t) for t in tokens[row, : resp.lengths[row]] if int(t) not in eos]
            text = tokenizer.decode(ids)
            rec = {"id": ex.id, "tokens": resp.lengths[row], "bucket": bucket_name(resp.lengths[row]),
                   "response": text, **checker(ex, text)}
            result.records.append(rec)
    return result
