"""The TRL side of the peer benchmark, run in its own process (torch only, no MLX loaded).

    python -m aropd_mlx.bench.peer_trl '{"trainer": "gkd", "mode": "default", "model": PATH,
        "rows": 8, "max_new_tokens": 64, "warmup": 1, "rounds": 5, "steps_per_round": 2,
        "device": "cpu"}'

The child stays alive across rounds and speaks a line protocol on stdin/stdout (every protocol
line starts with "AROPD_PEER_"; anything else on stdout is library noise and is ignored):

  child:  loads the model twice (student and frozen teacher), builds the trainer, runs `warmup`
          untimed steps, then prints  AROPD_PEER_WAIT  and blocks reading one line on stdin
  parent: writes  go  (or  stop , or closes stdin: the child exits without a result)
  child:  runs `steps_per_round` steps, prints  AROPD_PEER_ROUND {"round": r, "step_seconds":
          [...], "step_cpu_seconds": [...]}  then  AROPD_PEER_WAIT  again (blocked: idle)
  ...     after the last round:  AROPD_PEER_RESULT {...}  (configuration and completion lengths)

So process start-up, model loading and warm-up are never timed, and the parent can alternate
this child's rounds with its own and with other children's (aropd_mlx.bench.peer.interleave).

The run is the same on-policy distillation as `aropd-mlx` `opd`: the student samples every
step (GKD lmbda = 1), reverse KL (beta = 1), temperature 1, a frozen self-teacher (a second
copy of the same weights), full fine-tuning, float32, one completion per prompt, fixed length
(min_new_tokens = max_new_tokens, so EOS never ends a completion early).
"mode": "default" keeps TRL's performance defaults (gradient_checkpointing=True, and with it
GKD generates without a KV cache); "tuned" sets gradient_checkpointing=False (KV cache on).
bf16 stays off in both (TRL's DistillationConfig turns it on for GPUs; we compare fp32).
"device": "cpu" (use_cpu) or "cuda" (the trainer's default placement; CUDA is synchronized
around every timed step).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time

PREFIX = "AROPD_PEER_"


class StopRounds(Exception):
    """The parent said stop (or closed stdin)."""


def say(kind: str, payload: dict | None = None, out=None) -> None:
    out = out or sys.stdout
    out.write(PREFIX + kind + ("" if payload is None else " " + json.dumps(payload)) + "\n")
    out.flush()


def wait_for_go(inp=None) -> None:
    say("WAIT")
    line = (inp or sys.stdin).readline()
    if line.strip() != "go":
        raise StopRounds(line.strip() or "EOF")


def plan(spec: dict) -> tuple[int, int, int]:
    """(warmup, rounds, steps_per_round); the old one-shot spec {"steps": n} is 1 round of n."""
    rounds = int(spec.get("rounds", 1))
    k = int(spec.get("steps_per_round", spec.get("steps", 1)))
    return int(spec.get("warmup", 1)), rounds, k


class RoundKeeper:
    """Counts trainer steps: untimed warm-up, then rounds of k timed steps, each started by the
    parent's "go" and reported when it ends. `sync` (CUDA) runs before every clock read."""

    def __init__(self, warmup: int, rounds: int, k: int, sync=None, inp=None):
        self.warmup, self.rounds, self.k, self.sync, self.inp = warmup, rounds, k, sync, inp
        self.step, self.times, self.cpu = 0, [], []

    def begin(self) -> None:
        i = self.step - self.warmup
        if i >= 0 and i % self.k == 0:
            wait_for_go(self.inp)
            self.times, self.cpu = [], []
        if self.sync:
            self.sync()
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def end(self) -> None:
        if self.sync:
            self.sync()
        wall, cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        i = self.step - self.warmup
        self.step += 1
        if i < 0:
            return
        self.times.append(wall)
        self.cpu.append(cpu)
        if (i + 1) % self.k == 0:
            say("ROUND", {"round": i // self.k, "step_seconds": self.times,
                          "step_cpu_seconds": self.cpu})


def _dataset(rows: int, steps: int, seed: int, kind: str):
    from datasets import Dataset

    from aropd_mlx.bench.common import lab_examples

    examples = lab_examples(rows * steps, seed)
    if kind == "gkd":
        return Dataset.from_list([{"messages": [
            {"role": "user", "content": e.question},
            {"role": "assistant", "content": e.solution}]} for e in examples])
    return Dataset.from_list([{"prompt": [{"role": "user", "content": e.question}]}
                              for e in examples])


def _common_args(spec: dict, out_dir: str, total_steps: int) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=spec["rows"],
                gradient_accumulation_steps=1, max_steps=total_steps, learning_rate=1e-5,
                logging_steps=10_000, save_strategy="no", report_to=[],
                use_cpu=spec.get("device", "cpu") == "cpu", bf16=False,
                fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=spec.get("seed", 0),
                temperature=1.0, beta=1.0, **({"gradient_checkpointing": False}
                                              if spec["mode"] == "tuned" else {}))


def run(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.manual_seed(spec.get("seed", 0))
    device = spec.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda: torch sees no CUDA device")
    path, rows, new = spec["model"], spec["rows"], spec["max_new_tokens"]
    warmup, rounds, k = plan(spec)
    total = warmup + rounds * k
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    keeper = RoundKeeper(warmup, rounds, k,
                         sync=torch.cuda.synchronize if device == "cuda" else None)
    lengths = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            keeper.begin()

        def on_step_end(self, args, state, control, **kwargs):
            keeper.end()

    out_dir = tempfile.mkdtemp(prefix="aropd-trl-")
    data = _dataset(rows, total, spec.get("seed", 0), spec["trainer"])
    if spec["trainer"] == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**_common_args(spec, out_dir, total), lmbda=1.0, max_new_tokens=new,
                         max_length=4096)
        trainer = GKDTrainer(model=load(), teacher_model=load(), args=args, train_dataset=data,
                             processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.generation_config.min_new_tokens = new  # fixed-length completions
        generate = trainer.generate_on_policy_outputs

        def counted(model, inputs, generation_config):
            ids, mask, labels = generate(model, inputs, generation_config)
            lengths.extend((labels != -100).sum(dim=1).tolist())
            return ids, mask, labels

        trainer.generate_on_policy_outputs = counted
    else:
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**_common_args(spec, out_dir, total), max_completion_length=new,
                                  generation_kwargs={"min_new_tokens": new})
        trainer = DistillationTrainer(model=load(), teacher_model=load(), args=args,
                                      train_dataset=data, processing_class=tokenizer,
                                      callbacks=[StepTimer()])
        single = trainer._generate_single_turn

        def counted(*a, **k):
            out = single(*a, **k)
            lengths.extend(len(c) for c in out)
            return out

        trainer._generate_single_turn = counted
    try:
        trainer.train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"trainer": spec["trainer"], "mode": spec["mode"], "device": device,
            "completion_tokens_mean": sum(lengths) / max(len(lengths), 1),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "torch_threads": torch.get_num_threads(), "steps_run": keeper.step}


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.loads(sys.argv[1])
    try:
        result = run(spec)
    except StopRounds:
        return
    say("RESULT", result)


if __name__ == "__main__":
    main()
