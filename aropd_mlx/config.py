"""The run configuration: one tree of frozen dataclasses, the single source of defaults.

Precedence: command-line flags > YAML file > the dataclass defaults below. Unknown keys and
wrong types are `UserError`s naming the key (and the file). The resolved tree is written to the
run directory as config.yaml, and `--resume` reads it back.

    cfg = load_config("run.yaml", overrides={"objective.lam": 0.6, "train.steps": 200})
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import yaml

from aropd_mlx.errors import UserError
from aropd_mlx.models import ModelSettings
from aropd_mlx.objective import ObjectiveSettings
from aropd_mlx.rollout import RolloutSettings
from aropd_mlx.views import METHODS, ViewSettings  # noqa: F401 - METHODS: config's API too


@dataclass(frozen=True)
class DataSettings:
    # a file (JSONL, JSON, Parquet, CSV), a folder, hf://datasets/OWNER/NAME[/path], or "lab"
    train: str = "lab"
    eval: str | None = None  # held-out data, same forms; None: `eval_fraction` of train (or the lab's set)
    eval_fraction: float = 0.0  # without `eval`: this share of train held out (data.split), not trained on
    max_prompt_tokens: int = 2048  # longer prompts are skipped and counted (see README)
    split: str = "train"  # the split of `train` when it is a folder or a dataset with splits
    eval_split: str | None = None  # the split of `eval`; None: validation, else test
    columns: dict[str, str] | None = None  # our field -> its column: {question: problem}
    answer_from: str | None = None  # boxed | last_number | "####" | auto: the answer from the solution

    def validate(self) -> None:
        from aropd_mlx.data import ANSWER_RULES, COLUMN_FIELDS

        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_prompt_tokens < 1:
            raise UserError("data.max_prompt_tokens must be >= 1")
        for name, column in (self.columns or {}).items():
            if name not in COLUMN_FIELDS:
                raise UserError(f"data.columns.{name}: unknown field (map {', '.join(COLUMN_FIELDS)}"
                                " to the dataset's column names)")
            if not column:
                raise UserError(f"data.columns.{name}: empty column name")
        if self.answer_from is not None and self.answer_from not in ANSWER_RULES:
            raise UserError(f"data.answer_from must be one of {', '.join(ANSWER_RULES)}, "
                            f"got {self.answer_from!r}")


@dataclass(frozen=True)
class TrainSettings:
    method: str = "ar-opd"
    steps: int = 100
    batch_size: int = 8  # prompts per step (each gets rollout.group_size responses)
    # Memory (memory.py plans what is left as None so the step fits train.memory_limit; a value
    # set here wins). micro_batch_size: rows per student forward/backward, 0: the whole step.
    micro_batch_size: int | None = None
    scoring_micro_batch: int | None = None  # response rows per teacher forward (all views); 0: all
    grad_checkpoint: bool | None = None  # recompute each student layer in the backward
    memory_limit: str | None = None  # e.g. "12GB"; None: 70% of this machine's memory
    learning_rate: float = 1e-4
    lr_schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # of every optimizer that has one (Adam has none)
    optimizer: str = "adamw"  # adamw | adam | sgd | adafactor | muon (optimizer.py)
    optimizer_config: dict[str, typing.Any] | None = None  # its parameters: {betas: [0.9, 0.95]}
    grad_clip: float = 1.0  # max global grad norm; 0: off
    lam_schedule: str = "constant"  # constant | linear-warmup | cosine (lambda over training)
    lam_warmup_steps: int = 0
    sft_view_mix: tuple[float, float, float] = (1.0, 0.0, 0.0)  # SFT prompts: student/partial/full
    save_every: int = 50
    diagnostics_every: int = 10  # per-token diagnostics on step 1, every N-th step and the last
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 5  # stop after this many skipped (NaN/inf) updates in a row
    seed: int = 0
    report_to: tuple[str, ...] = ()  # wandb, tensorboard: each step's metrics there too (tracking.py)
    project_name: str | None = None  # the W&B project (None: aropd-mlx)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"train.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("steps", "batch_size", "save_every", "diagnostics_every", "keep_checkpoints",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.learning_rate < 1.0:
            raise UserError(f"train.learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise UserError(f"train.lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.lam_schedule not in ("constant", "linear-warmup", "cosine"):
            raise UserError("train.lam_schedule must be constant, linear-warmup or cosine, "
                            f"got {self.lam_schedule!r}")
        if self.grad_clip < 0 or self.weight_decay < 0 or (self.micro_batch_size or 0) < 0 \
                or (self.scoring_micro_batch or 0) < 0:
            raise UserError("train.grad_clip, weight_decay, micro_batch_size and "
                            "scoring_micro_batch must be >= 0")
        if self.memory_limit is not None:
            from aropd_mlx.memory import parse_size

            parse_size(self.memory_limit, "train.memory_limit")
        from aropd_mlx.optimizer import optimizer_kwargs

        optimizer_kwargs(self.optimizer, self.optimizer_config, self.weight_decay)
        from aropd_mlx.tracking import TRACKERS

        for name in self.report_to:
            if name not in TRACKERS or self.report_to.count(name) > 1:
                raise UserError(f"train.report_to: {name!r} is unknown or given twice (use "
                                f"{', '.join(TRACKERS)}, or leave it empty)")
        if len(self.sft_view_mix) != 3 or min(self.sft_view_mix) < 0 or sum(self.sft_view_mix) <= 0:
            raise UserError("train.sft_view_mix must be three non-negative weights, not all zero")


@dataclass(frozen=True)
class RunConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    views: ViewSettings = field(default_factory=ViewSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    out: str = "runs/latest"

    def validate(self) -> "RunConfig":
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value):
                value.validate()
        return self


def _check_type(value, annotation, key: str):
    """Coerce YAML/flag values to the field's type, or a UserError naming the key."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _check_type(value, args[0], key)
    if origin is tuple or hint is tuple:
        item = (typing.get_args(hint) or (str,))[0]
        if isinstance(value, str) and item is str:  # one name, or mlx-lm's "a,b"
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return tuple(_check_type(v, item, key) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise UserError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{key}: expected a string, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping (name: value lines), got {value!r}")
        kt, vt = typing.get_args(hint) or (str, str)
        return {_check_type(k, kt, key): _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known: {', '.join(known)}"
            raise UserError(f"unknown key {dotted!r} ({hint})")
        hint = hints[key]
        if is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, dotted + ".")
        else:
            kwargs[key] = _check_type(value, hint, dotted)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return {f.name: (to_dict(v) if is_dataclass(v := getattr(cfg, f.name))
                     else list(v) if isinstance(v, tuple) else v) for f in fields(cfg)}


def merge(base: dict, overrides: dict) -> dict:
    """Apply dotted overrides ({"objective.lam": 0.6}) to a nested dict."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: i + 1])
                raise UserError(f"{section}: expected a section (key: value lines), got {node!r}")
        node[leaf] = value
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None,
                base: dict | None = None, flag_names: dict[str, str] | None = None) -> RunConfig:
    """Defaults <- `base` (e.g. a preset) <- the YAML file <- flag overrides; validated.

    An error names where the bad value came from: `--flag` (`flag_names` maps dotted keys to
    the flags that set them), `file.yaml:LINE`, or the key alone."""
    data, lines, aliases = merge({}, base or {}), {}, {}  # base: dotted keys, like overrides
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            also = (f"; {e.context} at line {ctx.line + 1}" if ctx and getattr(e, "context", None)
                    and (not mark or ctx.line != mark.line) else "")  # where it began: the bad line
            raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', e)}{also})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{path}:1: expected a mapping (key: value) at the top level")
        lines = _key_lines(text)
        from aropd_mlx.mlxlm_config import is_mlx_lm_config

        if is_mlx_lm_config(loaded):  # written for mlx_lm.lora: its keys, read as ours
            loaded, lines, aliases = _from_mlx_lm(loaded, lines, path)
        try:
            data = merge(data, _flatten(loaded))
        except UserError as e:
            raise UserError(_locate(str(e), path, lines, {})) from None
    flags = {k: v for k, v in (flag_names or {}).items() if k in (overrides or {})}
    try:
        return _build(RunConfig, merge(data, overrides or {}), "").validate()
    except UserError as e:
        raise UserError(_locate(str(e), path, lines, flags, aliases)) from None


def _from_mlx_lm(loaded: dict, lines: dict[str, int], path: Path):
    """An mlx-lm config as ours: (tree, our key -> its line, our key -> the mlx-lm key)."""
    from aropd_mlx.errors import note
    from aropd_mlx.mlxlm_config import OUR_SECTIONS, translate

    tree, origin, notes = translate(
        loaded, lambda key: f"{path}:{lines[key]}" if key in lines else str(path))
    for message in notes:
        note(f"{path}: {message}")
    ours = {k: n for k, n in lines.items() if k.split(".")[0] in OUR_SECTIONS}
    ours.update({k: lines[src] for k, src in origin.items() if src in lines})
    return tree, ours, origin


def yaml_keys(path) -> set[str]:
    """The dotted keys (ours) a YAML config file sets, an mlx-lm config's once translated."""
    from aropd_mlx.mlxlm_config import is_mlx_lm_config, translate

    if path is None:
        return set()
    tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if is_mlx_lm_config(tree):
        tree = translate(tree, str)[0]
    return set(_flatten(tree))


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line of that key in a YAML text."""
    out: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                dotted = f"{prefix}{key.value}"
                out[dotted] = key.start_mark.line + 1
                walk(value, dotted + ".")

    try:
        walk(yaml.compose(text, Loader=yaml.SafeLoader), "")
    except yaml.YAMLError:
        pass
    return out


def _locate(message: str, path, lines: dict[str, int], flags: dict[str, str],
            aliases: dict[str, str] | None = None) -> str:
    """Prefix a config error with the flag or the file:line that set the key it names first."""
    found = []
    for key in set(lines) | set(flags):
        m = re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message)
        if m:
            found.append((m.start(), -len(key), key))
    if found:
        key = min(found)[2]
        if key in flags:
            return f"{flags[key]}: {message}"
        alias = f" (mlx-lm's {aliases[key]})" if aliases and key in aliases else ""
        return f"{path}:{lines[key]}: {message}{alias}"
    return f"{path}: {message}" if path is not None else message


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save_config(cfg: RunConfig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def with_overrides(cfg: RunConfig, **sections) -> RunConfig:
    """Replace fields of sections: with_overrides(cfg, train={"steps": 5})."""
    return replace(cfg, **{name: replace(getattr(cfg, name), **values)
                           for name, values in sections.items()})
