"""A config written for `mlx_lm.lora`, read as ours: `aropd-mlx train -c lora_config.yaml`.

Recognised by its keys (a string `model` or `data`, or any of mlx-lm's own top-level keys such
as `iters`, `num_layers`, `lora_parameters`, `adapter_path`). Each key becomes ours:

    model -> model.path              fine_tune_type -> model.fine_tune_type
    num_layers -> model.lora_layers  lora_parameters.{rank,scale,dropout,keys} -> model.lora_*
    data (a folder with train.jsonl, valid.jsonl) -> data.train (its train split) and, when it
         has valid.jsonl, data.eval (its validation split); a file or hf:// path -> data.train;
         an OWNER/NAME that is not a local path -> hf://datasets/OWNER/NAME
    learning_rate -> train.learning_rate    iters -> train.steps    batch_size -> train.batch_size
    lr_schedule {name: cosine_decay, arguments: [peak, decay_steps, end], warmup} ->
         train.lr_schedule cosine, learning_rate, min_lr_ratio, warmup_steps; none: constant
    optimizer adam | adamw | sgd | adafactor | muon -> train.optimizer; optimizer_config.<it>
         -> train.optimizer_config (its weight_decay: train.weight_decay); the other
         optimizers' entries are ignored, as by mlx-lm
    grad_checkpoint -> train.grad_checkpoint (where this version has it)
    adapter_path -> out (the run directory: adapters.safetensors + adapter_config.json there)
    seed -> train.seed    save_every -> train.save_every    trust_remote_code -> model.*
    report_to (wandb, tensorboard; "a,b" or a list) -> train.report_to
    project_name -> train.project_name (W&B)    wandb: PROJECT (older mlx-lm) -> both
    max_seq_length -> data.max_prompt_tokens (a longer prompt is skipped; responses are bounded
         by rollout.max_new_tokens)

Keys left out take mlx-lm's defaults where they differ from ours (num_layers 16, batch_size 4,
iters 1000, learning_rate 1e-5, a constant learning rate, save_every 100, adapter_path
adapters, optimizer adam). Keys that only steer mlx-lm's reporting (steps_per_report, steps_per_eval,
val_batches, ...) are ignored with one note. A value we cannot honour (lr_schedule:
linear_schedule, grad_accumulation_steps > 1, ...) is one error line; an unknown key is rejected by
name. Our own sections `views`, `rollout` and `objective` may sit beside mlx-lm's keys, and
`data` may be our own section (train, eval, columns, answer_from, ...) instead of a path.

    tree, origin, notes = translate(yaml.safe_load(text), where=lambda key: f"run.yaml:{line}")
"""

from __future__ import annotations

import difflib
import re
from dataclasses import fields
from pathlib import Path
from typing import Callable

from aropd_mlx.errors import UserError

# mlx_lm.lora's keys (its CONFIG_DEFAULTS and parser), by what we do with them
MAPPED = ("model", "data", "fine_tune_type", "num_layers", "lora_parameters", "learning_rate",
          "iters", "batch_size", "grad_checkpoint", "optimizer", "optimizer_config",
          "lr_schedule", "adapter_path", "seed", "save_every", "max_seq_length",
          "trust_remote_code", "report_to", "project_name", "wandb")
IGNORED = ("steps_per_report", "steps_per_eval", "val_batches", "test_batches",
           "clear_cache_threshold", "mask_prompt", "config")
CHECKED = ("train", "test", "resume_adapter_file", "grad_accumulation_steps", "hf_dataset")
MLX_LM_KEYS = MAPPED + IGNORED + CHECKED
OUR_SECTIONS = ("views", "rollout", "objective")  # ours, allowed beside mlx-lm's keys
DEFAULTS = {"model.lora_layers": 16, "train.batch_size": 4, "train.steps": 1000,
            "train.learning_rate": 1e-5, "train.lr_schedule": "constant",
            "train.save_every": 100, "out": "adapters", "train.optimizer": "adam"}
LORA_KEYS = {"rank": "model.lora_rank", "scale": "model.lora_scale",
             "dropout": "model.lora_dropout", "keys": "model.lora_keys"}


def is_mlx_lm_config(tree: dict) -> bool:
    """A YAML tree written for mlx_lm.lora rather than for us."""
    if not isinstance(tree, dict):
        return False
    ours = {"model", "data", "train", "out", *OUR_SECTIONS}
    return (any(k in MLX_LM_KEYS and k not in ours for k in tree)
            or isinstance(tree.get("model"), str) or isinstance(tree.get("data"), str)
            or isinstance(tree.get("train"), bool))


def _has_train_key(name: str) -> bool:
    from aropd_mlx.config import TrainSettings

    return name in {f.name for f in fields(TrainSettings)}


def _data(value, where) -> dict:
    """mlx-lm's `data`: a folder of train/valid/test.jsonl, a file, or a Hub dataset name."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{where('data')}: data: expected a folder, a file or a Hub dataset "
                        f"name, got {value!r}")
    path = Path(value).expanduser()
    if path.is_dir():
        out = {"data.train": value, "data.split": "train"}
        from aropd_mlx.sources import file_split, list_folder

        if any(file_split(rel) == "validation" for rel in list_folder(path)):
            out.update({"data.eval": value, "data.eval_split": "validation"})
        return out
    if not path.exists() and "://" not in value and re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        return {"data.train": f"hf://datasets/{value}"}
    return {"data.train": value}


def _lr_schedule(value, where) -> dict:
    if value is None:
        return {"train.lr_schedule": "constant"}
    if not isinstance(value, dict):
        raise UserError(f"{where('lr_schedule')}: lr_schedule: expected a mapping "
                        f"{{name, arguments, warmup}}, got {value!r}")
    unknown = set(value) - {"name", "arguments", "warmup", "warmup_init"}
    if unknown:
        raise UserError(f"{where('lr_schedule')}: unknown key 'lr_schedule.{sorted(unknown)[0]}' "
                        "(known: name, arguments, warmup, warmup_init)")
    name, args = value.get("name"), value.get("arguments") or []
    if name != "cosine_decay":
        raise UserError(f"{where('lr_schedule')}: lr_schedule.name: {name!r} cannot be honoured "
                        "(aropd-mlx has cosine_decay, with optional warmup, and a constant rate: "
                        "leave lr_schedule out)")
    if not isinstance(args, list) or not 2 <= len(args) <= 3 or not all(
            isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise UserError(f"{where('lr_schedule')}: lr_schedule.arguments: expected [peak, "
                        f"decay_steps, end], got {args!r}")
    peak, end = float(args[0]), float(args[2]) if len(args) == 3 else 0.0
    if value.get("warmup_init", 0.0):
        raise UserError(f"{where('lr_schedule')}: lr_schedule.warmup_init: "
                        f"{value['warmup_init']!r} cannot be honoured (warm-up starts at 0)")
    out = {"train.lr_schedule": "cosine", "train.learning_rate": peak,
           "train.min_lr_ratio": round(end / peak, 12) if peak > 0 else 0.0,
           "train.warmup_steps": value.get("warmup", 0) or 0, "_decay_steps": int(args[1])}
    return out


def _optimizer(tree: dict, where, notes: list[str]) -> dict:
    """mlx-lm's `optimizer` and `optimizer_config.<name>` as train.optimizer,
    train.optimizer_config and (its weight_decay) train.weight_decay."""
    from aropd_mlx.optimizer import OPTIMIZERS

    name = tree.get("optimizer", "adam")
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise UserError(f"{where('optimizer')}: optimizer: {name!r} cannot be honoured "
                        f"(aropd-mlx has {', '.join(OPTIMIZERS)}, as mlx-lm)")
    name = name.lower()  # mlx-lm lowercases it too
    config = tree.get("optimizer_config") or {}
    if not isinstance(config, dict):
        raise UserError(f"{where('optimizer_config')}: optimizer_config: expected a mapping "
                        "(optimizer name: its parameters)")
    for other in config:
        if other not in OPTIMIZERS:
            raise UserError(f"{where('optimizer_config')}: unknown key 'optimizer_config.{other}' "
                            f"(known: {', '.join(OPTIMIZERS)})")
    chosen = config.get(name) or {}
    if not isinstance(chosen, dict):
        raise UserError(f"{where('optimizer_config')}: optimizer_config.{name}: expected a mapping")
    params = {k: v for k, v in chosen.items() if k != "weight_decay"}
    out = {"train.optimizer": name, "train.optimizer_config": params or None}
    if "weight_decay" in chosen:
        out["train.weight_decay"] = chosen["weight_decay"]
    if name == "adafactor" and "relative_step" not in chosen:
        notes.append("optimizer: adafactor follows learning_rate here (relative_step: false, "
                     "scale_parameter: false); mlx-lm's default relative steps: "
                     "optimizer_config.adafactor.relative_step: true")
    return out


def translate(tree: dict, where: Callable[[str], str]) -> tuple[dict, dict, list[str]]:
    """(our config tree, our dotted key -> the mlx-lm key it came from, notes)."""
    out: dict = dict(DEFAULTS)
    origin: dict[str, str] = {}
    notes: list[str] = []
    ignored = []

    def put(key: str, value, src: str) -> None:
        out[key], origin[key] = value, src

    for key, value in tree.items():
        if key in OUR_SECTIONS:
            continue
        if key not in MLX_LM_KEYS:
            close = difflib.get_close_matches(str(key), MLX_LM_KEYS + OUR_SECTIONS, n=1)
            hint = (f"did you mean {close[0]}?" if close else
                    f"mlx-lm's keys: {', '.join(MAPPED)}; ours beside them: "
                    f"{', '.join(OUR_SECTIONS)}")
            raise UserError(f"{where(key)}: unknown key {key!r} in an mlx-lm config ({hint})")
        if key in IGNORED:
            ignored.append(key)
        elif key == "lr_schedule":
            continue  # below, once the learning rate and the steps are known
        elif key == "model":
            if not isinstance(value, str):
                raise UserError(f"{where(key)}: model: in an mlx-lm config the model is a path "
                                "or Hub id (a section `model:` is aropd-mlx's own format; do not "
                                "mix it with mlx-lm keys)")
            put("model.path", value, key)
        elif key == "data" and isinstance(value, dict):  # our own data section, as it is
            for k, v in value.items():
                put(f"data.{k}", v, f"data.{k}")
        elif key == "data":
            for k, v in _data(value, where).items():
                put(k, v, key)
        elif key == "lora_parameters":
            if not isinstance(value, dict):
                raise UserError(f"{where(key)}: lora_parameters: expected a mapping")
            for sub, v in value.items():
                if sub not in LORA_KEYS:
                    raise UserError(f"{where(key + '.' + str(sub))}: unknown key "
                                    f"'lora_parameters.{sub}' (known: {', '.join(LORA_KEYS)})")
                put(LORA_KEYS[sub], v, f"lora_parameters.{sub}")
        elif key in ("optimizer", "optimizer_config"):
            if "train.optimizer" not in origin:  # once for the two keys
                for k, v in _optimizer(tree, where, notes).items():
                    put(k, v, "optimizer" if k == "train.optimizer" else "optimizer_config")
        elif key == "grad_checkpoint":
            if _has_train_key("grad_checkpoint"):
                put("train.grad_checkpoint", value, key)
            elif value:
                notes.append("grad_checkpoint: not available in this version of aropd-mlx; "
                             "training runs without it")
        elif key == "train":
            if value is False:
                raise UserError(f"{where(key)}: train: false (mlx-lm: test only) cannot be "
                                "honoured here: `aropd-mlx eval --adapter RUN` evaluates")
        elif key == "test":
            if value:
                raise UserError(f"{where(key)}: test: true cannot be honoured: after training, "
                                "`aropd-mlx eval --adapter RUN --data TEST` evaluates")
        elif key in ("report_to", "project_name") and value in (None, ""):
            continue  # mlx-lm's default: none
        elif key == "wandb":  # older mlx-lm: `wandb: PROJECT` reports there
            if value:
                put("train.report_to", ["wandb"], key)
                put("train.project_name", value, key)
        elif key in ("resume_adapter_file", "hf_dataset"):
            if value:
                fix = {"resume_adapter_file": "--resume continues a run from its checkpoints",
                       "hf_dataset": "give data: hf://datasets/OWNER/NAME and --columns"}[key]
                raise UserError(f"{where(key)}: {key} cannot be honoured ({fix})")
        elif key == "grad_accumulation_steps":
            if value not in (None, 1):
                raise UserError(f"{where(key)}: grad_accumulation_steps: {value!r} cannot be "
                                "honoured (set batch_size to the batch you want per update; "
                                "train.micro_batch_size bounds memory)")
        else:
            target = {"fine_tune_type": "model.fine_tune_type", "num_layers": "model.lora_layers",
                      "learning_rate": "train.learning_rate", "iters": "train.steps",
                      "batch_size": "train.batch_size", "adapter_path": "out",
                      "seed": "train.seed", "save_every": "train.save_every",
                      "max_seq_length": "data.max_prompt_tokens",
                      "trust_remote_code": "model.trust_remote_code",
                      "report_to": "train.report_to", "project_name": "train.project_name"}[key]
            put(target, value, key)
    if "lr_schedule" in tree:  # after learning_rate: the schedule's peak wins, as in mlx-lm
        sched = _lr_schedule(tree["lr_schedule"], where)
        decay = sched.pop("_decay_steps", None)
        for k, v in sched.items():
            put(k, v, "lr_schedule")
        steps, warm = out["train.steps"], out.get("train.warmup_steps", 0)
        if decay is not None and isinstance(steps, int) and decay != steps - warm:
            raise UserError(f"{where('lr_schedule')}: lr_schedule.arguments: decay over {decay} "
                            f"steps cannot be honoured (aropd-mlx decays over iters - warmup = "
                            f"{steps - warm}: set arguments[1] to that)")
    if ignored:
        notes.append(f"mlx-lm keys with no effect here, ignored: {', '.join(ignored)}")
    tree_out: dict = {}
    for dotted, value in out.items():
        node = tree_out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    for section in OUR_SECTIONS:
        if section in tree:
            tree_out[section] = tree[section]
    return tree_out, origin, notes
