"""The TRL side of the peer benchmark, run in its own process (torch only, no MLX loaded):

    python -m aropd_mlx.bench.peer_trl '{"trainer": "gkd", "mode": "default", "model": PATH,
                                         "rows": 8, "max_new_tokens": 64, "steps": 2}'
prints one JSON line: wall and CPU seconds of every step (the first is a warm-up) and the
completion lengths seen.

The run is the same on-policy distillation as `aropd-mlx` `opd`: the student samples every
step (GKD lmbda = 1), reverse KL (beta = 1), temperature 1, a frozen self-teacher (a second
copy of the same weights), full fine-tuning, float32, one completion per prompt, fixed length
(min_new_tokens = max_new_tokens, so EOS never ends a completion early).
"mode": "default" keeps TRL's performance defaults (gradient_checkpointing=True, and with it
GKD generates without a KV cache); "tuned" sets gradient_checkpointing=False (KV cache on).
bf16 stays off in both (TRL's DistillationConfig turns it on for GPUs; we compare fp32).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time


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


def _common_args(spec: dict, out_dir: str) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=spec["rows"],
                gradient_accumulation_steps=1, max_steps=spec["steps"] + 1, learning_rate=1e-5,
                logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                fp16=False, dataloader_num_workers=0, disable_tqdm=True, seed=spec.get("seed", 0),
                temperature=1.0, beta=1.0, **({"gradient_checkpointing": False}
                                              if spec["mode"] == "tuned" else {}))


def run(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    torch.manual_seed(spec.get("seed", 0))
    path, rows, new = spec["model"], spec["rows"], spec["max_new_tokens"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    times, cpu_times, lengths = [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    out_dir = tempfile.mkdtemp(prefix="aropd-trl-")
    data = _dataset(rows, spec["steps"] + 1, spec.get("seed", 0), spec["trainer"])
    if spec["trainer"] == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**_common_args(spec, out_dir), lmbda=1.0, max_new_tokens=new,
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

        args = DistillationConfig(**_common_args(spec, out_dir), max_completion_length=new,
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
    return {"trainer": spec["trainer"], "mode": spec["mode"], "step_seconds": times,
            "step_cpu_seconds": cpu_times,
            "completion_tokens_mean": sum(lengths) / max(len(lengths), 1),
            "gradient_checkpointing": bool(args.gradient_checkpointing),
            "torch_threads": torch.get_num_threads()}


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    spec = json.loads(sys.argv[1])
    result = run(spec)
    print("AROPD_PEER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
