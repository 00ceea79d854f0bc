"""The lab's run defaults: what `aropd-mlx train` with no arguments runs.

A preset sits between the dataclass defaults and the user's YAML/flags (which still win).
Numbers come from LAB.md's prototype, re-measured on 2 cores: see README "The built-in lab".
"""
from __future__ import annotations

from aropd_mlx.lab.setup import Lab, LabSettings

LAB_TRAIN = {
    "train.method": "ar-opd",
    "train.steps": 150,
    "train.batch_size": 8,
    "train.learning_rate": 1e-4,
    "train.save_every": 50,
    "rollout.group_size": 4,
    "rollout.temperature": 1.0,
    "model.lora_rank": 8,
    "model.lora_scale": 20.0,
    "out": "runs/lab",
}


def lab_settings_for(cfg) -> LabSettings:
    return LabSettings(seed=0)


def lab_preset(lab: Lab, cfg) -> dict:
    return {**LAB_TRAIN, **lab.overrides()}
