"""The slip probe (lab/hindsight.py): the slipped trace, the probed positions, and what it says
of a random model and of the shipped default teacher."""
import random
from dataclasses import replace

import pytest

from aropd_mlx.errors import UserError
from aropd_mlx.lab import shipped, task
from aropd_mlx.lab.hindsight import _probe_points, format_hindsight, hindsight
from aropd_mlx.lab.tiny import TinySpec, build_tiny_model
from aropd_mlx.views import partial_reference

from helpers import lab_examples
from shipped_checks import assert_reproduces, assert_slip_probe, named_lab
from test_lab_shipped import SMALL


def test_a_slipped_trace_is_wrong_at_its_slip_and_valid_after_it():
    """Property over random problems: the checker finds the first error at the slip, every
    other line locally valid (the chain goes on from the written value), and the answer is
    that chain's, not the oracle's unless the chain rejoins it."""
    rng = random.Random(3)
    for ex in lab_examples(n=200, k_min=2, k_max=9, seed=5):
        k = len(task.parse_question(ex.question)[1])
        j = rng.randrange(k)
        good = int(ex.solution.splitlines()[j][-1])
        wrong = rng.choice([d for d in range(10) if d != good])
        lines, answer = task.slipped_trace(ex.question, {j: wrong})
        v = task.check(ex.question, task.format_response(lines, answer))
        assert v.first_error_step == j and v.steps_correct == k - 1
        assert lines[:j] == ex.solution.splitlines()[:j] and lines[j][:4] == ex.solution.splitlines()[j][:4]
        value = wrong  # the chain recomputed by hand from the slip
        for op, b in task.parse_question(ex.question)[1][j + 1:]:
            value = task.apply_op(value, op, b)
        assert answer == str(value)
    with pytest.raises(ValueError, match="not a slip"):
        task.slipped_trace("Q:7+5", {0: 2})


def test_a_slipping_writer_slips_at_its_rate_and_each_line_follows_the_one_before():
    """task.slipping_writer: every line is a well-formed step of the question's operation
    started from the value written before it; a line's result is wrong exactly where it slips
    (p = 0: the oracle; p = 1: every line); the slip rate is p; the answer ends the chain."""
    rng = random.Random(7)
    examples = lab_examples(n=300, k_min=1, k_max=8, seed=9)
    slips = lines_seen = 0
    for ex in examples:
        assert task.slipping_writer(ex.question, 0.0, rng) == task.solve(ex.question)
        lines, answer = task.slipping_writer(ex.question, 0.3, rng)
        value, ops = task.parse_question(ex.question)
        for line, (op, b) in zip(lines, ops):
            assert line[:4] == f"{value}{op}{b}="
            slips += int(line[-1]) != task.apply_op(value, op, b)
            value, lines_seen = int(line[-1]), lines_seen + 1
        assert answer == str(value) and len(lines) == len(ops)
        every, _ = task.slipping_writer(ex.question, 1.0, rng)
        assert task.check(ex.question, task.format_response(every, "0")).steps_correct == 0
    assert 0.25 < slips / lines_seen < 0.35


def test_the_probe_reads_the_next_line_and_the_answer_at_the_right_characters():
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides

    views = load_config(overrides=view_overrides(12)).views
    rng = random.Random(0)
    for ex in lab_examples(n=50, k_min=2, k_max=8, seed=1):
        text, points = _probe_points(ex, views, rng)
        lines = text.splitlines()
        k = len(task.parse_question(ex.question)[1])
        (what, pos, mine, theirs), *rest = points
        oracle = ex.solution.splitlines()
        assert ("next_result" in [p[0] for p in rest]) == (lines[k - 1][-1] != oracle[k - 1][-1])
        assert ("answer" in [p[0] for p in rest]) == (lines[k][2] != ex.answer)
        assert what == "next_line" and text[pos] == mine == lines[k - 1][0]
        assert theirs == ex.solution.splitlines()[k - 1][0] != mine  # the oracle's value
        for what, pos, mine, theirs in rest:
            if what == "next_result":
                assert pos == points[0][1] + 4 and text[pos] == mine == lines[k - 1][-1]
                assert theirs == ex.solution.splitlines()[k - 1][-1] != mine
            else:
                assert what == "answer" and text[pos - 2:pos + 1] == "A:" + mine
                assert theirs == ex.answer != mine


def test_an_early_slip_is_put_at_line_0_and_probed_at_line_1():
    """slip="early": the first line's result is wrong, the chain goes on from it; the probed
    line is line 1, inside the partial view's half of the reference (k >= 4)."""
    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides

    views = load_config(overrides=view_overrides(12)).views
    rng = random.Random(0)
    for ex in lab_examples(n=40, k_min=4, k_max=8, seed=4):
        text, points = _probe_points(ex, views, rng, slip="early")
        lines, oracle = text.splitlines(), ex.solution.splitlines()
        assert lines[0][:-1] == oracle[0][:-1] and lines[0][-1] != oracle[0][-1]
        assert task.check(ex.question, text).first_error_step == 0  # only line 0 is wrong
        assert task.check(ex.question, text).steps_correct == len(oracle) - 1
        what, pos, mine, theirs = points[0]
        assert what == "next_line" and pos == len(lines[0]) + 1 and text[pos] == mine
        assert (mine, theirs) == (lines[1][0], oracle[1][0])
    with pytest.raises(ValueError, match="slip must be"):
        hindsight(None, None, [], views, slip="middle")


def test_probabilities_of_a_random_model_are_probabilities(tmp_path):
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides

    model, tok = load(str(build_tiny_model(tmp_path / "m", TinySpec(
        hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64))))
    views = load_config(overrides=view_overrides(4)).views
    examples = lab_examples(n=12, k_min=1, k_max=4, seed=2)
    got = hindsight(model, tok, examples, views, batch=5)  # batches of 5: padding is exercised
    one = hindsight(model, tok, examples, views, batch=64)
    n = sum(len(task.parse_question(e.question)[1]) >= 2 for e in examples)
    early = hindsight(model, tok, examples, views, slip="early")
    assert early["full"]["next_line"]["n"] == sum(
        len(task.parse_question(e.question)[1]) >= 4 for e in examples) > 0
    assert set(got) == {"student", "partial", "full"}
    for name, kinds in got.items():
        assert kinds["next_line"]["n"] == n
        for what, row in kinds.items():
            assert 0 <= row["oracle"] and 0 <= row["consistent"]
            assert row["oracle"] + row["consistent"] <= 1.0001  # two different characters
            assert row == pytest.approx(one[name][what], abs=2e-4)
    assert "full" in format_hindsight(got)


@pytest.mark.parametrize("slip", ["late", "early"])
def test_the_probe_scores_each_point_by_the_next_token_distribution(tmp_path, slip):
    """One example: each probed probability equals a plain forward pass of the view's prompt and
    the response up to that character (an independent alignment check, no batching)."""
    import mlx.core as mx
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides
    from aropd_mlx.lab.hindsight import char_id
    from aropd_mlx.views import encode_response, encode_views, render_views

    model, tok = load(str(build_tiny_model(tmp_path / "m", TinySpec(
        hidden=32, layers=2, heads=2, kv_heads=2, intermediate=64))))
    views = load_config(overrides=view_overrides(4)).views
    ex = lab_examples(n=1, k_min=4, k_max=4, seed=3)[0]
    got = hindsight(model, tok, [ex], views, seed=11, slip=slip)
    text, points = _probe_points(ex, views, random.Random(11), slip)
    resp = encode_response(tok, text)
    prompts = encode_views(tok, render_views(ex, views), views)
    for name, prompt in prompts.items():
        for what, pos, consistent, oracle in points:
            logits = model(mx.array([prompt + resp[:pos]]))[0, -1]
            p = mx.softmax(logits.astype(mx.float32))
            assert got[name][what]["consistent"] == pytest.approx(float(p[char_id(tok, consistent)]), abs=2e-4)
            assert got[name][what]["oracle"] == pytest.approx(float(p[char_id(tok, oracle)]), abs=2e-4)


@pytest.mark.skipif(shipped.manifest() is None, reason="no lab model shipped in this checkout")
def test_the_shipped_default_teacher_computes_after_a_slip_it_has_no_hindsight():
    """Measured (docs/LAB.md, session 14): the privileged views of the default teacher put
    most of their mass on the value the response wrote, none on the oracle's answer."""
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import LabSettings, view_overrides
    from aropd_mlx.lab.measure import dev_examples

    settings = LabSettings()
    model, tok = load(str(shipped.SHIPPED_DIR))
    views = load_config(overrides=view_overrides(settings.k_max)).views
    got = hindsight(model, tok, dev_examples(settings, 8), views)
    for name in ("partial", "full"):
        assert got[name]["next_line"]["consistent"] > 0.6 > 0.3 > got[name]["next_line"]["oracle"]
        assert got[name]["answer"]["oracle"] < 0.05


def test_warm_start_copy_rows_show_a_wrong_trace_through_the_full_view(tmp_path):
    """full_copy_share: a drawn example is the full view of a trace whose results are wrong
    (its reference) with that same trace as the target, whatever view the mix draws; the other
    examples are untouched; the share is drawn per example; the default key is unchanged."""
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides
    from aropd_mlx.lab.setup import copies_reference, warm_encoder

    base = replace(SMALL, k_max=4, student_view_k_max=0)
    from aropd_mlx.lab.defaults import LATER_FIELDS, LabSettings

    # the new fields at their neutral values leave every existing lab's key and recipe alone
    assert all(getattr(LabSettings(), k) == v for k, v in LATER_FIELDS.items())
    assert not {"full_copy_share", "full_copy_p", "full_copy_style"} & set(
        shipped.recipe(LabSettings()))
    assert replace(base, full_copy_share=0.3).key() != base.key()
    with pytest.raises(UserError, match="full_copy_share must lie in"):
        replace(base, full_copy_share=1.5)
    with pytest.raises(UserError, match="needs the privileged views"):
        replace(base, full_copy_share=0.3, warm_view_mix=(1.0, 0.0, 0.0))
    # without copy rows their probability and style change nothing: same key, same cache
    assert replace(base, full_copy_p=0.7, full_copy_style="slipped").key() == base.key()
    _, tok = load(str(build_tiny_model(tmp_path / "m", SMALL.spec)))
    cfg = load_config(overrides={**view_overrides(4), "train.method": "sft",
                                 "train.sft_view_mix": [0.5, 0.25, 0.25]})
    ex = lab_examples(n=1, k_min=3, k_max=3)[0]
    plain = warm_encoder(base, cfg, tok)(ex)
    copy = warm_encoder(replace(base, full_copy_share=1.0, full_copy_p=1.0), cfg, tok)(ex)
    assert copy.prompts["student"] == copy.prompts["partial"] == copy.prompts["full"]
    target = tok.decode(copy.oracle)
    lines, oracle = target.split("\n")[:3], ex.solution.split("\n")
    assert f"\nA:{ex.answer}" in target  # the answer kept
    for mine, right in zip(lines, oracle):  # same step, every result wrong (p = 1)
        assert mine[:4] == right[:4] and mine[4] != right[4]
    assert "\n".join(lines) in tok.decode(copy.prompts["full"])  # the reference is that trace
    assert plain.oracle != copy.oracle and plain.prompts["student"] != plain.prompts["full"]
    slips = warm_encoder(replace(base, full_copy_share=1.0, full_copy_p=1.0,
                                 full_copy_style="slipped"), cfg, tok)(ex)
    target = tok.decode(slips.oracle)
    lines, answer = task.slipping_writer(ex.question, 1.0, random.Random(f"copy:{ex.id}"))
    trace = "\n".join(lines)
    assert target.startswith(trace) and f"\nA:{answer}" in target
    assert trace in tok.decode(slips.prompts["full"]) and slips.prompts["student"] == slips.prompts["full"]
    with pytest.raises(UserError, match="full_copy_style"):
        replace(base, full_copy_style="sideways")
    share = replace(base, full_copy_share=0.3)
    many = lab_examples(n=400, k_min=1, k_max=4)
    drawn = [copies_reference(share, e) for e in many]
    assert drawn == [copies_reference(share, e) for e in many] and 80 < sum(drawn) < 160
    assert not any(copies_reference(replace(base, full_copy_share=0.0), e) for e in many)


def test_copy_rows_past_the_cut_slip_only_where_the_partial_view_shows_nothing(tmp_path):
    """full_copy_past_cut: a copy row's lines that the partial view shows (views.partial_ratio
    of the reference) are the oracle's, every later one slips (p = 1); `first` = 0 is the
    writer as before, draw for draw; the field needs slipped copy rows and leaves keys alone."""
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import LabSettings, view_overrides
    from aropd_mlx.lab.setup import shown_lines, warm_encoder

    for ex in lab_examples(n=60, k_min=1, k_max=9, seed=4):
        k, oracle = len(ex.solution.split("\n")), ex.solution.split("\n")
        assert (task.slipping_writer(ex.question, 0.3, random.Random(ex.id)) ==
                task.slipping_writer(ex.question, 0.3, random.Random(ex.id), 0))
        for first in range(k + 1):
            lines, _ = task.slipping_writer(ex.question, 1.0, random.Random(first), first)
            assert lines[:first] == oracle[:first]
            assert all(int(ln[-1]) != task.apply_op(int(ln[0]), ln[1], int(ln[2]))
                       for ln in lines[first:])
        shown = shown_lines(ex.solution, 0.5)
        assert (k + 1) // 2 <= shown <= k // 2 + 1 and shown_lines(ex.solution, 1.0) == k
    with pytest.raises(UserError, match="full_copy_past_cut"):
        LabSettings(full_copy_past_cut=True)
    base = replace(SMALL, k_max=6, student_view_k_max=0, full_copy_share=1.0, full_copy_p=1.0,
                   full_copy_style="slipped")
    assert replace(base, full_copy_past_cut=True).key() != base.key()
    _, tok = load(str(build_tiny_model(tmp_path / "m", SMALL.spec)))
    cfg = load_config(overrides={**view_overrides(6), "train.method": "sft",
                                 "train.sft_view_mix": [0.5, 0.25, 0.25]})
    for ex in lab_examples(n=8, k_min=2, k_max=6, seed=5):
        oracle = ex.solution.split("\n")
        cut = shown_lines(ex.solution, cfg.views.partial_ratio)
        late = tok.decode(warm_encoder(replace(base, full_copy_past_cut=True), cfg, tok)(ex).oracle)
        every = tok.decode(warm_encoder(base, cfg, tok)(ex).oracle)
        assert late.split("\n")[:cut] == oracle[:cut] != every.split("\n")[:cut]
        assert all(int(ln[-1]) != task.apply_op(int(ln[0]), ln[1], int(ln[2]))
                   for ln in late.split("\n")[cut:len(oracle)])  # each later line slips


def test_distrust_rows_show_the_partial_view_a_slipped_reference_and_ask_for_the_oracle(tmp_path):
    """anchor_distrust_share: a drawn example (never a copy row) is the partial view of a
    reference that slips once on a line that view shows, its chain computed on from the slip,
    the answer the true one, whatever view the mix draws; its target the oracle's trace."""
    from mlx_lm import load

    from aropd_mlx.config import load_config
    from aropd_mlx.lab.defaults import view_overrides
    from aropd_mlx.lab.setup import (copies_reference, distrusted, distrusts_reference,
                                     shown_lines, warm_encoder)

    base = replace(SMALL, k_max=6, student_view_k_max=0)
    assert replace(base, anchor_distrust_share=0.2).key() != base.key()
    with pytest.raises(UserError, match="anchor_distrust_share"):
        replace(base, anchor_distrust_share=0.2, warm_view_mix=(0.5, 0.0, 0.5))
    with pytest.raises(UserError, match="must lie in"):
        replace(base, anchor_distrust_share=-0.1)
    for ex in lab_examples(n=40, k_min=1, k_max=6, seed=6):
        oracle, lines = ex.solution.split("\n"), distrusted(ex, 0.5).solution.split("\n")
        slips = [j for j, ln in enumerate(lines) if ln != oracle[j]]
        assert slips and slips[0] < shown_lines(ex.solution, 0.5) and distrusted(ex, 0.5).answer == ex.answer
        value, _ = task.parse_question(ex.question)
        for j, ln in enumerate(lines):  # every line follows the one before it, but the slip
            assert ln[0] == str(value)
            right = task.apply_op(value, ln[1], int(ln[2]))
            assert (int(ln[-1]) != right) == (j == slips[0])
            value = int(ln[-1])
    both = replace(base, full_copy_share=0.5, anchor_distrust_share=0.5)
    many = lab_examples(n=400, k_min=1, k_max=6)
    drawn = [distrusts_reference(both, e) for e in many]
    assert not any(d and copies_reference(both, e) for d, e in zip(drawn, many))
    assert 60 < sum(drawn) < 140  # ~ (1 - 0.5) * 0.5 of them
    _, tok = load(str(build_tiny_model(tmp_path / "m", SMALL.spec)))
    cfg = load_config(overrides={**view_overrides(6), "train.method": "sft",
                                 "train.sft_view_mix": [0.5, 0.25, 0.25]})
    ex = lab_examples(n=1, k_min=4, k_max=4)[0]
    plain = warm_encoder(base, cfg, tok)(ex)
    row = warm_encoder(replace(base, anchor_distrust_share=1.0), cfg, tok)(ex)
    assert row.oracle == plain.oracle  # the oracle's trace is the target
    assert row.prompts["student"] == row.prompts["partial"] == row.prompts["full"] != plain.prompts["partial"]
    shown = partial_reference(distrusted(ex, 0.5).solution, 0.5)
    assert shown in tok.decode(row.prompts["partial"]) and shown not in tok.decode(plain.prompts["partial"])


@pytest.mark.skipif(shipped.manifest(shipped.shipped_dir("hindsight")) is None,
                    reason="no hindsight lab model shipped in this checkout")
def test_the_shipped_hindsight_lab_model_reproduces_its_numbers_and_its_hindsight():
    """AROPD_MLX_LAB=hindsight's model: its greedy numbers, and the slip probe's (dev problems,
    8 per k) within sampling noise of the manifest's held-out ones: a full view that asks for
    the reference's result after a slip, a partial view that goes on from the written value."""
    folder, settings, views = named_lab("hindsight")
    assert_reproduces(folder, settings, views, (2, 8, 12), names=("student", "partial"))
    got = assert_slip_probe(folder, settings, views, 8, 0.15)
    want = shipped.manifest(folder)["measured"]["hindsight"]
    for view in ("partial", "full"):
        assert abs(got[view]["next_line"]["oracle"] - want[view]["next_line"]["oracle"]) < 0.15, view
    assert got["full"]["next_result"]["oracle"] > 0.8


def test_warm_init_goes_on_from_a_named_labs_model(tmp_path, monkeypatch):
    """LabSettings.warm_init: the warm start begins from the named lab's model (prepared as
    prepare_lab does: here built into the cache) instead of a fresh tiny model, and runs only
    its own phases; an unknown name or another spec is one clear error; the key changes with it
    and labs without it keep theirs (the shipped ones' hashes: test_lab_shipped)."""
    import json
    from dataclasses import asdict

    from aropd_mlx.lab import defaults, setup

    monkeypatch.setenv("AROPD_MLX_CACHE", str(tmp_path / "cache"))
    small = replace(SMALL, warm_steps=3)
    monkeypatch.setattr(defaults, "NAMED_LABS", {"small": json.loads(json.dumps(asdict(small)))})
    on = replace(small, warm_init="small", warm_steps=2, full_copy_share=0.5,
                 full_copy_style="slipped")
    assert on.key() != replace(on, warm_init="").key()
    assert replace(small, warm_init="").key() == small.key()
    with pytest.raises(UserError, match="warm_init must name a lab \\(small\\), got 'smal'"):
        replace(on, warm_init="smal")
    with pytest.raises(UserError, match="needs that lab's spec"):
        replace(on, spec=TinySpec(hidden=16, layers=1, heads=2, kv_heads=2, intermediate=32))

    base = setup.prepare_lab(defaults.settings_from(defaults.NAMED_LABS["small"]))
    started = {}
    real_start = setup.start_model

    def spy(settings, dest):
        got = real_start(settings, dest)
        started["bytes"] = (got / "model.safetensors").read_bytes()
        return got

    monkeypatch.setattr(setup, "start_model", spy)
    monkeypatch.setattr(setup, "build_tiny_model", lambda *a: pytest.fail("a fresh model was built"))
    lab = setup.prepare_lab(on, root=tmp_path / "on")
    assert started["bytes"] == (base.model_path / "model.safetensors").read_bytes()
    steps = (lab.root / "warm_run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in steps] == [1, 2]
    assert (lab.model_path / "model.safetensors").read_bytes() != started["bytes"]  # it trained


def test_the_long_hindsight_lab_goes_on_from_the_long_labs_model():
    """AROPD_MLX_LAB=long_hindsight: the long lab's spec, layout and data, none of its student
    phases, one mixed phase with copy rows of a writer who slips."""
    from aropd_mlx.lab.defaults import NAMED_LABS, settings_from

    long, long_h = settings_from(NAMED_LABS["long"]), settings_from(NAMED_LABS["long_hindsight"])
    assert long_h.warm_init == "long" and long_h.spec == long.spec
    assert (long_h.k_max, long_h.question_last, long_h.partial_outline, long_h.n_train) == (
        long.k_max, long.question_last, long.partial_outline, long.n_train)
    assert not long_h.student_phases() and long_h.mixed_phases() == [(100, 40, "warm_run", "all views")]
    assert (long_h.full_copy_share, long_h.full_copy_style) == (0.3, "slipped")


@pytest.mark.skipif(shipped.manifest(shipped.shipped_dir("long_hindsight")) is None,
                    reason="no long hindsight lab model shipped in this checkout")
def test_the_shipped_long_hindsight_lab_model_reproduces_its_numbers_and_its_hindsight():
    """AROPD_MLX_LAB=long_hindsight's model: its greedy student and anchor at a short, a middle
    and a long k, and the slip probe (dev problems, 4 per k): a full view that asks for the
    reference's result after a slip, an anchor that goes on from the written value."""
    folder, settings, views = named_lab("long_hindsight")
    assert_reproduces(folder, settings, views, (5, 25, 35), names=("student", "partial"))
    got = assert_slip_probe(folder, settings, views, 4, 0.15)
    assert got["full"]["next_result"]["oracle"] > 0.8
