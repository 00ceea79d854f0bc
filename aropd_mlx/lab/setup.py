"""The built-in lab: task data, views, the warm-started tiny self-teacher, cached on disk.

`aropd-mlx train` with no arguments runs on this. The model is a tiny llama trained from
scratch with the project's own `sft` method on a mix of student / partial / full views, so
that (a) from the student view it solves the task imperfectly, worse on long instances, and
(b) given the privileged views it uses them (LAB.md). Everything is deterministic from a seed
and cached under ~/.cache/aropd-mlx/lab/ (override with AROPD_MLX_CACHE).

    lab = prepare_lab(LabSettings())          # builds once (a few minutes on 2 cores), then reuses
    lab.model_path, lab.train_path, lab.eval_path, lab.overrides()
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from aropd_mlx import __version__
from aropd_mlx.data import Example, write_examples
from aropd_mlx.lab import task
from aropd_mlx.lab.tiny import TinySpec, build_tiny_model


@dataclass(frozen=True)
class LabSettings:
    seed: int = 0
    k_min: int = 1  # operations per problem (the length dial)
    k_max: int = 8
    n_train: int = 20000  # problems in the prompt pool (warm start and distillation)
    eval_ks: tuple[int, ...] = (2, 4, 6, 8)
    n_eval_per_k: int = 64
    spec: TinySpec = field(default_factory=lambda: TinySpec(
        hidden=128, layers=3, heads=4, kv_heads=4, intermediate=384, max_position=512))
    warm_steps: int = 1000
    warm_batch: int = 32
    warm_lr: float = 3e-3
    warm_view_mix: tuple[float, float, float] = (0.4, 0.2, 0.4)

    def key(self) -> str:
        blob = json.dumps({"v": __version__, **asdict(self)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def view_overrides(k_max: int) -> dict:
    """The lab's views: the reference is padded to k_max lines so that reference line i sits at
    a fixed distance from response line i, which a tiny model can learn to align (LAB.md)."""
    return {
        "views.student_template": "{question}",
        "views.privileged_template": "{question}\n{reference}\nA:{answer}",
        "views.response_template": "{solution}\nA:{answer}",
        "views.pad_reference_lines": k_max,
        "views.pad_line": ".....",
        "views.use_chat_template": True,
    }


def cache_root() -> Path:
    return Path(os.environ.get("AROPD_MLX_CACHE", Path.home() / ".cache" / "aropd-mlx")) / "lab"


@dataclass(frozen=True)
class Lab:
    settings: LabSettings
    root: Path

    @property
    def model_path(self) -> Path:
        return self.root / "model"

    @property
    def train_path(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def eval_path(self) -> Path:
        return self.root / "eval.jsonl"

    def overrides(self) -> dict:
        """Config defaults of a lab run (a user's YAML and flags still win)."""
        return {"model.path": str(self.model_path), "data.train": str(self.train_path),
                "data.eval": str(self.eval_path), "data.max_prompt_tokens": 512,
                "rollout.max_new_tokens": 6 * self.settings.k_max + 8,
                **view_overrides(self.settings.k_max)}


def checker(example, response: str) -> dict:
    """The lab's exact checker (aropd_mlx.lab.task.check) as an evaluation record."""
    v = task.check(example.question, response)
    return {"correct": v.answer_correct, "all_steps_correct": v.all_steps_correct,
            "shortcut": v.shortcut, "first_error_step": v.first_error_step,
            "k": v.steps_required}


def eval_examples(settings: LabSettings) -> list[dict]:
    import random

    rng = random.Random(10_000 + settings.seed)
    return [task.make_example(rng, k, id=f"eval-k{k}-{i}")
            for k in settings.eval_ks for i in range(settings.n_eval_per_k)]


def write_data(settings: LabSettings, root: Path) -> None:
    write_examples(root / "train.jsonl", task.generate(settings.n_train, settings.k_min,
                                                       settings.k_max, seed=settings.seed))
    write_examples(root / "eval.jsonl", eval_examples(settings))


def warm_start(settings: LabSettings, root: Path, on_step: Callable | None = None) -> Path:
    """Train the tiny model from scratch with the project's own `sft`, then save it as a model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from aropd_mlx.config import load_config
    from aropd_mlx.data import load_examples
    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.trainer import train

    init_dir = build_tiny_model(root / "init", settings.spec)
    overrides = {
        **view_overrides(settings.k_max), "model.path": str(init_dir), "model.fine_tune_type": "full",
        "train.method": "sft", "train.steps": settings.warm_steps, "train.batch_size": settings.warm_batch,
        "train.learning_rate": settings.warm_lr, "train.min_lr_ratio": 0.1, "train.grad_clip": 1.0,
        "train.warmup_steps": 20, "train.sft_view_mix": list(settings.warm_view_mix),
        "train.save_every": settings.warm_steps, "train.seed": settings.seed,
        "out": str(root / "warm_run"),
    }
    cfg = load_config(overrides=overrides)
    shutil.rmtree(cfg.out, ignore_errors=True)  # what an interrupted build left
    model, tokenizer = load_student(cfg.model)
    examples = load_examples(str(root / "train.jsonl"), need=("question", "solution", "answer"))
    train(cfg, model, tokenizer, examples, teacher=Teacher("frozen"), on_step=on_step)
    out = root / "model.tmp"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(init_dir, out)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    return out


def prepare_lab(settings: LabSettings = LabSettings(), *, rebuild: bool = False,
                on_step: Callable | None = None, root: Path | None = None) -> Lab:
    """The lab's data and warm-started model, built once and cached (atomic: a rename)."""
    root = Path(root) if root else cache_root() / settings.key()
    lab = Lab(settings, root)
    if rebuild:
        shutil.rmtree(root, ignore_errors=True)
    if lab.model_path.is_dir() and lab.train_path.is_file() and lab.eval_path.is_file():
        return lab
    root.mkdir(parents=True, exist_ok=True)
    write_data(settings, root)
    built = warm_start(settings, root, on_step)
    os.replace(built, lab.model_path)
    (root / "lab.json").write_text(json.dumps(asdict(settings), indent=2, default=str))
    shutil.rmtree(root / "init", ignore_errors=True)
    return lab


def view_logprobs(model, tokenizer, examples, views) -> dict[str, float]:
    """Mean per-token log-prob of each example's oracle response under each view: the evidence
    that the teacher uses its privileged context (full > partial > student when it does)."""
    import mlx.core as mx
    import numpy as np

    from aropd_mlx.models import head_from_model
    from aropd_mlx.scoring import response_hidden
    from aropd_mlx.views import encode_response, encode_views, render_views

    head, sums = head_from_model(model), {}
    for ex in examples:
        prompts = encode_views(tokenizer, render_views(ex, views), views)
        resp = encode_response(tokenizer, views.response_template.format(
            solution=ex.solution, answer=ex.answer))
        for name, prompt in prompts.items():
            h = response_hidden(model, [prompt], np.array([resp], dtype=np.int32), [len(resp)])
            logits = head(h)[0]
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = mx.take_along_axis(lp, mx.array(resp)[:, None], axis=-1)
            sums.setdefault(name, []).append(float(picked.mean()))
    return {name: float(np.mean(v)) for name, v in sums.items()}


def to_examples(records: list[dict]) -> list[Example]:
    return [Example(**r) for r in records]
