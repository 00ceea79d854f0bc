"""Benchmark: one training step on 1 rank vs 2 ranks (ring backend, loopback), with the share
of the 2-rank step spent in the cross-rank reduction (distributed.World.reduce).

    python -m aropd_mlx.bench.distributed MODEL_DIR OUT_DIR

Each world size runs in its own `mlx.launch`; the first step (compile, warm-up) is dropped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from aropd_mlx.jsonio import read_json

_BENCH_SCRIPT = r'''
import json, sys, time
from aropd_mlx import distributed, trainer
from aropd_mlx.batches import PromptEncoder, draw_batch
from aropd_mlx.models import Teacher, load_student
from aropd_mlx.optimizer import make_optimizer
sys.path.insert(0, {tests!r})
from helpers import lab_examples, tiny_config

world = distributed.init()
cfg = tiny_config({model!r}, {out!r} + f"/r{{world.rank}}", **{overrides!r})
model, tok = load_student(cfg.model)
teacher = Teacher.create(model, tok, cfg.model)
opt = make_optimizer(cfg); opt.init(model.trainable_parameters())
enc = PromptEncoder(cfg, tok)
times, reduce_t = [], []
for step in range({steps}):
    batch = world.shard(draw_batch(cfg, lab_examples(), enc, step, min_size=world.size))
    t = time.perf_counter()
    line = trainer.run_step(cfg, model, tok, opt, teacher, batch, step, world=world)
    times.append(time.perf_counter() - t)
    reduce_t.append(line.get("time_allreduce", 0.0))
from mlx.utils import tree_flatten
n_par = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
if world.is_main:
    json.dump({{"world": world.size, "step_s": times[1:], "allreduce_s": reduce_t[1:],
               "lora_params": n_par}}, open({out!r} + f"/bench-{{world.size}}.json", "w"))
'''


def benchmark(model_path: str, out: str, steps: int = 4, batch_size: int = 8,
              tests_dir: str | None = None, **overrides) -> dict:
    """Median step time of a 1-rank and a 2-rank (ring, loopback) run of the same global batch,
    and the share of the 2-rank step spent in the gradient all-reduce. The first step (compile,
    warm-up) is dropped. Needs tests/helpers.py for the tiny config (`tests_dir`)."""
    tests_dir = tests_dir or str(Path(__file__).resolve().parents[2] / "tests")
    Path(out).mkdir(parents=True, exist_ok=True)
    over = {"train.batch_size": batch_size, "train.steps": steps, **overrides}
    script = Path(out) / "bench_step.py"
    script.write_text(_BENCH_SCRIPT.format(tests=tests_dir, model=str(model_path), out=str(out),
                                           overrides=over, steps=steps))
    result = {}
    for n in (1, 2):
        cmd = ["mlx.launch", "-n", str(n), "--backend", "ring", "--", sys.executable, str(script)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        path = Path(out) / f"bench-{n}.json"
        if not path.is_file():  # the launcher may exit 0 while a rank failed
            raise RuntimeError(f"benchmark with {n} rank(s) wrote no result:\n{proc.stderr[-2000:]}")
        r = read_json(path)
        result[n] = {"step_s": float(np.median(r["step_s"])),
                     "allreduce_s": float(np.median(r["allreduce_s"])) if r["allreduce_s"] else 0.0,
                     "lora_params": r["lora_params"]}
    two = result[2]
    return {"batch_size": batch_size, "one_rank_step_s": result[1]["step_s"],
            "two_rank_step_s": two["step_s"], "speedup": result[1]["step_s"] / two["step_s"],
            "allreduce_s": two["allreduce_s"], "allreduce_share": two["allreduce_s"] / two["step_s"],
            "allreduce_bytes": 4 * two["lora_params"]}


if __name__ == "__main__":  # python -m aropd_mlx.bench.distributed MODEL_DIR OUT_DIR
    print(json.dumps(benchmark(sys.argv[1], sys.argv[2]), indent=2))
