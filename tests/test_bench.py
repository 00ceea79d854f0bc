"""Smoke tests of the benchmarks: each runs at a tiny size and returns well-formed numbers.
No timing is asserted (the machines are shared and noisy); only shapes, counts and keys."""
import json
import re
import math

import pytest

from aropd_mlx.bench import common


def _finite_positive(*values):
    for v in values:
        assert isinstance(v, float) and math.isfinite(v) and v > 0, v


@pytest.fixture(autouse=True)
def bench_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AROPD_MLX_BENCH_DIR", str(tmp_path / "bench"))


def test_padded_vocab_model_loads_in_both_libraries(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "BENCH_VOCAB_56M", 300)
    monkeypatch.setattr(common, "spec_56m", common.lab_spec)  # small, same code path
    path = common.bench_model("56m", root=tmp_path)
    from mlx_lm import load

    model, tok = load(str(path))
    assert len(tok.get_vocab()) == 300
    assert model.lm_head.weight.shape[0] == 300
    prompts = common.student_prompts(tok, 2)
    assert all(p[0] == tok.bos_token_id for p in prompts)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vocab_size"] == 300
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert len(hf_tok) == 300
    msgs = [{"role": "user", "content": "Q:1+2"}]
    hf_ids = hf_tok.apply_chat_template(msgs, add_generation_prompt=True)
    hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == list(tok.apply_chat_template(msgs, add_generation_prompt=True))


def test_flop_model_counts_matmul_weights(tiny_llama):
    from mlx_lm import load

    model, _ = load(str(tiny_llama))
    fm = common.FlopModel.of(model)
    embed = model.model.embed_tokens.weight.size
    assert fm.n_total - fm.n_matmul == embed  # untied: the input table does no matmul


def test_rollout_bench(tiny_llama):
    from aropd_mlx.bench.rollout import bench_rollout, format_rollout

    r = bench_rollout(rows=2, max_new_tokens=4, repeats=1, model_path=tiny_llama)
    assert r["ours_tokens"] == r["batch_generate_tokens"] == 8  # fixed length, EOS off
    _finite_positive(r["ours_tokens_per_s"], r["batch_generate_tokens_per_s"], r["speedup"])
    assert "batch_generate" in format_rollout(r)


def test_scoring_bench(tiny_llama):
    from aropd_mlx.bench.step import bench_step, format_step

    r = bench_step(batch=2, group=1, max_new_tokens=4, repeats=1, model_path=tiny_llama)
    for name in ("ar-opd", "opd"):
        _finite_positive(r[f"{name}_scoring_seconds"], r[f"{name}_update_seconds"],
                         r[f"{name}_step_seconds"])
    _finite_positive(r["step_ratio"], r["scoring_ratio"], r["update_ratio"])
    assert "AR-OPD/OPD" in format_step(r)


def test_mfu_bench(tiny_llama):
    from aropd_mlx.bench.step import bench_mfu, format_mfu

    r = bench_mfu(batch=2, group=1, max_new_tokens=4, steps=1, model_path=tiny_llama,
                  peak_gflops=100.0, bandwidth_gbs=10.0)
    _finite_positive(r["mfu"], r["step_gflop"], r["rollout_gflops"], r["update_gflops"])
    assert "MFU" in format_mfu(r)
    # the decode steps' limit: every matmul weight (fp32) read once per step at 10 GB/s
    limit = 4 * 4 * r["params_matmul"] / 1e9 / 10.0
    assert abs(r["rollout_bandwidth_limit_seconds"] - limit) < 1e-12
    assert abs(r["rollout_bandwidth_share"] - limit / r["rollout_seconds"]) < 1e-12
    from aropd_mlx.bench.suite import goal_rows

    rows = goal_rows("step", {**r, "model": "tiny"})
    assert [row["goal"] for row in rows] == [">= 50%", ">= 50%", ">= 50%", ">= 35%"]
    assert rows[2]["result"] == f"{100 * r['rollout_bandwidth_share']:.1f}%"


def test_memory_bandwidth_is_measured():
    from aropd_mlx.doctor import memory_bandwidth_gbs

    bw = memory_bandwidth_gbs(n=1024, repeats=2)
    assert 0.1 < bw < 10_000  # GB/s: a real number, neither zero nor absurd


def test_step_flops_formula():
    from types import SimpleNamespace

    from aropd_mlx.bench.step import step_flops

    enc = [SimpleNamespace(prompts={"student": [0] * 3, "partial": [0] * 5, "full": [0] * 7})]
    fm = common.FlopModel(n_matmul=110, n_total=120)
    f = step_flops(fm, 10, enc, ("partial", "full"), 1, [4], weight_grads=True)
    assert f["rollout"] == 2 * 100 * (3 - 1 + 4) + 2 * 10 * 4
    assert f["scoring"] == 2 * 100 * (5 + 3) + 2 * 100 * (7 + 3)
    assert f["update"] == 6 * 100 * (3 + 3) + 4 * 10 * 4 + 2 * (2 * 10 * 4)
    # a group of 2 responses (lengths 4 and 2): prompts run once, responses once per row
    g = step_flops(fm, 10, enc, ("partial",), 2, [4, 2], weight_grads=False)
    assert g["rollout"] == 2 * 100 * (2 + 4 + 2) + 2 * 10 * (4 + 2)
    assert g["scoring"] == 2 * 100 * (5 + 3 + 1)
    assert g["update"] == 2 * 10 * 6 + 4 * 100 * ((3 + 3) + (3 + 1)) + 4 * 10 * 6


def test_peer_ours_side_and_install_check(tiny_llama):
    from aropd_mlx.bench.peer import bench_peer, ensure_trl, format_peer

    r = bench_peer(rows=2, max_new_tokens=4, rounds=2, steps_per_round=1, peers=(),
                   install=False, model_path=tiny_llama)
    assert r["speedups"] == {} and r["ratios"] == {}
    ours = r["runs"]["aropd-mlx opd"]
    _finite_positive(ours["seconds_per_step"], ours["tokens_per_s"], ours["update_seconds"])
    assert len(ours["round_seconds_per_step"]) == 2 and len(ours["step_seconds"]) == 2
    assert ours["completion_tokens_mean"] == 4
    why = ensure_trl(install=False)
    assert why is None or "TRL" in why
    assert "aropd-mlx opd" in format_peer(r)


@pytest.mark.slow
def test_peer_against_trl(tiny_llama):
    pytest.importorskip("trl")
    from aropd_mlx.bench.peer import bench_peer

    r = bench_peer(rows=2, max_new_tokens=4, rounds=2, steps_per_round=1, peers=("gkd-tuned",),
                   install=False, model_path=tiny_llama)
    run = r["runs"]["trl gkd-tuned"]
    assert "error" not in run, run
    assert len(run["step_seconds"]) == len(run["step_cpu_seconds"]) == 2  # 2 rounds x 1 step
    assert len(run["round_seconds_per_step"]) == 2
    assert run["completion_tokens_mean"] == 4  # warm-up included: all fixed length
    _finite_positive(r["speedups"]["trl gkd-tuned"], r["speedups_cpu"]["trl gkd-tuned"])
    assert r["ratios"]["trl fastest"]["config"] == "trl gkd-tuned"
    assert r["order"] == ["0:aropd-mlx opd", "0:trl gkd-tuned", "1:aropd-mlx opd",
                          "1:trl gkd-tuned"]


def test_suite_table_and_cli_json(tmp_path):
    import typer
    from typer.testing import CliRunner

    from aropd_mlx.cli.bench import bench_command

    app = typer.Typer()
    app.command()(bench_command)
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["objective", "--quick", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert {"machine", "results", "table"} <= set(data)
    rows = data["table"]
    assert rows and all({"benchmark", "measure", "result", "goal", "met"} <= set(r) for r in rows)
    assert "fused / naive" in res.output
    bad = CliRunner().invoke(app, ["nonsense"])
    assert bad.exit_code == 2 and "unknown benchmark" in bad.output


def test_goal_rows_mark_misses():
    from aropd_mlx.bench.suite import goal_rows

    rows = goal_rows("scoring", {"model": "lab", "scoring_ratio": 2.0, "step_ratio": 1.5,
                                 "flop_ratio": 1.6})
    step = [r for r in rows if r["measure"] == "AR-OPD / OPD step time"][0]
    assert step["met"] == "NO" and step["result"] == "1.50x"
    assert {r["met"] for r in rows if r["goal"] == "-"} == {"-"}
    ratio = {"median": 1.3, "min": 1.25, "max": 1.4, "n": 5, "goal": 1.2, "verdict": "yes"}
    rows = goal_rows("peer", {"model": "lab", "ratios": {
        "trl gkd-default": {**ratio, "goal": 3.0, "verdict": "NO"},
        "trl gkd-tuned": {**ratio, "goal": None, "verdict": "-"},
        "trl fastest": {**ratio, "config": "trl gkd-tuned"}}})
    assert [r["met"] for r in rows] == ["NO", "-", "yes"]
    assert [r["goal"] for r in rows] == [">= 3x", "-", ">= 1.2x"]
    assert rows[2]["measure"].startswith("opd speed vs trl fastest (gkd-tuned)")
    assert rows[2]["result"] == "1.30x [1.25-1.40]"


def test_busy_machine_warning():
    from aropd_mlx.bench.suite import busy_note

    assert busy_note({"loadavg_start": [1.2, 1, 1], "cpus": 2}) is None
    note = busy_note({"loadavg_start": [4.1, 3, 3], "cpus": 2})
    assert note.startswith("warning: load average 4.1 on 2 CPUs")
    assert busy_note({"loadavg_start": None, "cpus": 2}) is None


def test_cli_peer_rounds_flags_and_device(tmp_path, monkeypatch):
    """`bench peer --quick --rounds --steps-per-round` reaches bench_peer (TRL forced absent:
    ours only, a few tiny steps); a bad --device is a one-line error."""
    import typer
    from typer.testing import CliRunner

    from aropd_mlx.bench import peer
    from aropd_mlx.cli.bench import bench_command

    monkeypatch.setattr(peer, "ensure_trl", lambda install=True: "TRL absent (test)")
    app = typer.Typer()
    app.command()(bench_command)
    out = tmp_path / "peer.json"
    res = CliRunner().invoke(app, ["peer", "--quick", "--no-install", "--rounds", "3",
                                   "--steps-per-round", "1", "--device", "cpu", "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    r = data["results"]["peer/lab"]
    assert (r["rounds"], r["steps_per_round"], r["device"]) == (3, 1, "cpu")
    assert len(r["runs"]["aropd-mlx opd"]["round_seconds_per_step"]) == 3
    assert r["skipped"] == "TRL absent (test)" and data["device"] == "cpu"
    assert "3 rounds x 1 timed steps" in res.output
    bad = CliRunner().invoke(app, ["peer", "--device", "tpu"])
    assert bad.exit_code == 2 and "--device" in bad.output


def test_bench_memory_prints_planned_beside_measured(tiny_qwen2):
    """A tiny `bench memory` (the tiny qwen2, tied, GQA): every phase's line, and the plan
    within a loose factor of the measured peak (the 15% goal is judged at real shapes)."""
    from aropd_mlx.bench.memory import PHASES
    from aropd_mlx.bench.suite import run_suite

    lines = []
    size = dict(model_path=tiny_qwen2, rows=4, group=2, student_prompt=24, view_prompt=48,
                response=16, lora_rank=4, scoring_rows=2, update_rows=2, checkpoint=True)
    res = run_suite(["memory"], sizes={"memory": [(None, size)]}, echo=lines.append)
    text = "\n".join(lines)
    (r,) = res["results"].values()
    assert (r["scoring_rows"], r["update_rows"], r["checkpoint"]) == (2, 2, True)
    for phase in PHASES:
        assert re.search(rf"{phase} +predicted +[0-9.]+ [GM]B +measured +[0-9.]+ [GM]B +"
                         r"measured/predicted [0-9.]+", text), text
        assert 1 / 3 < r["measured"][phase] / r["predicted"][phase] < 3, (phase, r)
    (row,) = res["table"]
    assert row["benchmark"] == "memory" and row["result"].endswith("x")


def test_every_benchmark_resolves_to_its_functions():
    """Each name `aropd-mlx bench` accepts finds a bench function and a formatter (the table
    of module and function names would otherwise fail only when that bench is run)."""
    from aropd_mlx.bench.suite import BENCHMARKS, RUNNERS, _runner

    assert set(RUNNERS) == set(BENCHMARKS) - {"objective"}
    for bench in BENCHMARKS:
        run, fmt = _runner(bench)
        assert callable(run) and callable(fmt), bench
        assert run.__name__.startswith("bench_") or bench == "objective", (bench, run)
