"""The labelled-layout probe of docs/LAB.md, session 19 (issue 16, item 5): can a lab-sized
student trained on short problems (k <= 12) solve long ones when each response line finds its
operation one hop from a label instead of at a growing distance?

Question: one line per operation, a label (50 letters in a fixed cyclic order from a random
start) and a one-character code for the operation, then a terminal line (the next label and
'.'); the start line `Q:<start>` comes first (--layout top) or last with the first label
(--layout last). Response line: label, code, the lab's own step line (`hK7+5=2`), then the
terminal line copied, then `A:<answer>`. Prints, every --eval-every steps, per k: greedy
whole-response-correct, the median first wrong line, the share of lines with the right label
and code. Reproduce session 19 (one BLAS thread each, ~5 s a step on 2 cores):

    OPENBLAS_NUM_THREADS=1 python scripts/probe_label_layout.py --layout top --theta 500 --steps 600 --out p/top500
    OPENBLAS_NUM_THREADS=1 python scripts/probe_label_layout.py --layout last --theta 500 --steps 600 \\
        --init p/top500/run/checkpoints/step-000600 --out p/last500
"""
import argparse
import collections
import json
import random
import string
from pathlib import Path

import mlx.core as mx

from aropd_mlx.config import load_config
from aropd_mlx.data import Example
from aropd_mlx.lab import task
from aropd_mlx.lab.measure import view_responses
from aropd_mlx.lab.tiny import TinySpec, build_tiny_model
from aropd_mlx.models import Teacher, load_student
from aropd_mlx.trainer import train

LABELS = [c for c in string.ascii_letters if c not in "QA"]
CODE = dict(zip([(op, b) for op in task.OPS for b in task.OPS[op]],
                [c for c in string.punctuation if c not in ".:="]))
EVAL_KS = (6, 12, 16, 24, 32, 40, 48)


def example(rng, k, id, layout):
    ex = task.make_example(rng, k, id=id)
    start, ops = task.parse_question(ex["question"])
    s = rng.randrange(len(LABELS))
    lab = [LABELS[(s + i) % len(LABELS)] for i in range(k + 1)]
    body = "\n".join(f"{lab[i]}{CODE[o]}" for i, o in enumerate(ops)) + f"\n{lab[k]}."
    q = f"Q:{start}\n{body}" if layout == "top" else f"{body}\nQ:{start}{lab[0]}"
    steps = ex["solution"].split("\n")
    sol = "\n".join(f"{lab[i]}{CODE[o]}{steps[i]}" for i, o in enumerate(ops)) + f"\n{lab[k]}."
    return Example(id=id, question=q, solution=sol, answer=ex["answer"])


def measure(model, tok, dev, views, n, step):
    resp = view_responses(model, tok, dev, views, "student", 0.0, 8 * 50 + 8, 0)
    by, fields = collections.defaultdict(list), collections.defaultdict(lambda: [0, 0, 0])
    for e, r in zip(dev, resp):
        want = (e.solution + f"\nA:{e.answer}").split("\n")
        got = [line.strip() for line in r.strip().split("\n")]
        first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        k = len(want) - 2
        by[k].append((got == want, first))
        for w, g in zip(want[:k], got):
            f = fields[k]
            f[0] += 1
            f[1] += g[:1] == w[:1]
            f[2] += g[1:2] == w[1:2]
    row = {k: {"all": sum(a for a, _ in by[k]) / n, "first_err_median": sorted(f for _, f in by[k])[n // 2],
               "label": round(fields[k][1] / max(fields[k][0], 1), 3),
               "code": round(fields[k][2] / max(fields[k][0], 1), 3)} for k in EVAL_KS}
    print(json.dumps({"step": step, **row}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=("top", "last"), required=True)
    ap.add_argument("--theta", type=float, default=500.0, help="RoPE base")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--init", help="a checkpoint folder of an earlier run to start from")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-n", type=int, default=16, help="dev problems per k")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rng = random.Random(19)
    pool = [example(rng, rng.randint(1, 12), f"p-{i}", a.layout) for i in range(20000)]
    rng = random.Random(1919)
    dev = [example(rng, k, f"d-{k}-{i}", a.layout) for k in EVAL_KS for i in range(a.eval_n)]
    out = Path(a.out)
    init = build_tiny_model(out / "init", TinySpec(hidden=128, layers=3, heads=4, kv_heads=4,
                            intermediate=384, max_position=1024, rope_theta=a.theta))
    cfg = load_config(overrides={
        "views.student_template": "{question}", "views.response_template": "{solution}\nA:{answer}",
        "views.use_chat_template": True, "model.path": str(init), "model.fine_tune_type": "full",
        "train.method": "sft", "train.batch_size": 32, "train.learning_rate": 2e-3,
        "train.min_lr_ratio": 0.1, "train.grad_clip": 1.0, "train.warmup_steps": 20,
        "train.sft_view_mix": [1.0, 0.0, 0.0], "train.save_every": 100, "train.seed": 0,
        "train.steps": a.steps, "out": str(out / "run"), "data.max_prompt_tokens": 1024})
    model, tok = load_student(cfg.model)
    if a.init:
        model.load_weights(list(mx.load(str(Path(a.init) / "adapters.safetensors")).items()), strict=True)

    def on_step(line):
        if line["step"] % a.eval_every == 0 or line["step"] == a.steps:
            measure(model, tok, dev, cfg.views, a.eval_n, line["step"])
    train(cfg, model, tok, pool, teacher=Teacher("frozen"), on_step=on_step, resume=True)


if __name__ == "__main__":
    main()
