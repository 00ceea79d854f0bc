"""Gradient checkpointing of the student's layers (train.grad_checkpoint, models.py): the same
gradients as the plain backward, on these layer instances only (never the teacher's model)."""
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm import load

from aropd_mlx.fused import fused_loss
from aropd_mlx.head import head_from_model
from aropd_mlx.models import ModelSettings, attach_adapters, checkpointed_layers
from aropd_mlx.objective import ObjectiveSettings
from aropd_mlx.scoring import response_hidden

from helpers import float32_tolerance


def _grads(model, checkpoint: bool):
    rng = np.random.default_rng(0)
    prompts = [[1] + rng.integers(3, 95, size=n).tolist() for n in (3, 6, 4)]
    tokens = rng.integers(3, 95, size=(3, 9)).astype(np.int32)
    lengths = [9, 5, 7]
    mask = mx.array((np.arange(9)[None] < np.array(lengths)[:, None]).astype(np.float32))
    settings = ObjectiveSettings(loss_type="nll", skip_first_tokens=0)

    def loss_fn(m):
        h = response_hidden(m, prompts, tokens, lengths)
        out = fused_loss(h, head_from_model(m), mx.array(tokens), mask, settings=settings,
                         diagnostics=False)
        return out.loss

    with checkpointed_layers(model, checkpoint):
        loss, g = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, g)
    return float(loss), {k: np.array(v) for k, v in tree_flatten(g)}


@pytest.mark.parametrize("fine_tune", ["lora", "full"])
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_qwen2"])
def test_checkpointed_gradients_equal_plain_ones(which, fine_tune, request):
    path = request.getfixturevalue(which)
    model, _ = load(str(path))
    attach_adapters(model, ModelSettings(fine_tune_type=fine_tune, lora_rank=4), seed=0)
    if fine_tune == "lora":  # non-zero lora_b, so the adapters are on the path
        mx.random.seed(1)
        model.update(tree_map(lambda v: v + 0.1 * mx.random.normal(v.shape),
                              model.trainable_parameters()))
    loss0, plain = _grads(model, False)
    loss1, ckpt = _grads(model, True)
    assert set(plain) == set(ckpt) and plain
    assert any(np.abs(v).max() > 0 for v in plain.values())
    assert abs(loss0 - loss1) <= float32_tolerance(64, 128, 99)
    for k, v in plain.items():
        tol = float32_tolerance(64, 128, 99, 16, magnitude=float(np.abs(v).max()))
        np.testing.assert_allclose(ckpt[k], v, rtol=0, atol=tol, err_msg=k)


def test_checkpointing_touches_these_instances_only(tiny_llama):
    student, _ = load(str(tiny_llama))
    other, _ = load(str(tiny_llama))
    cls = type(student.layers[0])
    with checkpointed_layers(student):
        assert type(student.layers[0]) is not cls and isinstance(student.layers[0], cls)
        assert type(other.layers[0]) is cls  # the teacher / other models: untouched
        assert cls.__call__ is type(other.layers[0]).__call__
    assert all(type(layer) is cls for layer in student.layers)  # restored on exit
    with checkpointed_layers(student, enabled=False):
        assert type(student.layers[0]) is cls


def test_checkpointed_layers_recompute_the_dropout_masks_their_forward_drew(tiny_llama, monkeypatch):
    """LoRA dropout under checkpointing: the backward recomputes each layer; its masks must be
    the forward's, or the gradient belongs to no loss (measured before the fix: 340% off). The
    reference is the same keyed masks with the recomputation turned off (mx.checkpoint as the
    identity), at one seed."""
    import aropd_mlx.models as models

    model, _ = load(str(tiny_llama))
    attach_adapters(model, ModelSettings(lora_rank=4, lora_dropout=0.3), seed=0)
    mx.random.seed(1)
    model.update(tree_map(lambda v: v + 0.1 * mx.random.normal(v.shape),
                          model.trainable_parameters()))

    def run(train: bool):
        model.train(train)
        mx.random.seed(7)
        try:
            return _grads(model, True)
        finally:
            model.eval()

    loss_eval, _ = run(False)
    loss, ckpt = run(True)
    assert abs(loss - loss_eval) > 1e-3  # dropout is on the path
    drops = [m for _, m in model.named_modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is nn.Dropout for m in drops) and not models._DROPOUT_KEYS
    monkeypatch.setattr(models.mx, "checkpoint", lambda fn: fn)
    loss_ref, ref = run(True)
    assert loss == loss_ref  # the same masks
    for k, v in ref.items():
        tol = float32_tolerance(64, 128, 99, 16, magnitude=float(np.abs(v).max()))
        np.testing.assert_allclose(ckpt[k], v, rtol=0, atol=tol, err_msg=k)
