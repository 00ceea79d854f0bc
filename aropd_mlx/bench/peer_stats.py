"""The statistics of the peer benchmark's interleaved rounds (aropd_mlx.bench.peer).

Per side: the median s/step of each round, and over rounds their median and spread. Per TRL
configuration: the ratio TRL s/step / ours s/step within each round, over rounds its median and
spread, and its verdict against its goal: "yes" only when the whole spread clears the goal, "NO"
when all of it misses, "straddles" otherwise. Pure functions of the round results; no processes.
"""

from __future__ import annotations

import statistics

from aropd_mlx.bench.common import median

OURS = "aropd-mlx opd"
FASTEST = "trl fastest"
GOAL_DEFAULTS = 3.0  # ours / TRL GKD defaults
GOAL_FASTEST = {"56m": 1.5, "lab": 1.2}  # ours / TRL's fastest configuration, per bench model


def spread(xs) -> dict:
    """median, min, max and quartiles (q1, q3: inclusive method) of a list of numbers."""
    xs = sorted(float(x) for x in xs)
    if not xs:
        nan = float("nan")
        return {"median": nan, "min": nan, "max": nan, "q1": nan, "q3": nan, "n": 0}
    q1, q3 = ((xs[0], xs[0]) if len(xs) == 1 else
              tuple(statistics.quantiles(xs, n=4, method="inclusive")[i] for i in (0, 2)))
    return {"median": float(statistics.median(xs)), "min": xs[0], "max": xs[-1],
            "q1": float(q1), "q3": float(q3), "n": len(xs)}


def verdict(lo: float, hi: float, goal: float | None) -> str:
    """'yes' when the whole spread [lo, hi] clears `goal`, 'NO' when all of it misses,
    'straddles' when the goal lies inside it (no claim either way); '-' without a goal."""
    if goal is None:
        return "-"
    if lo >= goal:
        return "yes"
    if hi < goal:
        return "NO"
    return "straddles"


def round_ratios(theirs: list[float], ours: list[float]) -> list[float]:
    """Per-round TRL s/step / ours s/step (ours is that many times as fast)."""
    return [t / o if o else float("nan") for t, o in zip(theirs, ours)]


def peer_goals(model_name: str) -> dict:
    return {"trl gkd-default": GOAL_DEFAULTS, FASTEST: GOAL_FASTEST.get(model_name, 1.2)}


def aggregate(rounds: dict[str, list[dict]], tokens: int, model_name: str,
              ours: str = OURS) -> dict:
    """Per side {round_seconds_per_step, seconds_per_step, spread, ...} and per TRL side the
    ratio over rounds {median, min, max, q1, q3, per_round, goal, verdict}, plus FASTEST: the
    TRL configuration with the lowest median s/step, judged against the fastest-goal.

    `rounds[name]` is the list of per-round results {"step_seconds": [...],
    "step_cpu_seconds": [...]} of each side, in round order (ours included)."""
    runs, ratios = {}, {}
    for name, rs in rounds.items():
        per = [median(r["step_seconds"]) for r in rs]
        cpu = [median(r["step_cpu_seconds"]) for r in rs if r.get("step_cpu_seconds")]
        s = spread(per)
        runs[name] = {"round_seconds_per_step": per, "seconds_per_step": s["median"],
                      "spread": s, "tokens_per_s": tokens / s["median"] if s["median"] else None,
                      "step_seconds": [t for r in rs for t in r["step_seconds"]],
                      "step_cpu_seconds": [t for r in rs for t in r.get("step_cpu_seconds", [])],
                      "round_cpu_seconds_per_step": cpu,
                      "cpu_seconds_per_step": median(cpu) if cpu else None}
    goals = peer_goals(model_name)
    base = runs.get(ours)
    trl = [n for n in runs if n != ours]
    for name in trl:
        r = round_ratios(runs[name]["round_seconds_per_step"], base["round_seconds_per_step"])
        s = spread(r)
        goal = goals.get(name)
        ratios[name] = {**s, "per_round": r, "goal": goal,
                        "verdict": verdict(s["min"], s["max"], goal)}
        cpu_t, cpu_o = runs[name]["round_cpu_seconds_per_step"], base["round_cpu_seconds_per_step"]
        if cpu_t and cpu_o:
            ratios[name]["cpu_median"] = spread(round_ratios(cpu_t, cpu_o))["median"]
    if trl:
        fastest = min(trl, key=lambda n: runs[n]["seconds_per_step"])
        goal = goals[FASTEST]
        ratios[FASTEST] = {**ratios[fastest], "config": fastest, "goal": goal,
                           "verdict": verdict(ratios[fastest]["min"], ratios[fastest]["max"],
                                              goal)}
    return {"runs": runs, "ratios": ratios}

