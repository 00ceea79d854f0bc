"""Lab settings read from JSON (AROPD_MLX_LAB, lab.json) checked field by field before use: each
value of the kind its default has, counts at least 1; one line naming the field otherwise
(a string where a number belongs failed deep in a build with a traceback)."""

from __future__ import annotations

import math
from dataclasses import fields

from aropd_mlx.errors import UserError

# ints that may be 0 (the rest count things: >= 1)
AT_LEAST_0 = ("seed", "warm_steps", "warm_student_steps", "student_view_k_max")

KINDS = {bool: ("true or false", lambda v: isinstance(v, bool)),
         int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
         float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(v)),
         str: ("a string", lambda v: isinstance(v, str))}


def check_types(values: dict, defaults, where: str) -> None:
    """`values` (JSON) against the dataclass instance `defaults`: a field whose default is a
    tuple takes a list of its first element's kind (an empty default: left to its own check);
    `spec` is checked on its own."""
    for f in fields(defaults):
        if f.name not in values or f.name == "spec":
            continue
        value, default = values[f.name], getattr(defaults, f.name)
        if isinstance(default, tuple):
            if not default:
                continue
            name, ok = KINDS[type(default[0])]
            what = f"a list, each {name}"
            good = isinstance(value, (list, tuple)) and all(ok(x) for x in value)
        else:
            name, ok = KINDS[type(default)]
            good, what = ok(value), name
            if type(default) is int:
                least = 0 if f.name in AT_LEAST_0 else 1
                good, what = good and value >= least, f"{name} >= {least}"
        if not good:
            raise UserError(f"{where}: {f.name} must be {what}, got {value!r}")
