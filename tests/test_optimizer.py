"""The compiled optimizer step against the eager mlx.optimizers reference, for every optimizer;
their configuration (train.optimizer, train.optimizer_config) and its errors."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from aropd_mlx.config import load_config
from aropd_mlx.errors import UserError
from aropd_mlx.optimizer import OPTIMIZERS, make_optimizer, optimizer_step

# Each optimizer with parameters that give it every piece of state it can have
SETTINGS = {
    "adamw": {"train.optimizer_config": {"betas": [0.8, 0.95], "eps": "1e-7"},
              "train.weight_decay": 0.1},
    "adam": {"train.optimizer_config": {"betas": [0.9, 0.99]}},
    "sgd": {"train.optimizer_config": {"momentum": 0.9, "nesterov": True},
            "train.weight_decay": 0.01},
    "adafactor": {"train.optimizer_config": {"beta_1": 0.9}, "train.weight_decay": 0.01},
    "muon": {"train.optimizer_config": {"momentum": 0.9, "ns_steps": 4},
             "train.weight_decay": 0.01},
}


def _model(seed=0):
    mx.random.seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))


def _grads(model, k):
    r = np.random.default_rng(k)
    return tree_map(lambda p: mx.array(r.normal(size=p.shape).astype(np.float32) * 3),
                    model.trainable_parameters())


def _flat(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("name,clip", [("adamw", 0.0)] + [(n, 1.0) for n in OPTIMIZERS])
def test_compiled_step_equals_eager_with_schedule_and_clipping(name, clip):
    cfg = load_config(overrides={"train.steps": 6, "train.warmup_steps": 2,
                                 "train.learning_rate": 0.05, "train.grad_clip": clip,
                                 "train.optimizer": name, **SETTINGS[name]})
    assert type(make_optimizer(cfg)) is OPTIMIZERS[name][0]
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


def test_optimizer_parameters_reach_the_mlx_optimizer():
    opt = make_optimizer(load_config(overrides={"train.optimizer": "adamw", **SETTINGS["adamw"]}))
    assert opt.betas == (0.8, 0.95) and opt.eps == 1e-7 and opt.weight_decay == 0.1
    assert opt.bias_correction  # torch's AdamW (PLATFORM.md); Adam too, unless set false
    opt = make_optimizer(load_config(overrides={"train.optimizer": "adam"}))
    assert opt.bias_correction and type(opt) is optim.Adam
    opt = make_optimizer(load_config(overrides={"train.optimizer": "adafactor"}))
    assert not opt.relative_step and not opt.scale_parameter  # follows train.learning_rate
    opt = make_optimizer(load_config(overrides={"train.optimizer": "muon",
                                                "train.weight_decay": 0.0}))
    assert opt.weight_decay == 0.0 and opt.momentum == 0.95  # ours, then mlx's defaults


@pytest.mark.parametrize("overrides,words", [
    ({"train.optimizer": "lion"}, ["train.optimizer", "adamw", "muon"]),
    ({"train.optimizer": "sgd", "train.optimizer_config": {"betas": [0.9, 0.9]}},
     ["train.optimizer_config.betas", "momentum"]),
    ({"train.optimizer_config": {"eps": "tiny"}}, ["train.optimizer_config.eps", "number"]),
    ({"train.optimizer_config": {"betas": [0.9]}}, ["train.optimizer_config.betas", "two"]),
    ({"train.optimizer_config": {"weight_decay": 0.1}}, ["train.weight_decay"]),
    ({"train.optimizer": "adam", "train.weight_decay": 0.1}, ["adam", "weight decay"]),
    ({"train.optimizer": "muon", "train.optimizer_config": {"ns_steps": 2.5}},
     ["ns_steps", "integer"]),
    ({"train.optimizer": "sgd", "train.optimizer_config": {"nesterov": True}}, ["momentum > 0"]),
])
def test_bad_optimizer_settings_name_the_key(overrides, words):
    with pytest.raises(UserError) as e:
        load_config(overrides=overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_optimizer_config_from_yaml(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  optimizer: adafactor\n  optimizer_config:\n"
                                       "    eps: [1e-30, 1e-3]\n    relative_step: true\n")
    cfg = load_config(tmp_path / "run.yaml")
    opt = make_optimizer(cfg)
    assert opt.eps == (1e-30, 1e-3) and opt.relative_step
