"""The lab's run defaults: what `aropd-mlx train` with no arguments runs.

A preset sits between the dataclass defaults and the user's YAML/flags (which still win).
Numbers come from LAB.md's prototype, re-measured on 2 cores: see README "The built-in lab".
"""
from __future__ import annotations

import json
import os

from aropd_mlx.errors import UserError
from aropd_mlx.lab.setup import Lab, LabSettings
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
        if "spec" in values:
            values["spec"] = TinySpec(**values["spec"])
        for key in ("eval_ks", "warm_view_mix"):
            if key in values:
                values[key] = tuple(values[key])
        return LabSettings(**values)
    except (ValueError, TypeError) as e:
        raise UserError(f"AROPD_MLX_LAB: {e}") from None


def lab_preset(lab: Lab, cfg) -> dict:
    return {**LAB_TRAIN, **lab.overrides()}
