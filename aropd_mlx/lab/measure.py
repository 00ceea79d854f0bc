"""What a lab teacher can do, measured on held-out problems: the numbers a shipped lab records.

A useful self-teacher for on-policy distillation is *competent but imperfect* (LAB.md): from
the student view it is sharp on short problems and weaker on long ones (there is something
to learn), from the full view it nearly copies the oracle (the privileged context is read),
the partial view helps on the first half of the steps (the anchor is informative), and its
temperature-1 samples are mostly well formed (rollouts are not noise).

    numbers = measure_teacher(model, tokenizer, examples, views)   # examples: lab eval problems
    numbers["student"]["by_k"]["12"]["all_steps_correct"]
"""
from __future__ import annotations

import numpy as np

from aropd_mlx.lab import task
from aropd_mlx.lab.hindsight import format_hindsight, hindsight
from aropd_mlx.rollout import RolloutSettings, sample
from aropd_mlx.views import encode_prompt, render_views


def well_formed(response: str) -> bool:
    """Every line a step `d?d=d` (or a double step `d?d?d=d`) or, last, the answer `A:d` (the
    task's grammar)."""
    lines = [l.strip() for l in response.splitlines() if l.strip()]
    return bool(lines) and task.is_answer_line(lines[-1]) and all(
        task.is_step_line(l) for l in lines[:-1])


def view_responses(model, tokenizer, examples, views, view: str, temperature: float,
                   max_new_tokens: int, seed: int, batch: int = 128) -> list[str]:
    """The decoded response (EOS dropped) to each example under one view (`render_views`'s
    "student", "partial" or "full"), sampled at `temperature` (0: greedy) in batches."""
    eos = set(tokenizer.eos_token_ids)
    settings = RolloutSettings(group_size=1, max_new_tokens=max_new_tokens,
                               temperature=temperature, completion_batch_size=batch)
    out = []
    for start in range(0, len(examples), batch):
        chunk = examples[start:start + batch]
        prompts = [encode_prompt(tokenizer, render_views(e, views)[view], views) for e in chunk]
        resp = sample(model, tokenizer, prompts, settings, seed=seed + start)
        tokens = np.array(resp.tokens)
        for row, n in enumerate(resp.lengths):
            out.append(tokenizer.decode([int(t) for t in tokens[row, :n] if int(t) not in eos]))
    return out


def _rates(examples, responses) -> dict:
    verdicts = [task.check(e.question, r) for e, r in zip(examples, responses)]

    def first_half(v):  # the steps the partial view's half of the reference covers
        half = (v.steps_required + 1) // 2
        return v.first_error_step is None or v.first_error_step >= half

    rows = {"n": len(verdicts),
            "accuracy": float(np.mean([v.answer_correct for v in verdicts])),
            "all_steps_correct": float(np.mean([v.all_steps_correct for v in verdicts])),
            "first_half_correct": float(np.mean([first_half(v) for v in verdicts])),
            "shortcut_rate": float(np.mean([v.shortcut is not None for v in verdicts])),
            "well_formed": float(np.mean([well_formed(r) for r in responses]))}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in rows.items()}


def rates_by_k(examples, responses) -> dict:
    out = {"all": _rates(examples, responses), "by_k": {}}
    ks = sorted({task.check(e.question, "").steps_required for e in examples})
    for k in ks:
        idx = [i for i, e in enumerate(examples) if len(task.parse_question(e.question)[1]) == k]
        out["by_k"][str(k)] = _rates([examples[i] for i in idx], [responses[i] for i in idx])
    return out


def measure_teacher(model, tokenizer, examples, views, *, max_new_tokens: int,
                    seed: int = 0) -> dict:
    """Greedy under each view, plus temperature-1 samples from the student view."""
    out = {}
    for view in ("student", "partial", "full"):
        out[view] = rates_by_k(examples, view_responses(model, tokenizer, examples, views,
                                                        view, 0.0, max_new_tokens, seed))
    out["student_t1"] = rates_by_k(examples, view_responses(
        model, tokenizer, examples, views, "student", 1.0, max_new_tokens, seed))
    return out


def dev_examples(settings, n_per_k: int | None = None) -> list:
    """Problems drawn apart from both the training pool and the held-out set (another seed
    stream), per k of settings.eval_ks: choosing a lab recipe on these keeps the held-out set
    for the results."""
    import random

    from aropd_mlx.data import Example

    rng = random.Random(20_000 + settings.seed)
    n = n_per_k or settings.n_eval_per_k
    return [Example(**task.make_example(rng, k, id=f"dev-k{k}-{i}",
                                        with_outline=settings.with_outline,
                                        outline_start=settings.student_sheet))
            for k in settings.eval_ks for i in range(n)]


def measure_lab(lab, seed: int = 0, dev: bool = False) -> dict:
    """`measure_teacher` of a prepared lab (setup.Lab) on its held-out problems (`dev`: on
    dev_examples instead), and the slip probe of its views, late and early (lab/hindsight.py)."""
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.data import load_examples

    model, tokenizer = load(str(lab.model_path))
    cfg = load_config(overrides=lab.overrides())
    examples = (dev_examples(lab.settings) if dev else
                load_examples(str(lab.eval_path), need=("question", "solution", "answer")))
    numbers = measure_teacher(model, tokenizer, examples, cfg.views,
                              max_new_tokens=cfg.rollout.max_new_tokens, seed=seed)
    numbers["hindsight"] = hindsight(model, tokenizer, examples, cfg.views, seed=seed)
    numbers["hindsight_early"] = hindsight(model, tokenizer, examples, cfg.views, seed=seed,
                                           slip="early")
    return numbers


def format_measure(numbers: dict) -> str:
    """A table: by k, all-steps-correct under each view, and T=1 well-formed / all-steps."""
    ks = list(numbers["student"]["by_k"])
    head = "k      student  partial  partial-1st-half  full   T=1 all-steps  T=1 well-formed"
    lines = [head]
    for k in ks + ["all"]:
        get = (lambda v: numbers[v]["all"]) if k == "all" else (lambda v: numbers[v]["by_k"][k])
        lines.append(f"{k:<6} {get('student')['all_steps_correct']:7.3f}  "
                     f"{get('partial')['all_steps_correct']:7.3f}  "
                     f"{get('partial')['first_half_correct']:16.3f}  "
                     f"{get('full')['all_steps_correct']:5.3f}  "
                     f"{get('student_t1')['all_steps_correct']:13.3f}  "
                     f"{get('student_t1')['well_formed']:15.3f}")
    for key, slip in (("hindsight", "late"), ("hindsight_early", "early")):
        if key in numbers:  # manifests written before a probe existed lack it
            lines += ["", format_hindsight(numbers[key], slip)]
    return "\n".join(lines)
