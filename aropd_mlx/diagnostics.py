"""Per-token diagnostics of the objective, aggregated over a run (METHOD.md "Diagnostics").

Every step's per-token signals (the keys of `objective.token_diagnostics`: kl_full_partial,
kl_student_partial, kl_student_full, kl_student_target, clip_rate, top16_overlap,
entropy_student, entropy_target, student_logprob, target_logprob) are added to running sums in
one table per signal, indexed by (response-length bucket, relative-position decile):

- the length bucket of a response is `evaluate.bucket_name` of its length n (tokens including
  the EOS; buckets are (lo, hi], 256 is in "<=256");
- the decile of response position t (0-based, t < n) is floor(10 * t / n): decile 0 holds the
  first tenth of each response, decile 9 the last. A response shorter than 10 tokens leaves
  some deciles empty.
Every valid response token counts (the loss's skip_first_tokens does not apply here), so
decile 0 shows the start of the responses too.

Sums, sums of squares and counts add up, so accumulators merge exactly (`merge`), and the JSON
form round-trips. Derived signals are computed from the means of each cell:
- residual_uptake = KL(S || partial) - KL(S || full): how much closer the student is to the
  full view than to the anchor (> 0: the student has taken up part of the residual);
- entropy_gap = H(student) - H(target).

    acc = DiagnosticsAccumulator()
    acc.add({"kl_full_partial": kl_BT, ...}, mask_BT)     # each step
    acc.summary()["by_position"]["kl_full_partial"]     # 10 means (None where empty)
    RunDiagnostics(run_dir).save(step)                   # run_dir/diagnostics.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from aropd_mlx.evaluate import BUCKET_NAMES, LENGTH_BUCKETS
from aropd_mlx.jsonio import read_json

N_DECILES = 10
FILE_NAME = "diagnostics.json"
FORMAT = 1
DERIVED = {"residual_uptake": ("kl_student_partial", "kl_student_full"),
           "entropy_gap": ("entropy_student", "entropy_target")}


def _bucket_of_lengths(lengths: np.ndarray) -> np.ndarray:
    """Bucket index of each length (vectorized `evaluate.bucket_index`)."""
    edges = np.array([hi for _, hi in LENGTH_BUCKETS[:-1]])
    return np.searchsorted(edges, lengths, side="left")


def cell_index(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell (B, T) int, valid (B, T) bool): cell = bucket * 10 + decile of every position.
    Responses start at position 0 and are right-padded (rollout.Responses), so a row's length
    is its number of valid positions."""
    valid = np.asarray(mask).astype(bool)
    lengths = valid.sum(axis=1)  # (B,)
    t = np.arange(valid.shape[1])[None, :]  # (1, T)
    decile = np.minimum((N_DECILES * t) // np.maximum(lengths[:, None], 1), N_DECILES - 1)
    return _bucket_of_lengths(lengths)[:, None] * N_DECILES + decile, valid


def _mean(s: np.ndarray, c: np.ndarray):
    """Elementwise s / c as floats, None where c == 0 (JSON-friendly nested lists)."""
    out = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    return _none_for_nan(out.tolist())


def _none_for_nan(x):
    if isinstance(x, list):
        return [_none_for_nan(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def _sub(a, b):
    if isinstance(a, list):
        return [_sub(x, y) for x, y in zip(a, b)]
    return None if a is None or b is None else a - b


class DiagnosticsAccumulator:
    """Running sums per signal over (length bucket, decile) cells; mergeable, JSON-able."""

    shape = (len(LENGTH_BUCKETS), N_DECILES)

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.sumsq: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.steps = 0

    def add(self, diagnostics: dict, mask, new_step: bool = True) -> None:
        """Add one batch: diagnostics name -> (B, T) values (mx or numpy arrays), mask (B, T)
        1 on response tokens. Positions outside the mask are ignored. `new_step` False: a
        further micro-batch of the step already counted in `steps`."""
        cell, valid = cell_index(np.asarray(mask))
        idx = cell[valid]
        size = self.shape[0] * self.shape[1]
        for name, values in diagnostics.items():
            v = np.asarray(values, dtype=np.float64)[valid]
            for table, w in ((self.sums, v), (self.sumsq, v * v), (self.counts, None)):
                add = np.bincount(idx, weights=w, minlength=size).reshape(self.shape)
                table[name] = table.get(name, np.zeros(self.shape)) + add
        self.steps += int(new_step)

    def merge(self, other: "DiagnosticsAccumulator") -> "DiagnosticsAccumulator":
        """A new accumulator holding both (the same as adding every batch to one)."""
        out = DiagnosticsAccumulator()
        out.steps = self.steps + other.steps
        for attr in ("sums", "sumsq", "counts"):
            a, b = getattr(self, attr), getattr(other, attr)
            setattr(out, attr, {k: a.get(k, 0) + b.get(k, 0) for k in sorted(set(a) | set(b))})
        return out

    @property
    def signals(self) -> list[str]:
        return sorted(self.sums)

    def to_json(self) -> dict:
        return {"steps": self.steps, "buckets": list(BUCKET_NAMES), "deciles": N_DECILES,
                **{attr: {k: v.tolist() for k, v in getattr(self, attr).items()}
                   for attr in ("sums", "sumsq", "counts")}}

    @classmethod
    def from_json(cls, data: dict) -> "DiagnosticsAccumulator":
        out = cls()
        out.steps = int(data.get("steps", 0))
        for attr in ("sums", "sumsq", "counts"):
            setattr(out, attr, {k: np.array(v, dtype=np.float64)
                                for k, v in data.get(attr, {}).items()})
        return out

    def summary(self) -> dict:
        """Means overall, by decile, by length bucket and by (bucket, decile); the standard
        deviation overall; derived signals wherever both of their inputs are present."""
        out = {"overall": {}, "std": {}, "by_position": {}, "by_length": {}, "by_length_position": {},
               "tokens": {}}
        for k in self.signals:
            s, q, c = self.sums[k], self.sumsq[k], self.counts[k]
            n = c.sum()
            out["tokens"][k] = int(n)
            out["overall"][k] = _mean(s.sum(), n)
            var = q.sum() / max(n, 1) - (s.sum() / max(n, 1)) ** 2
            out["std"][k] = float(np.sqrt(max(var, 0.0))) if n > 0 else None
            out["by_position"][k] = _mean(s.sum(axis=0), c.sum(axis=0))
            by_len = _mean(s.sum(axis=1), c.sum(axis=1))
            out["by_length"][k] = {b: m for b, m in zip(BUCKET_NAMES, by_len)}
            out["by_length_position"][k] = {b: m for b, m in zip(BUCKET_NAMES, _mean(s, c))}
        for name, (a, b) in DERIVED.items():
            if a in self.sums and b in self.sums:
                for view in ("overall", "by_position"):
                    out[view][name] = _sub(out[view][a], out[view][b])
                out["by_length"][name] = {g: _sub(out["by_length"][a][g], out["by_length"][b][g])
                                          for g in BUCKET_NAMES}
                out["by_length_position"][name] = {
                    g: _sub(out["by_length_position"][a][g], out["by_length_position"][b][g])
                    for g in BUCKET_NAMES}
        return out


class RunDiagnostics(DiagnosticsAccumulator):
    """The accumulator of one training run, saved as run_dir/diagnostics.json.

    Exact resume: the file is written at every checkpoint (and at the end) with the step it
    covers; a resumed run continues from it when that step is the checkpoint's, and otherwise
    starts afresh and says so (`from_step`)."""

    def __init__(self, run_dir: str | Path | None = None, from_step: int = 0):
        super().__init__()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.from_step = from_step

    @classmethod
    def resume(cls, run_dir: str | Path, step: int) -> "RunDiagnostics":
        out = cls(run_dir, from_step=step)
        data = load_diagnostics(run_dir)
        if step > 0 and data and data.get("through_step") == step:
            acc = DiagnosticsAccumulator.from_json(data["accumulator"])
            out.sums, out.sumsq, out.counts, out.steps = acc.sums, acc.sumsq, acc.counts, acc.steps
            out.from_step = int(data.get("from_step", 0))
        return out

    def save(self, step: int) -> Path:
        """Write diagnostics.json atomically (a temp file, then a rename)."""
        if self.run_dir is None:
            raise ValueError("RunDiagnostics.save needs a run directory")
        path = self.run_dir / FILE_NAME
        blob = {"format": FORMAT, "from_step": self.from_step, "through_step": step,
                "summary": self.summary(), "accumulator": self.to_json()}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(blob))
        os.replace(tmp, path)
        return path


def load_diagnostics(run_dir: str | Path) -> dict | None:
    """The saved diagnostics.json of a run (None when there is none)."""
    return read_json(Path(run_dir) / FILE_NAME, missing=None)
