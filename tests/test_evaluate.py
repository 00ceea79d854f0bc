"""evaluate.py: answer extraction, equivalence, length buckets, avg@k / pass@k, the lab checker."""
import json

import pytest

from aropd_mlx.data import Example
from aropd_mlx.evaluate import (
    BUCKET_NAMES,
    EvalResult,
    answer_checker,
    answers_match,
    boxed_contents,
    bucket_name,
    extract_answer,
    markdown_table,
    normalize,
    pass_at,
    summary_markdown,
    summary_rows,
)


@pytest.mark.parametrize("text,want", [
    (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{2}}{\sqrt{3}}}", r"\frac{\sqrt{2}}{\sqrt{3}}"),  # nested two deep
    (r"first \boxed{3}, finally \boxed{4}", "4"),  # the last box
    (r"\boxed{x} and #### 7", "x"),  # a box wins over other markers
    ("unbalanced \\boxed{3 and then 12", "12"),  # no closed box: fall through to numbers
    (r"\fbox{9}", "9"),
    ("work...\n#### 1,234", "1,234"),
    ("The answer is 42.", "42"),
    ("Final answer: $7$.", "7"),
    ("Final Answer: x = 5", "x = 5"),
    ("Answer: 5 apples", "5"),
    ("7+5=2\n2*3=6\nA:6", "6"),  # the lab's answer line
    ("Data: 5 and 6", "6"),  # 'a:' inside a word is no marker
    ("answer the question 3 times then 9", "9"),  # 'answer' without ':'/'is' is no marker
    ("we get 5-3 = 2", "2"),
    ("x-3", "3"),  # a binary minus is not a sign
    ("it is -4", "-4"),
    ("total 1,234,567 dollars", "1234567"),
    ("ratio 3/4 of it", "3/4"),
    ("no numbers at all", None),
    ("", None),
    ("**Answer:** 7", "7"), ("**Final Answer:** 42", "42"),  # markdown bold, as chat models write
    ("The answer is **7**.", "7"),
    (r"\boxed{5} then \boxed{}", "5"), (r"\boxed{ }", None),  # an empty box holds nothing
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_boxed_contents_depth():
    assert boxed_contents(r"\boxed{a{b{c}}d} \boxed{e}") == ["a{b{c}}d", "e"]
    assert boxed_contents(r"\boxed{never closed") == []


@pytest.mark.parametrize("a,b", [
    ("1/2", "0.5"), (r"\frac{1}{2}", "0.5"), (r"\dfrac12", "1/2"), ("3.0", "3"), ("3.50", "7/2"),
    ("1,234", "1234"), ("$5$", "5"), ("x = 5", "5"), ("(1,2)", "(1, 2)"), (r"50\%", "50"),
    (r"\text{Paris}", "paris"), ("5.", "5"), (r"90^\circ", "90"), ("−3", "-3"),
    (r"\left( 1, 2 \right)", "(1,2)"), (r"\boxed{4}", "4"),
    (r"-\frac{1}{2}", "-0.5"), (r"-\frac12", "-1/2"), (r"\frac{-1}{2}", r"-\dfrac{1}{2}"),
    (r"\$18.90", "18.90"),
])
def test_equivalent_answers(a, b):
    assert answers_match(a, b) and answers_match(b, a)


@pytest.mark.parametrize("a,b", [("1,2", "12"), ("1/3", "0.33"), ("2", "-2"), ("x", "y"), (None, "1"),
                                 (r"-\frac{1}{2}", "0.5"), ("--3", "3")])
def test_different_answers(a, b):
    assert not answers_match(a, b)


def test_normalize_forms():
    assert normalize("1/0") == "1/0"  # no division by zero
    assert normalize(" 12 ") == "12" and normalize("-0.25") == "-1/4"


def test_answer_checker_on_generic_data():
    ex = Example(id="1", question="q", answer="0.5")
    assert answer_checker(ex, r"... so \boxed{\frac{1}{2}}") == {"correct": True,
                                                                 "predicted": r"\frac{1}{2}"}
    assert answer_checker(ex, "I don't know")["correct"] is False


@pytest.mark.parametrize("n,name", [(0, "<=256"), (1, "<=256"), (256, "<=256"), (257, "256-512"),
                                    (512, "256-512"), (513, "512-768"), (768, "512-768"),
                                    (1024, "768-1024"), (1025, ">1024"), (10**6, ">1024")])
def test_bucket_edges(n, name):
    assert bucket_name(n) == name


def test_pass_at_estimator():
    assert pass_at(4, 0, 1) == 0 and pass_at(4, 4, 2) == 1
    assert pass_at(4, 1, 1) == pytest.approx(0.25)
    assert pass_at(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at(2, 1, 3)


def _rec(i, s, correct, tokens=10, **extra):
    return {"id": i, "sample": s, "correct": correct, "tokens": tokens,
            "bucket": bucket_name(tokens), **extra}


def test_summary_avg_and_pass_at_k_by_hand():
    recs = [_rec("a", 0, True), _rec("a", 1, False), _rec("a", 2, False), _rec("a", 3, False),
            _rec("b", 0, False), _rec("b", 1, False), _rec("b", 2, False), _rec("b", 3, False, 300)]
    s = EvalResult(recs, k=4).summary()
    assert s["accuracy"] == pytest.approx(1 / 8) and s["avg_at_k"] == pytest.approx(1 / 8)
    assert s["pass_at_k"] == 0.5 and s["n_problems"] == 2 and s["samples_per_problem"] == 4
    assert s["pass_at"] == {"1": pytest.approx(0.125), "2": pytest.approx(0.25), "4": 0.5}
    assert list(s["by_length"]) == ["<=256", "256-512"]
    assert s["by_length"]["256-512"] == {"n": 1, "accuracy": 0.0}
    json.dumps(s)  # JSON-serializable as is


def test_two_problems_sharing_an_id_stay_two_problems():
    """Ids may repeat (a row without one gets its index, which another row may have as its id):
    the summary counts problems by their position, so pass@k never pools two problems' samples."""
    recs = [dict(_rec("p", 0, True), problem=0), dict(_rec("p", 1, True), problem=0),
            dict(_rec("p", 0, False), problem=1), dict(_rec("p", 1, False), problem=1)]
    s = EvalResult(recs, k=2).summary()
    assert s["n_problems"] == 2 and s["pass_at_k"] == 0.5 and set(s["pass_at"]) == {"1", "2"}


def test_summary_with_lab_checker_fields_and_tables():
    from aropd_mlx.lab.setup import checker

    ex = Example(id="e", question="Q:7+5*3", solution="7+5=2\n2*3=6", answer="6")
    responses = ["7+5=2\n2*3=6\nA:6", "A:6", "7+5=3\n3*3=9\nA:6", "7+5=2\n2*3=6\nA:1"]
    recs = [{"id": f"e{i}", "tokens": len(r) + 1, "bucket": bucket_name(len(r) + 1), **checker(ex, r)}
            for i, r in enumerate(responses)]
    s = EvalResult(recs).summary()
    assert s["accuracy"] == 0.75 and s["all_steps_correct_rate"] == 0.25
    assert s["shortcut_rate"] == 0.5
    assert s["shortcut_counts"] == {"copied_foresight": 1, "no_steps": 1}
    assert s["by_k"]["2"]["shortcut_rate"] == 0.5
    md = summary_markdown(s)
    assert "| all | 4 | 0.750 | 0.250 | 0.500 |" in md and "| k=2 |" in md and "| len <=256 |" in md
    assert markdown_table([]) == "(empty)\n"
    assert BUCKET_NAMES[0] == "<=256"


def test_one_evaluation_table_before_and_after():
    """The table `train` (before -> after) and `eval` print is evaluate.summary_rows, the only
    one: groups all, by k, by length; a group missing before shows None."""
    import aropd_mlx.cli.train as cli_train

    after = {"n": 4, "accuracy": 0.75, "all_steps_correct_rate": 0.5, "shortcut_rate": 0.25,
             "by_k": {"2": {"n": 2, "accuracy": 1.0, "all_steps_correct_rate": 1.0, "shortcut_rate": 0.0},
                      "3": {"n": 2, "accuracy": 0.5, "all_steps_correct_rate": 0.0, "shortcut_rate": 0.5}},
             "by_length": {"<=256": {"n": 4, "accuracy": 0.75}}}
    before = {**after, "accuracy": 0.25, "by_k": {"2": {**after["by_k"]["2"], "accuracy": 0.5}}}
    rows = summary_rows(after, before)
    assert [r["group"] for r in rows] == ["all", "k=2", "k=3", "len <=256"]
    assert rows[0] == {"group": "all", "n": 4, "acc before": 0.25, "acc after": 0.75,
                       "all-steps before": 0.5, "all-steps after": 0.5,
                       "shortcut before": 0.25, "shortcut after": 0.25}
    assert rows[1]["acc before"] == 0.5 and rows[2]["acc before"] is None
    assert rows[3]["all-steps after"] is None  # the length groups carry accuracy only
    assert list(summary_rows(after)[0]) == ["group", "n", "acc", "all-steps", "shortcut"]
    assert not hasattr(cli_train, "summary_rows") or cli_train.summary_rows is summary_rows


def test_evaluate_samples_k_per_problem(tiny_llama):
    from mlx_lm import load

    from aropd_mlx.evaluate import evaluate
    from aropd_mlx.views import ViewSettings

    model, tok = load(str(tiny_llama))
    exs = [Example(id=str(i), question=f"Q:{i}+1", answer=str(i + 1)) for i in range(3)]
    res = evaluate(model, tok, exs, ViewSettings(), k=2, temperature=1.0, max_new_tokens=5)
    assert len(res.records) == 6
    assert [(r["id"], r["sample"]) for r in res.records[:2]] == [("0", 0), ("0", 1)]
    s = res.summary()
    assert s["n_problems"] == 3 and s["samples_per_problem"] == 2 and set(s["pass_at"]) == {"1", "2"}
    assert all(1 <= r["tokens"] <= 5 for r in res.records)


def test_math_verify_is_used_when_installed(monkeypatch):
    import aropd_mlx.evaluate as ev

    calls = []

    def parse(s):
        calls.append(s)
        return s

    monkeypatch.setattr(ev, "_math_verify", lambda: (parse, lambda gold, pred: gold == "$2\\pi$"))
    assert ev.answers_match("\\pi*2", "2\\pi") and calls == ["$2\\pi$", "$\\pi*2$"]
    assert ev.answers_match("3", "3.0") and len(calls) == 2  # the normalizer answers first

    def broken(_):
        raise RuntimeError("parser timeout")

    monkeypatch.setattr(ev, "_math_verify", lambda: (broken, None))
    assert not ev.answers_match("a", "b")  # a failing parser is a non-match, not a crash
