"""`aropd-mlx train`, `eval` and `lab build`: from a config (or nothing: the lab) to a run.

    aropd-mlx train                                  # the built-in lab, end to end, offline
    aropd-mlx train -c examples/configs/qwen.yaml --lam 0.6 --steps 200 --out runs/qwen
    aropd-mlx train --out runs/qwen --resume         # continue an interrupted run (or: the same
                                                     #  command plus --resume)
    aropd-mlx train ... --out runs/qwen --overwrite  # replace the run in runs/qwen
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from aropd_mlx.errors import UserError

from .common import handles_errors, table

FLAG_KEYS = {"model": "model.path", "data": "data.train", "method": "train.method",
             "steps": "train.steps", "save_every": "train.save_every", "out": "out",
             "lam": "objective.lam", "alpha": "objective.alpha", "teacher": "model.teacher",
             "seed": "train.seed", "batch_size": "train.batch_size", "lr": "train.learning_rate",
             "group_size": "rollout.group_size", "max_new_tokens": "rollout.max_new_tokens",
             "eval_data": "data.eval", "trust_remote_code": "model.trust_remote_code"}
# How an error names a value the user set by flag (config key -> flag).
FLAG_NAMES = {key: "--" + flag.replace("_", "-") for flag, key in FLAG_KEYS.items()} | {
    "objective.clip": "--clip"}


def _clip_value(clip: Optional[str]):
    if clip is None:
        return None
    if clip.lower() == "none":
        return "none"
    try:
        return float(clip)
    except ValueError:
        raise UserError(f"--clip: expected a number or 'none', got {clip!r}") from None


def resolve_config(config: Optional[Path], flags: dict, resume: bool):
    """Flags > YAML > lab preset (when model or data is 'lab') > defaults; or the saved config."""
    from aropd_mlx.config import load_config

    overrides = {FLAG_KEYS[k]: v for k, v in flags.items() if v is not None and k in FLAG_KEYS}
    if flags.get("clip") is not None:
        overrides["objective.clip"] = None if flags["clip"] == "none" else flags["clip"]
    if resume:
        out = overrides.get("out")
        if not out:
            raise UserError("--resume needs --out DIR (the run to continue)")
        saved = Path(out) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"--resume: {saved} not found (no run to continue there)")
        extra = sorted(k for k in overrides if k not in ("out", "train.steps"))
        if extra or config is not None:
            raise UserError("--resume continues the saved config; only --steps may change "
                            f"(got {', '.join(extra) or '--config'})")
        return load_config(saved, overrides=overrides, flag_names=FLAG_NAMES), None
    preset, lab = {}, None
    cfg = load_config(config, overrides=overrides, flag_names=FLAG_NAMES)
    if cfg.model.path == "lab" or cfg.data.train == "lab":
        from aropd_mlx.lab.defaults import lab_preset, lab_settings_for
        from aropd_mlx.lab.setup import prepare_lab

        lab = prepare_lab(lab_settings_for(cfg), on_step=_build_progress())
        preset = lab_preset(lab, cfg)
        cfg = load_config(config, overrides=overrides, base=preset, flag_names=FLAG_NAMES)
        cfg = _lab_paths(cfg, lab)
    return cfg, lab


def _lab_paths(cfg, lab):
    """A config file may say `lab` for the model or the data (examples/configs/lab.yaml)."""
    from aropd_mlx.config import with_overrides

    data = {k: str(p) for k, p in (("train", lab.train_path), ("eval", lab.eval_path))
            if getattr(cfg.data, k) == "lab"}
    model = {"path": str(lab.model_path)} if cfg.model.path == "lab" else {}
    return with_overrides(cfg, data=data, model=model)


def _build_progress():
    state = {}

    def on_step(line):
        if "bar" not in state:
            typer.echo("Building the lab model (once; cached): warm start with `sft`...", err=True)
            state["bar"] = True
        if line["step"] % 50 == 0:
            typer.echo(f"  warm start step {line['step']}  loss {line['loss']:.3f}", err=True)

    return on_step


def _checker(lab):
    """The lab's checker for a lab run (all-steps-correct, shortcuts, by k), else the generic one."""
    if lab is not None:
        from aropd_mlx.lab.setup import checker

        return checker
    from aropd_mlx.evaluate import answer_checker

    return answer_checker


def _eval(model, tokenizer, cfg, examples, lab) -> dict:
    from aropd_mlx.evaluate import evaluate

    res = evaluate(model, tokenizer, examples, cfg.views, checker=_checker(lab),
                   max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.train.seed)
    return res.summary()


@handles_errors
def train_command(
    config: Optional[Path] = typer.Option(None, "-c", "--config", help="YAML run config."),
    model: Optional[str] = typer.Option(None, help="Hub id or local path of the student ('lab': built-in)."),
    data: Optional[str] = typer.Option(None, help="JSONL path or hf://datasets/OWNER/NAME/file.jsonl ('lab')."),
    method: Optional[str] = typer.Option(None, help="sft | opd | partial-opd | full-opd | ar-opd"),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps."),
    out: Optional[str] = typer.Option(None, help="Run directory (one run each; see --resume, --overwrite)."),
    resume: bool = typer.Option(False, "--resume", help=(
        "Continue the interrupted run in --out from its last checkpoint to its planned end. "
        "`--out DIR --resume` is enough; the original command plus --resume works too: every "
        "value it sets must equal the saved config's (only --steps may change).")),
    overwrite: bool = typer.Option(False, "--overwrite", help=(
        "Replace the run already in --out. The old run stays whole until the new one has "
        "written its first checkpoint, then the new run takes its place.")),
    lam: Optional[float] = typer.Option(None, help="Residual weight lambda (0: Partial OPD)."),
    clip: Optional[str] = typer.Option(None, help="Residual clip c, or 'none'."),
    alpha: Optional[float] = typer.Option(None, help="Divergence: 0 forward KL, 1 reverse KL, else JSD."),
    teacher: Optional[str] = typer.Option(None, help="frozen | ema | PATH of a separate teacher."),
    seed: Optional[int] = typer.Option(None, help="Seed of every random draw."),
    batch_size: Optional[int] = typer.Option(None, help="Prompts per step."),
    group_size: Optional[int] = typer.Option(None, help="Rollouts per prompt."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Rollout length limit."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out JSONL for before/after evaluation."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the before/after evaluation."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow model repo code."),
):
    """Train with AR-OPD (or a baseline). With no arguments: the built-in lab, end to end.

    A run directory (--out) holds one run. A new run into a directory that already holds one is
    refused: --resume continues it, --overwrite replaces it. A run locks its directory while it
    runs, so a second run on the same --out fails at once."""
    from aropd_mlx.checkpoint import check_run_dir
    from aropd_mlx.data import load_examples
    from aropd_mlx.evaluate import summary_rows
    from aropd_mlx.models import Teacher, check_supported, load_student
    from aropd_mlx.rundir import RunDir, check_run_start
    from aropd_mlx.trainer import train

    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: "
                        "give one of them")
    flags = dict(model=model, data=data, method=method, steps=steps, save_every=save_every,
                 out=out, lam=lam, clip=_clip_value(clip), alpha=alpha, teacher=teacher, seed=seed,
                 batch_size=batch_size, group_size=group_size, max_new_tokens=max_new_tokens,
                 lr=lr, eval_data=eval_data, trust_remote_code=trust_remote_code)
    cfg, lab = resolve_config(config, flags, resume)
    check_run_dir(cfg.out)  # a bad --out fails now, not after loading the model
    check_run_start(cfg.out, resume=resume, overwrite=overwrite)  # a run there, or one running
    need = ("question", "solution", "answer") if cfg.train.method in (
        "sft", "partial-opd", "full-opd", "ar-opd") else ("question",)
    examples = load_examples(cfg.data.train, need=need)
    eval_examples = load_examples(cfg.data.eval, need=("question", "answer")) if cfg.data.eval else []
    student, tokenizer = load_student(cfg.model, seed=cfg.train.seed)
    check_supported(student, tokenizer)
    teacher_ = Teacher.create(student, tokenizer, cfg.model)
    from aropd_mlx.distributed import init

    if not init().is_main:  # other ranks of an mlx.launch run: train quietly, write nothing
        train(cfg, student, tokenizer, examples, teacher=teacher_, resume=resume, overwrite=overwrite)
        return
    typer.echo(f"run {cfg.out}: {cfg.train.method} on {cfg.model.path}, {len(examples)} prompts, "
               f"{cfg.train.steps} steps", err=True)
    # The lock is taken when training writes its first file, and held to the end; files for
    # the run directory wait in `run.files` (written into the new run, never an old one).
    with RunDir(cfg.out, resume=resume, overwrite=overwrite) as run:
        before = _eval_before(cfg, student, tokenizer, eval_examples, lab, no_eval, resume)
        if before is not None and not resume:
            run.files["eval_before.json"] = json.dumps(before, indent=2)
        from .progress import StepProgress

        with StepProgress(cfg.train.steps, resume=resume) as progress:
            summary = train(cfg, student, tokenizer, examples, teacher=teacher_, resume=resume,
                            on_step=progress.update, run=run)
        if eval_examples and not no_eval:
            after = _eval(student, tokenizer, cfg, eval_examples, lab)
            summary.update(eval_before=before, eval_after=after)
            typer.echo("\n" + table(summary_rows(after, before)))
        (Path(cfg.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(f"\n{summary['steps_done']} steps in {summary['train_seconds']:.0f}s "
               f"(final loss {summary['final_loss'] or float('nan'):.4f}); adapters in {cfg.out}")
    if summary.get("skipped_prompts") or summary.get("skipped_updates"):
        typer.echo(f"note: skipped {summary.get('skipped_prompts', 0)} prompts longer than "
                   f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} and "
                   f"{summary.get('skipped_updates', 0)} updates with NaN/inf loss", err=True)


def _eval_before(cfg, student, tokenizer, eval_examples, lab, no_eval: bool, resume: bool):
    """Evaluate before training (a resumed run reads the one its first start made)."""
    path = Path(cfg.out) / "eval_before.json"
    if resume:
        return json.loads(path.read_text()) if path.is_file() else None
    if not eval_examples or no_eval:
        return None
    typer.echo(f"evaluating before training ({len(eval_examples)} held-out problems)...", err=True)
    return _eval(student, tokenizer, cfg, eval_examples, lab)


@handles_errors
def eval_command(
    model: str = typer.Option("lab", help="Hub id or local path ('lab': the built-in lab model)."),
    adapter: Optional[Path] = typer.Option(None, help="Run or adapter directory to load."),
    data: Optional[str] = typer.Option(None, help="JSONL with question and answer (lab: its held-out set)."),
    k: int = typer.Option(1, help="Samples per problem (avg@k, pass@k)."),
    temperature: float = typer.Option(0.0, help="0: greedy."),
    max_new_tokens: int = typer.Option(256),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result here."),
):
    """Evaluate a model (plus adapters) on held-out problems."""
    from aropd_mlx.config import load_config
    from aropd_mlx.data import load_examples
    from aropd_mlx.evaluate import answer_checker, evaluate, summary_rows
    from aropd_mlx.models import ModelSettings, load_student

    cfg, lab = resolve_config(None, {"model": model, "data": data}, resume=False)
    if adapter is not None and (adapter / "config.yaml").is_file():
        saved = load_config(adapter / "config.yaml")
        settings = saved.model
        views = saved.views
    else:
        settings, views = cfg.model, cfg.views
    from dataclasses import replace

    settings = replace(settings, path=cfg.model.path if model == "lab" else model,
                       adapter=str(adapter) if adapter else None)
    student, tokenizer = load_student(settings)
    examples = load_examples(data or cfg.data.eval or cfg.data.train, need=("question", "answer"))
    checker = answer_checker
    if lab is not None:
        from aropd_mlx.lab.setup import checker
    result = evaluate(student, tokenizer, examples, views, checker=checker, k=k,
                      temperature=temperature, max_new_tokens=max_new_tokens)
    s = result.summary()
    typer.echo(table(summary_rows(s)))
    if json_out:
        json_out.write_text(json.dumps({"summary": s, "records": result.records}, indent=2))
