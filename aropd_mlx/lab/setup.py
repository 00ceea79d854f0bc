"""The built-in lab: task data, views, the warm-started tiny self-teacher, cached on disk.

`aropd-mlx train` with no arguments runs on this (its settings and run preset: defaults.py).
The model is a tiny llama trained from scratch with the project's own `sft` method on a mix of
student / partial / full views, so that (a) from the student view it solves the task
imperfectly, worse on long instances, and (b) given the privileged views it uses them (LAB.md). Everything is deterministic from a seed
and cached under ~/.cache/aropd-mlx/lab/ (override with AROPD_MLX_CACHE).

    lab = prepare_lab(LabSettings())          # builds once (a few minutes on 2 cores), then reuses
    lab.model_path, lab.train_path, lab.eval_path, lab.overrides()
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from aropd_mlx.data import Example, write_examples
from aropd_mlx.lab import shipped, task
from aropd_mlx.lab.defaults import LabSettings, lab_overrides, lab_view_overrides
from aropd_mlx.lab.defaults import view_overrides  # noqa: F401 - API
from aropd_mlx.lab.tiny import build_tiny_model


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
        """Config defaults of a lab run tied to this lab (paths, lengths, views): see defaults.py."""
        return lab_overrides(self)


def checker(example, response: str) -> dict:
    """The lab's exact checker (aropd_mlx.lab.task.check) as an evaluation record."""
    v = task.check(example.question, response)
    return {"correct": v.answer_correct, "all_steps_correct": v.all_steps_correct,
            "shortcut": v.shortcut, "first_error_step": v.first_error_step,
            "k": v.steps_required}


def eval_examples(settings: LabSettings) -> list[dict]:
    rng = random.Random(10_000 + settings.seed)
    return [task.make_example(rng, k, id=f"eval-k{k}-{i}", with_outline=settings.with_outline,
                              outline_start=settings.student_sheet)
            for k in settings.eval_ks for i in range(settings.n_eval_per_k)]


def write_data(settings: LabSettings, root: Path) -> None:
    write_examples(root / "train.jsonl", task.generate(
        settings.n_train, settings.k_min, settings.k_max, seed=settings.seed,
        with_outline=settings.with_outline, outline_start=settings.student_sheet))
    write_examples(root / "eval.jsonl", eval_examples(settings))


def _draw(settings: LabSettings, ex, salt: str = "") -> int:
    """A 32-bit number drawn from the lab's seed and an example's id (the same every epoch and
    machine)."""
    import hashlib

    digest = hashlib.sha256(f"{settings.seed}:{ex.id}{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def hint_style(settings: LabSettings, ex) -> str:
    """The reference style of an example's privileged hints in the warm start: drawn from
    settings.warm_hint_styles by the example's id."""
    styles = settings.warm_hint_styles
    return styles[_draw(settings, ex) % len(styles)]


def copies_reference(settings: LabSettings, ex) -> bool:
    """Whether the warm start shows this example as a full-view copy row (settings.full_copy_share)."""
    return _draw(settings, ex, ":copy") < settings.full_copy_share * 2**32


def shown_lines(solution: str, ratio: float) -> int:
    """How many of the solution's lines the partial view shows, a cut-off one included."""
    from aropd_mlx.views import partial_reference

    return len(partial_reference(solution, ratio).splitlines())


def distrusts_reference(settings: LabSettings, ex) -> bool:
    """Whether the warm start shows this example as a distrust row (anchor_distrust_share);
    never a copy row too."""
    return (not copies_reference(settings, ex)
            and _draw(settings, ex, ":distrust") < settings.anchor_distrust_share * 2**32)


def distrusted(ex, ratio: float):
    """`ex` with a reference that slips once, on a line the partial view (`ratio`) shows, the
    chain computed on from the slip; the true answer kept."""
    rng = random.Random(f"distrust:{ex.id}")
    lines, _ = task.slip_once(ex.question, rng.randrange(shown_lines(ex.solution, ratio)), rng)
    return replace(ex, solution="\n".join(lines))


def warm_encoder(settings: LabSettings, cfg, tokenizer):
    """The warm start's prompt encoder: past settings.student_view_k_max operations, an
    example's "student" prompt is its partial view, so long problems train the privileged
    views only (the draw's view mix then applies between partial and full). The privileged
    prompts carry the hints in the example's `hint_style`; the target stays the oracle trace.
    A copy row (`copies_reference`) is the full view of a trace with wrong results
    (settings.full_copy_style), whatever view the mix draws, its target that same trace; a
    distrust row (`distrusts_reference`) the partial view of a reference that slips where that
    view shows it (`distrusted`), whatever view the mix draws, its target the oracle's trace."""
    from aropd_mlx.batches import Encoded, PromptEncoder

    class WarmEncoder(PromptEncoder):
        def _encode(self, ex):
            if settings.full_copy_share and copies_reference(settings, ex):
                rng = random.Random(f"copy:{ex.id}")
                if settings.full_copy_style == "slipped":
                    first = (shown_lines(ex.solution, cfg.views.partial_ratio)
                             if settings.full_copy_past_cut else 0)
                    lines, answer = task.slipping_writer(ex.question, settings.full_copy_p, rng,
                                                         first)
                    wrong = replace(ex, solution="\n".join(lines), answer=answer)
                else:
                    wrong = replace(ex, solution=task.reference_variant(
                        asdict(ex), f"corrupted:{settings.full_copy_p}", rng)["solution"])
                enc = super()._encode(wrong)
                if enc is None:  # a prompt too long for the run
                    return None
                return Encoded(ex, dict.fromkeys(enc.prompts, enc.prompts["full"]), enc.oracle)
            enc = super()._encode(ex)
            if enc is not None and settings.anchor_distrust_share and distrusts_reference(
                    settings, ex):
                wrong = super()._encode(distrusted(ex, cfg.views.partial_ratio))
                if wrong is None:
                    return None
                return Encoded(ex, dict.fromkeys(enc.prompts, wrong.prompts["partial"]),
                               enc.oracle)
            style = hint_style(settings, ex)
            if enc is not None and style != "oracle":
                other = replace(ex, solution=task.reference_variant(
                    asdict(ex), style, random.Random(ex.id))["solution"])
                hinted = super()._encode(other)
                if hinted is None:
                    return None
                enc.prompts.update({v: hinted.prompts[v] for v in ("partial", "full")
                                    if v in hinted.prompts})
            limit = settings.student_view_k_max
            if (enc is not None and limit and "partial" in enc.prompts
                    and len(task.parse_question(ex.question)[1]) > limit):
                enc.prompts["student"] = enc.prompts["partial"]
            return enc

    return WarmEncoder(cfg, tokenizer)


WARM_SAVE_EVERY = 50  # a lab build checkpoints this often (and at each phase's end) to resume


def warm_start(settings: LabSettings, root: Path, on_step: Callable | None = None) -> Path:
    """Train the tiny model with the project's own `sft` (from scratch, or from the model of the
    lab settings.warm_init names), then save it as a model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from aropd_mlx.config import load_config
    from aropd_mlx.data import load_examples
    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.trainer import train

    init_dir = start_model(settings, root / "init")
    overrides = {
        **lab_view_overrides(settings),
        "model.path": str(init_dir), "model.fine_tune_type": "full",
        "train.method": "sft", "train.batch_size": settings.warm_batch,
        "train.learning_rate": settings.warm_lr, "train.min_lr_ratio": 0.1, "train.grad_clip": 1.0,
        "train.warmup_steps": 20, "train.sft_view_mix": list(settings.warm_view_mix),
        "train.save_every": WARM_SAVE_EVERY, "train.seed": settings.seed,
    }
    model, tokenizer = load_student(load_config(overrides=overrides).model)
    examples = load_examples(str(root / "train.jsonl"), need=("question", "solution", "answer"))
    # the student view alone first, then all views; each phase on problems up to its k limit
    phases = [(steps, limit, name, f"student view, k <= {limit}", False)
              for steps, limit, name in settings.student_phases()]
    phases += [(*phase, True) for phase in settings.mixed_phases()]
    for steps, limit, name, tag, all_views in phases:
        short = [e for e in examples if len(task.parse_question(e.question)[1]) <= limit]
        phase = load_config(overrides={
            **overrides, "train.steps": steps, "out": str(root / name),
            **({} if all_views else {"train.sft_view_mix": [1.0, 0.0, 0.0]})})
        # an interrupted build goes on from its last checkpoint (a finished phase: its weights)
        train(phase, model, tokenizer, short, teacher=Teacher("frozen"),
              on_step=_tagged(on_step, tag, steps), resume=True,
              encoder=warm_encoder(settings, phase, tokenizer) if all_views else None)
    out = root / "model.tmp"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(init_dir, out)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    return out


def start_model(settings: LabSettings, dest: Path) -> Path:
    """The warm start's first weights: a fresh tiny model, or the model of the named lab that
    settings.warm_init goes on from (installed from the package, or built, as prepare_lab does)."""
    if not settings.warm_init:
        return build_tiny_model(dest, settings.spec)
    from aropd_mlx.lab.defaults import NAMED_LABS, settings_from

    base = prepare_lab(settings_from(NAMED_LABS[settings.warm_init]))
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base.model_path, dest)
    return dest


def _tagged(on_step: Callable | None, phase: str, steps: int) -> Callable | None:
    """on_step for one warm-start phase: each line also names the phase and its length."""
    if on_step is None:
        return None
    return lambda line: on_step({**line, "phase": phase, "phase_steps": steps})


def prepare_lab(settings: LabSettings = LabSettings(), *, rebuild: bool = False,
                on_step: Callable | None = None, root: Path | None = None) -> Lab:
    """The lab's data and warm-started model, cached (atomic: a rename). The model is the one
    shipped in the package when `settings` are its recipe (lab/shipped.py), else built once;
    `rebuild` always trains it again from scratch."""
    root = Path(root) if root else cache_root() / settings.key()
    lab = Lab(settings, root)
    ready = lambda: lab.model_path.is_dir() and lab.train_path.is_file() and lab.eval_path.is_file()
    if ready() and not rebuild:
        return lab
    with _build_lock(root):  # a second process waits, then finds the model built
        if rebuild:
            for p in root.iterdir():
                if p.name != BUILD_LOCK:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif ready():
            return lab
        write_data(settings, root)
        if rebuild or not shipped.install(settings, lab.model_path):  # shipped.py: no warm start
            built = warm_start(settings, root, on_step)
            os.replace(built, lab.model_path)
        (root / "lab.json").write_text(json.dumps(asdict(settings), indent=2, default=str))
        shutil.rmtree(root / "init", ignore_errors=True)
    return lab


BUILD_LOCK = ".build.lock"


@contextmanager
def _build_lock(root: Path):
    """Hold root/.build.lock (fcntl) while the lab is built: two processes asking for the same
    lab at once (a `lab measure` beside a `lab build`) must not both train and clear each
    other's scratch folders."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / BUILD_LOCK, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"aropd-mlx: waiting for another process building the lab in {root}",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def view_logprobs(model, tokenizer, examples, views) -> dict[str, float]:
    """Mean per-token log-prob of each example's oracle response under each view: the evidence
    that the teacher uses its privileged context (full > partial > student when it does)."""
    import mlx.core as mx
    import numpy as np

    from aropd_mlx.head import head_from_model
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
