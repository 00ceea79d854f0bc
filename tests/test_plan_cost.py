"""`bench plan-cost`: the three sides' settings come from the memory plan, the step runs at
each of them, and the goal rows read the measured ratios."""
from aropd_mlx.bench.plan_cost import GOAL, bench_plan_cost, side_settings
from aropd_mlx.bench.suite import goal_rows
from aropd_mlx.config import load_config
from aropd_mlx.memory import ModelShape, RunShape, predict

QWEN05 = ModelShape(layers=24, hidden=896, heads=14, kv_heads=2, intermediate=4864,
                    vocab=151936, tied=True, dtype_bytes=2, attention_bias=True)
RUN = RunShape(rows=8, group=4, student_prompt=256, view_prompts={"partial": 768, "full": 768},
               response=1024, lora_rank=16)


def test_sides_fit_their_limits_and_shrink_with_them():
    sides = side_settings(QWEN05, RUN, load_config().train, share=0.6)
    free = sides["unconstrained"]
    assert (free["scoring_rows"], free["update_rows"], free["checkpoint"]) == (8, 8, False)
    assert free["predicted_peak"] == max(predict(QWEN05, RUN, 8, 8, False).values())
    for side in ("planned", "tightest"):
        s = sides[side]
        # the plan's own prediction at the chosen settings is under the side's limit
        got = max(predict(QWEN05, RUN, s["scoring_rows"], s["update_rows"], s["checkpoint"]).values())
        assert got == s["predicted_peak"] <= s["limit"] < free["predicted_peak"]
    assert sides["tightest"]["limit"] < sides["planned"]["limit"] == int(0.6 * free["predicted_peak"])
    assert sides["tightest"]["update_rows"] <= sides["planned"]["update_rows"] < 8


def test_plan_cost_runs_every_side_on_one_rollout(tiny_llama):
    r = bench_plan_cost("tiny", model_path=tiny_llama, batch=2, group=2, max_new_tokens=8,
                        repeats=1, share=0.5)
    assert set(r["sides"]) == {"unconstrained", "planned", "tightest"}
    base = r["sides"]["unconstrained"]
    for side in ("planned", "tightest"):
        s = r["sides"][side]
        assert s["step_seconds"] > r["rollout_seconds"] > 0
        assert abs(s["step_ratio"] - s["step_seconds"] / base["step_seconds"]) < 1e-12
        # micro-batches hold fewer rows' activations at once than all rows together
        assert s["peak_gb"] <= base["peak_gb"] * 1.05
    rows = goal_rows("plan-cost", r)
    assert [row["goal"] for row in rows] == [f"<= {GOAL}x"] * 2
    assert [row["met"] for row in rows] == [
        "yes" if r["sides"][s]["step_ratio"] <= GOAL else "NO" for s in ("planned", "tightest")]
