"""The partial view's cut (METHOD.md: the first `partial_ratio` of the oracle reasoning's
characters, extended to a word boundary) and the view templates' placeholders."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aropd_mlx.errors import UserError
from aropd_mlx.views import ViewSettings, partial_reference


def reference_cut(solution: str, ratio: float) -> str:
    """Naive reference: the words (maximal runs of non-space) that have at least one character
    among the first floor(ratio * len) characters, as written in the solution (the spaces
    between them kept), nothing after the last one."""
    if ratio >= 1.0:
        return solution
    budget = int(len(solution) * ratio)
    ends = [m.end() for m in re.finditer(r"\S+", solution) if m.start() < budget]
    return solution[: ends[-1]] if ends else ""


@pytest.mark.parametrize("ratio, want", [
    (0.0, ""),
    (0.5, "alpha beta"),  # the cut (11) lands on "gamma"'s g: gamma is not started
    (0.25, "alpha"),  # the cut (5) lands on the space after alpha
    (0.3, "alpha"),  # the cut (6) lands on b, a word start: beta is not started
    (0.32, "alpha beta"),  # the cut (7) lands inside "beta": finish it
    (0.75, "alpha beta gamma"),
    (1.0, "alpha beta gamma delta"),
])
def test_partial_reference_examples(ratio, want):
    assert partial_reference("alpha beta gamma delta", ratio) == want


def test_half_of_the_characters_stays_near_half():
    """The reported defect: 0.5 gave "alpha beta gamma" (73% of the characters)."""
    text = "alpha beta gamma delta"
    cut = partial_reference(text, 0.5)
    assert len(cut) <= len(text) * 0.5


words = st.lists(st.text(alphabet="abcxyz.=+1", min_size=1, max_size=8), min_size=0, max_size=12)
spaces = st.lists(st.sampled_from([" ", "  ", "\n", "\t", " \n"]), min_size=13, max_size=13)


@settings(max_examples=300, deadline=None)
@given(words=words, gaps=spaces, lead=st.sampled_from(["", " ", "\n"]),
       ratio=st.floats(0.0, 1.0))
def test_partial_reference_matches_the_naive_cut(words, gaps, lead, ratio):
    solution = lead + "".join(w + g for w, g in zip(words, gaps)).rstrip()
    got = partial_reference(solution, ratio)
    assert got == reference_cut(solution, ratio)
    assert solution.startswith(got)
    # never more than the budget plus the rest of one word
    budget = int(len(solution) * ratio)
    longest = max((len(w) for w in words), default=0)
    assert ratio >= 1.0 or len(got) <= budget + longest


@pytest.mark.parametrize("key, template, needles", [
    ("privileged_template", "{question}\nExample: {answer}", ["views.privileged_template", "{reference}"]),
    ("privileged_template", "{question} {refrence} {answer}", ["views.privileged_template", "{refrence}"]),
    ("privileged_template", "{question} {reference} {", ["views.privileged_template", "template"]),
    ("response_template", "{soluton}\nFinal answer: {answer}", ["views.response_template", "{soluton}"]),
    ("response_template", "Final answer: {answer}", ["views.response_template", "{solution}"]),
    ("response_template", "{solution} {0}", ["views.response_template", "{0}"]),
    ("student_template", "{question} {answer}", ["views.student_template", "{answer}"]),
    ("student_template", "Solve it.", ["views.student_template", "{question}"]),
])
def test_bad_templates_name_the_key_and_placeholder(key, template, needles):
    with pytest.raises(UserError) as e:
        ViewSettings(**{key: template}).validate()
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


def test_good_templates_pass():
    ViewSettings().validate()
    ViewSettings(privileged_template="{question}{{literal}}\n{reference}", response_template="{solution}",
                 student_template="Q: {question!s}").validate()


def test_a_padded_question_last_ends_where_the_students_does_and_keeps_the_reference_fixed():
    """views.pad_question_chars with the question last in the privileged template: every
    privileged view ends with the student's question (left-padded with pad_line's first
    character to the given width), and the reference starts at the same distance from the
    prompt's end for a short and a long question."""
    from types import SimpleNamespace

    from aropd_mlx.views import render_views

    views = ViewSettings(privileged_template="{reference}\nA:{answer}\n{question}",
                         student_template="{question}", pad_reference_lines=4, pad_line=".....",
                         pad_question_chars=9)
    views.validate()
    short = SimpleNamespace(question="Q:1+2", solution="1+2=3", answer="3")
    long = SimpleNamespace(question="Q:1+2*3+4", solution="1+2=3\n3*3=9\n9+4=3", answer="3")
    offsets = set()
    for ex in (short, long):
        texts = render_views(ex, views)
        assert texts["student"] == ex.question
        for name in ("partial", "full"):
            pad = "." * (9 - len(ex.question))
            assert texts[name].endswith("\nA:3\n" + pad + ex.question)
            offsets.add(len(texts[name]) - texts[name].index("1+2=3"))
    assert len(offsets) == 1  # the same distance for both questions and both views
    with pytest.raises(UserError, match="pad_question_chars needs views.pad_line"):
        ViewSettings(pad_question_chars=9).validate()
    with pytest.raises(UserError, match="pad_question_chars must be >= 0"):
        ViewSettings(pad_question_chars=-1).validate()


def test_the_partial_outline_continues_the_anchor_past_its_cut_and_nowhere_else():
    """views.partial_outline: the partial view's reference is its cut of the solution, then the
    outline's lines from the cut's line count on, then the padding; the full view and the
    student view are the same as without it, and an example without an outline is padded as
    before. Checked against the lab's layout written out by hand."""
    from aropd_mlx.data import Example
    from aropd_mlx.views import render_views

    base = dict(privileged_template="{reference}\nA:{answer}\n{question}", pad_line=".....",
                student_template="{question}", pad_reference_lines=6)
    ex = Example(id="x", question="Q:7+5*3-2+8", solution="7+5=2\n2*3=6\n6-2=4\n4+8=2",
                 answer="2", outline=".+5=.\n.*3=.\n.-2=.\n.+8=.")
    plain, outlined = (render_views(ex, ViewSettings(**base, partial_outline=flag))
                       for flag in (False, True))
    assert outlined["partial"] == ("7+5=2\n2*3=6\n.-2=.\n.+8=.\n.....\n.....\nA:2\n"
                                   "Q:7+5*3-2+8")
    assert plain["partial"] == "7+5=2\n2*3=6\n.....\n.....\n.....\n.....\nA:2\nQ:7+5*3-2+8"
    assert outlined["full"] == plain["full"] and outlined["student"] == plain["student"]
    bare = Example(id="y", question=ex.question, solution=ex.solution, answer="2")
    assert render_views(bare, ViewSettings(**base, partial_outline=True)) == plain


def test_the_student_outline_gives_the_student_the_privileged_views_layout():
    """views.student_outline: the student's prompt is the privileged template with the outline
    padded where the references sit, pad_line's first character for the answer and the padded
    question, written out by hand; so response line i is as far from the student's line i as
    from the full view's (the same length of every prompt). Off, the student view is as before;
    on, it needs pad_line and an outline, and the student template may use {reference}."""
    from aropd_mlx.data import Example
    from aropd_mlx.views import render_views

    layout = "{reference}\nA:{answer}\n{question}"
    base = dict(privileged_template=layout, pad_line=".....", pad_reference_lines=6,
                pad_question_chars=13, partial_outline=True)
    ex = Example(id="x", question="Q:7+5*3-2+8", solution="7+5=2\n2*3=6\n6-2=4\n4+8=2",
                 answer="2", outline="7+5=.\n.*3=.\n.-2=.\n.+8=.")
    on = ViewSettings(**base, student_template=layout, student_outline=True)
    on.validate()
    texts = render_views(ex, on)
    assert texts["student"] == ("7+5=.\n.*3=.\n.-2=.\n.+8=.\n.....\n.....\nA:.\n"
                                "..Q:7+5*3-2+8")
    assert len({len(t) for t in texts.values()}) == 1
    off = render_views(ex, ViewSettings(**base, student_template="{question}"))
    assert off["student"] == ex.question
    assert {k: v for k, v in off.items() if k != "student"} == {
        k: v for k, v in texts.items() if k != "student"}
    assert render_views(Example(id="q", question=ex.question, outline=ex.outline), on) == {
        "student": texts["student"]}  # no solution: the student view alone, as without it
    with pytest.raises(UserError, match="example 'y' has no outline"):
        render_views(Example(id="y", question=ex.question), on)
    with pytest.raises(UserError, match="student_outline needs views.pad_line"):
        ViewSettings(student_template=layout, student_outline=True).validate()
    with pytest.raises(UserError, match="unknown placeholder {reference}"):
        ViewSettings(**base, student_template=layout).validate()
