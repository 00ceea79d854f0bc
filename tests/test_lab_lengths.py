"""Every lab's problems fit the lengths its runs allow: a prompt past data.max_prompt_tokens is
skipped (batches.py), a response past rollout.max_new_tokens is cut, so a bound set too low
would quietly drop or cut a lab's longest problems."""
import pytest

from aropd_mlx.config import load_config
from aropd_mlx.data import Example
from aropd_mlx.lab import task
from aropd_mlx.lab.defaults import (NAMED_LABS, lab_max_new_tokens, lab_max_prompt_tokens,
                                    lab_response_tokens, lab_view_overrides, settings_from)
from aropd_mlx.lab.setup import LabSettings, eval_examples
from aropd_mlx.views import encode_response, encode_views, render_views


@pytest.fixture(scope="module")
def lab_tokenizer(tiny_llama):
    from mlx_lm import load

    return load(str(tiny_llama))[1]


@pytest.mark.parametrize("name", ["default", *NAMED_LABS])
def test_every_labs_longest_prompts_and_answers_fit_its_run_lengths(name, lab_tokenizer):
    settings = LabSettings() if name == "default" else settings_from(NAMED_LABS[name])
    views = load_config(overrides=lab_view_overrides(settings)).views
    longest = task.generate(64, settings.k_max, settings.k_max, seed=1,
                            with_outline=settings.with_outline,
                            outline_start=settings.student_sheet)
    examples = [Example(**e) for e in eval_examples(settings) + longest]
    prompt_room, answer_room = lab_max_prompt_tokens(settings.k_max), lab_max_new_tokens(settings.k_max)
    most = {"prompt": 0, "answer": 0}
    for ex in examples:
        ids = encode_views(lab_tokenizer, render_views(ex, views), views)
        most["prompt"] = max(most["prompt"], *map(len, ids.values()))
        answer = encode_response(lab_tokenizer, task.format_response(ex.solution.splitlines(),
                                                                     ex.answer))
        most["answer"] = max(most["answer"], len(answer))
        k = len(ex.solution.splitlines())
        assert len(answer) == lab_response_tokens(k), (name, ex.id)  # the buckets rest on it
    assert 0 < most["prompt"] <= prompt_room, (name, most)
    assert 0 < most["answer"] <= answer_room, (name, most)
