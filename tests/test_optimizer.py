"""The compiled optimizer step against the eager mlx.optimizers reference."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from aropd_mlx.config import load_config
from aropd_mlx.optimizer import make_optimizer, optimizer_step


def _model(seed=0):
    mx.random.seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))


def _grads(model, k):
    r = np.random.default_rng(k)
    return tree_map(lambda p: mx.array(r.normal(size=p.shape).astype(np.float32) * 3),
                    model.trainable_parameters())


def _flat(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_compiled_step_equals_eager_adamw_with_schedule_and_clipping(clip):
    cfg = load_config(overrides={"train.steps": 6, "train.warmup_steps": 2,
                                 "train.learning_rate": 0.05, "train.weight_decay": 0.1,
                                 "train.grad_clip": clip})
    ours, ref = _model(), _model()
    opt_ours, opt_ref = make_optimizer(cfg), make_optimizer(cfg)
    opt_ours.init(ours.trainable_parameters())
    opt_ref.init(ref.trainable_parameters())
    step = optimizer_step(ours, opt_ours, clip)
    for k in range(5):
        g = _grads(ours, k)
        clipped, norm = step.clip(g)
        step.apply(clipped)
        want_norm = np.sqrt(sum(float((v * v).sum()) for _, v in tree_flatten(g)))
        assert float(norm) == pytest.approx(want_norm, rel=1e-5)
        opt_ref.update(ref, optim.clip_grad_norm(g, clip)[0] if clip else g)
        mx.eval(ref.parameters(), opt_ref.state)
        for name, v in _flat(ref).items():
            np.testing.assert_allclose(_flat(ours)[name], v, rtol=1e-5, atol=1e-6, err_msg=name)
    assert optimizer_step(ours, opt_ours, clip) is step  # kept: compiled once per run


def test_a_replaced_optimizer_state_is_followed():
    """A resume assigns optimizer.state a new dict: the compiled update must use it."""
    cfg = load_config(overrides={"train.learning_rate": 0.05})
    ours, ref = _model(), _model()
    opt_ours, opt_ref = make_optimizer(cfg), make_optimizer(cfg)
    opt_ours.init(ours.trainable_parameters())
    opt_ref.init(ref.trainable_parameters())
    step = optimizer_step(ours, opt_ours, 0.0)
    step.apply(_grads(ours, 0))
    opt_ref.update(ref, _grads(ref, 0))
    mx.eval(ref.parameters(), opt_ref.state)
    opt_ours.state = tree_map(lambda x: x, opt_ref.state)  # as trainer.restore does
    ours.update(ref.parameters())
    step.apply(_grads(ours, 1))
    opt_ref.update(ref, _grads(ref, 1))
    mx.eval(ref.parameters(), opt_ref.state)
    assert int(opt_ours.state["step"]) == 2
    for name, v in _flat(ref).items():
        np.testing.assert_allclose(_flat(ours)[name], v, rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_compiled_step_does_not_keep_model_and_optimizer_alive():
    import gc
    import weakref

    import mlx.nn as nn
    import mlx.optimizers as optim

    from aropd_mlx.optimizer import optimizer_step

    model = nn.Linear(4, 4)
    opt = optim.AdamW(1e-3)
    opt.init(model.trainable_parameters())
    assert optimizer_step(model, opt, 1.0) is optimizer_step(model, opt, 1.0)  # made once
    alive = weakref.ref(model)
    del model, opt
    gc.collect()
    assert alive() is None
