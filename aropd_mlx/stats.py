"""Small statistics for comparing methods over seeds, without scipy.

    mean_ci([0.61, 0.70, 0.66])   # {"n": 3, "mean": .657, "half_width": .112, "low":, "high":}

The 95% interval is mean +- t_{0.975, n-1} * s / sqrt(n) with s the sample standard deviation
(ddof = 1): the Student-t interval for the mean over seeds. With n = 1 there is no estimate of
the seed-to-seed spread, so the interval is undefined: half_width, low and high are None (shown
as "n/a"), never 0. With n = 0 the mean is None too.
"""

from __future__ import annotations

import math


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with an integer df >= 1, in closed form (Abramowitz & Stegun
    26.7.3-4: a finite series in cos(theta), theta = atan(t / sqrt(df)))."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be an integer >= 1, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        series, term = 1.0, 1.0
        for j in range(1, (df - 1) // 2):  # terms (2*4*...*2j)/(3*5*...*(2j+1)) cos^2j
            term *= c2 * (2 * j) / (2 * j + 1)
            series += term
        a = 2.0 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * series if df > 1 else 0.0))
    else:
        series, term = 1.0, 1.0
        for j in range(1, df // 2):  # terms (1*3*...*(2j-1))/(2*4*...*2j) cos^2j
            term *= c2 * (2 * j - 1) / (2 * j)
            series += term
        a = math.sin(theta) * series
    return 0.5 * (1.0 + a)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (0 < p < 1), by bisection on `t_cdf` (to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def mean_ci(values, level: float = 0.95) -> dict:
    """Mean over seeds with its two-sided Student-t interval (see the module docstring)."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "half_width": None, "low": None, "high": None}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "half_width": None, "low": None, "high": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "low": mean - half,
            "high": mean + half}


def paired_deltas(a: dict, b: dict, level: float = 0.95) -> dict:
    """Interval of the mean of a[s] - b[s] over the seeds s both have. A side with a single
    value (a deterministic run, e.g. the base model) is compared with every seed of the other."""
    if len(a) == 1 and len(b) > 1:
        a = {s: next(iter(a.values())) for s in b}
    if len(b) == 1 and len(a) > 1:
        b = {s: next(iter(b.values())) for s in a}
    seeds = sorted(set(a) & set(b))
    out = mean_ci([a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None], level)
    out["excludes_zero"] = out["low"] is not None and (out["low"] > 0 or out["high"] < 0)
    return out


def format_ci(ci: dict, digits: int = 3) -> str:
    """'0.657 ± 0.112', '0.500 ± n/a' (one seed) or '-' (none)."""
    if ci.get("mean") is None:
        return "-"
    half = ci.get("half_width")
    return f"{ci['mean']:.{digits}f} ± " + ("n/a" if half is None else f"{half:.{digits}f}")
