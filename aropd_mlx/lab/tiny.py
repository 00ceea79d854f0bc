"""Tiny offline causal LMs in Hugging Face format, built from a seed.

Every test and the built-in lab use these: a character-level tokenizer made with the
`tokenizers` library (bos/eos/pad and a chat template) and a llama- or qwen2-type model whose
config.json carries the keys both mlx-lm and transformers need, weights in model.safetensors.
Nothing is downloaded. `mlx_lm.load(path)` and `transformers.AutoModelForCausalLM` both load it.

    from aropd_mlx.lab.tiny import TinySpec, build_tiny_model
    build_tiny_model("/tmp/tiny", TinySpec(model_type="qwen2", hidden=64, layers=2))
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)

# The template emits the BOS itself (apply_chat_template tokenizes without special tokens).
# A user turn is its text plus a newline; an assistant turn is its text plus the EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Architecture of a tiny model. Defaults give ~0.1M parameters (fast in tests)."""

    model_type: str = "llama"  # "llama" | "qwen2"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_position: int = 2048
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if self.model_type not in ("llama", "qwen2"):
            raise ValueError(f"model_type must be 'llama' or 'qwen2', got {self.model_type!r}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide by heads and heads by kv_heads")


def char_vocab() -> list[str]:
    """Special tokens, then newline and the printable ASCII characters (ids are stable)."""
    chars = ["\n"] + [c for c in string.printable if c.isprintable() and c not in "\t\r\x0b\x0c"]
    return list(SPECIAL_TOKENS) + sorted(set(chars), key=chars.index)


def _byte_symbol(char: str) -> str:
    """The byte-level BPE symbol of an ASCII character (GPT-2's map: bytes <= 32 shift by 256).

    Byte-level symbols make the tokenizer behave the same whether transformers uses it as is
    (llama) or re-applies Qwen's byte-level pre-tokenizer on top of it (qwen2)."""
    b = ord(char)
    return chr(256 + b) if b <= 32 or b == 127 else char


def _tokenizer_json(vocab: list[str]) -> dict:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ids = {(t if t in SPECIAL_TOKENS else _byte_symbol(t)): i for i, t in enumerate(vocab)}
    # Byte-level BPE with no merges over single characters = a character tokenizer.
    tok = Tokenizer(models.BPE(vocab=ids, merges=[], unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return json.loads(tok.to_str())


def _config(spec: TinySpec, vocab_size: int) -> dict:
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[spec.model_type]
    cfg = {
        "model_type": spec.model_type,
        "architectures": [arch],
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.hidden // spec.heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": spec.max_position,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,  # top level: mlx-lm reads only this key
        "tie_word_embeddings": spec.tie_word_embeddings,  # explicit: the two libraries' defaults differ
        "hidden_act": "silu",
        "attention_bias": spec.model_type == "qwen2",
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if spec.model_type == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=spec.layers)
    return cfg


def _weights(spec: TinySpec, vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    hd = spec.hidden // spec.heads

    def normal(*shape):
        return (rng.standard_normal(shape) * spec.init_std).astype(np.float32)

    def norm():  # near one, not exactly: a layout bug in norms must show in tests
        return (1.0 + 0.1 * rng.standard_normal(spec.hidden)).astype(np.float32)

    w = {"model.embed_tokens.weight": normal(vocab_size, spec.hidden)}
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = normal(spec.heads * hd, spec.hidden)
        w[p + "self_attn.k_proj.weight"] = normal(spec.kv_heads * hd, spec.hidden)
        w[p + "self_attn.v_proj.weight"] = normal(spec.kv_heads * hd, spec.hidden)
        w[p + "self_attn.o_proj.weight"] = normal(spec.hidden, spec.heads * hd)
        if spec.model_type == "qwen2":
            w[p + "self_attn.q_proj.bias"] = normal(spec.heads * hd)
            w[p + "self_attn.k_proj.bias"] = normal(spec.kv_heads * hd)
            w[p + "self_attn.v_proj.bias"] = normal(spec.kv_heads * hd)
        w[p + "mlp.gate_proj.weight"] = normal(spec.intermediate, spec.hidden)
        w[p + "mlp.up_proj.weight"] = normal(spec.intermediate, spec.hidden)
        w[p + "mlp.down_proj.weight"] = normal(spec.hidden, spec.intermediate)
    w["model.norm.weight"] = norm()
    if not spec.tie_word_embeddings:
        w["lm_head.weight"] = normal(vocab_size, spec.hidden)
    return w


def write_tokenizer(path: str | Path) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = char_vocab()
    (path / "tokenizer.json").write_text(json.dumps(_tokenizer_json(vocab), ensure_ascii=False))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def build_tiny_model(path: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a complete HF-format model directory at `path` (deterministic from spec.seed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = len(char_vocab())
    write_tokenizer(path)
    (path / "config.json").write_text(json.dumps(_config(spec, vocab_size), indent=2))
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    save_file(_weights(spec, vocab_size), str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "aropd_tiny_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return path
