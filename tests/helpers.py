"""Small builders shared by tests: lab-style examples and a tiny run config."""
from aropd_mlx.config import load_config
from aropd_mlx.data import Example
from aropd_mlx.lab import task
from aropd_mlx.lab.setup import view_overrides


def lab_examples(n=32, k_min=1, k_max=3, seed=0):
    return [Example(**d) for d in task.generate(n, k_min, k_max, seed=seed)]


def tiny_config(model_path, out, **overrides):
    base = {**view_overrides(4), "model.path": str(model_path), "out": str(out),
            "train.steps": 3, "train.batch_size": 4, "train.save_every": 2,
            "rollout.group_size": 2, "rollout.max_new_tokens": 12}
    return load_config(overrides={**base, **overrides})
