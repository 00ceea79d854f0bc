"""What trains under each fine-tuning type (models.attach_adapters) and which teacher settings are
refused (models.Teacher.create): a quantized base cannot be fully fine-tuned, full fine-tuning
of an mlx-lm config's last `num_layers` trains those layers only, and a frozen teacher under full
fine-tuning from saved weights would not be the base."""
import mlx.nn as nn
import pytest
from mlx_lm import load

from aropd_mlx.errors import UserError
from aropd_mlx.models import ModelSettings, Teacher, attach_adapters, trainable


def test_full_fine_tuning_of_a_quantized_base_is_one_clear_error(tiny_llama):
    model, _ = load(str(tiny_llama))
    nn.quantize(model, group_size=32, bits=4)
    with pytest.raises(UserError, match="needs an unquantized base"):
        attach_adapters(model, ModelSettings(path="x", fine_tune_type="full"))
    model, _ = load(str(tiny_llama))
    nn.quantize(model, group_size=32, bits=4)
    attach_adapters(model, ModelSettings(path="x", fine_tune_type="lora", lora_rank=2))
    assert trainable(model) and all("lora" in k for k in trainable(model))  # LoRA: as before


def test_full_fine_tuning_of_the_last_layers_as_mlx_lm_trains_them(tiny_llama):
    model, _ = load(str(tiny_llama))
    last = len(model.layers) - 1
    attach_adapters(model, ModelSettings(path="x", fine_tune_type="full", lora_layers=1))
    assert trainable(model) and {k.split(".")[2] for k in trainable(model)} == {str(last)}
    assert all(k.startswith(f"model.layers.{last}.") for k in trainable(model))
    model, _ = load(str(tiny_llama))
    attach_adapters(model, ModelSettings(path="x", fine_tune_type="full"))  # -1: every weight
    names = set(trainable(model))
    assert any("embed_tokens" in k for k in names) and any("norm" in k and "layers" not in k
                                                           for k in names)


def test_a_frozen_teacher_from_full_weights_is_refused(tiny_llama):
    model, tok = load(str(tiny_llama))
    settings = ModelSettings(path="x", fine_tune_type="full", adapter="runs/somewhere")
    attach_adapters(model, settings)
    with pytest.raises(UserError, match="frozen is the base weights"):
        Teacher.create(model, tok, settings)
    assert Teacher.create(model, tok, ModelSettings(path="x", fine_tune_type="full",
                                                    adapter="runs/x", teacher="ema")).mode == "ema"
