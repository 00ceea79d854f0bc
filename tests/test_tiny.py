"""The tiny offline model builder: loads in mlx-lm and transformers, same log-probs."""
import json

import mlx.core as mx
import numpy as np
import pytest

from aropd_mlx.lab.tiny import TinySpec, build_tiny_model, char_vocab

TEXT = "Q:7+5*3-2 end\n"


def _mlx_logprobs(path, ids):
    from mlx_lm import load

    model, _ = load(str(path))
    logits = model(mx.array([ids])).astype(mx.float32)
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_mlx_and_transformers_agree(fixture, request):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = request.getfixturevalue(fixture)
    from mlx_lm import load

    _, tok = load(str(path))
    ids = tok.apply_chat_template([{"role": "user", "content": TEXT}], add_generation_prompt=True)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path))
    assert hf_tok(TEXT, add_special_tokens=False)["input_ids"] == tok.encode(TEXT)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0], -1).numpy()
    ours = _mlx_logprobs(path, ids)
    assert ours.shape == ref.shape == (len(ids), len(char_vocab()))
    assert np.abs(ours - ref).max() < 1e-4


def test_tokenizer_round_trip_and_chat_template(tiny_llama):
    from mlx_lm import load

    _, tok = load(str(tiny_llama))
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert len(tok.encode(TEXT)) == len(TEXT)  # one token per character
    ids = tok.apply_chat_template([{"role": "user", "content": "ab"}], add_generation_prompt=True)
    assert ids == [tok.bos_token_id] + tok.encode("ab\n")
    assert tok.eos_token_ids == {tok.eos_token_id} and tok.pad_token_id == 0


def test_deterministic_and_seed_sensitive(tmp_path):
    a = build_tiny_model(tmp_path / "a", TinySpec(seed=3))
    b = build_tiny_model(tmp_path / "b", TinySpec(seed=3))
    c = build_tiny_model(tmp_path / "c", TinySpec(seed=4))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_config_has_keys_both_libraries_need(tiny_qwen2):
    cfg = json.loads((tiny_qwen2 / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_theta", "tie_word_embeddings", "vocab_size", "eos_token_id"):
        assert key in cfg
    assert cfg["tie_word_embeddings"] is True and cfg["model_type"] == "qwen2"


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError):
        TinySpec(model_type="gpt2")
    with pytest.raises(ValueError):
        TinySpec(hidden=65, heads=4)
