"""Does a lab teacher's view have hindsight? The slip probe.

The paper's case against Full OPD is hindsight: a teacher that sees the whole reference pulls
the student toward it even where the student's own chain went elsewhere, and the student
cannot follow a pull toward something it cannot see. The lab can measure this directly. Take
an oracle trace, make line j's result wrong (a slip), compute every later line on from the
wrong value (as a student that slipped would), and ask each view of the teacher for the next
line's first character (and its result, where the two chains' results differ):

    oracle      7+5=2  2*3=6  6-2=4  4+8=2   A:2
    slipped     7+5=2  2*3=6  6-2=1  1+8=9   A:9      (j = 2; the next line starts "1")

`consistent` is the view's probability of the value the response wrote ("1"), `oracle` of the
reference's value ("4"). A view that computes from the response puts its mass on the first; a
view that copies its reference, on the second. The slip is put at line k - 2 (`slip="late"`),
so the probed line, k - 1, lies past the partial view's half of the reference (for every
k >= 2): does the full view copy where the anchor has to compute? `slip="early"` puts it at
line 0 and probes line 1, inside the partial view's half too (problems with k >= 4): does the
anchor itself copy the part of the reference it is shown (docs/LAB.md, session 15)? Three
points are probed: the next line's first character (`next_line`), its result where the two
chains' results differ (`next_result`), and the answer digit (`answer`: the slipped chain's,
which the response's last line already shows, against the reference's `A:`).

    numbers = hindsight(model, tokenizer, examples, views)
    numbers["full"]["next_result"]["oracle"]     # small (< .3) for the shipped default teacher
"""
from __future__ import annotations

import random

import numpy as np

from aropd_mlx.lab import task


SLIPS = {"late": 2, "early": 4}  # where the slip goes -> the fewest steps a probed problem has


def _probe_points(ex, views, rng: random.Random, slip: str = "late"):
    """(response text, [(what, char position, consistent char, oracle char)]) for one example."""
    steps, answer = task.solve(ex.question)
    j = 0 if slip == "early" else len(steps) - 2
    lines, consistent = task.slip_once(ex.question, j, rng)
    text = views.response_template.format(solution="\n".join(lines), answer=consistent)
    start = text.index(lines[j + 1], text.index(lines[j]) + len(lines[j]))
    points = [("next_line", start, lines[j + 1][0], steps[j + 1][0])]
    if lines[j + 1][-1] != steps[j + 1][-1]:
        points.append(("next_result", start + task.LINE_WIDTH - 1, lines[j + 1][-1],
                       steps[j + 1][-1]))
    if consistent != answer:
        points.append(("answer", text.rindex("A:" + consistent) + 2, consistent, answer))
    return text, points


def hindsight(model, tokenizer, examples, views, seed: int = 0, batch: int = 64,
              slip: str = "late") -> dict:
    """Per view and probed point (`next_line`, `next_result`, `answer`: module docstring), the
    mean probability of the response's own value (`consistent`) and of the reference's
    (`oracle`) after a slip (`slip`: "late" or "early", module docstring), over the examples
    with enough steps (SLIPS); `n` counts the points."""
    import mlx.core as mx

    from aropd_mlx.head import head_from_model
    from aropd_mlx.rollout import pad_responses
    from aropd_mlx.scoring import score_views
    from aropd_mlx.views import encode_response, encode_views, render_views

    ids: dict[str, int] = {}

    def token(char: str) -> int:
        if char not in ids:
            ids[char] = char_id(tokenizer, char)
        return ids[char]

    if slip not in SLIPS:
        raise ValueError(f"slip must be one of {', '.join(SLIPS)}, got {slip!r}")
    rng, prompts, responses, probed = random.Random(seed), {}, [], []
    for ex in examples:
        if len(task.parse_question(ex.question)[1]) < SLIPS[slip]:
            continue
        text, points = _probe_points(ex, views, rng, slip)
        resp = encode_response(tokenizer, text)
        if list(resp[:len(text)]) != [token(c) for c in text]:
            raise ValueError("the slip probe needs a tokenizer with one token per character "
                             "(the lab's): the response's tokens are not its characters")
        for name, prompt in encode_views(tokenizer, render_views(ex, views), views).items():
            prompts.setdefault(name, []).append(prompt)
        responses.append(resp)
        probed.append(points)
    if not responses:
        return {}
    padded = pad_responses(responses, [True] * len(responses))
    hidden = score_views(model, prompts, np.array(padded.tokens), padded.lengths,
                         micro_batch=batch)
    head, seen = head_from_model(model), {}
    for name, h in hidden.items():
        probs = np.array(mx.softmax(head(h).astype(mx.float32), axis=-1))
        for i, points in enumerate(probed):
            for what, pos, consistent, oracle in points:
                seen.setdefault(name, {}).setdefault(what, []).append(
                    (probs[i, pos, token(consistent)], probs[i, pos, token(oracle)]))
    return {name: {what: {"consistent": round(float(np.mean([r[0] for r in got])), 4),
                          "oracle": round(float(np.mean([r[1] for r in got])), 4),
                          "n": len(got)}
                   for what, got in kinds.items()}
            for name, kinds in seen.items()}


def char_id(tokenizer, char: str) -> int:
    """The token of one character; an error where the tokenizer has no single token for it."""
    ids = tokenizer.encode(char, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError("the slip probe needs a tokenizer with one token per character (the "
                         f"lab's); {char!r} is {len(ids)} tokens")
    return ids[0]


def format_hindsight(numbers: dict, slip: str = "late") -> str:
    """A table: per view, P(consistent) / P(oracle) after a slip."""
    where = ("at line 0 (inside the anchor's half)" if slip == "early" else
             "at line k-2 (past the anchor's half)")
    lines = [f"after a slip {where}   P(the response's value) / P(the reference's value)",
             "view      next line's first char   its result        answer"]
    for name, kinds in numbers.items():
        cells = [f"{kinds[w]['consistent']:.3f} / {kinds[w]['oracle']:.3f}" if w in kinds else "-"
                 for w in ("next_line", "next_result", "answer")]
        lines.append(f"{name:<9} {cells[0]:<24} {cells[1]:<17} {cells[2]}")
    return "\n".join(lines)
