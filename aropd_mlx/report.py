"""Reports: PNG plots of runs (or of a `compare` output) and the markdown of a comparison.

    written = report(["runs/lab"], out="runs/lab/plots")        # one run
    written = report(["runs/compare"])                          # a compare dir: every variant

Inputs per directory: metrics.jsonl (training curves), summary.json `eval_after` (accuracy),
diagnostics.json (per-token signals by relative position / length), compare.json (means and
95% intervals over seeds). Runs named .../<variant>/seed<N> are averaged per variant. A plot
whose data is absent everywhere is skipped, never drawn empty.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from aropd_mlx.diagnostics import BUCKET_NAMES, N_DECILES, DiagnosticsAccumulator, load_diagnostics
from aropd_mlx.errors import UserError
from aropd_mlx.evaluate import markdown_table
from aropd_mlx.jsonio import read_json
from aropd_mlx.stats import format_ci, mean_ci

SIGNAL_LABELS = {
    "kl_full_partial": "KL(full ‖ partial) [nats]",
    "kl_student_target": "KL(student ‖ target) [nats]",
    "residual_uptake": "residual uptake [nats]\nKL(S‖partial) − KL(S‖full)",
    "clip_rate": "clip rate (share of vocab entries)",
    "top16_overlap": "top-16 overlap student/target",
    "entropy_gap": "entropy gap [nats]\nH(student) − H(target)",
}
METRIC_LABELS = {"accuracy": "accuracy", "all_steps_correct_rate": "all-steps-correct",
                 "long_accuracy": "long-k accuracy", "long_all_steps_correct_rate": "long-k all-steps",
                 "shortcut_rate": "shortcut rate"}


# ----------------------------------------------------------------------------- inputs

def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _label(run_dir: Path) -> str:
    """A run's group label: the variant for .../<variant>/seed<N>, else the directory name."""
    if re.fullmatch(r"seed\d+", run_dir.name):
        return run_dir.parent.name
    return run_dir.name


def collect(run_dirs: list[str | Path]) -> dict:
    """Runs grouped by label ({label: [run dict]}) and the compare.json files found."""
    groups: dict[str, list[dict]] = {}
    compares = []
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise UserError(f"report: {d} is not a directory")
        comp = read_json(d / "compare.json", missing=None)
        if comp is not None:
            compares.append(comp)
            for r in comp.get("runs", []):
                groups.setdefault(r["name"], []).append(_load_run(d / r["run_dir"]))
        elif (d / "metrics.jsonl").is_file() or (d / "summary.json").is_file():
            groups.setdefault(_label(d), []).append(_load_run(d))
        else:
            raise UserError(f"report: {d} holds no metrics.jsonl, summary.json or compare.json")
    return {"groups": groups, "compares": compares}


def _load_run(d: Path) -> dict:
    summary = read_json(d / "summary.json", missing={})
    return {"dir": d, "metrics": _read_jsonl(d / "metrics.jsonl"), "summary": summary,
            "diagnostics": load_diagnostics(d)}


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


BEFORE = " (before training)"


def _color(label: str, labels: list[str]):
    """One color per variant in every plot (tab10 by order of appearance); a variant's
    evaluation before training gets its color, lighter."""
    from matplotlib import colors

    base = label[: -len(BEFORE)] if label.endswith(BEFORE) else label
    names = list(dict.fromkeys(l[: -len(BEFORE)] if l.endswith(BEFORE) else l for l in labels))
    c = f"C{names.index(base) % 10}" if base in names else "C9"
    return colors.to_rgba(c, alpha=0.45 if label.endswith(BEFORE) else 1.0)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = [y[: i + 1].mean() for i in range(window - 1)]  # no lag at the start
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def _series(runs: list[dict], key: str):
    """(steps, mean over runs, min, max) of a metrics key, over the steps all runs have."""
    per_run = [{l["step"]: l[key] for l in r["metrics"] if l.get(key) is not None} for r in runs]
    per_run = [p for p in per_run if p]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(p) for p in per_run)))
    if not steps:
        return None
    ys = np.array([[p[s] for s in steps] for p in per_run], dtype=float)
    return np.array(steps), ys.mean(0), ys.min(0), ys.max(0)


def plot_training(groups: dict, out: Path) -> Path | None:
    keys = [("loss", "training loss (NLL for SFT, divergence otherwise)"),
            ("kl_student_target", "KL(student ‖ target) [nats/token]")]
    keys = [(k, lab) for k, lab in keys if any(_series(rs, k) for rs in groups.values())]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 4.2), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], keys):
        series = {label: _series(runs, key) for label, runs in groups.items()}
        longest = max(len(s[0]) for s in series.values() if s is not None)
        window = max(1, longest // 20)  # one window for every line of the panel
        for label, runs in groups.items():
            if series[label] is None:
                continue
            steps, mean, lo, hi = series[label]
            line, = ax.plot(steps, _smooth(mean, window), label=f"{label} (n={len(runs)})",
                            color=_color(label, list(groups)))
            if len(runs) > 1:
                ax.fill_between(steps, _smooth(lo, window), _smooth(hi, window),
                                color=line.get_color(), alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        smooth = "raw" if window == 1 else f"moving average over {window} steps"
        ax.set_title(f"{key} per step ({smooth}; band: min–max over seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "training_curves.png")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _accuracy_table(groups: dict, compares: list[dict], metric: str, by: str) -> dict:
    """{label: {group: (mean, half_width or None)}} of a metric by k or by length: compare.json
    intervals where present, else the runs' evaluations (after, and before when logged). By
    length, a compare's own buckets (--length-buckets: the length of a correct response) are
    not mixed with the runs' (the length of the response given)."""
    table: dict[str, dict] = {}
    for comp in compares:
        for v in comp["variants"]:
            if v.get(by):
                table[v["name"]] = {g: (c[metric]["mean"], c[metric]["half_width"])
                                    for g, c in v[by].items() if c[metric]["mean"] is not None}
    if by == "by_length" and table:
        return {k: v for k, v in table.items() if v}
    for label, runs in groups.items():
        for when, name in (("eval_before", label + BEFORE), ("eval_after", label)):
            if name in table:
                continue
            rows: dict = {}
            for r in runs:
                for g, row in (r["summary"].get(when) or {}).get(by, {}).items():
                    if row.get(metric) is not None:
                        rows.setdefault(g, []).append(row[metric])
            if rows:
                cis = {g: mean_ci(v) for g, v in rows.items()}
                table[name] = {g: (ci["mean"], ci["half_width"]) for g, ci in cis.items()}
    return {k: v for k, v in table.items() if v}


def _bucket_order(g: str) -> float:
    """A length bucket's place: a run's own (BUCKET_NAMES) or a compare's ('<=64', '>320')."""
    if g in BUCKET_NAMES:
        return BUCKET_NAMES.index(g)
    if g.startswith("<="):
        return 0.0
    return float(g[1:]) + 0.5 if g.startswith(">") else float(g.split("-")[0])


def plot_accuracy(groups: dict, compares: list[dict], out: Path, by: str) -> Path | None:
    """Grouped bars of accuracy, all-steps-correct and the shortcut rate per method (each one
    that was measured), by k (the lab) or by response length; by length only where it shows
    two buckets or more (or there is no k)."""
    panels = [(m, _accuracy_table(groups, compares, m, by))
              for m in ("accuracy", "all_steps_correct_rate", "shortcut_rate")]
    panels = [(m, t) for m, t in panels if t]
    if not panels:
        return None
    if by == "by_length" and _accuracy_table(groups, compares, "accuracy", "by_k"):
        if len({g for row in panels[0][1].values() for g in row}) < 2:
            return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.2), squeeze=False)
    for ax, (metric, table) in zip(axes[0], panels):
        cats = sorted({g for row in table.values() for g in row},
                      key=lambda g: int(g) if by == "by_k" else _bucket_order(g))
        width = 0.8 / max(len(table), 1)
        x = np.arange(len(cats))
        for i, (label, row) in enumerate(table.items()):
            means = [row.get(g, (np.nan, None))[0] for g in cats]
            errs = [row.get(g, (0, None))[1] or 0.0 for g in cats]
            ax.bar(x + (i - (len(table) - 1) / 2) * width, means, width, yerr=errs,
                   capsize=2, label=label, color=_color(label, list(table)))
        ax.set_xticks(x, [f"k={g}" if by == "by_k" else f"{g} tok" for g in cats])
        ax.set_xlabel("operations per problem (k)" if by == "by_k" else "response length"
                      if set(cats) <= set(BUCKET_NAMES) else "length of a correct response")
        ax.set_ylabel(f"{METRIC_LABELS[metric]} (share of problems)")
        ax.set_ylim(0, 1.22)  # headroom: the legend sits above the bars
        ax.set_yticks(np.linspace(0, 1, 6))
        has_ci = any(h is not None for row in table.values() for _, h in row.values())
        ax.set_title(f"held-out {METRIC_LABELS[metric]} (" + ("error bars: 95% CI over seeds)"
                     if has_ci else "one seed each: no interval)"), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=min(len(table), 4), loc="upper center")
    return _save(fig, out / f"accuracy_{by}.png")


def merged_diagnostics(runs: list[dict]) -> dict | None:
    """The summary of every run's accumulator merged (a variant over its seeds)."""
    accs = [DiagnosticsAccumulator.from_json(r["diagnostics"]["accumulator"])
            for r in runs if r.get("diagnostics")]
    if not accs:
        return None
    total = accs[0]
    for a in accs[1:]:
        total = total.merge(a)
    return total.summary()


def plot_diagnostics(groups: dict, out: Path) -> Path | None:
    """Per-token signals by relative position in the rollout (deciles), one line per variant."""
    merged = {label: merged_diagnostics(runs) for label, runs in groups.items()}
    merged = {k: v for k, v in merged.items() if v}
    signals = [s for s in SIGNAL_LABELS if any(s in m["by_position"] for m in merged.values())]
    if not signals:
        return None
    plt = _plt()
    cols = min(3, len(signals))
    rows = -(-len(signals) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    x = (np.arange(N_DECILES) + 0.5) * 100 / N_DECILES
    for ax, sig in zip(axes.flat, signals):
        for label, m in merged.items():
            ys = m["by_position"].get(sig)
            if ys is not None:
                ax.plot(x, [np.nan if y is None else y for y in ys], marker="o", ms=3, label=label,
                        color=_color(label, list(groups)))
        ax.set_xlabel("relative position in the response [% of its length]")
        ax.set_ylabel(SIGNAL_LABELS[sig], fontsize=8)
        ax.set_xlim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(signals):]:
        ax.axis("off")
    fig.suptitle("per-token diagnostics over training, by decile of the rollout", fontsize=10)
    return _save(fig, out / "diagnostics_by_position.png")


def plot_diagnostics_by_length(groups: dict, out: Path) -> Path | None:
    """KL(full || partial) and KL(S || T) by response-length bucket, where two or more buckets
    hold tokens (the lab's responses all fall in "<=256": then there is nothing to show)."""
    merged = {label: merged_diagnostics(runs) for label, runs in groups.items()}
    merged = {k: v for k, v in merged.items() if v}
    signals = [s for s in ("kl_full_partial", "kl_student_target")
               if any(s in m["by_length"] for m in merged.values())]
    buckets = [b for b in BUCKET_NAMES if any(m["by_length"].get(s, {}).get(b) is not None
                                               for m in merged.values() for s in signals)]
    if not signals or len(buckets) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(signals), figsize=(6.5 * len(signals), 4.2), squeeze=False)
    x = np.arange(len(buckets))
    width = 0.8 / len(merged)
    for ax, sig in zip(axes[0], signals):
        for i, (label, m) in enumerate(merged.items()):
            ys = [m["by_length"].get(sig, {}).get(b) for b in buckets]
            ax.bar(x + (i - (len(merged) - 1) / 2) * width, [np.nan if y is None else y for y in ys],
                   width, label=label, color=_color(label, list(groups)))
        ax.set_xticks(x, [f"{b} tok" for b in buckets])
        ax.set_xlabel("response length")
        ax.set_ylabel(SIGNAL_LABELS[sig])
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("per-token diagnostics over training, by response-length bucket", fontsize=10)
    return _save(fig, out / "diagnostics_by_length.png")


def plot_shortcuts(groups: dict, out: Path) -> Path | None:
    """Shortcut events over training, when metrics.jsonl logs them (keys with 'shortcut')."""
    keys = sorted({k for rs in groups.values() for r in rs for l in r["metrics"] for k in l
                   if "shortcut" in k and isinstance(l[k], (int, float))})
    if not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, runs in groups.items():
        for key in keys:
            s = _series(runs, key)
            if s is not None:
                ax.plot(s[0], _smooth(s[1], max(1, len(s[0]) // 20)), label=f"{label}: {key}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("shortcut events (share of rollouts)")
    ax.set_title("shortcut events during training (as logged in metrics.jsonl)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "shortcuts_over_training.png")


def report(run_dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write every plot the inputs support into `out` (default: FIRST_DIR/plots)."""
    if not run_dirs:
        raise UserError("report: name at least one run directory (or a compare output)")
    found = collect(run_dirs)
    out = Path(out) if out else Path(run_dirs[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    groups, compares = found["groups"], found["compares"]
    written = [plot_training(groups, out), plot_accuracy(groups, compares, out, "by_k"),
               plot_accuracy(groups, compares, out, "by_length"), plot_diagnostics(groups, out),
               plot_diagnostics_by_length(groups, out), plot_shortcuts(groups, out)]
    written = [p for p in written if p is not None]
    if compares:
        (out / "compare.md").write_text(compare_markdown(compares[0]))
    return written


# ----------------------------------------------------------------------------- markdown

def _delta_text(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "-"
    if d.get("low") is None:
        return f"{d['mean']:+.3f} (n/a)"
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _reading(variants: list[dict]) -> list[str]:
    """One plain sentence per (AR-OPD variant, reference): better, worse or not shown."""
    lines = []
    for v in (v for v in variants if v["method"] == "ar-opd"):
        for ref, deltas in v["deltas"].items():
            for metric in ("accuracy", "all_steps_correct_rate", "long_accuracy"):
                d = deltas[metric]
                if d["mean"] is None:
                    continue
                if d["low"] is None:
                    verdict = "one seed: no interval, not evidence either way"
                elif d["excludes_zero"]:
                    verdict = "AR-OPD better" if d["mean"] > 0 else "AR-OPD WORSE"
                else:
                    verdict = "no difference shown (the interval contains 0)"
                lines.append(f"- {v['name']} vs {ref}, {METRIC_LABELS[metric]}: "
                             f"{_delta_text(d)} — {verdict}.")
    return lines


def _sampling_example(n) -> str:
    n = n if isinstance(n, int) and n > 0 else 192  # the held-out set's size; unknown: 192
    return f"±{1.96 * (0.25 / n) ** 0.5:.3f} at p = 0.5, n = {n}"


def compare_markdown(comp: dict) -> str:
    """compare.md: the settings, a results table (mean ± 95% CI), per-k tables, deltas."""
    s, lab = comp["settings"], comp.get("lab", {})
    variants = comp["variants"]
    ks = sorted({k for v in variants for k in v["by_k"]}, key=int)
    long = f"k = {ks[-1]}" if ks else "the longest length bucket"
    head = ["# Method comparison on the built-in lab\n",
            f"{s['steps']} optimizer steps per trained method, {s['seeds']} seed(s) "
            f"(base: one greedy evaluation, deterministic), training pool "
            f"{lab.get('n_train_pool', '?')} oracle-traced problems, held-out set "
            f"{lab.get('n_eval', '?')} problems, greedy decoding; compute "
            f"{comp.get('compute_seconds', comp.get('wall_seconds', 0)) / 60:.1f} min "
            "(train + evaluation, summed over runs).\n",
            "Cells: mean ± half-width of the 95% Student-t interval over seeds (n/a: one seed). "
            f"Deltas are paired by seed: mean [95% interval]. 'long-k' = {long}.\n",
            "The intervals cover seed-to-seed noise on this fixed held-out set only; as a "
            "claim about the task, an accuracy p on n problems carries another "
            "±1.96·sqrt(p(1−p)/n) of sampling noise (" + _sampling_example(lab.get("n_eval")) + ").\n"]
    if s.get("setting", "clean") != "clean":
        head.append(f"Setting: **{s['setting']}**: the privileged references (and SFT's "
                    "targets) are another writer's traces, not the oracle's; the checker accepts "
                    "every notation the task allows.\n")
    if s.get("sft_steps"):
        head.append(f"SFT ran {s['sft_steps']} steps (the other methods {s['steps']}); mean "
                    "train seconds per method are in compare.json.\n")
    rows = []
    for v in variants:
        name = v["name"] + (" (no-signal control)" if v["method"] == "opd" else "")
        row = {"method": name, "seeds": len(v["seeds"])}
        for m in ("accuracy", "all_steps_correct_rate", "long_accuracy", "shortcut_rate"):
            row[METRIC_LABELS[m]] = format_ci(v["stats"][m])
        for ref in ("full-opd", "sft"):
            row[f"Δacc vs {ref}"] = _delta_text(v["deltas"].get(ref, {}).get("accuracy"))
        rows.append(row)
    parts = head + ["## Results\n", markdown_table(rows)]
    arop = next((v for v in variants if v["method"] == "ar-opd"), None)
    buckets = comp.get("length_buckets") or {}
    for field_name, groups, label, title in (
            ("by_k", ks, "k={}".format, "by k"),
            ("by_length", list(buckets), lambda g: f"{g} tok (k={','.join(buckets[g])})",
             "by response length (tokens of a correct response, EOS included)")):
        if not groups:
            continue
        for metric in ("accuracy", "all_steps_correct_rate", "shortcut_rate"):
            table = [{"method": v["name"], **{label(g): format_ci(v[field_name].get(g, {}).get(metric, {}))
                                              for g in groups}} for v in variants]
            parts += [f"\n## {METRIC_LABELS[metric]} {title}\n", markdown_table(table)]
        deltas = (arop or {}).get("deltas_" + field_name) or {}
        for metric in ("all_steps_correct_rate", "shortcut_rate") if deltas else ():
            table = [{"AR-OPD minus": ref, **{label(g): _delta_text(deltas[ref].get(g, {}).get(metric))
                                              for g in groups}} for ref in deltas]
            parts += [f"\n## {arop['name']} minus each reference, {METRIC_LABELS[metric]} {title} "
                      "(paired by seed)\n", markdown_table(table)]
    reading = _reading(variants)
    if reading:
        parts += ["\n## AR-OPD against the references\n", "\n".join(reading) + "\n"]
    methods = {v["method"] for v in variants}  # a footnote only for a method that ran
    if "opd" in methods:
        parts.append("\n`opd` scores with the self-teacher's own student view: with a frozen "
                     "self-teacher its target is the student at the start (KL 0), a control with "
                     "no privileged signal.\n")
    if "sft" in methods:
        parts.append("\nSFT trains on the lab's clean oracle traces, which are exactly in the "
                     "student's output format: read it as a ceiling, not a rival (docs/LAB.md).\n"
                     if comp["settings"].get("setting", "clean") == "clean" else
                     "\nSFT trains on the other writer's traces (the setting above): the control "
                     "the paper compares AR-OPD with.\n")
    return "\n".join(parts)
