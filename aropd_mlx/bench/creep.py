"""`aropd-mlx bench creep`: does a long lab run's memory creep upward?

Trains the built-in lab's default run (the preset of `aropd-mlx train`, its method and
sizes) for `steps` steps into a temporary run directory, then reads each step's
`peak_memory_gb` (MLX's peak within that step: trainer.run_step resets it at the start)
from metrics.jsonl. Compared: the highest step peak over an early window (steps 50-100,
after warm-up) and over the last `late` steps (201-300). A ratio above 1.05 means memory
creeps: the cache or a leak grows with the steps. Active and cache memory at the end of each
window say which.

    aropd-mlx bench creep --json /tmp/creep.json   # 300 steps: minutes
    aropd-mlx bench creep --quick                  # 40 steps: steps 10-20 vs the last 13
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

GOAL = 1.05  # the late window's peak at most 5% above the early window's


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def window(lines: list[dict], first: int, last: int) -> dict:
    """Steps first..last (1-based, inclusive): the highest step peak, and the active and cache
    memory at the window's last step (GB)."""
    inside = [l for l in lines if first <= l["step"] <= last]
    if not inside:
        raise ValueError(f"no metrics lines for steps {first}-{last}")
    end = max(inside, key=lambda l: l["step"])
    return {"steps": [first, last], "peak_gb": max(l["peak_memory_gb"] for l in inside),
            "active_gb_at_end": end["active_memory_gb"], "cache_gb_at_end": end["cache_memory_gb"]}


def creep_from_metrics(lines: list[dict], early: tuple[int, int], late: int) -> dict:
    """The early window, the last `late` steps, and late peak / early peak."""
    steps = max(l["step"] for l in lines)
    a, b = window(lines, *early), window(lines, steps - late + 1, steps)
    return {"early": a, "late": b, "ratio": b["peak_gb"] / a["peak_gb"]}


def bench_creep(model_name: str = "lab", steps: int = 300, early: tuple[int, int] = (50, 100),
                late: int = 100, lab=None, overrides: dict | None = None,
                out: str | Path | None = None) -> dict:
    """Train the lab run for `steps` steps (into `out`, else a temporary directory removed
    afterwards) and measure the creep. `lab`: a prepared setup.Lab (default: the built-in
    one); `overrides`: extra config keys (tests: smaller batches)."""
    from aropd_mlx.config import load_config
    from aropd_mlx.data import load_examples
    from aropd_mlx.lab.defaults import lab_preset, lab_settings_for
    from aropd_mlx.lab.setup import prepare_lab
    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.trainer import train

    if model_name != "lab":
        raise ValueError(f"bench creep runs on the lab model, got {model_name!r}")
    if not 1 <= early[0] <= early[1] <= steps - late:
        raise ValueError(f"windows {early} and the last {late} of {steps} steps must not overlap")
    lab = lab or prepare_lab(lab_settings_for(load_config()))
    examples = load_examples(str(lab.train_path), need=("question", "solution", "answer"))
    with tempfile.TemporaryDirectory(prefix="aropd-creep-") as tmp:
        run_dir = Path(out) if out else Path(tmp) / "run"
        cfg = load_config(overrides={**lab_preset(lab), "train.steps": steps,
                                     "train.save_every": steps, "out": str(run_dir),
                                     **(overrides or {})})
        model, tokenizer = load_student(cfg.model, seed=cfg.train.seed)
        teacher = Teacher.create(model, tokenizer, cfg.model)
        summary = train(cfg, model, tokenizer, examples, teacher=teacher)
        lines = read_metrics(run_dir / "metrics.jsonl")
    return {"model": "lab", "method": cfg.train.method, "steps": steps,
            "train_seconds": summary["train_seconds"], **creep_from_metrics(lines, early, late),
            **{f"{k}_gb_by_step": [l[f"{k}_memory_gb"] for l in lines]
               for k in ("peak", "active", "cache")}}


def format_creep(r: dict) -> str:
    a, b = r["early"], r["late"]

    def part(w):
        return (f"steps {w['steps'][0]}-{w['steps'][1]}: peak {w['peak_gb']:.3f} GB, at the end "
                f"active {w['active_gb_at_end']:.3f} GB, cache {w['cache_gb_at_end']:.3f} GB")

    return (f"creep [lab {r['method']}, {r['steps']} steps, {r['train_seconds']:.0f}s]\n"
            f"  {part(a)}\n  {part(b)}\n"
            f"  late / early peak {r['ratio']:.3f} (goal <= {GOAL})")
