"""Maintainers: build the default lab model from scratch, measure it, ship it in the package.

    python scripts/ship_lab.py            # AROPD_MLX_LAB may change the recipe (lab/defaults.py)
    python scripts/ship_lab.py long       # a named lab (defaults.NAMED_LABS) -> shipped_long/

Writes aropd_mlx/lab/shipped/ (or shipped_<name>/: model files + lab.json: recipe, SHA-256 per
file, the held-out numbers of lab/measure.py). Record the printed table in docs/LAB.md. Takes 10-35 minutes on
2 cores, depending on the recipe.
"""
import sys

from aropd_mlx.lab import shipped
from aropd_mlx.lab.defaults import NAMED_LABS, lab_settings_for, settings_from
from aropd_mlx.lab.measure import format_measure, measure_lab
from aropd_mlx.lab.setup import prepare_lab
from aropd_mlx.platform import ensure_fast_blas


def main() -> None:
    ensure_fast_blas()
    name = sys.argv[1] if len(sys.argv) > 1 else None
    if name is not None and name not in NAMED_LABS:
        sys.exit(f"ship_lab.py: unknown lab {name!r} (named labs: {', '.join(NAMED_LABS)})")
    settings = lab_settings_for() if name is None else settings_from(NAMED_LABS[name])
    lab = prepare_lab(settings,  # the cached build of this recipe, else a build from scratch
                      on_step=lambda line: line["step"] % 50 or print("warm start", line["step"],
                                                                      f"loss {line['loss']:.3f}"))
    numbers = measure_lab(lab)
    found = shipped.export(lab.model_path, settings, numbers, shipped.shipped_dir(name))
    print(format_measure(numbers))
    print("shipped:", ", ".join(f"{k} {v[:12]}" for k, v in found["files"].items()))


if __name__ == "__main__":
    main()
