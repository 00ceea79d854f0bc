"""compare.py (planning, statistics, a tiny end-to-end run) and report.py (PNGs, markdown)."""
import json
import math

import numpy as np
import pytest

from aropd_mlx.compare import CompareSettings, compare, plan, run_metrics
from aropd_mlx.errors import UserError
from aropd_mlx.stats import format_ci, mean_ci, paired_deltas, t_cdf, t_quantile

# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("df,q", [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451),
                                  (9, 2.2621572), (29, 2.0452296)])
def test_t_quantile_matches_tables(df, q):
    assert t_quantile(0.975, df) == pytest.approx(q, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-q, abs=1e-6)


def test_t_closed_forms():
    # df = 1 is Cauchy: F(t) = 1/2 + atan(t)/pi; df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    for t in (-3.0, -0.5, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    p = 0.975
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), abs=1e-9)
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-9)
    with pytest.raises(ValueError):
        t_cdf(1.0, 0)


def test_mean_ci_by_hand_and_single_seed():
    ci = mean_ci([0.5, 0.7, 0.6])
    assert ci["mean"] == pytest.approx(0.6) and ci["std"] == pytest.approx(0.1)
    assert ci["half_width"] == pytest.approx(4.3026527 * 0.1 / math.sqrt(3), abs=1e-6)
    one = mean_ci([0.42])
    assert one["mean"] == 0.42 and one["half_width"] is None and one["low"] is None
    assert format_ci(one) == "0.420 ± n/a" and format_ci(mean_ci([])) == "-"
    assert format_ci(ci) == f"0.600 ± {ci['half_width']:.3f}"


def test_paired_deltas():
    d = paired_deltas({0: 0.8, 1: 0.9, 2: 0.7}, {0: 0.5, 1: 0.7, 2: 0.6})
    assert d["mean"] == pytest.approx(0.2) and d["n"] == 3
    base = paired_deltas({0: 0.8, 1: 0.9}, {0: 0.5})  # a deterministic side broadcasts
    assert base["mean"] == pytest.approx(0.35) and base["n"] == 2
    assert paired_deltas({0: 0.8, 1: 0.8}, {0: 0.5, 1: 0.5})["half_width"] == 0.0


# ----------------------------------------------------------------------------- planning


def test_plan_names_and_sweeps():
    names = [v.name for v in plan(CompareSettings())]
    assert names == ["base", "sft", "opd", "partial-opd", "full-opd", "ar-opd"]
    sweep = plan(CompareSettings(methods=("partial-opd", "ar-opd"), lams=(0.6, 1.2),
                                 partial_ratios=(0.25, 0.5)))
    assert [v.name for v in sweep] == ["partial-opd ρ=0.25", "partial-opd ρ=0.5",
                                       "ar-opd λ=0.6 ρ=0.25", "ar-opd λ=1.2 ρ=0.25",
                                       "ar-opd λ=0.6 ρ=0.5", "ar-opd λ=1.2 ρ=0.5"]
    assert sweep[2].slug == "ar-opd_lam0.6_ratio0.25"
    with pytest.raises(UserError):
        CompareSettings(methods=("dpo",)).validate()
    with pytest.raises(UserError):
        CompareSettings(partial_ratios=(1.5,)).validate()


def test_run_metrics_takes_the_largest_k():
    s = {"accuracy": 0.5, "by_k": {"4": {"accuracy": 0.9}, "12": {"accuracy": 0.1,
                                                                  "all_steps_correct_rate": 0.05}}}
    m = run_metrics(s)
    assert m["long_accuracy"] == 0.1 and m["long_all_steps_correct_rate"] == 0.05
    by_length = {"accuracy": 1.0, "by_length": {"<=256": {"accuracy": 0.3}}}
    assert run_metrics(by_length)["long_accuracy"] == 0.3


# ----------------------------------------------------------------------------- end to end


def test_tiny_compare_end_to_end_and_report(tiny_lab, tmp_path):
    from aropd_mlx.report import report

    out = tmp_path / "cmp"
    settings = CompareSettings(seeds=2, steps=2, out=str(out),
                               overrides={"train.batch_size": 2, "rollout.group_size": 2})
    events = []
    result = compare(settings, lab=tiny_lab, on_event=events.append)
    names = [v["name"] for v in result["variants"]]
    assert names == ["base", "sft", "opd", "partial-opd", "full-opd", "ar-opd"]
    assert len(result["runs"]) == 1 + 5 * 2 and any("ar-opd seed 1" in e for e in events)
    ar = result["variants"][-1]
    assert ar["stats"]["accuracy"]["n"] == 2 and set(ar["deltas"]) == {"full-opd", "sft", "partial-opd", "base"}
    assert set(ar["by_k"]) == {"2", "3"}
    base = result["variants"][0]
    assert base["stats"]["accuracy"]["half_width"] is None  # one deterministic evaluation
    saved = json.loads((out / "compare.json").read_text())
    assert saved["variants"] == json.loads(json.dumps(result["variants"]))
    md = (out / "compare.md").read_text()
    assert "| ar-opd | 2 |" in md and "Δacc vs full-opd" in md and "by k" in md
    run = out / saved["runs"][-1]["run_dir"]
    assert (run / "diagnostics.json").is_file() and (run / "adapters.safetensors").is_file()
    assert json.loads((run / "summary.json").read_text())["eval_after"]["n"] == 6

    # a second call reuses the finished runs (no training: same numbers, no new steps)
    again = compare(settings, lab=tiny_lab)
    assert again["variants"] == result["variants"]
    # length buckets change the tables, not the runs (reused: each bucket here is one k)
    from dataclasses import replace
    bucketed = compare(replace(settings, length_buckets=(16,)), lab=tiny_lab)
    assert bucketed["length_buckets"] == {"<=16": ["2"], ">16": ["3"]}  # 6k + 4 tokens
    ar_b = bucketed["variants"][-1]
    assert ar_b["by_length"]["<=16"] == ar["by_k"]["2"] and ar_b["stats"] == ar["stats"]
    assert "<=16 tok (k=2)" in (out / "compare.md").read_text()

    written = report([out], tmp_path / "plots")
    names = sorted(p.name for p in written)
    # the compare's length buckets (two here) draw their own picture
    assert names == ["accuracy_by_k.png", "accuracy_by_length.png", "diagnostics_by_position.png",
                     "training_curves.png"]
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    # by k: three panels (accuracy, all-steps-correct, shortcut rate), each 7 inches wide
    png = (tmp_path / "plots" / "accuracy_by_k.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert 4.6 < width / height < 5.4, (width, height)

    # a compare folder moved elsewhere is still reused, its runs found where they are now
    import shutil
    moved = tmp_path / "elsewhere" / "cmp"
    shutil.move(str(out), str(moved))
    last = moved / saved["runs"][-1]["run_dir"] / "result.json"
    stamp = last.stat().st_mtime_ns
    there = compare(replace(settings, out=str(moved)), lab=tiny_lab)
    assert there["variants"] == result["variants"] and last.stat().st_mtime_ns == stamp
    assert [r["run_dir"] for r in there["runs"]] == [r["run_dir"] for r in saved["runs"]]


def _synthetic_run(d, method="ar-opd", seed=0, long=False):
    from aropd_mlx.diagnostics import RunDiagnostics

    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, 31):
            line = {"step": s, "loss": 1 / s + rng.random() * 0.05, "kl_student_target": 0.5 / s,
                    "shortcut_rate": 0.2 - s / 300}
            f.write(json.dumps(line) + "\n")
    by_k = {"4": {"n": 4, "accuracy": 0.75, "all_steps_correct_rate": 0.5},
            "8": {"n": 4, "accuracy": 0.25, "all_steps_correct_rate": 0.0}}
    by_length = {"<=256": {"n": 6, "accuracy": 0.6}, "256-512": {"n": 2, "accuracy": 0.2}}
    ev = {"n": 8, "accuracy": 0.5, "by_k": by_k, "by_length": by_length}
    before = {**ev, "by_k": {"4": {"accuracy": 0.5}}}
    summary = {"method": method, "eval_after": ev, "eval_before": before}
    (d / "summary.json").write_text(json.dumps(summary))
    diag = RunDiagnostics(d)
    width = 300 if long else 40
    mask = np.ones((3, width))
    mask[1, 20:] = 0
    mask[2, 40:] = 0
    t = np.arange(width)[None, :] / 40.0
    diag.add({"kl_full_partial": np.repeat(t, 3, 0), "kl_student_target": np.repeat(1 - t, 3, 0),
              "kl_student_partial": np.repeat(t + 0.5, 3, 0), "kl_student_full": np.repeat(t, 3, 0),
              "clip_rate": np.repeat(t / 10, 3, 0)}, mask)
    diag.save(30)


def test_report_from_synthetic_runs(tmp_path):
    from aropd_mlx.report import report

    _synthetic_run(tmp_path / "ar-opd" / "seed0")
    _synthetic_run(tmp_path / "ar-opd" / "seed1", seed=1)
    _synthetic_run(tmp_path / "full-opd", method="full-opd", seed=2, long=True)
    written = report([tmp_path / "ar-opd" / "seed0", tmp_path / "ar-opd" / "seed1",
                      tmp_path / "full-opd"], tmp_path / "plots")
    assert sorted(p.name for p in written) == [
        "accuracy_by_k.png", "accuracy_by_length.png", "diagnostics_by_length.png",
        "diagnostics_by_position.png", "shortcuts_over_training.png", "training_curves.png"]
    for p in written:
        assert p.stat().st_size > 5000
    with pytest.raises(UserError):
        report([tmp_path / "nothing-here"])


def test_cli_report_and_compare_errors(tmp_path):
    import typer
    from typer.testing import CliRunner

    from aropd_mlx.cli.compare import compare_command
    from aropd_mlx.cli.report import report_command

    _synthetic_run(tmp_path / "run")
    app = typer.Typer()
    app.command("report")(report_command)
    app.command("compare")(compare_command)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "plots" / "training_curves.png").is_file()
    bad = CliRunner().invoke(app, ["compare", "--methods", "base,dpo"])
    assert bad.exit_code == 2 and "unknown method 'dpo'" in bad.output
    bad = CliRunner().invoke(app, ["compare", "--lams", "0.6,x"])
    assert bad.exit_code == 2 and "--lams" in bad.output


def test_paired_deltas_by_k_and_first_seed():
    """aggregate(): AR-OPD minus a reference by k, paired by seed (hand-computed), and the
    seeds a compare runs start at first_seed."""
    from aropd_mlx.compare import Variant, aggregate
    from aropd_mlx.report import compare_markdown

    def run(seed, acc, by_k):
        return {"seed": seed, "train_seconds": 1.0,
                "metrics": {m: acc for m in ("accuracy", "all_steps_correct_rate", "long_accuracy",
                                             "long_all_steps_correct_rate", "shortcut_rate")},
                "eval": {"by_k": {k: {"accuracy": v, "all_steps_correct_rate": v,
                                      "shortcut_rate": 1 - v} for k, v in by_k.items()}}}

    variants = [Variant("opd", "opd"), Variant("full-opd", "full-opd"), Variant("ar-opd", "ar-opd")]
    results = {"opd": [run(5, 0.5, {"2": 0.5}), run(6, 0.5, {"2": 0.5})],
               "full-opd": [run(5, 0.4, {"2": 0.6, "8": 0.1}), run(6, 0.5, {"2": 0.7, "8": 0.3})],
               "ar-opd": [run(5, 0.6, {"2": 0.7, "8": 0.4}), run(6, 0.6, {"2": 0.7, "8": 0.4})]}
    rows = aggregate(variants, results)
    d = rows[2]["deltas_by_k"]["full-opd"]["8"]["all_steps_correct_rate"]
    assert d["n"] == 2 and abs(d["mean"] - 0.2) < 1e-12  # (0.3 + 0.1) / 2
    # t(0.975, 1) = 12.706; sd of (0.3, 0.1) = 0.1414; half width = 12.706 * 0.1414 / sqrt 2
    assert abs(d["half_width"] - 12.706 * 0.1414214 / 2 ** 0.5) < 1e-3
    md = compare_markdown({"settings": {"steps": 2, "seeds": 2}, "lab": {}, "variants": rows})
    assert "opd (no-signal control)" in md and "ar-opd minus each reference" in md
    assert "+0.200 [" in md
    s = CompareSettings(seeds=2, first_seed=5, methods=("base", "ar-opd"))
    from aropd_mlx.compare import schedule
    assert [(v.name, seed) for v, seed in schedule(s)] == [("base", 5), ("ar-opd", 5), ("ar-opd", 6)]
    with pytest.raises(UserError):
        CompareSettings(first_seed=-1).validate()


def test_length_buckets_pool_ks_and_pair_by_seed():
    """--length-buckets: each bucket holds the ks whose correct response falls in it, its rate
    is the n-weighted mean of theirs (hand-computed), deltas pair by seed, compare.md shows it."""
    from aropd_mlx.compare import Variant, aggregate, length_groups
    from aropd_mlx.report import compare_markdown

    tokens = lambda k: 6 * k + 4
    assert length_groups(["5", "10", "15", "30"], (64, 128), tokens) == \
        {"<=64": ["5", "10"], "64-128": ["15"], ">128": ["30"]}
    assert length_groups(["10"], (64,), tokens) == {"<=64": ["10"]}  # 64 is in (0, 64]
    assert length_groups(["15"], (10, 64, 200), tokens) == {"64-200": ["15"]}  # no empty ones

    def run(seed, by_k):
        return {"seed": seed, "train_seconds": 1.0, "metrics": {m: 0.5 for m in (
                    "accuracy", "all_steps_correct_rate", "long_accuracy",
                    "long_all_steps_correct_rate", "shortcut_rate")},
                "eval": {"by_k": {k: {"n": n, "accuracy": v, "all_steps_correct_rate": v,
                                      "shortcut_rate": 1 - v} for k, (n, v) in by_k.items()}}}

    buckets = {"<=64": ["5", "10"], ">64": ["15"]}
    variants = [Variant("full-opd", "full-opd"), Variant("ar-opd", "ar-opd")]
    results = {"full-opd": [run(0, {"5": (10, 1.0), "10": (30, 0.0), "15": (4, 0.25)}),
                            run(1, {"5": (10, 1.0), "10": (30, 0.4), "15": (4, 0.5)})],
               "ar-opd": [run(0, {"5": (10, 1.0), "10": (30, 0.2), "15": (4, 0.5)}),
                          run(1, {"5": (10, 1.0), "10": (30, 0.4), "15": (4, 1.0)})]}
    rows = aggregate(variants, results, buckets)
    full = rows[0]["by_length"]["<=64"]["all_steps_correct_rate"]
    assert abs(full["mean"] - (0.25 + 0.55) / 2) < 1e-12  # (10*1 + 30*0)/40, (10 + 12)/40
    d = rows[1]["deltas_by_length"]["full-opd"][">64"]["all_steps_correct_rate"]
    assert abs(d["mean"] - 0.375) < 1e-12 and d["n"] == 2  # (0.25 + 0.5) / 2
    assert rows[1]["by_k"]["10"]["accuracy"]["mean"] == pytest.approx(0.3)
    md = compare_markdown({"settings": {"steps": 2, "seeds": 2}, "lab": {}, "variants": rows,
                           "length_buckets": buckets})
    assert "by response length" in md and "<=64 tok (k=5,10)" in md and "+0.375 [" in md
    # footnotes only for the methods that ran: neither SFT nor opd here
    assert "read it as a ceiling" not in md and "SFT trains" not in md and "`opd` scores" not in md
    sft = dict(rows[0], method="sft", name="sft")
    opd = dict(rows[0], method="opd", name="opd")
    clean = compare_markdown({"settings": {"steps": 2, "seeds": 2}, "lab": {},
                              "variants": [sft, opd] + rows})
    assert "read it as a ceiling" in clean and "other writer's traces" not in clean
    assert "`opd` scores with the self-teacher's own student view" in clean
    other = compare_markdown({"settings": {"steps": 2, "seeds": 2, "setting": "stronger-writer"},
                              "lab": {}, "variants": [sft] + rows})
    assert "read it as a ceiling" not in other and "SFT trains on the other writer's" in other
    with pytest.raises(UserError):
        CompareSettings(length_buckets=(128, 64)).validate()


def test_lab_response_tokens_match_the_tokenizer(tiny_lab):
    """The closed form the length buckets rest on: an oracle response's tokens as SFT encodes
    them (EOS included), for every k of the pool."""
    from aropd_mlx.data import load_examples
    from aropd_mlx.lab.defaults import lab_response_tokens
    from aropd_mlx.lab.task import parse_question
    from aropd_mlx.models import ModelSettings, load_student
    from aropd_mlx.views import encode_response

    _, tok = load_student(ModelSettings(path=str(tiny_lab.model_path)))
    for ex in load_examples(str(tiny_lab.train_path), need=("question", "solution", "answer")):
        k = len(parse_question(ex.question)[1])
        assert len(encode_response(tok, f"{ex.solution}\nA:{ex.answer}")) == lab_response_tokens(k)
    assert lab_response_tokens(40) == 244


def test_other_writer_setting_rewrites_references_and_sft_gets_its_own_steps(tiny_lab, tmp_path):
    """--setting other-writer: the train pool's references (teacher hints, SFT targets) are
    another writer's lines, each a correct step by the checker, never the oracle's own; the
    held-out problems are untouched; --sft-steps gives SFT its own step count."""
    from aropd_mlx.compare import load_lab_data
    from aropd_mlx.lab import task

    clean = load_lab_data(tiny_lab, None, False, "clean")
    other = load_lab_data(tiny_lab, None, False, "other-writer")
    assert [e.question for e in clean["train"]] == [e.question for e in other["train"]]
    assert other["eval"] == clean["eval"]
    for c, o in zip(clean["train"], other["train"]):
        assert o.answer == c.answer and task.check(o.question, f"{o.solution}\nA:{o.answer}"
                                                   ).all_steps_correct
        assert all(a != b or a[0] == a[2] for a, b in zip(o.solution.split("\n"),
                                                          c.solution.split("\n")))
    out = tmp_path / "ow"
    settings = CompareSettings(methods=("sft", "ar-opd"), seeds=1, steps=1, sft_steps=3,
                               setting="other-writer", out=str(out),
                               overrides={"train.batch_size": 2, "rollout.group_size": 2})
    result = compare(settings, lab=tiny_lab)
    runs = {r["name"]: out / r["run_dir"] for r in result["runs"]}
    assert json.loads((runs["sft"] / "summary.json").read_text())["steps_done"] == 3
    assert json.loads((runs["ar-opd"] / "summary.json").read_text())["steps_done"] == 1
    md = (out / "compare.md").read_text()
    assert "other-writer" in md and "SFT ran 3 steps" in md
    with pytest.raises(UserError, match="--setting"):
        CompareSettings(setting="messy").validate()


def test_cli_compare_set_overrides_are_checked_at_once():
    import typer
    from typer.testing import CliRunner

    from aropd_mlx.cli.compare import compare_command, parse_sets

    assert parse_sets(["train.learning_rate=1e-4", "model.fine_tune_type=full"]) == {
        "train.learning_rate": 1e-4, "model.fine_tune_type": "full"}
    app = typer.Typer()
    app.command("compare")(compare_command)
    app.command("other")(lambda: None)
    for args, said in ((["--set", "train.nope=1"], "unknown key 'train.nope'"),
                       (["--set", "train.learning_rate"], "expected KEY=VALUE"),
                       (["--set", "train.learning_rate=abc"], "expected a number")):
        res = CliRunner().invoke(app, ["compare", *args])
        assert res.exit_code == 2 and said in res.output, res.output
        assert "Traceback" not in res.output


def test_a_partial_ratio_sweep_pairs_each_ar_opd_with_partial_opd_at_its_ratio():
    """--partial-ratios 0.3,0.5: the variants are named by ratio, and AR-OPD at each ratio is
    read against Partial OPD at the same ratio (hand-computed), not dropped; a Partial OPD row
    has no delta against its own method; a lone reference (full-opd) pairs with every row."""
    from aropd_mlx.compare import CompareSettings, aggregate, plan, reference_of

    def run(seed, rate):
        return {"seed": seed, "train_seconds": 1.0, "eval": {},
                "metrics": {m: rate for m in ("accuracy", "all_steps_correct_rate", "long_accuracy",
                                              "long_all_steps_correct_rate", "shortcut_rate")}}

    variants = plan(CompareSettings(methods=("full-opd", "partial-opd", "ar-opd"),
                                    partial_ratios=(0.3, 0.5)))
    names = [v.name for v in variants]
    assert names == ["full-opd", "partial-opd ρ=0.3", "partial-opd ρ=0.5", "ar-opd ρ=0.3", "ar-opd ρ=0.5"]
    rates = dict(zip(names, (0.1, 0.2, 0.4, 0.5, 0.6)))
    rows = {r["name"]: r for r in aggregate(variants, {n: [run(0, x), run(1, x)]
                                                       for n, x in rates.items()})}
    for ratio, want in ((0.3, 0.5 - 0.2), (0.5, 0.6 - 0.4)):
        d = rows[f"ar-opd ρ={ratio:g}"]["deltas"]["partial-opd"]["accuracy"]
        assert d["mean"] == pytest.approx(want) and d["n"] == 2
        assert rows[f"ar-opd ρ={ratio:g}"]["deltas"]["full-opd"]["accuracy"]["mean"] == \
            pytest.approx(rates[f"ar-opd ρ={ratio:g}"] - 0.1)
    assert "partial-opd" not in rows["partial-opd ρ=0.3"]["deltas"]
    assert reference_of(variants, variants[0], "partial-opd") is None  # full-opd: no ratio to match


def test_compare_md_states_the_sampling_noise_of_its_own_held_out_set():
    from aropd_mlx.report import compare_markdown

    md = compare_markdown({"settings": {"steps": 2, "seeds": 2}, "lab": {"n_eval": 256},
                           "variants": []})
    assert f"±{1.96 * 0.5 / 16:.3f} at p = 0.5, n = 256" in md  # sqrt(.25 / 256) = .5 / 16


def test_the_by_length_picture_of_a_compare_shows_its_own_buckets_in_order(tmp_path):
    """--length-buckets: accuracy_by_length.png plots compare.json's paired buckets (their
    intervals), ordered by length, and not the runs' own buckets of the response given."""
    from aropd_mlx.report import _accuracy_table, _bucket_order, plot_accuracy

    cell = lambda m, h: {k: {"mean": m, "half_width": h} for k in
                         ("accuracy", "all_steps_correct_rate", "shortcut_rate")}
    comp = {"variants": [{"name": "ar-opd", "by_k": {"8": cell(1.0, 0.0)},
                          "by_length": {">320": cell(0.5, 0.1), "<=64": cell(1.0, 0.0),
                                        "64-128": cell(0.9, 0.05)}}]}
    own = {"summary": {"eval_after": {"by_length": {"<=256": {"accuracy": 0.2}}}}}
    table = _accuracy_table({"ar-opd": [own]}, [comp], "accuracy", "by_length")
    assert table == {"ar-opd": {">320": (0.5, 0.1), "<=64": (1.0, 0.0), "64-128": (0.9, 0.05)}}
    assert sorted(table["ar-opd"], key=_bucket_order) == ["<=64", "64-128", ">320"]
    assert sorted(["256-512", "<=256", ">1024"], key=_bucket_order) == ["<=256", "256-512", ">1024"]
    assert plot_accuracy({"ar-opd": [own]}, [comp], tmp_path, "by_length").stat().st_size > 5000
