"""The lab's run defaults: what `aropd-mlx train` with no arguments runs.

A preset sits between the dataclass defaults and the user's YAML/flags (which still win).
Numbers come from LAB.md's prototype, re-measured on 2 cores: see README "The built-in lab".
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from aropd_mlx.errors import UserError
from aropd_mlx.lab.setup import Lab, LabSettings, cache_root, prepare_lab
from aropd_mlx.lab.tiny import TinySpec

LAB_TRAIN = {
    "train.method": "ar-opd",
    "train.steps": 100,
    "train.batch_size": 8,
    "train.learning_rate": 3e-5,
    "train.save_every": 50,
    "rollout.group_size": 4,
    "rollout.temperature": 0.6,  # at 1.0 the warm start's rollouts are mostly noise
    "model.lora_rank": 8,
    "model.lora_scale": 20.0,
    "out": "runs/lab",
}


def lab_settings_for(cfg=None) -> LabSettings:
    """The lab's settings; env AROPD_MLX_LAB='{"warm_steps": 2000, "k_max": 8}' changes them
    (a bigger or smaller lab; each distinct setting is built and cached once)."""
    raw = os.environ.get("AROPD_MLX_LAB")
    if not raw:
        return LabSettings()
    try:
        values = json.loads(raw)
        if not isinstance(values, dict):
            raise ValueError("expected a JSON object")
        return settings_from(values)
    except (ValueError, TypeError) as e:
        raise UserError(f"AROPD_MLX_LAB: {e}") from None


def settings_from(values: dict) -> LabSettings:
    """LabSettings from their JSON form (AROPD_MLX_LAB, lab.json)."""
    values = dict(values)
    if "spec" in values:
        values["spec"] = TinySpec(**values["spec"])
    for key in ("eval_ks", "warm_view_mix"):
        if key in values:
            values[key] = tuple(values[key])
    return LabSettings(**values)


def lab_at(settings: LabSettings) -> Lab:
    """The lab of these settings where the cache keeps it: its paths, nothing built."""
    return Lab(settings, cache_root() / settings.key())


def lab_record(lab: Lab) -> str:
    """The run directory's lab.json: which lab a run used (resume and `eval` use its checker)."""
    return json.dumps({"root": str(lab.root), "settings": asdict(lab.settings)}, indent=2,
                      default=str)


def find_lab(run_dir, cfg, on_step=None) -> Lab | None:
    """The lab a saved run used (None: not a lab run), built again if its cache is gone: from
    the run's lab.json, or (runs made before it) from the lab cache its model path points at."""
    record = Path(run_dir) / "lab.json"
    try:
        if record.is_file():
            data = json.loads(record.read_text())
            root, values = Path(data["root"]), data["settings"]
        else:
            root = Path(cfg.model.path).expanduser().parent
            if Path(cfg.model.path).name != "model" or not (root / "lab.json").is_file():
                return None
            values = json.loads((root / "lab.json").read_text())
        settings = settings_from(values)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"{record}: unreadable lab record ({e})") from None
    return prepare_lab(settings, root=root, on_step=on_step)


def lab_preset(lab: Lab, cfg) -> dict:
    return {**LAB_TRAIN, **lab.overrides()}
