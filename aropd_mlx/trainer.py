"""The training loop: one step for every method, checkpoints, exact resume, metrics.

One step (DESIGN.md): draw prompts -> the student samples G responses each (SFT: the oracle
trace instead) -> the teacher scores them under the method's views (no grad) -> the student
is distilled toward the target (anchor + lam * clipped residual for AR-OPD) -> the optimizer
(train.optimizer: AdamW by default).

    run_dir = train(cfg, model, tokenizer, examples)          # writes metrics, adapters, summary

run_step: draw_responses -> score_views under the teacher (its hidden states per view, and
its own output head: `Scored`) -> accumulate (loss and gradients over micro-batches, summed
over ranks) -> apply_update (clip, optimizer, skipped when not finite).

Every random draw of step s comes from seeds derived from (train.seed, s), and every piece of
state lives in the checkpoint, so a resumed run repeats an uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten

from aropd_mlx import checkpoint as ckpt
from aropd_mlx import distributed as dist
from aropd_mlx.batches import METHOD_VIEWS, Encoded, PromptEncoder, draw_batch
from aropd_mlx.config import RunConfig, save_config
from aropd_mlx.data import Example
from aropd_mlx.diagnostics import RunDiagnostics
from aropd_mlx.errors import UserError
from aropd_mlx.fused import fused_loss
from aropd_mlx.head import OutputHead, head_from_model
from aropd_mlx.memory import plan_for_run
from aropd_mlx.models import Teacher, checkpointed_layers, save_adapters, trainable
from aropd_mlx.objective import ObjectiveSettings, response_mask
from aropd_mlx.optimizer import make_optimizer, optimizer_step
from aropd_mlx.rollout import Responses, pad_responses, sample
from aropd_mlx.rundir import RunDir
from aropd_mlx.scoring import response_hidden, score_views
from aropd_mlx.tracking import Tracking, check_trackers


@dataclass
class LoopState:
    step: int = 0
    nonfinite_in_a_row: int = 0
    skipped_updates: int = 0
    extra: dict = field(default_factory=dict)


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**31 - 1)


def objective_for(cfg: RunConfig) -> ObjectiveSettings:
    if cfg.train.method == "sft":
        return replace(cfg.objective, loss_type="nll", skip_first_tokens=0)
    return cfg.objective


def diagnostics_due(cfg: RunConfig, step: int) -> bool:
    """Per-token diagnostics on the first step, every train.diagnostics_every-th and the last
    (0-based `step`). They cost extra passes over the vocabulary; loss and gradient do not."""
    every, steps = cfg.train.diagnostics_every, cfg.train.steps
    return step == 0 or (step + 1) % every == 0 or step + 1 >= steps


def lam_at(cfg: RunConfig, step: int) -> float:
    lam, t = cfg.objective.lam, cfg.train
    if t.lam_schedule == "linear-warmup" and t.lam_warmup_steps > 0:
        return lam * min(1.0, step / t.lam_warmup_steps)
    if t.lam_schedule == "cosine":
        return lam * 0.5 * (1 - math.cos(math.pi * min(step, t.steps) / t.steps))
    return lam


def draw_responses(cfg, model, tokenizer, batch: list[Encoded], step: int, rank: int = 0):
    """Rows of (prompt per view, response): on-policy samples, or the oracle for SFT.
    `rank` salts the seeds (distributed.rank_salt; rank 0 keeps a plain run's seeds)."""
    t, salt = cfg.train, dist.rank_salt(rank)
    if t.method == "sft":
        rng = np.random.default_rng(step_seed(t.seed, step, 1 + salt))
        mix = np.array(t.sft_view_mix) / sum(t.sft_view_mix)
        names = ["student", "partial", "full"]
        student = [e.prompts[names[rng.choice(3, p=mix)]] for e in batch]
        resp = pad_responses([e.oracle for e in batch], [True] * len(batch),
                             tokenizer.pad_token_id or 0)
        return {"student": student}, resp
    g = cfg.rollout.group_size
    resp = sample(model, tokenizer, [e.prompts["student"] for e in batch], cfg.rollout,
                  seed=step_seed(t.seed, step, 2 + salt))
    rows = {name: [e.prompts[name] for e in batch for _ in range(g)] for name in batch[0].prompts}
    return rows, resp


def _micro_batches(n: int, size: int) -> list[slice]:
    size = n if size <= 0 else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class Scored:
    """What the update trains on: each view's prompt per row, the responses, the teacher's
    hidden states per view and the teacher's own output head that projects them (None: SFT)."""

    rows: dict[str, list[list[int]]]
    resp: Responses
    teacher_h: dict[str, mx.array]
    teacher_head: OutputHead | None
    pad_id: int = 0


@dataclass
class Accumulated:
    """Loss and gradients summed over a step's micro-batches (and over ranks): the loss is
    already divided by the global loss weight, the diagnostics are sums over response tokens."""

    grads: dict
    loss: float
    diag_sums: dict[str, float]
    tokens: float  # response tokens the diagnostic sums run over


def accumulate(cfg, model, scored: Scored, settings: ObjectiveSettings, *,
               tracker: RunDiagnostics | None = None, world: dist.World | None = None,
               diagnostics: bool = True) -> Accumulated:
    """Loss and gradients over micro-batches, weighted exactly as one big batch.

    With several ranks (`world`) each holds a shard of the batch: the weight total, the
    gradients and the loss/diagnostic sums are summed over ranks (World.reduce), so every rank
    applies the update a single rank would make on the whole batch. Diagnostics average over
    every response token (the same tokens as diagnostics.json's tracker): skip_first_tokens
    is a choice of the loss, not of the measurement."""
    world = world or dist.World()
    resp = scored.resp
    tokens_np = np.array(resp.tokens)
    eff = response_mask(resp.mask, settings.skip_first_tokens)
    total_w = float((eff.sum(axis=1) > 0).sum() if settings.reduction == "sequence" else eff.sum())
    total_w = world.sum_floats([total_w])[0]  # the GLOBAL weight: summed grads need no division
    views = METHOD_VIEWS[cfg.train.method]
    valid = resp.mask.astype(mx.bool_)
    grads, loss_sum, diag_sums, n_tokens = None, 0.0, {}, 0.0

    def loss_fn(m, sl, scale):
        sh = response_hidden(m, scored.rows["student"][sl], tokens_np[sl], resp.lengths[sl],
                             scored.pad_id)
        th = scored.teacher_h[views[0]][sl] if views else None
        fh = scored.teacher_h[views[1]][sl] if len(views) > 1 else None
        # the head from `m`: a trainable head (tied embedding, full fine-tune) gets its gradient
        out = fused_loss(sh, head_from_model(m), resp.tokens[sl], resp.mask[sl], th, fh,
                         teacher_head=scored.teacher_head, settings=settings,
                         diagnostics=diagnostics)
        return out.loss * out.weight * scale, out

    value_and_grad = nn.value_and_grad(model, loss_fn)
    model.train()  # dropout (if any) in the student's update only, not in rollouts or scoring
    for sl in _micro_batches(tokens_np.shape[0], cfg.train.micro_batch_size or 0):
        with checkpointed_layers(model, bool(cfg.train.grad_checkpoint)):  # these layers only
            (loss, out), g = value_and_grad(model, sl, 1.0 / max(total_w, 1.0))
        grads = g if grads is None else tree_map_add(grads, g)
        m = valid[sl]
        sums = {k: (v * m).sum() for k, v in out.diagnostics.items()}
        mx.eval(grads, loss, sums, out.diagnostics)
        if tracker is not None and diagnostics:  # per-token signals by position and length
            tracker.add(out.diagnostics, resp.mask[sl], new_step=sl.start == 0)
        for k, v in sums.items():
            diag_sums[k] = diag_sums.get(k, 0.0) + v.item()
        n_tokens += float(m.sum().item())
        loss_sum += loss.item()
    model.eval()
    if world.distributed:
        keys = sorted(diag_sums)
        grads, summed = world.reduce(grads, [loss_sum, n_tokens] + [diag_sums[k] for k in keys])
        loss_sum, n_tokens, diag_sums = summed[0], summed[1], dict(zip(keys, summed[2:]))
    return Accumulated(grads, loss_sum, diag_sums, n_tokens)


def apply_update(cfg, model, optimizer, acc: Accumulated) -> tuple[float, float, bool, dict]:
    """Clip and apply the accumulated gradients (skipped when the loss or the gradient norm
    is not finite); returns (loss, grad norm, finite, mean diagnostics per response token)."""
    opt_step = optimizer_step(model, optimizer, cfg.train.grad_clip)  # compiled (optimizer.py)
    grads, norm = opt_step.clip(acc.grads)
    norm = norm.item()
    finite = math.isfinite(acc.loss) and math.isfinite(norm)
    if finite:
        opt_step.apply(grads)
    ntok = max(acc.tokens, 1.0)
    return acc.loss, norm, finite, {k: float(v) / ntok for k, v in acc.diag_sums.items()}


def tree_map_add(a, b):
    return tree_map(lambda x, y: x + y, a, b)


def run_step(cfg: RunConfig, model, tokenizer, optimizer, teacher: Teacher,
             batch: list[Encoded], step: int, tracker: RunDiagnostics | None = None,
             world: dist.World | None = None) -> dict:
    """One training step; returns its metrics line (host floats only). With several ranks
    `batch` is this rank's shard and the metrics are those of the whole global batch."""
    world = world or dist.World()
    mx.random.seed(step_seed(cfg.train.seed, step, dist.rank_salt(world.rank)))  # dropout etc.
    settings = replace(objective_for(cfg), lam=lam_at(cfg, step))
    pad_id = tokenizer.pad_token_id or 0
    mx.reset_peak_memory()  # peak_memory_gb: this step's own peak (bench creep reads it)
    t0 = time.perf_counter()
    rows, resp = draw_responses(cfg, model, tokenizer, batch, step, world.rank)
    t1 = time.perf_counter()
    views = METHOD_VIEWS[cfg.train.method]
    scored = Scored(rows, resp, {}, None, pad_id)
    if views:
        with teacher.active(model) as scorer:  # each view is projected by its own model's head
            scored.teacher_h = score_views(scorer, {v: rows[v] for v in views},
                                           np.array(resp.tokens), resp.lengths, pad_id,
                                           micro_batch=cfg.train.scoring_micro_batch or 0)
        scored.teacher_head = teacher.head(model)  # each view's own head, over the student's rows
    t2 = time.perf_counter()
    acc = accumulate(cfg, model, scored, settings, tracker=tracker, world=world,
                     diagnostics=diagnostics_due(cfg, step))
    loss, norm, finite, diags = apply_update(cfg, model, optimizer, acc)
    if finite:
        teacher.after_update(model)
    t3 = time.perf_counter()
    ntok = int(sum(resp.lengths))
    lengths = np.array(resp.lengths)
    extra = {}
    if world.distributed:  # metrics of the global batch
        ntok_g, nseq, nfin = world.sum_floats([ntok, len(lengths), float(np.sum(resp.finished))])
        len_max = world.max_floats([float(lengths.max())])[0]
        ntok, lengths = int(ntok_g), np.array([ntok_g / nseq])
        extra = {"world_size": world.size, "time_allreduce": world.last_reduce_s,
                 "finished_rate": nfin / nseq, "response_len_max": int(len_max)}
    return {
        "step": step + 1, "loss": loss, "grad_norm": norm, "finite": finite,
        "lr": float(optimizer.learning_rate.item()) if isinstance(optimizer.learning_rate, mx.array)
        else float(optimizer.learning_rate),
        "lam": settings.lam, **diags,
        "response_len_mean": float(lengths.mean()), "response_len_max": int(lengths.max()),
        "finished_rate": float(np.mean(resp.finished)), "response_tokens": ntok,
        "tokens_per_s": ntok / max(t3 - t0, 1e-9), "time_rollout": t1 - t0,
        "time_scoring": t2 - t1, "time_update": t3 - t2, "time_step": t3 - t0,
        **memory_line(), **extra,
    }


def memory_line() -> dict:
    """MLX's memory in GB: the peak since the step's mx.reset_peak_memory, the arrays alive
    now (weights, adapters, optimizer state...) and the freed buffers MLX keeps cached."""
    return {"peak_memory_gb": mx.get_peak_memory() / 1e9,
            "active_memory_gb": mx.get_active_memory() / 1e9,
            "cache_memory_gb": mx.get_cache_memory() / 1e9}


def _append_metrics(path: Path, line: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def _metrics_step(line: str) -> float:
    """The step of a metrics line; +inf for a line a crash cut short (then dropped)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _truncate_metrics(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    keep = [l for l in path.read_text().splitlines() if _metrics_step(l) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)


def restore(run_dir: Path, model, optimizer, teacher: Teacher,
            world: dist.World | None = None) -> LoopState:
    """Load the latest complete checkpoint of `run_dir` (nothing: a fresh start). Every rank
    loads it (the run directory must be on every machine); only rank 0 tidies the directory."""
    world = world or dist.World()
    if world.is_main:
        ckpt.sweep_temporary(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    world.check_same("the checkpoint step to resume from", int(found[-1].name[len(ckpt.PREFIX):])
                     if found else 0)
    if not found:
        if world.is_main:
            _truncate_metrics(run_dir / "metrics.jsonl", 0)
        return LoopState()
    c = ckpt.load_checkpoint(found[-1])
    written_by = int(c["state"].get("world_size", 1))
    if written_by != world.size:
        raise UserError(f"checkpoint was written by a {written_by}-rank run; resume with the same "
                        f"world size (this run has {world.size})")
    model.update(tree_unflatten(list(c["params"].items())))
    optimizer.state = c["optimizer_state"]
    if c["teacher"] is not None:
        teacher.params = dict(c["teacher"])
    s = c["state"]
    mx.eval(model.parameters(), optimizer.state)
    if world.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", c["step"])
    return LoopState(step=c["step"], nonfinite_in_a_row=s.get("nonfinite_in_a_row", 0),
                     skipped_updates=s.get("skipped_updates", 0))


def train(cfg: RunConfig, model, tokenizer, examples: list[Example], *, teacher: Teacher,
          resume: bool = False, on_step: Callable[[dict], None] | None = None,
          stop_after: int | None = None, overwrite: bool = False,
          run: RunDir | None = None, encoder: PromptEncoder | None = None,
          on_plan: Callable[[str], None] | None = None) -> dict:
    """Train to cfg.train.steps (from the latest checkpoint when `resume`); returns the summary.

    A directory holding a previous run is refused unless `resume` (continue it) or `overwrite`
    (replace it, once the new run has its first checkpoint); `run`: a RunDir the caller holds
    (the CLI: its lock then covers the evaluations around training). Before the first step the
    memory plan (memory.py) fills in the micro-batches and checkpointing the config leaves
    open, and `on_plan` gets its one line; a run that cannot fit stops here, having written
    nothing. `stop_after`: return after this many steps of this call (tests of interruption).
    `encoder`: how examples become each view's prompt ids (default batches.PromptEncoder; the
    lab's warm start uses its own). A failed write in the run directory (a full disk) is a
    one-line UserError."""
    run = run or RunDir(cfg.out, resume=resume, overwrite=overwrite)
    tracking = Tracking(cfg, resume=resume)  # train.report_to (W&B, TensorBoard): rank 0 only
    try:
        with run, tracking:
            return _train(cfg, model, tokenizer, examples, teacher=teacher, resume=resume,
                          on_step=on_step, stop_after=stop_after, run=run, encoder=encoder,
                          on_plan=on_plan, tracking=tracking)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"cannot write in the run directory {cfg.out}: "
                        f"{e.strerror or e}{where}") from None


def _train(cfg: RunConfig, model, tokenizer, examples: list[Example], *, teacher: Teacher,
           resume: bool, on_step: Callable[[dict], None] | None, stop_after: int | None,
           run: RunDir, encoder: PromptEncoder | None = None,
           on_plan: Callable[[str], None] | None = None,
           tracking: Tracking | None = None) -> dict:
    run_dir = Path(cfg.out)
    world = dist.init()  # a world of one unless started by mlx.launch (DISTRIBUTED.md)
    if cfg.train.batch_size < world.size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is smaller than the {world.size} "
                        "ranks: each rank needs at least one prompt per step")
    encoder = encoder or PromptEncoder(cfg, tokenizer)
    draw_batch(cfg, examples, encoder, 0, world.size)  # bad prompts fail before anything is written
    plan = plan_for_run(cfg, model, encoder, examples, world.size)  # too big: fails before anything is written
    cfg = plan.apply(cfg)
    if on_plan is not None and world.is_main:
        on_plan(plan.line())
    if world.is_main:  # only rank 0 writes in the run directory (and holds its lock)
        check_trackers(cfg.train.report_to)  # and logs: a missing package fails before it
        run_dir = run.open()  # --overwrite: a staging directory until the first checkpoint
        save_config(cfg, run_dir / "config.yaml")
    optimizer = make_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    state = restore(run_dir, model, optimizer, teacher, world) if resume else LoopState()
    for done in range(1, state.step):  # the steps before a resume: what they drew and skipped
        draw_batch(cfg, examples, encoder, done, world.size)
    tracker = RunDiagnostics.resume(run_dir, state.step) if world.is_main else None
    tracking = tracking or Tracking(cfg, resume=resume)
    if world.is_main and not run.staged:  # staged (--overwrite): from its first checkpoint on
        tracking.start(run_dir, state.step)
    metrics_path, t = run_dir / "metrics.jsonl", cfg.train
    done_here, lines_here = 0, []
    while state.step < t.steps and (stop_after is None or done_here < stop_after):
        batch = world.shard(draw_batch(cfg, examples, encoder, state.step, world.size))
        line = run_step(cfg, model, tokenizer, optimizer, teacher, batch, state.step, tracker, world)
        state.step, done_here = state.step + 1, done_here + 1
        state.nonfinite_in_a_row = 0 if line["finite"] else state.nonfinite_in_a_row + 1
        state.skipped_updates += 0 if line["finite"] else 1
        line["skipped_updates"] = state.skipped_updates
        if world.is_main:
            _append_metrics(metrics_path, line)
            tracking.log(line)
        else:
            lines_here.append(line)
        if on_step:
            on_step(line)
        if state.nonfinite_in_a_row >= t.max_nonfinite_steps:
            raise UserError(f"stopped at step {state.step}: {state.nonfinite_in_a_row} updates in a "
                            "row had NaN/inf loss or gradients and were skipped (train."
                            f"max_nonfinite_steps={t.max_nonfinite_steps}); lower train.learning_rate? "
                            f"The last good checkpoint is in {run_dir / 'checkpoints'}")
        if world.is_main and (state.step % t.save_every == 0 or state.step == t.steps):
            ckpt.save_checkpoint(
                run_dir, state.step, params=trainable(model), optimizer_state=optimizer.state,
                teacher=teacher.params if teacher.mode == "ema" else None,
                state={"nonfinite_in_a_row": state.nonfinite_in_a_row,
                       "skipped_updates": state.skipped_updates, "world_size": world.size},
                keep=t.keep_checkpoints)
            tracker.save(state.step)
            if run.staged:  # --overwrite: the new run has a checkpoint; now it replaces the old
                run_dir = tracker.run_dir = run.commit()
                metrics_path = run_dir / "metrics.jsonl"
                tracking.start(run_dir, state.step)
    if not world.is_main:  # the other ranks write nothing; the same keys, from this call's steps
        last = lines_here[-10:]
        return {"steps_done": state.step, "skipped_updates": state.skipped_updates,
                "skipped_prompts": encoder.skipped, "rank": world.rank,
                "final_loss": float(np.mean([l["loss"] for l in last])) if last else None,
                "train_seconds": float(sum(l["time_step"] for l in lines_here)),
                "response_tokens": int(sum(l["response_tokens"] for l in lines_here))}
    if state.step >= t.steps:
        save_adapters(run_dir, model, cfg.model)
    summary = summarize(run_dir, state, encoder.skipped)
    if state.step >= t.steps:
        tracking.finish(run_dir, summary)  # the report plots and the summary, to the trackers
    return summary


def summarize(run_dir: Path, state: LoopState, skipped_prompts: int) -> dict:
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (run_dir / "metrics.jsonl").is_file() else []
    last = lines[-10:]
    summary = {
        "steps_done": state.step, "skipped_updates": state.skipped_updates,
        "skipped_prompts": skipped_prompts,
        "final_loss": float(np.mean([l["loss"] for l in last])) if last else None,
        "train_seconds": float(sum(l["time_step"] for l in lines)),
        "response_tokens": int(sum(l["response_tokens"] for l in lines)),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
