"""The lab task: generator, oracle, checker (shortcut events), reference variants."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aropd_mlx.lab.task import (
    LINE_WIDTH,
    OPS,
    Verdict,
    check,
    format_question,
    format_response,
    generate,
    make_example,
    parse_question,
    reference_variant,
    solve,
)

Q = "Q:7+5*3-2+8"
ORACLE = ["7+5=2", "2*3=6", "6-2=4", "4+8=2"]


# ---------------------------------------------------------------- question and oracle


def test_parse_and_solve_the_worked_example():
    assert parse_question(Q) == (7, [("+", 5), ("*", 3), ("-", 2), ("+", 8)])
    assert solve(Q) == (ORACLE, "2")
    assert format_response(ORACLE, "2") == "7+5=2\n2*3=6\n6-2=4\n4+8=2\nA:2"
    assert format_response([], "2") == "A:2"


def test_subtraction_wraps_mod_10():
    assert solve("Q:3-7") == (["3-7=6"], "6")
    assert solve("Q:0-0*9") == (["0-0=0", "0*9=0"], "0")


@pytest.mark.parametrize(
    "bad",
    ["7+5", "Q:", "Q:7", "Q:7+", "Q:7+55", "Q:17+5", "Q:7 +5", "Q:7/5", "Q:7*1", "Q:7*0", "q:7+5"],
)
def test_parse_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse_question(bad)


def test_parse_tolerates_surrounding_whitespace_only():
    assert parse_question("  Q:7+5\n") == (7, [("+", 5)])


# ---------------------------------------------------------------- generator


def test_generate_is_deterministic_per_seed():
    a = generate(50, 1, 12, seed=3)
    assert a == generate(50, 1, 12, seed=3)
    assert a != generate(50, 1, 12, seed=4)
    assert [e["id"] for e in a[:2]] == ["lab-3-0", "lab-3-1"]
    assert generate(2, 1, 1, seed=3, prefix="eval")[1]["id"] == "eval-3-1"


def test_generated_examples_follow_schema_and_oracle():
    data = generate(300, 2, 7, seed=0)
    ks = set()
    for ex in data:
        assert set(ex) == {"id", "question", "solution", "answer"}
        start, ops = parse_question(ex["question"])
        ks.add(len(ops))
        for op, b in ops:
            assert b in OPS[op]
        steps, answer = solve(ex["question"])
        assert ex["solution"] == "\n".join(steps) and ex["answer"] == answer
        assert all(len(line) == LINE_WIDTH for line in ex["solution"].split("\n"))
        assert ex["question"] == "Q:" + str(start) + "".join(f"{o}{b}" for o, b in ops)
    assert ks == set(range(2, 8))  # every k in range is drawn, none outside
    assert {ex["question"][2] for ex in data} == set("0123456789")


def test_make_example_default_id_and_bad_arguments():
    ex = make_example(random.Random(0), 3)
    assert ex["id"] == "lab-" + ex["question"][2:]
    assert make_example(random.Random(0), 3, id="x")["id"] == "x"
    with pytest.raises(ValueError):
        make_example(random.Random(0), 0)
    with pytest.raises(ValueError):
        generate(3, 5, 4, seed=0)
    with pytest.raises(ValueError):
        generate(3, 0, 4, seed=0)
    assert generate(0, 1, 2, seed=0) == []


# ---------------------------------------------------------------- checker


def test_correct_trace():
    v = check(Q, format_response(ORACLE, "2"))
    assert v == Verdict("2", True, 4, 4, 4, True, None, None)


def test_answer_alone_is_no_steps_shortcut():
    v = check(Q, "A:2")
    assert v == Verdict("2", True, 0, 4, 0, False, "no_steps", 0)
    assert check(Q, "A:5").shortcut == "no_steps"  # a stated answer without steps, even if wrong


def test_missing_steps_is_no_steps_shortcut():
    v = check(Q, format_response(ORACLE[:2], "2"))
    assert (v.shortcut, v.steps_written, v.steps_correct, v.first_error_step) == ("no_steps", 2, 2, 2)
    assert not v.all_steps_correct and v.answer_correct


def test_skipped_middle_step_with_right_answer():
    # the third step is left out: three lines, positions shift; "no_steps" has precedence
    v = check(Q, format_response([ORACLE[0], ORACLE[1], ORACLE[3]], "2"))
    assert v.shortcut == "no_steps" and v.first_error_step == 2 and v.steps_correct == 2


def test_right_answer_with_wrong_step_is_copied_foresight():
    steps = ["7+5=2", "2*3=7", "7-2=5", "5+8=3"]  # slip at step 1, chain continues validly
    v = check(Q, format_response(steps, "2"))  # ...but the answer is the oracle's
    assert v == Verdict("2", True, 4, 4, 3, False, "copied_foresight", 1)


def test_wrong_answer_with_right_steps_is_not_a_shortcut():
    v = check(Q, format_response(ORACLE, "7"))
    assert v == Verdict("7", False, 4, 4, 4, False, None, 4)


def test_honest_slip_is_not_a_shortcut():
    steps = ["7+5=2", "2*3=7", "7-2=5", "5+8=3"]
    v = check(Q, format_response(steps, "3"))
    assert (v.shortcut, v.answer_correct, v.steps_correct, v.first_error_step) == (None, False, 3, 1)


def test_step_must_match_the_question_op_and_the_written_chain():
    assert check(Q, format_response(["7+5=2", "2+3=5", "5-2=3", "3+8=1"], "1")).first_error_step == 1
    assert check(Q, format_response(["7+5=2", "2*4=8", "8-2=6", "6+8=4"], "4")).first_error_step == 1
    # right value, wrong left operand (does not chain from the written "2")
    assert check(Q, format_response(["7+5=2", "3*3=9", "9-2=7", "7+8=5"], "5")).steps_correct == 3
    assert check(Q, format_response(["8+5=3"] + ORACLE[1:], "2")).shortcut == "copied_foresight"


def test_garbage_lines_count_as_written_wrong_steps():
    v = check(Q, "7+5=2\nhello\n6-2=4\n4+8=2\nA:2")
    # line 1 is garbage; line 2 has no written result to chain from; line 3 chains from line 2
    assert (v.steps_written, v.steps_correct, v.first_error_step) == (4, 2, 1)
    assert v.shortcut == "copied_foresight"
    assert check(Q, "x\ny\nz\nw\nA:2").shortcut == "copied_foresight"
    assert check(Q, "x\ny\nz\nw\nA:3").shortcut is None


def test_missing_answer_is_wrong_but_not_a_shortcut():
    v = check(Q, "\n".join(ORACLE))
    assert v == Verdict(None, False, 4, 4, 4, False, None, 4)
    v = check(Q, "7+5=2\n2*3=6")  # truncated rollout
    assert (v.shortcut, v.first_error_step) == (None, 2)
    assert check(Q, "") == Verdict(None, False, 0, 4, 0, False, None, 0)
    assert check(Q, "\n".join(ORACLE) + "\nA:12").answer is None  # not an answer line
    assert check(Q, "\n".join(ORACLE) + "\nA: 2").answer is None


def test_extra_steps_are_not_all_correct_and_not_a_shortcut():
    v = check(Q, format_response(ORACLE + ["2+0=2"], "2"))
    assert v == Verdict("2", True, 5, 4, 4, False, None, 4)


def test_whitespace_tolerance():
    messy = "  7+5=2 \r\n\n2*3=6\t\n6-2=4\n\n4+8=2\nA:2  \n"
    assert check(Q, messy).all_steps_correct
    assert not check(Q, "7 + 5=2\n2*3=6\n6-2=4\n4+8=2\nA:2").all_steps_correct


def test_reading_stops_at_the_first_answer_line():
    v = check(Q, format_response(ORACLE, "2") + "\nA:5\njunk")
    assert v.answer == "2" and v.all_steps_correct
    v = check(Q, "A:2\n" + "\n".join(ORACLE))
    assert v.shortcut == "no_steps" and v.steps_written == 0


def test_first_error_step_is_none_iff_all_correct():
    rng = random.Random(1)
    for _ in range(200):
        ex = make_example(rng, rng.randint(1, 6))
        lines = ex["solution"].split("\n")
        i = rng.randrange(len(lines))
        lines[i] = lines[i][:-1] + str((int(lines[i][-1]) + 1) % 10)
        v = check(ex["question"], format_response(lines, ex["answer"]))
        assert v.first_error_step == i and not v.all_steps_correct
        assert v.shortcut == "copied_foresight"


# ---------------------------------------------------------------- reference variants


EX = {"id": "x", "question": Q, "solution": "\n".join(ORACLE), "answer": "2"}


def _lines(ex):
    return ex["solution"].split("\n")


def test_oracle_variant_is_unchanged_copy():
    out = reference_variant(EX, "oracle", random.Random(0))
    assert out == EX and out is not EX


def test_values_variant():
    out = reference_variant(EX, "values", random.Random(0))
    assert _lines(out) == ["...=2", "...=6", "...=4", "...=2"]
    assert {k: out[k] for k in ("id", "question", "answer")} == {"id": "x", "question": Q, "answer": "2"}


def test_reversed_notation_variant():
    out = reference_variant(EX, "reversed_notation", random.Random(0))
    assert _lines(out) == ["5+7=2", "3*2=6", "8+6=4", "8+4=2"]
    assert out["answer"] == "2"


def test_corrupted_variant_p0_p1_and_determinism():
    assert reference_variant(EX, "corrupted:0", random.Random(0)) == EX
    out = reference_variant(EX, "corrupted:1", random.Random(0))
    for got, want in zip(_lines(out), ORACLE):
        assert got[:-1] == want[:-1] and got[-1] != want[-1]  # well formed, wrong result
    assert out["answer"] == "2"
    a = reference_variant(EX, "corrupted:0.5", random.Random(7))
    assert a == reference_variant(EX, "corrupted:0.5", random.Random(7))
    assert not check(Q, format_response(_lines(out), "2")).all_steps_correct


def test_corrupted_rate_is_roughly_p():
    data = generate(200, 5, 5, seed=2)
    rng = random.Random(0)
    changed = total = 0
    for ex in data:
        out = reference_variant(ex, "corrupted:0.3", rng)
        changed += sum(a != b for a, b in zip(_lines(out), _lines(ex)))
        total += 5
    assert 0.25 < changed / total < 0.35


@pytest.mark.parametrize("style", ["oracle", "values", "corrupted:0.5", "reversed_notation"])
def test_every_variant_keeps_line_width_and_count(style):
    rng = random.Random(0)
    for ex in generate(100, 1, 12, seed=5):
        out = reference_variant(ex, style, rng)
        lines = _lines(out)
        assert len(lines) == len(_lines(ex))
        assert all(len(line) == LINE_WIDTH for line in lines)


@pytest.mark.parametrize("style", ["nope", "corrupted:", "corrupted:x", "corrupted:1.5", "corrupted:-0.1"])
def test_unknown_or_bad_style_raises(style):
    with pytest.raises(ValueError):
        reference_variant(EX, style, random.Random(0))


# ---------------------------------------------------------------- property


_op = st.sampled_from(sorted(OPS)).flatmap(lambda o: st.tuples(st.just(o), st.sampled_from(OPS[o])))
_question = st.builds(
    lambda s, ops: "Q:" + str(s) + "".join(f"{o}{b}" for o, b in ops),
    st.integers(0, 9),
    st.lists(_op, min_size=1, max_size=16),
)


@settings(max_examples=300, deadline=None)
@given(_question)
def test_oracle_response_is_all_correct(q):
    steps, answer = solve(q)
    v = check(q, format_response(steps, answer))
    assert v.all_steps_correct and v.answer_correct and v.shortcut is None
    assert v.first_error_step is None and v.steps_correct == v.steps_required == len(steps)
    assert all(len(s) == LINE_WIDTH for s in steps)


# ---------------------------------------------------------------- accepted notations


def test_checker_accepts_every_notation_the_task_allows():
    # swapped operands for + and *, subtraction as adding the inverse (either order)
    for steps in (["5+7=2", "3*2=6", "6+8=4", "8+4=2"], ["7+5=2", "2*3=6", "8+6=4", "4+8=2"],
                  ["5+7=2", "2*3=6", "6+8=4", "8+4=2"]):
        v = check(Q, format_response(steps, "2"))
        assert v.all_steps_correct and v.shortcut is None, steps


def test_checker_rejects_wrong_lines_in_any_notation():
    # each line below is wrong in exactly one way; the chain stays on the oracle's values
    for bad in ("5+7=3", "3-2=1", "2-6=4", "8-6=2", "6+2=8", "4*2=8"):
        i = {"5+7=3": 0, "3-2=1": 1, "2-6=4": 2, "8-6=2": 2, "6+2=8": 2, "4*2=8": 1}[bad]
        steps = list(ORACLE)
        steps[i] = bad
        v = check(Q, format_response(steps, "2"))
        assert v.first_error_step == i and not v.all_steps_correct, bad


@settings(max_examples=200, deadline=None)
@given(_question, st.integers(0, 2**31))
def test_other_writer_references_are_correct_chains(q, seed):
    # a reversed-notation reference, written as a response, is all-steps-correct; corrupting
    # one of its result digits breaks exactly that step
    steps, answer = solve(q)
    ex = {"id": "x", "question": q, "solution": "\n".join(steps), "answer": answer}
    lines = reference_variant(ex, "reversed_notation", random.Random(0))["solution"].split("\n")
    assert check(q, format_response(lines, answer)).all_steps_correct
    i = random.Random(seed).randrange(len(lines))
    lines[i] = lines[i][:-1] + str((int(lines[i][-1]) + 1) % 10)
    assert check(q, format_response(lines, answer)).first_error_step == i


@given(_question)
def test_the_outline_restates_each_operation_in_its_lines_columns_and_solves_nothing(q):
    """task.outline: one line per solution line, the same width; the operator and operand in
    the columns where the oracle's line has them, every other column a dot (no value)."""
    from aropd_mlx.lab.task import outline

    lines, steps = outline(q).split("\n"), solve(q)[0]
    assert len(lines) == len(steps)
    for line, step in zip(lines, steps):
        assert len(line) == LINE_WIDTH
        assert line == "." + step[1:3] + "=."


@given(_question)
def test_an_outline_with_its_start_restates_the_whole_question(q):
    """task.outline(with_start=True): the outline with the start digit in its first column, so
    the question can be read back from it alone."""
    from aropd_mlx.lab.task import outline

    start, ops = parse_question(q)
    sheet = outline(q, with_start=True).split("\n")
    assert sheet[0] == str(start) + outline(q).split("\n")[0][1:]
    assert sheet[1:] == outline(q).split("\n")[1:]
    assert format_question(int(sheet[0][0]), [(line[1], int(line[2])) for line in sheet]) == q


def test_examples_carry_an_outline_only_when_asked_and_it_survives_the_data_files(tmp_path):
    from aropd_mlx.data import load_examples, write_examples
    from aropd_mlx.lab.task import outline

    plain = generate(5, 1, 6, seed=3)
    withit = generate(5, 1, 6, seed=3, with_outline=True)
    assert all("outline" not in e for e in plain)
    assert [{k: v for k, v in e.items() if k != "outline"} for e in withit] == plain
    assert all(e["outline"] == outline(e["question"]) for e in withit)
    write_examples(tmp_path / "d.jsonl", withit)
    back = load_examples(str(tmp_path / "d.jsonl"), need=("question", "solution", "answer"))
    assert [e.outline for e in back] == [e["outline"] for e in withit]
    assert [e.to_json() for e in back] == withit
