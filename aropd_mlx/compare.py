"""Compare base, SFT, OPD, Partial OPD, Full OPD and AR-OPD on the built-in lab, over seeds.

Every trained variant starts from the same warm-started lab model, draws its prompts from the
same pool of oracle-traced problems (the lab's train.jsonl, optionally its first `pool`), runs
the same number of optimizer steps with the lab's run preset, and is evaluated greedily on
the same held-out set with the lab's checker. Seeds change the LoRA init, the prompt order and
the rollouts. Results: OUT/compare.json and OUT/compare.md (report.md reads them), one full
run directory per (variant, seed) under OUT/runs/ (`aropd-mlx report` plots them).

    result = compare(CompareSettings(seeds=3, steps=100, out="runs/compare"))
    aropd-mlx compare --quick                  # docs/EVALUATION.md gives its cost

A finished (variant, seed) leaves OUT/runs/<variant>/seed<s>/result.json; a rerun with the
same settings reuses it, so an interrupted compare continues where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from aropd_mlx.errors import UserError
from aropd_mlx.jsonio import read_json, write_json, write_text
from aropd_mlx.stats import mean_ci, paired_deltas
from aropd_mlx.views import METHODS as TRAIN_METHODS

METHODS = ("base", *TRAIN_METHODS)  # the untrained model, then every training method
METRICS = ("accuracy", "all_steps_correct_rate", "long_accuracy", "long_all_steps_correct_rate",
           "shortcut_rate")
# paired deltas are computed against these (the table shows the first two; compare.md's
# closing section reads AR-OPD against all of them)
REFERENCES = ("full-opd", "sft", "partial-opd", "base")


@dataclass(frozen=True)
class CompareSettings:
    methods: tuple[str, ...] = METHODS
    seeds: int = 3
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (fresh seeds: a new check)
    steps: int = 100  # the final comparison of docs/LAB.md (full fine-tuning: ~1 s a step)
    lams: tuple[float, ...] = (0.8,)  # AR-OPD lambda; several: one AR-OPD variant each
    partial_ratios: tuple[float, ...] = (0.5,)  # partial view; applies to partial-opd, ar-opd
    pool: int | None = None  # oracle-traced problems to train on (None: the whole lab pool)
    dev: bool = False  # evaluate on dev problems (lab/measure.dev_examples): for choosing settings
    overrides: dict = field(default_factory=dict)  # extra config keys for every trained run
    # "clean": the privileged references are the oracle traces; "other-writer": another
    # writer's (task.reference_variant "reversed_notation": operands swapped, subtraction as
    # adding the inverse); "stronger-writer": a writer who does two operations per line
    # ("two_per_line"); for the teacher's views and as SFT's targets alike
    setting: str = "clean"
    sft_steps: int | None = None  # SFT's own step count (e.g. AR-OPD's wall-clock); None: steps
    # response-length bucket edges in tokens (e.g. (64, 128, 192)): compare.md adds tables by
    # the length of a correct response; only the tables change, never the runs
    length_buckets: tuple[int, ...] = ()
    out: str = "runs/compare"
    reuse: bool = True  # reuse finished (variant, seed) runs with identical settings

    def steps_for(self, method: str) -> int:
        """Optimizer steps of one method's runs (SFT may have its own)."""
        return self.sft_steps if method == "sft" and self.sft_steps else self.steps

    def validate(self) -> "CompareSettings":
        if not self.methods:
            raise UserError("compare: --methods names none (e.g. --methods base,full-opd,ar-opd)")
        for flag, values in (("--methods", self.methods), ("--lams", self.lams),
                             ("--partial-ratios", self.partial_ratios)):
            twice = sorted({str(v) for v in values if list(values).count(v) > 1})
            if twice:
                raise UserError(f"compare: {flag} names {', '.join(twice)} twice")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"compare: unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
        if self.seeds < 1 or self.steps < 1:
            raise UserError("compare: --seeds and --steps must be >= 1")
        if self.first_seed < 0:
            raise UserError(f"compare: --first-seed must be >= 0, got {self.first_seed}")
        if not self.lams or any(not (math.isfinite(l) and l >= 0) for l in self.lams):
            raise UserError("compare: --lams must be finite numbers >= 0")
        if not self.partial_ratios or any(not 0 <= r <= 1 for r in self.partial_ratios):  # nan too
            raise UserError("compare: --partial-ratios must lie in [0, 1]")
        if self.pool is not None and self.pool < 1:
            raise UserError("compare: --pool must be >= 1")
        if self.setting not in SETTINGS:
            raise UserError(f"compare: unknown --setting {self.setting!r} "
                            f"(known: {', '.join(SETTINGS)})")
        if self.sft_steps is not None and self.sft_steps < 1:
            raise UserError("compare: --sft-steps must be >= 1")
        edges = self.length_buckets
        if any(e < 1 for e in edges) or list(edges) != sorted(set(edges)):
            raise UserError("compare: --length-buckets must be increasing token counts >= 1, "
                            f"got {','.join(map(str, edges))}")
        return self


# -> reference style; "stronger-writer": two operations per line (task "two_per_line"), a
# reference the one-step-a-line student cannot copy line for line
SETTINGS = {"clean": "oracle", "other-writer": "reversed_notation",
            "stronger-writer": "two_per_line"}

# From measured step costs (docs/EVALUATION.md "Measured cost"): <= 8 min on 2 idle cores.
QUICK = {"seeds": 2, "steps": 30}


@dataclass(frozen=True)
class Variant:
    name: str  # shown in tables, e.g. "ar-opd" or "ar-opd λ=0.6"
    method: str
    lam: float | None = None
    partial_ratio: float | None = None

    @property
    def slug(self) -> str:
        out = self.method
        if self.lam is not None:
            out += f"_lam{self.lam:g}"
        if self.partial_ratio is not None:
            out += f"_ratio{self.partial_ratio:g}"
        return out


def plan(settings: CompareSettings) -> list[Variant]:
    """The variants to run, in table order. Sweeps add one variant per value; a single value
    keeps the plain method name."""
    variants = []
    sweep_lam, sweep_ratio = len(settings.lams) > 1, len(settings.partial_ratios) > 1
    for method in settings.methods:
        if method == "partial-opd":
            for r in settings.partial_ratios:
                variants.append(Variant(method + (f" ρ={r:g}" if sweep_ratio else ""), method,
                                        None, r))
        elif method == "ar-opd":
            for r in settings.partial_ratios:
                for lam in settings.lams:
                    tag = (f" λ={lam:g}" if sweep_lam else "") + (f" ρ={r:g}" if sweep_ratio else "")
                    variants.append(Variant(method + tag, method, lam, r))
        else:
            variants.append(Variant(method, method))
    return variants


def schedule(settings: CompareSettings) -> list[tuple[Variant, int]]:
    """(variant, seed) pairs in run order; base is evaluated once (it is deterministic)."""
    first = settings.first_seed
    return [(v, s) for v in plan(settings)
            for s in range(first, first + (1 if v.method == "base" else settings.seeds))]


def run_overrides(lab, variant: Variant, seed: int, steps: int, run_dir: Path,
                  extra: dict) -> dict:
    """The config of one trained run: the lab preset, then the variant, then `extra`."""
    from aropd_mlx.lab.defaults import lab_preset

    out = {**lab_preset(lab, None), "train.method": variant.method, "train.steps": steps,
           "train.seed": seed, "train.save_every": steps, "out": str(run_dir), **extra}
    if variant.lam is not None:
        out["objective.lam"] = variant.lam
    if variant.partial_ratio is not None:
        out["views.partial_ratio"] = variant.partial_ratio
    if variant.method == "base":
        out["train.method"] = "sft"  # not trained; a valid config for the evaluation only
    return out


def run_metrics(summary: dict) -> dict:
    """The compared numbers of one evaluation: overall rates plus those of the longest problems
    (the largest k of the lab, or else the largest non-empty length bucket)."""
    groups = summary.get("by_k") or summary.get("by_length") or {}
    long = groups[list(groups)[-1]] if groups else {}
    if summary.get("by_k"):
        long = groups[max(groups, key=lambda g: int(g))]
    return {"accuracy": summary.get("accuracy"),
            "all_steps_correct_rate": summary.get("all_steps_correct_rate"),
            "long_accuracy": long.get("accuracy"),
            "long_all_steps_correct_rate": long.get("all_steps_correct_rate"),
            "shortcut_rate": summary.get("shortcut_rate")}


def run_one(lab, variant: Variant, seed: int, settings: CompareSettings, data: dict,
            on_step: Callable[[dict], None] | None = None) -> dict:
    """Train (unless base) and evaluate one (variant, seed); returns and saves result.json."""
    from aropd_mlx.config import load_config, save_config
    from aropd_mlx.evaluate import evaluate
    from aropd_mlx.lab.setup import checker
    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.trainer import train

    run_dir = Path(settings.out) / "runs" / variant.slug / f"seed{seed}"
    steps = settings.steps_for(variant.method)
    spec = json.loads(json.dumps({"variant": asdict(variant), "seed": seed, "steps": steps,
                                  "pool": settings.pool, "overrides": settings.overrides,
                                  "dev": settings.dev, "setting": settings.setting,
                                  "lab": lab.settings.key()}))  # as it reads back from JSON
    saved = run_dir / "result.json"
    if settings.reuse and saved.is_file():
        try:
            cached = read_json(saved)
        except UserError:  # unreadable (cut short by a crash before writes were atomic): redo
            cached = {}
        if cached.get("spec") == spec:  # where it is now (a compare folder may be moved)
            return {**cached, "run_dir": str(run_dir)}
    shutil.rmtree(run_dir, ignore_errors=True)  # not reused: made again from scratch
    cfg = load_config(overrides=run_overrides(lab, variant, seed, steps, run_dir,
                                              settings.overrides))
    model, tokenizer = load_student(cfg.model, seed=seed)
    t0 = time.perf_counter()
    if variant.method == "base":
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        summary = {"steps_done": 0, "train_seconds": 0.0}
    else:
        teacher = Teacher.create(model, tokenizer, cfg.model)
        summary = train(cfg, model, tokenizer, data["train"], teacher=teacher, on_step=on_step)
    t1 = time.perf_counter()
    ev = evaluate(model, tokenizer, data["eval"], cfg.views, checker=checker,
                  max_new_tokens=cfg.rollout.max_new_tokens, seed=seed).summary()
    t2 = time.perf_counter()
    summary.update(method=variant.method, eval_after=ev)
    write_json(run_dir / "summary.json", summary)
    result = {"spec": spec, "name": variant.name, "seed": seed, "run_dir": str(run_dir),
              "metrics": run_metrics(ev), "eval": ev, "train_wall_s": t1 - t0,
              "eval_wall_s": t2 - t1, "train_seconds": summary.get("train_seconds", 0.0)}
    write_json(saved, result)  # last, and whole: its presence marks the run finished
    return result


GROUP_METRICS = ("accuracy", "all_steps_correct_rate", "shortcut_rate")


def length_groups(ks: list[str], edges: tuple[int, ...], tokens_of_k: Callable[[int], int]) -> dict:
    """Response-length buckets (lo, hi] in tokens, each with the ks whose correct response
    (`tokens_of_k`, EOS included) falls in it: {"<=64": ["5", "10"], "64-128": [...], ...}.
    Empty buckets are left out. A bucket holds the same problems for every method."""
    from aropd_mlx.evaluate import bucket_label

    bounds = list(zip((0, *edges), (*edges, None)))
    groups: dict[str, list[str]] = {}
    for k in ks:
        n = tokens_of_k(int(k))
        lo, hi = next(b for b in bounds if b[1] is None or n <= b[1])
        groups.setdefault(bucket_label(lo, hi), []).append(k)
    order = [bucket_label(lo, hi) for lo, hi in bounds]
    return {g: groups[g] for g in order if g in groups}


def _pooled(run: dict, ks: list[str], metric: str) -> float | None:
    """One run's rate over the problems of several ks (weighted by each k's count)."""
    cells = [run["eval"].get("by_k", {}).get(k, {}) for k in ks]
    cells = [c for c in cells if c.get(metric) is not None]
    if not cells:
        return None
    weights = [c.get("n", 1) for c in cells]
    return sum(w * c[metric] for w, c in zip(weights, cells)) / sum(weights)


def reference_of(variants: list[Variant], v: Variant, ref: str) -> Variant | None:
    """The variant that `v`'s deltas against method `ref` pair with: the only one of that
    method, or in a partial-ratio sweep the one at v's ratio (AR-OPD ρ=0.3 against Partial OPD
    ρ=0.3); none for v's own method."""
    found = [u for u in variants if u.method == ref and ref != v.method]
    if len(found) > 1:
        found = [u for u in found if u.partial_ratio == v.partial_ratio]
    return found[0] if len(found) == 1 else None


def aggregate(variants: list[Variant], results: dict[str, list[dict]],
              length_buckets: dict[str, list[str]] | None = None) -> list[dict]:
    """Per variant: each metric's mean and 95% interval over seeds, the same by k (and by
    response-length bucket, from `length_groups`), and the paired deltas against each of
    REFERENCES that ran."""
    by_name = {v.name: {r["seed"]: r for r in results[v.name]} for v in variants}
    rows = []
    for v in variants:
        runs = by_name[v.name]
        refs = {ref: by_name[u.name] for ref in REFERENCES
                if (u := reference_of(variants, v, ref)) is not None}
        row = {"name": v.name, "method": v.method, "lam": v.lam, "partial_ratio": v.partial_ratio,
               "seeds": sorted(runs), "stats": {}, "deltas": {}}
        for m in METRICS:
            row["stats"][m] = mean_ci([r["metrics"][m] for r in runs.values()])
        ks = sorted({k for r in runs.values() for k in r["eval"].get("by_k", {})}, key=int)
        for field_name, groups in (("by_k", {k: [k] for k in ks}),
                                   ("by_length", length_buckets)):
            if groups is None:
                continue
            row[field_name] = {g: {m: mean_ci([_pooled(r, gks, m) for r in runs.values()])
                                   for m in GROUP_METRICS} for g, gks in groups.items()}
            row["deltas_" + field_name] = {ref: {g: {m: paired_deltas(
                {s: _pooled(r, gks, m) for s, r in runs.items()},
                {s: _pooled(r, gks, m) for s, r in ref_runs.items()})
                for m in ("all_steps_correct_rate", "shortcut_rate")} for g, gks in groups.items()}
                for ref, ref_runs in refs.items()}
        for ref, ref_runs in refs.items():
            row["deltas"][ref] = {m: paired_deltas(
                {s: r["metrics"][m] for s, r in runs.items()},
                {s: r["metrics"][m] for s, r in ref_runs.items()}) for m in METRICS}
        row["train_seconds_mean"] = mean_ci([r["train_seconds"] for r in runs.values()])["mean"]
        rows.append(row)
    return rows


def _step_reporter(say: Callable[[str], None], steps: int) -> Callable[[dict], None]:
    every = max(1, steps // 5)

    def on_step(line: dict) -> None:
        if line["step"] % every == 0:
            say(f"    step {line['step']}/{steps}  loss {line['loss']:.4f}  "
                f"{line['time_step']:.2f} s/step")

    return on_step


def load_lab_data(lab, pool: int | None, dev: bool = False, setting: str = "clean") -> dict:
    """The train pool (its references in the setting's style) and the evaluation problems."""
    from aropd_mlx.data import load_examples

    train_ex = load_examples(str(lab.train_path), need=("question", "solution", "answer"))
    if pool is not None:
        train_ex = train_ex[:pool]
    if SETTINGS[setting] != "oracle":
        train_ex = other_writer(train_ex, SETTINGS[setting])
    if dev:  # problems apart from the held-out set: choosing settings leaves it untouched
        from aropd_mlx.lab.measure import dev_examples

        return {"train": train_ex, "eval": dev_examples(lab.settings)}
    return {"train": train_ex, "eval": load_examples(str(lab.eval_path), need=("question", "answer"))}


def other_writer(examples: list, style: str) -> list:
    """The examples with their solutions rewritten in another writer's `style`."""
    import random

    from aropd_mlx.lab.task import reference_variant

    return [replace(e, solution=reference_variant(asdict(e), style, random.Random(e.id))["solution"])
            for e in examples]


def compare(settings: CompareSettings, lab=None, on_event: Callable[[str], None] | None = None) -> dict:
    """Run every (variant, seed), aggregate, write compare.json and compare.md; return the JSON.
    `lab`: a prepared Lab (default: the lab of `aropd-mlx train`, built once and cached)."""
    from aropd_mlx.lab.defaults import lab_response_tokens
    from aropd_mlx.report import compare_markdown

    settings.validate()
    say = on_event or (lambda _: None)
    if lab is None:
        from aropd_mlx.config import load_config
        from aropd_mlx.lab.defaults import lab_settings_for
        from aropd_mlx.lab.setup import prepare_lab

        lab = prepare_lab(lab_settings_for(load_config()))
    data = load_lab_data(lab, settings.pool, settings.dev, settings.setting)
    variants = plan(settings)
    jobs = schedule(settings)
    ks = [str(k) for k in lab.settings.eval_ks]
    buckets = (length_groups(ks, settings.length_buckets, lab_response_tokens)
               if settings.length_buckets else None)
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    t0 = time.perf_counter()
    for i, (v, seed) in enumerate(jobs, 1):
        steps = settings.steps_for(v.method)
        say(f"[{i}/{len(jobs)}] {v.name} seed {seed}: "
            + ("evaluating" if v.method == "base" else f"training {steps} steps"))
        r = run_one(lab, v, seed, settings, data, on_step=_step_reporter(say, steps))
        results[v.name].append(r)
        m = r["metrics"]
        say(f"    accuracy {m['accuracy']:.3f}, long {m['long_accuracy']:.3f}, train "
            f"{r['train_wall_s']:.0f}s + eval {r['eval_wall_s']:.0f}s")
    out = {"settings": {**asdict(settings), "steps": settings.steps},
           "lab": {"root": str(lab.root), "key": lab.settings.key(),
                   "n_train_pool": len(data["train"]), "n_eval": len(data["eval"])},
           "length_buckets": buckets,
           "variants": aggregate(variants, results, buckets),
           "runs": [{"name": r["name"], "seed": r["seed"], "metrics": r["metrics"],
                     "run_dir": str(Path(r["run_dir"]).relative_to(settings.out)),  # from OUT
                     "train_wall_s": r["train_wall_s"], "eval_wall_s": r["eval_wall_s"]}
                    for rs in results.values() for r in rs],
           "wall_seconds": time.perf_counter() - t0,  # this call (finished runs are reused)
           "compute_seconds": sum(r["train_wall_s"] + r["eval_wall_s"]
                                  for rs in results.values() for r in rs)}
    out_dir = Path(settings.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compare.json", out)
    write_text(out_dir / "compare.md", compare_markdown(out))
    return out


def quick_settings(base: CompareSettings) -> CompareSettings:
    return replace(base, **QUICK)
