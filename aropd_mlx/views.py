"""The three prompts of one example: the student's, the partial view (the anchor), the full view.

METHOD.md: the partial view holds the first `partial_ratio` of the oracle reasoning's
characters (a word cut there is finished, none is started) plus the final answer; the full view
holds the whole reasoning plus the answer; both are shown as an example before the question is
answered again. The student sees only the question. Responses are the same tokens under every view:
only the prompts differ.

Chat templates that think (Qwen3: the generation prompt ends `<think>\n\n</think>\n\n` when
thinking is off, or lets the model open its own `<think>`): each view is one user turn rendered
with add_generation_prompt, so every view ends with the template's same generation suffix,
think block included (checked per example: `generation_suffix`), and the scored response is the
student's sampled ids appended to each view's prompt ids, never re-rendered or re-tokenized. (A
teacher prompt made by rendering [user, assistant: response] through the template would differ
exactly there: Qwen3's template drops an assistant turn's think block, and a text round trip
may split the first response token differently.) `views.chat_template_args` (mlx-lm's
`chat_template_args`, e.g. `{enable_thinking: false}`) goes to the template for every view.

    views = render_views(example, ViewSettings())
    prompts = encode_views(tokenizer, views, ViewSettings())   # token ids per view
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from aropd_mlx.errors import UserError

VIEW_NAMES = ("student", "partial", "full")
# The training methods (the one list) and the teacher views each distils from ("student" = the
# teacher without privilege; SFT has none: it trains on the oracle trace).
METHOD_VIEWS = {"sft": (), "opd": ("student",), "partial-opd": ("partial",),
                "full-opd": ("full",), "ar-opd": ("partial", "full")}
METHODS = tuple(METHOD_VIEWS)


@dataclass(frozen=True)
class ViewSettings:
    partial_ratio: float = 0.5
    student_template: str = "{question}"
    privileged_template: str = (
        "{question}\n\nHere is an example response:\n{reference}\nFinal answer: {answer}\n\n"
        "Now answer with your own response."
    )
    # How an oracle solution is written as a response (SFT targets, the lab's traces)
    response_template: str = "{solution}\n\nFinal answer: {answer}"
    # Pad the reference to this many lines (0: off) so that reference line i sits at a fixed
    # distance from response line i: a tiny model can then align them (LAB.md).
    pad_reference_lines: int = 0
    pad_line: str = ""
    # Left-pad the question of the privileged views with pad_line's first character to this
    # many characters (0: off): with the question last in privileged_template, the question
    # then ends where the student's does and the reference still sits at a fixed distance.
    pad_question_chars: int = 0
    # Past its cut, the partial view's reference shows the example's `outline` lines (public:
    # what each remaining step is to do, e.g. the question's operation restated where the
    # reference's line would be), so the anchor computes its second half in place (LAB.md s. 12)
    partial_outline: bool = False
    # The student's view as a worksheet: its {reference} is the example's outline (padded like
    # the references), its {answer} pad_line's first character, its question padded as the
    # privileged views' is; with the privileged template as student_template every view then
    # has one layout and reads step i's operation at one fixed distance (LAB.md, session 20)
    student_outline: bool = False
    use_chat_template: bool = True
    system_prompt: str | None = None
    # Extra variables of the chat template, the same for every view: {enable_thinking: false}
    chat_template_args: dict[str, Any] | None = None

    def validate(self) -> None:
        if not 0.0 <= self.partial_ratio <= 1.0:
            raise UserError(f"views.partial_ratio must be in [0, 1], got {self.partial_ratio}")
        if self.pad_reference_lines < 0:
            raise UserError("views.pad_reference_lines must be >= 0")
        if self.pad_question_chars < 0:
            raise UserError("views.pad_question_chars must be >= 0")
        if self.pad_question_chars and not self.pad_line:
            raise UserError("views.pad_question_chars needs views.pad_line (its first character "
                            "pads the question)")
        if self.student_outline and not self.pad_line:
            raise UserError("views.student_outline needs views.pad_line (its first character is "
                            "the student's answer placeholder)")
        for name, (allowed, required) in TEMPLATE_FIELDS.items():
            if name == "student_template" and self.student_outline:
                allowed = TEMPLATE_FIELDS["privileged_template"][0]
            check_template(f"views.{name}", getattr(self, name), allowed, required)
        for key in self.chat_template_args or {}:
            if key in RESERVED_TEMPLATE_ARGS:
                raise UserError(f"views.chat_template_args.{key}: set by aropd-mlx itself (every "
                                "view is one user turn with the generation prompt)")


RESERVED_TEMPLATE_ARGS = ("conversation", "messages", "add_generation_prompt", "tokenize",
                          "continue_final_message", "return_dict", "tools", "documents")


# Each template's placeholders: (allowed, required). The student sees only the question; a
# privileged view without {reference} would make the partial and the full view one prompt.
TEMPLATE_FIELDS = {
    "student_template": (("question",), ("question",)),
    "privileged_template": (("question", "reference", "answer"), ("question", "reference")),
    "response_template": (("solution", "answer"), ("solution",)),
}


def check_template(key: str, template: str, allowed: tuple[str, ...],
                   required: tuple[str, ...]) -> None:
    """A `UserError` naming `key` and the placeholder when `template` uses one outside
    `allowed`, lacks one of `required`, or is not a valid format string."""
    use = ", ".join("{" + a + "}" for a in allowed)
    try:
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as e:  # a lone "{" or "}"
        raise UserError(f"{key}: not a valid template ({e}); placeholders: {use}, "
                        "literal braces: {{ }}") from None
    for field in names:
        if field not in allowed:
            raise UserError(f"{key}: unknown placeholder {{{field}}} (use {use})")
    for field in required:
        if field not in names:
            raise UserError(f"{key} must contain {{{field}}}")


def partial_reference(solution: str, ratio: float) -> str:
    """The first `ratio` of the characters of `solution`, extended to a word boundary.

    The cut sits at floor(ratio * len). Inside a word it moves to that word's end; on a word's
    first letter (or in whitespace) it stays, so no word starting past the cut is included.
    Trailing whitespace is dropped; ratio 0 gives "" and ratio 1 the whole solution."""
    if ratio >= 1.0:
        return solution
    cut = int(len(solution) * ratio)
    if cut > 0 and not solution[cut - 1].isspace():  # mid-word: finish the word
        while cut < len(solution) and not solution[cut].isspace():
            cut += 1
    return solution[:cut].rstrip()


def outlined(reference: str, outline: str | None) -> str:
    """`reference` (a cut of the solution) continued by the outline's lines past its own."""
    if not outline:
        return reference
    lines = reference.split("\n") if reference else []
    return "\n".join(lines + outline.split("\n")[len(lines):])


def _pad(reference: str, settings: ViewSettings) -> str:
    if not settings.pad_reference_lines:
        return reference
    lines = reference.split("\n") if reference else []
    lines += [settings.pad_line] * max(0, settings.pad_reference_lines - len(lines))
    return "\n".join(lines)


def render_views(example, settings: ViewSettings) -> dict[str, str]:
    """The text of each view (before any chat template). Privileged views need a solution;
    views.student_outline an outline."""
    question = example.question
    if settings.pad_question_chars:  # validate(): pad_line is set then
        question = question.rjust(settings.pad_question_chars, settings.pad_line[0])
    if settings.student_outline:
        sheet = getattr(example, "outline", None)
        if not sheet:
            raise UserError(f"example {example.id!r} has no outline, which "
                            "views.student_outline shows the student")
        student = settings.student_template.format(
            question=question, reference=_pad(sheet, settings), answer=settings.pad_line[0])
    else:
        student = settings.student_template.format(question=example.question, reference="",
                                                   answer="")
    out = {"student": student}
    if example.solution is None or example.answer is None:
        return out
    for name, ratio in (("partial", settings.partial_ratio), ("full", 1.0)):
        reference = partial_reference(example.solution, ratio)
        if settings.partial_outline and name == "partial":
            reference = outlined(reference, getattr(example, "outline", None))
        reference = _pad(reference, settings)
        out[name] = settings.privileged_template.format(
            question=question, reference=reference, answer=example.answer)
    return out


def encode_prompt(tokenizer, text: str, settings: ViewSettings) -> list[int]:
    """Token ids of a prompt, through the tokenizer's chat template when asked to."""
    if not settings.use_chat_template:
        ids = tokenizer.encode(text)
        return ids
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; set views.use_chat_template: false "
                        "(plain prompts) or use a model with one")
    return _render(tokenizer, text, settings, generation_prompt=True)


def _render(tokenizer, text: str, settings: ViewSettings, generation_prompt: bool) -> list[int]:
    messages = [{"role": "user", "content": text}]
    if settings.system_prompt:
        messages.insert(0, {"role": "system", "content": settings.system_prompt})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                              **(settings.chat_template_args or {})))


def generation_suffix(tokenizer, text: str, settings: ViewSettings,
                      prompt: list[int] | None = None) -> list[int] | None:
    """The ids the chat template adds after the user turn holding `text` to prompt the
    assistant (`<|im_start|>assistant\n`, plus `<think>\n\n</think>\n\n` for Qwen3 with
    thinking off); None without a chat template, or when the prompt without them is not a
    prefix of the prompt with them (then nothing can be said). `prompt`: encode_prompt's ids
    of `text`, when already made."""
    if not settings.use_chat_template:
        return None
    full = prompt if prompt is not None else _render(tokenizer, text, settings, True)
    bare = _render(tokenizer, text, settings, generation_prompt=False)
    return full[len(bare):] if full[:len(bare)] == bare else None


def encode_views(tokenizer, views: dict[str, str], settings: ViewSettings) -> dict[str, list[int]]:
    """Token ids of each view's prompt. With a chat template, every view must end with the same
    generation suffix (think block included): the teacher then scores the student's response
    tokens after the very prefix the student sampled them after (a UserError otherwise)."""
    prompts = {name: encode_prompt(tokenizer, text, settings) for name, text in views.items()}
    if settings.use_chat_template and len(views) > 1:
        suffixes = {name: generation_suffix(tokenizer, text, settings, prompts[name])
                    for name, text in views.items()}
        known = {name: tuple(s) for name, s in suffixes.items() if s is not None}
        if len(set(known.values())) > 1:
            shown = "; ".join(f"{name}: {tokenizer.decode(list(s))!r}" for name, s in known.items())
            raise UserError("the chat template ends the views' prompts differently (" + shown +
                            "): the teacher would score the student's response after another "
                            "prefix; use a template whose generation prompt does not depend on "
                            "the user's text, or views.use_chat_template: false")
    return prompts


def encode_response(tokenizer, text: str) -> list[int]:
    """Token ids of an oracle response (SFT), ending with the EOS the student must learn."""
    return list(tokenizer.encode(text, add_special_tokens=False)) + [tokenizer.eos_token_id]
