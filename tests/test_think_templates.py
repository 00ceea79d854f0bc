"""Chat templates that think (Qwen3-style): the student's and both teacher views' prompts end with
the same generation suffix, `<think>\\n\\n</think>\\n\\n` included when thinking is off, and the
teacher scores exactly the student's sampled tokens at the same response positions. Tested on a
tiny model given Qwen3's special tokens and a template with Qwen3's structure."""
import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from aropd_mlx.config import load_config
from aropd_mlx.data import Example
from aropd_mlx.errors import UserError
from aropd_mlx.models import Teacher, hidden_states, load_student
from aropd_mlx.rollout import RolloutSettings, sample
from aropd_mlx.scoring import build_inputs, response_hidden, score_views
from aropd_mlx.trainer import train
from aropd_mlx.views import ViewSettings, encode_views, generation_suffix, render_views

from helpers import lab_examples

ADDED = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's template, cut to what matters here: turns in <|im_start|>ROLE ... <|im_end|>, an
# assistant turn in the history loses its think block, and the generation prompt adds an empty
# think block when enable_thinking is false.
QWEN3_STYLE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + "
    "'<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set content = message.content %}"
    "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
EXAMPLE = Example(id="x", question="Q:3+4*2", answer="11",
                  solution="<think>\n4*2=8\n</think>\n\n3+8=11")  # a Qwen3-style oracle trace


def thinking_model(path, template=QWEN3_STYLE):
    """The tiny llama with Qwen3's four added tokens (embedding and head grown to match) and
    `template` as its chat template."""
    from aropd_mlx.lab.tiny import build_tiny_model
    from tokenizers import AddedToken, Tokenizer

    build_tiny_model(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ADDED[:2]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED[2:]])
    tok.save(str(path / "tokenizer.json"))
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "chat_template": template}))
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] += len(ADDED)
    (path / "config.json").write_text(json.dumps(config))
    w = load_file(str(path / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = (rng.standard_normal((len(ADDED), w[name].shape[1])) * 0.02).astype(np.float32)
        w[name] = np.concatenate([w[name], extra])
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def qwen3ish(tmp_path_factory):
    return thinking_model(tmp_path_factory.mktemp("qwen3ish"))


def _ids(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("thinking", [False, True, None])
def test_every_view_ends_with_the_same_generation_suffix(qwen3ish, thinking):
    """Thinking off: the suffix holds the empty think block; on (or the template's default):
    the bare assistant header, the model opens its own <think>."""
    model_cfg = load_config(overrides={"model.path": str(qwen3ish)}).model
    _, tok = load_student(model_cfg)
    args = None if thinking is None else {"enable_thinking": thinking}
    settings = ViewSettings(chat_template_args=args, system_prompt="Be brief.")
    texts = render_views(EXAMPLE, settings)
    prompts = encode_views(tok, texts, settings)
    expect = "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if thinking is False else "")
    suffix = _ids(tok, expect)
    assert [tok.decode([i]) for i in suffix[:1]] == ["<|im_start|>"]
    if thinking is False:  # the think tags are single tokens, as in Qwen3's vocabulary
        assert sum(i in suffix for i in tok.convert_tokens_to_ids(ADDED[2:])) == 2
    for name, p in prompts.items():
        assert p[-len(suffix):] == suffix, name
        assert generation_suffix(tok, texts[name], settings) == suffix, name
    # the privileged views really differ before the suffix (the reference's think block in them)
    assert len({tuple(p) for p in prompts.values()}) == 3
    assert "<think>" in tok.decode(prompts["full"][:-len(suffix)])


def test_the_teacher_scores_the_students_sampled_tokens_at_the_same_positions(qwen3ish):
    model_cfg = load_config(overrides={"model.path": str(qwen3ish)}).model
    model, tok = load_student(model_cfg)
    settings = ViewSettings(chat_template_args={"enable_thinking": False})
    prompts = encode_views(tok, render_views(EXAMPLE, settings), settings)
    resp = sample(model, tok, [prompts["student"]], RolloutSettings(group_size=3,
                  max_new_tokens=10), seed=0)
    tokens = np.array(resp.tokens)
    for name, p in prompts.items():
        ids, pos = build_inputs([p] * 3, tokens, resp.lengths)
        ids, pos = np.array(ids), np.array(pos)
        for i in range(3):
            n = resp.lengths[i]
            # the input after each gather position is the student's next sampled token
            assert pos[i, 0] == len(p) - 1 and list(ids[i, pos[i, 1:n]]) == list(tokens[i, :n - 1])
            assert list(ids[i, len(p):len(p) + n - 1]) == list(tokens[i, :n - 1]), name
    # response token 0 is predicted at the suffix's last token, in every view: the scored
    # hidden state equals the prompt's own last hidden state (the same prefix the student saw)
    scored = score_views(model, {v: [p] * 3 for v, p in prompts.items()}, tokens, resp.lengths)
    for name, p in prompts.items():
        last = hidden_states(model, mx.array([p]))[0, -1]
        np.testing.assert_allclose(np.array(scored[name][0, 0]), np.array(last), atol=1e-5)
    student = response_hidden(model, [prompts["student"]] * 3, tokens, resp.lengths)
    np.testing.assert_allclose(np.array(scored["student"]), np.array(student), atol=1e-5)


def test_rendering_the_response_through_the_template_would_not_reproduce_it(qwen3ish):
    """Why responses are appended as ids: rendered as an assistant turn, a thinking response
    loses its think block under Qwen3's template (the first response tokens change)."""
    _, tok = load_student(load_config(overrides={"model.path": str(qwen3ish)}).model)
    response = "<think>\nsum\n</think>\n\n3+8=11"
    rendered = tok.apply_chat_template([{"role": "user", "content": "Q"},
                                        {"role": "assistant", "content": response}])
    assert not set(tok.convert_tokens_to_ids(ADDED[2:])) & set(rendered)


def test_a_template_whose_generation_prompt_depends_on_the_text_is_refused(tmp_path):
    """A (made-up) template that opens a think block only for prompts holding a reference
    would put the student's tokens after another prefix under the teacher views."""
    template = ("{%- for message in messages %}{{- '<|im_start|>user\\n' + message.content + "
                "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                "{{- '<|im_start|>assistant\\n' }}{%- if 'example response' in messages[-1].content %}"
                "{{- '<think>\\n' }}{%- endif %}{%- endif %}")
    path = thinking_model(tmp_path / "m", template)
    _, tok = load_student(load_config(overrides={"model.path": str(path)}).model)
    settings = ViewSettings()
    with pytest.raises(UserError, match="ends the views' prompts differently.*student"):
        encode_views(tok, render_views(EXAMPLE, settings), settings)


def test_reserved_template_args_are_refused():
    with pytest.raises(UserError, match="views.chat_template_args.add_generation_prompt"):
        load_config(overrides={"views.chat_template_args": {"add_generation_prompt": False}})


def test_ar_opd_trains_on_a_thinking_template(qwen3ish, tmp_path):
    from helpers import tiny_config

    cfg = tiny_config(qwen3ish, tmp_path / "run", **{
        "views.chat_template_args": {"enable_thinking": False}, "train.steps": 2,
        "views.use_chat_template": True})
    model, tok = load_student(cfg.model)
    summary = train(cfg, model, tok, lab_examples(8), teacher=Teacher.create(model, tok, cfg.model))
    assert summary["steps_done"] == 2 and np.isfinite(summary["final_loss"])
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.views.chat_template_args == {"enable_thinking": False}
