"""The output head: logits = h @ W.T, the one projection from hidden states to the vocabulary.

Its own small room because two layers need it: `fused` (the loss projects each view's hidden
states through that view's model's head) and `models` (which finds the head of a loaded model).
It sits below both, so imports go down the flow.

    head = head_from_model(model)        # lm_head, or the tied input embedding
    logits = head(hidden)                # (..., H) -> (..., V)

`trainable` says whether the loss must give the head a gradient: under full fine-tuning the
head trains (an untied lm_head, or a tied embedding through both of its uses); under LoRA it
is frozen, and a quantized head never trains.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class OutputHead:
    """The output projection: logits = h @ W.T, W float (V, H) or mx.quantize'd."""

    weight: mx.array  # (V, H) float, or packed (V, H * bits / 32) uint32 when quantized
    scales: mx.array | None = None  # quantized head when not None
    biases: mx.array | None = None
    group_size: int = 64
    bits: int = 4
    mode: str = "affine"
    trainable: bool = False  # the loss gives `weight` a gradient (float heads only)

    def __post_init__(self):
        if self.trainable and self.quantized:
            raise ValueError("a quantized output head cannot train")

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    def first_rows(self, n: int) -> "OutputHead":
        """The head over ids 0..n-1 only: a separate teacher whose head is padded past the
        tokenizer (Qwen2.5-7B's 152,064 rows against 0.5B's 151,936) scores the student's."""
        if n >= self.vocab:
            return self
        cut = (lambda a: None if a is None else a[:n])
        return replace(self, weight=self.weight[:n], scales=cut(self.scales), biases=cut(self.biases))

    def __call__(self, h: mx.array) -> mx.array:  # (..., H) -> (..., V)
        return project(h, self.arrays(), self.static_key(), transpose=True)

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.weight, self.scales, self.biases) if a is not None]

    def static_key(self) -> tuple:
        """What a compiled function must know that is not an array (part of its cache key)."""
        return (self.quantized, self.biases is not None, self.group_size, self.bits, self.mode)


def n_arrays(key: tuple) -> int:
    """How many arrays `OutputHead.arrays()` holds for a head with this static key."""
    quantized, has_biases = key[0], key[1]
    return 1 if not quantized else 2 + int(has_biases)


def project(h: mx.array, arrays, key: tuple, transpose: bool = True) -> mx.array:
    """head(h) (transpose=True) or h @ W (transpose=False: the backward of the head)."""
    quantized, has_biases, group_size, bits, mode = key
    if not quantized:
        return h @ arrays[0].T if transpose else h @ arrays[0]
    biases = arrays[2] if has_biases else None
    return mx.quantized_matmul(h, arrays[0], arrays[1], biases, transpose=transpose,
                               group_size=group_size, bits=bits, mode=mode)


def head_layer(model: nn.Module) -> nn.Module:
    """The layer that projects to the vocabulary: lm_head, or the input embedding when the
    model ties them."""
    layer = getattr(model, "lm_head", None)
    return model.model.embed_tokens if layer is None else layer


def head_from_model(model: nn.Module) -> OutputHead:
    """The model's output projection (lm_head, or the tied embedding), plain or quantized;
    `trainable` when its weight is among the model's trainable parameters."""
    layer = head_layer(model)
    if "scales" in layer:
        return OutputHead(weight=layer.weight, scales=layer.scales, biases=layer.get("biases"),
                          group_size=layer.group_size, bits=layer.bits,
                          mode=getattr(layer, "mode", "affine"))
    return OutputHead(weight=layer.weight, trainable="weight" in layer.trainable_parameters())
