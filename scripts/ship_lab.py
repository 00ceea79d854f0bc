"""Maintainers: build the default lab model from scratch, measure it, ship it in the package.

    python scripts/ship_lab.py            # AROPD_MLX_LAB may change the recipe (lab/defaults.py)

Writes aropd_mlx/lab/shipped/ (model files + lab.json: recipe, SHA-256 per file, the held-out
numbers of lab/measure.py). Record the printed table in docs/LAB.md. Takes 10-35 minutes on
2 cores, depending on the recipe.
"""
from aropd_mlx.lab import shipped
from aropd_mlx.lab.defaults import lab_settings_for
from aropd_mlx.lab.measure import format_measure, measure_lab
from aropd_mlx.lab.setup import prepare_lab
from aropd_mlx.platform import ensure_fast_blas


def main() -> None:
    ensure_fast_blas()
    settings = lab_settings_for()
    lab = prepare_lab(settings,  # the cached build of this recipe, else a build from scratch
                      on_step=lambda line: line["step"] % 50 or print("warm start", line["step"],
                                                                      f"loss {line['loss']:.3f}"))
    numbers = measure_lab(lab)
    found = shipped.export(lab.model_path, settings, numbers)
    print(format_measure(numbers))
    print("shipped:", ", ".join(f"{k} {v[:12]}" for k, v in found["files"].items()))


if __name__ == "__main__":
    main()
