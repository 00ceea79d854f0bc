"""`aropd-mlx train`, `eval` and `lab build`: from a config (or nothing: the lab) to a run.

    aropd-mlx train                                  # the built-in lab, end to end, offline
    aropd-mlx train -c examples/configs/qwen.yaml --lam 0.6 --steps 200 --out runs/qwen
    aropd-mlx train --out runs/qwen --resume         # continue an interrupted run (or: the same
                                                     #  command plus --resume)
    aropd-mlx train ... --out runs/qwen --overwrite  # replace the run in runs/qwen
    aropd-mlx train -c qwen.yaml --memory-limit 12GB --dry-run   # the memory plan, nothing run
    aropd-mlx eval --adapter runs/qwen --data held_out.jsonl
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from aropd_mlx.errors import UserError
from aropd_mlx.jsonio import output_path, write_json

from .common import handles_errors, table

FLAG_KEYS = {"model": "model.path", "data": "data.train", "method": "train.method",
             "steps": "train.steps", "save_every": "train.save_every", "out": "out",
             "lam": "objective.lam", "alpha": "objective.alpha", "teacher": "model.teacher",
             "seed": "train.seed", "batch_size": "train.batch_size", "lr": "train.learning_rate",
             "group_size": "rollout.group_size", "max_new_tokens": "rollout.max_new_tokens",
             "eval_data": "data.eval", "trust_remote_code": "model.trust_remote_code",
             "data_split": "data.split", "columns": "data.columns", "answer_from": "data.answer_from",
             "memory_limit": "train.memory_limit", "optimizer": "train.optimizer",
             "report_to": "train.report_to"}
# How an error names a value the user set by flag (config key -> flag).
FLAG_NAMES = {key: "--" + flag.replace("_", "-") for flag, key in FLAG_KEYS.items()} | {
    "objective.clip": "--clip"}


def _columns_value(columns: Optional[str]):
    """--columns question=problem,solution=solution -> {"question": "problem", ...}."""
    if columns is None:
        return None
    out = {}
    for item in filter(None, (c.strip() for c in columns.split(","))):
        field, sep, column = (part.strip() for part in item.partition("="))
        if not sep or not field or not column:
            raise UserError(f"--columns: expected FIELD=COLUMN[,FIELD=COLUMN...], got {item!r}")
        out[field] = column
    return out


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
    """Flags > YAML > lab preset (when model or data is 'lab') > defaults; or, with `resume`,
    the saved config (the command's own values must equal it; only the steps may change)."""
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import lab_settings_for
    from aropd_mlx.lab.setup import prepare_lab

    overrides = {FLAG_KEYS[k]: v for k, v in flags.items() if v is not None and k in FLAG_KEYS}
    if flags.get("clip") is not None:
        overrides["objective.clip"] = None if flags["clip"] == "none" else flags["clip"]
    if resume:
        return _resume_config(config, overrides)
    cfg = load_config(config, overrides=overrides, flag_names=FLAG_NAMES)
    if not _wants_lab(cfg):
        return _absolute_paths(cfg), None
    lab = prepare_lab(lab_settings_for(cfg), on_step=_build_progress())
    return _absolute_paths(_with_lab(config, overrides, cfg, lab)), lab


def _absolute_paths(cfg):
    """The local files and folders a run reads, absolute in its config.yaml: a --resume or an
    `eval --adapter` from another directory reads the same files (a relative path was read
    against the new directory: another file of the same name was trained on)."""
    from aropd_mlx.config import with_overrides

    parts: dict = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and "://" not in value and Path(value).expanduser().exists():
            parts.setdefault(section, {})[name] = str(Path(value).expanduser().resolve())
    return with_overrides(cfg, **parts) if parts else cfg


def _wants_lab(cfg) -> bool:
    return cfg.model.path == "lab" or cfg.data.train == "lab"


def _with_lab(config, overrides: dict, cfg, lab):
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import lab_preset

    cfg = load_config(config, overrides=overrides, base=lab_preset(lab, cfg), flag_names=FLAG_NAMES)
    return _lab_paths(cfg, lab)


PATH_KEYS = ("model.path", "model.teacher", "model.adapter", "data.train", "data.eval")
# left null (the memory plan chooses), saved as chosen: a resume giving null again matches
PLANNED_KEYS = ("train.micro_batch_size", "train.scoring_micro_batch", "train.grad_checkpoint")


def _resume_config(config: Optional[Path], overrides: dict):
    """The saved config of the run the command names, if every value the command sets (flags,
    -c YAML) equals the saved one once resolved as the first run resolved it; else one line
    naming each difference. Only the steps may change."""
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import find_lab, lab_at, lab_settings_for

    fresh = load_config(config, overrides=overrides, flag_names=FLAG_NAMES)
    if _wants_lab(fresh):  # the lab's paths and preset, as the first run had them (nothing built)
        fresh = _with_lab(config, overrides, fresh, lab_at(lab_settings_for(fresh)))
    run_dir = Path(fresh.out).expanduser()
    from aropd_mlx.rundir import put_back

    put_back(run_dir)  # an --overwrite stopped mid-swap left the run beside it
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"--resume: {saved_path} not found (no run to continue there; "
                        "--out names the run)")
    saved = load_config(saved_path)
    from aropd_mlx.config import yaml_keys

    given = set(overrides) | yaml_keys(config)  # the dotted keys the YAML sets
    differ = []
    for key in sorted(given - {"out", "train.steps"}):
        old, new = _value(saved, key), _value(fresh, key)
        if not _same(key, old, new):
            flag = f" ({FLAG_NAMES[key]})" if key in FLAG_NAMES and key in overrides else ""
            differ.append(f"{key}{flag}: saved {old!r}, given {new!r}")
    if differ:
        raise UserError(f"--resume continues the run saved in {saved_path}; only --steps may "
                        f"change, and this command differs: {'; '.join(differ)} (to start over "
                        "instead: --overwrite)")
    keep = {"out": fresh.out}
    if "train.steps" in given:
        from aropd_mlx.checkpoint import checkpoint_step, list_checkpoints

        done = max(map(checkpoint_step, list_checkpoints(run_dir)), default=0)
        if fresh.train.steps < done:  # it would end at once, its config.yaml saying fewer steps
            raise UserError(f"--resume --steps {fresh.train.steps}: this run has done {done} "
                            "steps (its last checkpoint); give more, or --overwrite to start over")
        keep["train.steps"] = fresh.train.steps
    cfg = load_config(saved_path, overrides=keep)
    return cfg, find_lab(run_dir, cfg, on_step=_build_progress())


def _value(cfg, key: str):
    from dataclasses import is_dataclass

    for part in key.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else getattr(cfg, part, None)
    return None if is_dataclass(cfg) else cfg  # an empty YAML section sets nothing


def _same(key: str, old, new) -> bool:
    """Equal values; paths also when they name the same file from here ('d.jsonl', './d.jsonl',
    an absolute path)."""
    if old == new or (key in PLANNED_KEYS and new is None):  # null: "the plan chooses"
        return True
    if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str) and \
            "://" not in old + new:
        return Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
    return False


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
        step, steps = line["step"], line["phase_steps"]  # lab/setup.py tags each phase's lines
        if step % 50 == 0 or step == steps:
            minutes = (steps - step) * line["time_step"] / 60
            left = ("" if steps == step else ", <1 min left" if minutes < 1
                    else f", ~{minutes:.0f} min left")
            typer.echo(f"  {line['phase']}: step {step}/{steps}  loss "
                       f"{line['loss']:.3f}  {line['time_step']:.1f} s/step{left}", err=True)

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
    data: Optional[str] = typer.Option(None, help=(
        "A JSONL, JSON, Parquet or CSV file, a folder, or hf://datasets/OWNER/NAME[/path] "
        "('lab': built-in).")),
    data_split: Optional[str] = typer.Option(None, help=(
        "The split of a folder or Hub dataset with splits (default: train).")),
    columns: Optional[str] = typer.Option(None, help=(
        "Column mapping FIELD=COLUMN,...: question=problem,solution=solution,answer=...,id=...")),
    answer_from: Optional[str] = typer.Option(None, help=(
        "Take a missing answer from the solution: boxed | last_number | '####' | auto.")),
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
    optimizer: Optional[str] = typer.Option(None, help=(
        "adamw | adam | sgd | adafactor | muon (parameters: train.optimizer_config).")),
    report_to: Optional[str] = typer.Option(None, help=(
        "Log each step's metrics to wandb and/or tensorboard too: 'wandb', 'wandb,tensorboard'.")),
    eval_data: Optional[str] = typer.Option(None, help=(
        "Held-out data for before/after evaluation (same forms as --data; a dataset's "
        "validation, else test split).")),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the before/after evaluation."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow model repo code."),
    memory_limit: Optional[str] = typer.Option(None, "--memory-limit", help=(
        "Peak memory the step must fit, e.g. 12GB (default: 70% of this machine's memory); the "
        "memory plan picks micro-batches and checkpointing to fit it.")),
    dry_run: bool = typer.Option(False, "--dry-run", help=(
        "Print the memory plan and exit: nothing is trained or written.")),
):
    """Train with AR-OPD (or a baseline). With no arguments: the built-in lab, end to end.

    A run directory (--out) holds one run. A new run into a directory that already holds one is
    refused: --resume continues it, --overwrite replaces it. A run locks its directory while it
    runs, so a second run on the same --out fails at once."""
    from aropd_mlx.checkpoint import check_run_dir
    from aropd_mlx.data import train_and_eval
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
                 lr=lr, eval_data=eval_data, trust_remote_code=trust_remote_code,
                 data_split=data_split, columns=_columns_value(columns), answer_from=answer_from,
                 memory_limit=memory_limit, optimizer=optimizer, report_to=report_to)
    cfg, lab = resolve_config(config, flags, resume)
    check_run_dir(cfg.out)  # a bad --out fails now, not after loading the model
    if not dry_run:
        check_run_start(cfg.out, resume=resume, overwrite=overwrite)  # a run there, or one running
    # SFT trains on the oracle; a privileged view shows it: solution and answer are needed
    from aropd_mlx.views import METHOD_VIEWS

    privileged = cfg.train.method == "sft" or set(METHOD_VIEWS[cfg.train.method]) - {"student"}
    need = ("question", "solution", "answer") if privileged else ("question",)
    examples, eval_examples = train_and_eval(cfg.data, need)  # data.eval or eval_fraction held out
    student, tokenizer = load_student(cfg.model, seed=cfg.train.seed)
    check_supported(student, tokenizer)
    teacher_ = Teacher.create(student, tokenizer, cfg.model)
    from aropd_mlx.batches import PromptEncoder
    from aropd_mlx.distributed import init
    from aropd_mlx.memory import plan_for_run

    plan = plan_for_run(cfg, student, PromptEncoder(cfg, tokenizer), examples,
                        init().size)  # too big: stops
    if init().is_main:
        typer.echo(plan.line(), err=dry_run is False)
    if dry_run:
        return
    cfg = plan.apply(cfg)  # the run (and its config.yaml) with the planned settings

    if not init().is_main:  # other ranks of an mlx.launch run: train quietly, write nothing
        train(cfg, student, tokenizer, examples, teacher=teacher_, resume=resume, overwrite=overwrite)
        return
    from aropd_mlx.tracking import check_trackers

    check_trackers(cfg.train.report_to)  # rank 0 logs: a missing wandb/tensorboard is one line
    typer.echo(f"run {cfg.out}: {cfg.train.method} on {cfg.model.path}, {len(examples)} prompts, "
               f"{cfg.train.steps} steps", err=True)
    from aropd_mlx.lab.defaults import lab_record

    # The lock is taken when training writes its first file, and held to the end; files for
    # the run directory wait in `run.files` (written into the new run, never an old one).
    with RunDir(cfg.out, resume=resume, overwrite=overwrite) as run:
        if lab is not None and not resume:
            run.files["lab.json"] = lab_record(lab)  # a resumed run, `eval`: the lab's checker
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
        write_json(Path(cfg.out) / "summary.json", summary)
    typer.echo(f"\n{summary['steps_done']} steps in {summary['train_seconds']:.0f}s "
               f"(final loss {_or_nan(summary['final_loss']):.4f}); adapters in {cfg.out}")
    if summary.get("skipped_prompts") or summary.get("skipped_updates"):
        typer.echo(f"note: skipped {summary.get('skipped_prompts', 0)} prompts longer than "
                   f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} and "
                   f"{summary.get('skipped_updates', 0)} updates with NaN/inf loss", err=True)


def _eval_before(cfg, student, tokenizer, eval_examples, lab, no_eval: bool, resume: bool):
    """Evaluate before training (a resumed run reads the one its first start made)."""
    path = Path(cfg.out) / "eval_before.json"
    if resume:
        from aropd_mlx.jsonio import read_json

        return read_json(path, missing=None)
    if not eval_examples or no_eval:
        return None
    typer.echo(f"evaluating before training ({len(eval_examples)} held-out problems)...", err=True)
    return _eval(student, tokenizer, cfg, eval_examples, lab)


@handles_errors
def eval_command(
    model: Optional[str] = typer.Option(None, help=(
        "Hub id or local path of the base model. Default: the one saved in the --adapter run's "
        "config.yaml; without --adapter, the lab model ('lab').")),
    adapter: Optional[Path] = typer.Option(None, help=(
        "A run directory (its config.yaml gives the base model, model settings and views) or "
        "an adapter directory (then --model is needed).")),
    data: Optional[str] = typer.Option(None, help=(
        "Held-out data with question and answer (a file, folder or hf:// dataset, read with the "
        "run's data.columns and data.answer_from). Default: the run's data.eval (the lab's "
        "held-out set for lab runs).")),
    data_split: Optional[str] = typer.Option(None, help=(
        "The split of a folder or Hub dataset (default: the run's data.eval_split, else "
        "validation, else test).")),
    k: int = typer.Option(1, help="Samples per problem (avg@k, pass@k)."),
    temperature: float = typer.Option(0.0, help="0: greedy."),
    max_new_tokens: Optional[int] = typer.Option(None, help=(
        "Response length limit. Default: the run's rollout.max_new_tokens (256 without a run).")),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full result here."),
):
    """Evaluate a model (plus adapters) on held-out problems."""
    from dataclasses import replace

    from aropd_mlx.data import load_examples
    from aropd_mlx.evaluate import evaluate, summary_rows
    from aropd_mlx.models import load_student

    json_out = output_path(json_out) if json_out else None  # before the evaluation, not after
    run, lab = _eval_run(model, adapter)
    path = run.model.path
    if model == "lab" or (model is None and path == "lab"):
        from aropd_mlx.lab.defaults import lab_settings_for
        from aropd_mlx.lab.setup import prepare_lab

        lab = lab or prepare_lab(lab_settings_for(), on_step=_build_progress())
        path = str(lab.model_path)
    elif model is not None:
        path = model
    settings = replace(run.model, path=path, adapter=str(adapter) if adapter else None)
    if data is None:
        data = run.data.eval or (str(lab.eval_path) if lab is not None else None)
        if data is None:
            where = f" ({adapter / 'config.yaml'} has no data.eval)" if adapter else ""
            raise UserError(f"eval: no held-out data: give --data FILE, a JSONL with question "
                            f"and answer{where}")
        source = f"data.eval of {adapter / 'config.yaml'}" if adapter else "the lab's held-out set"
        typer.echo(f"no --data: evaluating on {data} ({source})", err=True)
    student, tokenizer = load_student(settings)
    examples = load_examples(data, need=("question", "answer"),
                             split=data_split or run.data.eval_split, columns=run.data.columns,
                             answer_from=run.data.answer_from)
    result = evaluate(student, tokenizer, examples, run.views, checker=_checker(lab), k=k,
                      temperature=temperature,
                      max_new_tokens=max_new_tokens or run.rollout.max_new_tokens)
    s = result.summary()
    typer.echo(table(summary_rows(s)))
    if json_out:
        write_json(json_out, {"summary": s, "records": result.records})


def _or_nan(x) -> float:
    """A summary's number for printing: None (nothing to report) as nan, 0.0 as 0.0."""
    return float("nan") if x is None else float(x)


def _eval_run(model: Optional[str], adapter: Optional[Path]):
    """The config `eval` starts from and the lab (None: generic data): the adapter run's saved
    config; else the lab's, for the lab model; else the defaults."""
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import find_lab

    if adapter is not None:
        if not adapter.is_dir():
            raise UserError(f"--adapter {adapter}: not a directory")
        if (adapter / "config.yaml").is_file():
            saved = load_config(adapter / "config.yaml")
            return saved, find_lab(adapter, saved, on_step=_build_progress())
        if model is None:
            raise UserError(f"--adapter {adapter} has no config.yaml naming its base model: "
                            "give --model")
    if model in (None, "lab"):
        return resolve_config(None, {"model": "lab"}, resume=False)
    return load_config(overrides={"model.path": model}), None
