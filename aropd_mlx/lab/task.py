"""The built-in lab's task: a running value mod 10 over k operations, with a checkable trace.

A question starts from a digit and applies k operations, each `+b` or `-b` (b in 0-9) or
`*b` (b in 2-9), keeping the running value mod 10::

    question  Q:7+5*3-2+8
    solution  7+5=2        one line per step, always 5 characters: <prev><op><b>=<res>
              2*3=6
              6-2=4
              4+8=2
    answer    2            a response ends with the line "A:2"

Examples follow the project's data schema (DESIGN.md): ``{"id", "question", "solution",
"answer"}`` with the full ``"Q:..."`` text as the question and the step lines joined by "\\n"
as the solution. Everything here is pure Python (``random.Random`` for draws).

How `check` reads a response (the definitions the lab's metrics rest on)
--------------------------------------------------------------------------
* Lines are split with ``str.splitlines``; each line is stripped of surrounding whitespace
  and blank lines are dropped. Whitespace *inside* a line is not tolerated (``"7 + 5=2"`` is
  garbage): the lab's model writes characters, and a space is a character it chose.
* The **answer line** is the first line that is exactly ``A:<digit>``. Nothing after it is
  read (generation should have stopped there). A line such as ``A:12`` or ``A:`` is not an
  answer line; it is garbage. With no answer line, ``answer`` is None and is not correct.
* Every non-blank line before the answer line is a **written step**, by position: a line
  shaped like a double step (``<d><op><d><op><d>=<d>``) stands for the next two positions,
  every other line (garbage too) for the next one; so with one step a line, line i is the
  response's attempt at step i (0-based). Garbage lines count as written (and wrong);
  positions >= k are **extra steps** (never correct). ``steps_written`` counts positions.
* Step i (i < k) of a single-step line is **locally valid** when it is well formed (``<d><op><d>=<d>``) and
  is one of the ways the task allows to write the question's i-th operation applied to the
  previous result *as written by the response* (for step 0: the question's start digit),
  with that arithmetic's result mod 10 (`accepted_lines`): the oracle's ``<prev><op><b>``;
  the operands swapped for ``+`` and ``*`` (``5+7=2``); a subtraction as adding the
  additive inverse, either order (``6-2=4`` as ``6+8=4`` or ``8+6=4``). Another writer's
  references (`reference_variant`'s ``"reversed_notation"``) are therefore correct steps. If line i-1 is garbage, there is no written
  previous result, so step i is not locally valid either. A chain that slipped can continue
  validly: ``7+5=3`` then ``3*3=9`` has step 1 valid (step 0 is not).
* A double step at positions i, i+1 (i + 1 < k) is locally valid when it is the question's
  operations i and i+1 applied left to right to the previous written result, with the result
  after both (`double_step_line`: ``7+5*3=6``, a stronger writer who skips a line; only this
  order); both positions are then valid, or both not.
* ``steps_correct`` counts the locally valid positions among the first k.
* ``answer_correct``: the answer line's digit equals the oracle answer.
* ``all_steps_correct``: exactly k written steps, all locally valid, and the answer correct.
  (k locally valid steps reproduce the oracle's values, so the chain and the oracle agree.)
* ``first_error_step``: the first position i < k whose step is missing or not locally
  valid; if every required step is valid but the response is still not all-correct (an
  extra line, a wrong or missing answer), it is k, the position of the answer line. It is
  None exactly when ``all_steps_correct`` is True.

Shortcut events (METHOD.md, last section), counted once per response
----------------------------------------------------------------------
* ``"no_steps"``: the response states an answer (an answer line exists) with fewer written
  steps than required (``steps_written < k``), whether that answer is right or wrong. This
  covers "A:2" alone and traces with steps left out.
* ``"copied_foresight"``: the answer is correct while some required step the response wrote
  (positions 0..k-1) is not locally valid: the answer did not come from the written chain.
* Precedence: ``"no_steps"`` is checked first, so a response that both skips steps and has a
  wrong step with a right answer counts as ``"no_steps"``.
* Not shortcuts: a missing answer line (a truncated rollout), a wrong answer after complete
  steps (an honest slip), and extra lines after k valid steps (all-steps-correct is False).

Reference variants (privileged references a student cannot copy as they are)
-------------------------------------------------------------------------------
`reference_variant` rewrites an example's solution; every line but the stronger writer's stays
5 characters so that hint line i aligns with response line i. Styles: ``"oracle"`` (unchanged), ``"values"``
(only the running values, ``"...=2"``), ``"corrupted:<p>"`` (each line independently, with
probability p, gets a wrong result digit; the answer is kept), ``"reversed_notation"``
(operands swapped, ``"5+7=2"``; a subtraction ``6-2=4`` is written as adding the additive
inverse, ``"8+6=4"``, so every line remains a true equation mod 10), ``"two_per_line"`` (a
stronger writer: two operations a line, ``"7+5*3=6"``, the last line single when k is odd;
half the lines, none aligned with the student's: a reference it cannot copy as it is).
"""

from __future__ import annotations

import operator
import random
import re
from dataclasses import dataclass

# operator -> the operands it may take (the task's language; `parse_question` enforces it)
OPS: dict[str, tuple[int, ...]] = {
    "+": tuple(range(10)),
    "-": tuple(range(10)),
    "*": tuple(range(2, 10)),
}
QUESTION_PREFIX = "Q:"
ANSWER_PREFIX = "A:"
LINE_WIDTH = 5  # every step line, and every reference-variant line, has this many characters
STYLES = ("oracle", "values", "corrupted:<p>", "reversed_notation", "two_per_line")

_QUESTION_RE = re.compile(r"Q:(\d)((?:[+\-*]\d)+)")
_STEP_RE = re.compile(r"(\d)([+\-*])(\d)=(\d)")
_STEP2_RE = re.compile(r"(\d)([+\-*])(\d)([+\-*])(\d)=(\d)")
_ANSWER_RE = re.compile(r"A:(\d)")


def apply_op(a: int, op: str, b: int) -> int:
    """One operation on the running value, mod 10."""
    if op == "+":
        return (a + b) % 10
    if op == "-":
        return (a - b) % 10
    if op == "*":
        return (a * b) % 10
    raise ValueError(f"unknown operator {op!r}; expected one of {''.join(OPS)}")


def step_line(prev: int, op: str, b: int) -> str:
    """The oracle's line for one step, e.g. ``step_line(7, "+", 5) == "7+5=2"``."""
    return f"{prev}{op}{b}={apply_op(prev, op, b)}"


def format_question(start: int, ops: list[tuple[str, int]]) -> str:
    """``format_question(7, [("+", 5), ("*", 3)]) == "Q:7+5*3"``."""
    return QUESTION_PREFIX + str(start) + "".join(f"{op}{b}" for op, b in ops)


def parse_question(question: str) -> tuple[int, list[tuple[str, int]]]:
    """``"Q:7+5*3"`` -> ``(7, [("+", 5), ("*", 3)])``.

    Surrounding whitespace is ignored; anything else outside the task's language (no "Q:",
    no operation, two-digit numbers, ``*0``/``*1``, spaces inside) raises ValueError.
    """
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    m = _QUESTION_RE.fullmatch(question.strip())
    if m is None:
        raise ValueError(f"malformed lab question {question!r}; expected like 'Q:7+5*3-2'")
    body = m.group(2)
    ops = [(body[j], int(body[j + 1])) for j in range(0, len(body), 2)]
    for op, b in ops:
        if b not in OPS[op]:
            raise ValueError(f"operand {b} is not allowed after {op!r} in {question!r}")
    return int(m.group(1)), ops


def oracle_values(question: str) -> list[int]:
    """The running value after each step (length k)."""
    value, ops = parse_question(question)
    values = []
    for op, b in ops:
        value = apply_op(value, op, b)
        values.append(value)
    return values


def solve(question: str) -> tuple[list[str], str]:
    """The oracle: step lines and the final answer digit (as a string)."""
    value, ops = parse_question(question)
    steps = []
    for op, b in ops:
        steps.append(step_line(value, op, b))
        value = apply_op(value, op, b)
    return steps, str(value)


def slipped_trace(question: str, wrong: dict[int, int]) -> tuple[list[str], str]:
    """The trace of a writer who slips: line j's result is `wrong[j]` (not the oracle's at that
    point of the chain) for each j in `wrong`, every other line computed on from the value
    written before it; and the chain's answer. `{}` gives the oracle."""
    value, ops = parse_question(question)
    lines = []
    for j, (op, b) in enumerate(ops):
        line = step_line(value, op, b)
        if j in wrong:
            if int(line[-1]) == wrong[j]:
                raise ValueError(f"line {j} of {question}: {wrong[j]} is the right result there, "
                                 "not a slip")
            line = line[:-1] + str(wrong[j])
        lines.append(line)
        value = int(line[-1])
    return lines, str(value)


def slip_once(question: str, line: int, rng: random.Random) -> tuple[list[str], str]:
    """`slipped_trace` with one slip: line `line`'s result a wrong digit drawn by `rng` (one
    ``rng.choice``), the chain and the answer computed on from it."""
    good = int(solve(question)[0][line][-1])
    return slipped_trace(question, {line: rng.choice([d for d in range(10) if d != good])})


def slipping_writer(question: str, p: float, rng: random.Random,
                    first: int = 0) -> tuple[list[str], str]:
    """`slipped_trace` with each line's result, with probability p, a wrong digit drawn by
    `rng` (one ``rng.random()`` per line, one more draw per slip); lines before `first` never
    slip (their draws are made all the same)."""
    value, ops = parse_question(question)
    wrong = {}
    for j, (op, b) in enumerate(ops):
        value = apply_op(value, op, b)
        if rng.random() < p and j >= first:
            wrong[j] = value = rng.choice([d for d in range(10) if d != value])
    return slipped_trace(question, wrong)


def format_response(steps: list[str], answer: str) -> str:
    """The exact text of a response: the step lines, then ``"A:<d>"``, joined by newlines."""
    return "\n".join([*steps, f"{ANSWER_PREFIX}{answer}"])


def outline(question: str, with_start: bool = False) -> str:
    """Each step's operation restated where its solution line sits (``".+5=."``: the
    operator and operand in their columns, the values left as dots): public, nothing solved.
    ``outline("Q:7+5*3") == ".+5=.\n.*3=."``; `with_start`: the first line's first column holds
    the question's start digit (``"7+5=.\n.*3=."``), so the outline restates the whole
    question (a worksheet: views.student_outline)."""
    start, ops = parse_question(question)
    first = str(start) if with_start else "."
    return "\n".join(f"{first if i == 0 else '.'}{op}{b}=." for i, (op, b) in enumerate(ops))


def make_example(rng: random.Random, k: int, *, id: str | None = None,
                 with_outline: bool = False, outline_start: bool = False) -> dict:
    """One example in the data schema with k operations drawn from `rng`.

    The start digit is uniform in 0-9; each operator is uniform over ``OPS``, then its
    operand uniform over the operands that operator allows. Default id: ``"lab-" + ops``.
    """
    k = operator.index(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    start = rng.randrange(10)
    ops = []
    for _ in range(k):
        op = rng.choice(tuple(OPS))
        ops.append((op, rng.choice(OPS[op])))
    question = format_question(start, ops)
    steps, answer = solve(question)
    out = {
        "id": id if id is not None else "lab-" + question[len(QUESTION_PREFIX):],
        "question": question,
        "solution": "\n".join(steps),
        "answer": answer,
    }
    if with_outline:  # the schema's optional outline (views.partial_outline, student_outline)
        out["outline"] = outline(question, with_start=outline_start)
    return out


def generate(n: int, k_min: int, k_max: int, seed: int, *, prefix: str = "lab",
             with_outline: bool = False, outline_start: bool = False) -> list[dict]:
    """n examples, deterministic in `seed`; each k uniform in [k_min, k_max].

    Ids are ``f"{prefix}-{seed}-{i}"``, so two sets drawn with different seeds never share
    an id (their questions may still coincide for small k).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (1 <= k_min <= k_max):
        raise ValueError(f"need 1 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(k_min, k_max)
        out.append(make_example(rng, k, id=f"{prefix}-{seed}-{i}", with_outline=with_outline,
                                outline_start=outline_start))
    return out


@dataclass(frozen=True)
class Verdict:
    """What `check` found in one response; the definitions are in the module docstring."""

    answer: str | None
    answer_correct: bool
    steps_written: int
    steps_required: int
    steps_correct: int
    all_steps_correct: bool
    shortcut: str | None
    first_error_step: int | None


def _read_response(response: str) -> tuple[list[str], str | None]:
    """Written step lines (stripped, non-blank, before the answer line) and the answer."""
    steps: list[str] = []
    for raw in response.splitlines():
        line = raw.strip()
        if not line:
            continue
        m = _ANSWER_RE.fullmatch(line)
        if m is not None:
            return steps, m.group(1)
        steps.append(line)
    return steps, None


def accepted_lines(prev: int, op: str, b: int) -> frozenset[str]:
    """Every line the checker takes as step `prev op b` (the module docstring's notations)."""
    res = apply_op(prev, op, b)
    if op == "-":
        inv = (-b) % 10
        return frozenset({f"{prev}-{b}={res}", f"{prev}+{inv}={res}", f"{inv}+{prev}={res}"})
    return frozenset({f"{prev}{op}{b}={res}", f"{b}{op}{prev}={res}"})


def _step_valid(line: str, expected_left: int | None, op: str, b: int) -> bool:
    """Local validity of one written line (see the module docstring)."""
    if expected_left is None or _STEP_RE.fullmatch(line) is None:
        return False
    return line in accepted_lines(expected_left, op, b)


def _written_result(line: str) -> int | None:
    m = _STEP_RE.fullmatch(line) or _STEP2_RE.fullmatch(line)
    return int(m.groups()[-1]) if m is not None else None


def double_step_line(prev: int, op1: str, b1: int, op2: str, b2: int) -> str:
    """A stronger writer's line for two steps at once, read left to right:
    ``double_step_line(7, "+", 5, "*", 3) == "7+5*3=6"`` ((7 + 5) * 3 mod 10)."""
    return f"{prev}{op1}{b1}{op2}{b2}={apply_op(apply_op(prev, op1, b1), op2, b2)}"


def is_step_line(line: str) -> bool:
    """Whether a line is shaped like a step: one operation (``7+5=2``) or a stronger writer's
    two (``7+5*3=6``), right or wrong."""
    return bool(_STEP_RE.fullmatch(line) or _STEP2_RE.fullmatch(line))


def is_answer_line(line: str) -> bool:
    """Whether a line is an answer line (``A:<digit>``)."""
    return _ANSWER_RE.fullmatch(line) is not None


def _line_ops(line: str) -> int:
    """How many of the question's operations a written line stands for: 2 for a line shaped
    like a stronger writer's double step (``<d><op><d><op><d>=<d>``), else 1 (garbage too)."""
    return 2 if _STEP2_RE.fullmatch(line) is not None else 1


def check(question: str, response: str) -> Verdict:
    """Grade one response to one question: answer, per-step validity, shortcut event."""
    start, ops = parse_question(question)
    _, oracle_answer = solve(question)
    k = len(ops)
    steps, answer = _read_response(response)

    valid: list[bool] = []  # one entry per operation a written line stands for (position)
    prev: int | None = start
    for line in steps:
        i, n = len(valid), _line_ops(line)
        if i >= k:
            break
        if n == 2:
            ok = (prev is not None and i + 1 < k
                  and line == double_step_line(prev, *ops[i], *ops[i + 1]))
        else:
            ok = _step_valid(line, prev, *ops[i])
        valid += [ok] * n
        prev = _written_result(line)
    written = sum(_line_ops(line) for line in steps)

    steps_correct = sum(valid[:k])
    answer_correct = answer is not None and answer == oracle_answer
    required_ok = written >= k and all(valid[:k])
    all_ok = required_ok and written == k and answer_correct

    if all_ok:
        first_error = None
    elif not required_ok:
        first_error = next((i for i, v in enumerate(valid[:k]) if not v), len(valid))
    else:
        first_error = k

    shortcut = None
    if answer is not None and written < k:
        shortcut = "no_steps"
    elif answer_correct and not all(valid[:k]):
        shortcut = "copied_foresight"

    return Verdict(
        answer=answer,
        answer_correct=answer_correct,
        steps_written=written,
        steps_required=k,
        steps_correct=steps_correct,
        all_steps_correct=all_ok,
        shortcut=shortcut,
        first_error_step=first_error,
    )


def _corrupt_line(line: str, rng: random.Random) -> str:
    """Same operands and operator, a different (wrong) result digit."""
    wrong = rng.choice([d for d in range(10) if d != int(line[-1])])
    return line[:-1] + str(wrong)


def _reversed_line(prev: int, op: str, b: int) -> str:
    """``b op prev = res``; subtraction as adding the inverse, so the line stays true."""
    res = apply_op(prev, op, b)
    if op == "-":
        return f"{(-b) % 10}+{prev}={res}"
    return f"{b}{op}{prev}={res}"


def _parse_p(style: str) -> float:
    text = style.split(":", 1)[1]
    try:
        p = float(text)
    except ValueError:
        msg = f"bad probability in style {style!r}; expected like 'corrupted:0.3'"
        raise ValueError(msg) from None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"corruption probability must lie in [0, 1], got {p} in {style!r}")
    return p


def reference_variant(example: dict, style: str, rng: random.Random) -> dict:
    """A copy of `example` whose solution is rewritten in `style` (see the module docstring).

    ``"oracle"`` returns an unchanged copy; the other styles derive their lines from the
    question (the oracle), so they are right for any lab example; id, question and answer
    are kept. Every line is 5 characters wide.
    ``"corrupted:<p>"`` draws one ``rng.random()`` per line (and one more per corrupted
    line), so a given rng state gives a given variant; p = 0 returns the oracle lines and
    p = 1 makes every line wrong.
    """
    question = example["question"]
    start, ops = parse_question(question)
    steps, _ = solve(question)
    if style == "oracle":
        return dict(example)
    if style == "values":
        lines = ["...=" + line[-1] for line in steps]
    elif style.startswith("corrupted:"):
        p = _parse_p(style)
        lines = [_corrupt_line(s, rng) if rng.random() < p else s for s in steps]
    elif style == "reversed_notation":
        lines, prev = [], start
        for op, b in ops:
            lines.append(_reversed_line(prev, op, b))
            prev = apply_op(prev, op, b)
    elif style == "two_per_line":
        lines, prev = [], start
        for j in range(0, len(ops), 2):
            pair = ops[j:j + 2]
            lines.append(double_step_line(prev, *pair[0], *pair[1]) if len(pair) == 2
                         else step_line(prev, *pair[0]))
            prev = int(lines[-1][-1])
    else:
        raise ValueError(f"unknown reference style {style!r}; expected one of {', '.join(STYLES)}")
    out = dict(example)
    out["solution"] = "\n".join(lines)
    return out
