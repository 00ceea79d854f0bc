"""A stronger writer's references (two operations a line, task "two_per_line") and the
checker's reading of double steps; `compare --setting stronger-writer`."""
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aropd_mlx.lab import shipped
from aropd_mlx.lab.task import (apply_op, check, double_step_line, format_response,
                                parse_question, reference_variant, solve)

from test_lab_task import _question

Q = "Q:7+5*3-2+8"  # oracle 7+5=2, 2*3=6, 6-2=4, 4+8=2


def _variant(q: str) -> list[str]:
    steps, answer = solve(q)
    ex = {"id": "x", "question": q, "solution": "\n".join(steps), "answer": answer}
    return reference_variant(ex, "two_per_line", random.Random(0))["solution"].split("\n")


def test_the_stronger_writer_does_two_operations_a_line():
    assert double_step_line(7, "+", 5, "*", 3) == "7+5*3=6"  # (7 + 5) * 3 = 36
    assert _variant(Q) == ["7+5*3=6", "6-2+8=2"]
    assert _variant("Q:7+5*3-2") == ["7+5*3=6", "6-2=4"]  # k odd: the last line single
    assert _variant("Q:4-9") == ["4-9=5"]
    v = check(Q, format_response(_variant(Q), "2"))
    assert v.all_steps_correct and v.steps_written == 4 and v.steps_correct == 4


def test_one_and_two_operation_lines_mix_and_each_double_line_counts_two_positions():
    assert check(Q, format_response(["7+5=2", "2*3-2=4", "4+8=2"], "2")).all_steps_correct
    wrong = check(Q, format_response(["7+5=2", "2*3-2=5", "5+8=3"], "2"))  # slips, goes on
    assert (wrong.first_error_step, wrong.steps_correct, wrong.shortcut) == (1, 2, "copied_foresight")
    assert check(Q, "7+5*3=6\nA:2").shortcut == "no_steps"  # 2 of 4 steps written
    assert check(Q, "7+5*3=6\nA:2").steps_written == 2
    # only the question's order, left to right, from the written previous value
    assert check(Q, format_response(["5+7*3=6", "6-2+8=2"], "2")).first_error_step == 0
    assert check(Q, format_response(["7+5*3=6", "6+8-2=2"], "2")).first_error_step == 2
    # a double line reaching past the last operation stands for an extra step
    past = check("Q:7+5*3", format_response(["7+5=2", "2*3+1=7"], "6"))
    assert (past.all_steps_correct, past.first_error_step, past.steps_written) == (False, 1, 3)
    assert past.shortcut == "copied_foresight"  # the right answer (6) after an invalid step


@settings(max_examples=300, deadline=None)
@given(_question, st.integers(0, 2**31))
def test_any_split_into_one_and_two_operation_lines_is_graded_like_its_operations(q, seed):
    """Write the chain in random chunks of one or two operations, maybe one chunk's result
    wrong (the chain then goes on from it); the expected grade comes from the operations alone
    (a naive walk), not from the checker's reading of lines."""
    rng = random.Random(seed)
    start, ops = parse_question(q)
    chunks, i = [], 0
    while i < len(ops):
        n = 2 if i + 1 < len(ops) and rng.random() < 0.5 else 1
        chunks.append((i, n))
        i += n
    slip = rng.randrange(len(chunks)) if rng.random() < 0.5 else None
    lines, prev = [], start
    for c, (i, n) in enumerate(chunks):
        value = prev
        for op, b in ops[i:i + n]:
            value = apply_op(value, op, b)
        if c == slip:
            value = (value + 1 + rng.randrange(9)) % 10
        lines.append(f"{prev}" + "".join(f"{op}{b}" for op, b in ops[i:i + n]) + f"={value}")
        prev = value
    v = check(q, format_response(lines, solve(q)[1]))
    assert v.steps_written == len(ops)
    assert v.all_steps_correct == (slip is None)
    if slip is not None:
        i, n = chunks[slip]
        assert (v.first_error_step, v.steps_correct) == (i, len(ops) - n)


def test_compare_setting_stronger_writer_gives_sft_and_the_teacher_two_operations_a_line():
    from aropd_mlx.compare import SETTINGS, CompareSettings, other_writer
    from aropd_mlx.data import Example

    assert SETTINGS["stronger-writer"] == "two_per_line"
    CompareSettings(setting="stronger-writer").validate()
    ex = [Example(id="a", question=Q, solution="\n".join(solve(Q)[0]), answer="2")]
    assert other_writer(ex, SETTINGS["stronger-writer"])[0].solution == "7+5*3=6\n6-2+8=2"


@pytest.mark.parametrize("bad", ["7+5*3=", "7+5*3=66", "7+5**3=6", "75*3=6"])
def test_malformed_double_lines_are_garbage_standing_for_one_step(bad):
    v = check("Q:7+5*3", format_response([bad, "6*3=8"], "8"))
    assert v.steps_written == 2 and v.first_error_step == 0 and not v.all_steps_correct


@pytest.mark.skipif(shipped.manifest(shipped.shipped_dir("stronger_writer")) is None,
                    reason="no stronger-writer lab model shipped in this checkout")
def test_the_shipped_stronger_writer_lab_reads_two_operations_a_line():
    """AROPD_MLX_LAB=stronger_writer's model: its recorded greedy numbers reproduce, and its full
    view, shown the stronger writer's lines, writes every step right at k = 12, the longest
    evaluated k, where the student view gets none (session 15's teacher failed there)."""
    from mlx_lm import load

    from aropd_mlx.compare import other_writer
    from aropd_mlx.lab.measure import dev_examples, view_responses

    from shipped_checks import assert_reproduces, named_lab

    folder, settings, views = named_lab("stronger_writer")
    assert settings.warm_init == "hindsight" and settings.k_max == 13
    assert_reproduces(folder, settings, views, (6, 8), names=("student", "full"))
    model, tok = load(str(folder))
    hinted = [e for e in other_writer(dev_examples(settings, 4), "two_per_line")
              if len(parse_question(e.question)[1]) == 12]
    assert len(hinted) == 4 and all(len(e.solution.splitlines()) == 6 for e in hinted)
    for view, want in (("full", 4), ("student", 0)):
        got = view_responses(model, tok, hinted, views, view, 0.0, 6 * settings.k_max + 8, 0)
        assert sum(check(e.question, r).all_steps_correct for e, r in zip(hinted, got)) == want
