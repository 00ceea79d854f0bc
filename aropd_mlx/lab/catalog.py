"""Which labs exist and where each one's model is: `aropd-mlx lab show`.

    name, settings = defaults.selected_lab()   # what AROPD_MLX_LAB selects
    describe(settings, name)                   # its key, model, lengths and recipe
    catalog()                                  # the default lab and every named one (NAMED_LABS)
"""
from __future__ import annotations

import json

from aropd_mlx.lab import shipped
from aropd_mlx.lab.defaults import NAMED_LABS, LabSettings, lab_response_tokens, settings_from
from aropd_mlx.lab.setup import cache_root


def describe(settings: LabSettings, name: str = "custom") -> dict:
    """A lab's key, where its model comes from (shipped with the package, built in the cache,
    or not built yet), its lengths and its recipe (JSON that AROPD_MLX_LAB takes back)."""
    key = settings.key()
    root = cache_root() / key
    folder = shipped.find(settings)
    cached = (root / "model").is_dir()
    model = ("shipped" if folder is not None else "built" if cached else "not built")
    return {"name": name, "key": key, "model": model,
            "shipped_in": str(folder) if folder is not None else None,
            "cache": str(root), "cached": cached, "k": [settings.k_min, settings.k_max],
            "longest_response_tokens": lab_response_tokens(settings.k_max),
            "recipe": shipped.recipe(settings)}


def catalog() -> list[dict]:
    """`describe` of the default lab and of each named lab, in NAMED_LABS' order."""
    return [describe(LabSettings(), "default"),
            *(describe(settings_from(NAMED_LABS[n]), n) for n in NAMED_LABS)]


MODEL_WORDS = {"shipped": "shipped in the package (copied into the cache on first use)",
               "built": "built, in the cache",
               "not built": "not built yet: `aropd-mlx lab build` builds it (minutes to hours "
                            "on 2 cores, resumable)"}


def format_description(d: dict) -> str:
    model = ("shipped in the package, installed in the cache"
             if d["model"] == "shipped" and d["cached"] else MODEL_WORDS[d["model"]])
    return "\n".join([
        f"lab:    {d['name']}" + ("" if d["name"] == "default" else " (AROPD_MLX_LAB)"),
        f"key:    {d['key']}",
        f"model:  {model}",
        f"cache:  {d['cache']}" + ("" if d["cached"] else " (empty)"),
        f"task:   k = {d['k'][0]}..{d['k'][1]} operations, correct responses up to "
        f"{d['longest_response_tokens']} tokens",
        "recipe (AROPD_MLX_LAB takes it back as it is, or '{\"base\": \"<name>\", ...}'):",
        json.dumps(d["recipe"], sort_keys=True)])


def format_catalog(rows: list[dict]) -> str:
    lines = [f"{'lab':<16} {'key':<13} {'k':<6} {'longest':>8}  model"]
    for d in rows:
        lines.append(f"{d['name']:<16} {d['key']:<13} {d['k'][0]}-{d['k'][1]:<4} "
                     f"{d['longest_response_tokens']:>8}  {d['model']}")
    lines.append("AROPD_MLX_LAB=<lab> picks one; `aropd-mlx lab show` with it set prints its recipe.")
    return "\n".join(lines)
