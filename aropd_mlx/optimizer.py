"""The optimizer (AdamW, Adam, SGD, Adafactor or Muon, as mlx-lm's trainer offers them) with
the configured schedule, and its update compiled.

Why compiled: an eager AdamW update is a dozen separate elementwise passes over every trained
parameter (plus two for clipping). On a full fine-tune of the 56M bench model that was 0.62 s
per step on the CPU backend; one compiled function (clip, moments, weights) took 0.42 s
(mlx-lm's tuner compiles its step the same way, with the model's and the optimizer's state as
inputs and outputs). Parameter shapes never change, so it compiles once per run, whichever
optimizer: each keeps its whole state in `optimizer.state` (arrays only), which the checkpoint
writes as safetensors and a resume reads back.

    opt = make_optimizer(cfg); opt.init(model.trainable_parameters())
    step = OptimizerStep(model, opt, grad_clip=1.0)
    grads, norm = step.clip(grads)      # norm: an mx scalar (check it is finite on the host)
    step.apply(grads)                   # updates model and optimizer state in place

`train.optimizer` names it, `train.optimizer_config` holds its parameters under mlx's (and
mlx-lm's `optimizer_config`) names; `train.weight_decay` is the weight decay of every
optimizer that has one, `train.learning_rate` and its schedule the learning rate of all.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from aropd_mlx.errors import UserError

# name -> (mlx class, {parameter: its kind}, our defaults where they differ from mlx's, has
# weight decay). Kinds: float, int, bool, "pair" (two floats), "float?" (a float or null).
OPTIMIZERS = {
    # bias_correction True: torch's Adam(W) does it, and early steps are stable (PLATFORM.md)
    "adamw": (optim.AdamW, {"betas": "pair", "eps": float, "bias_correction": bool},
              {"bias_correction": True}, True),
    "adam": (optim.Adam, {"betas": "pair", "eps": float, "bias_correction": bool},
             {"bias_correction": True}, False),
    "sgd": (optim.SGD, {"momentum": float, "dampening": float, "nesterov": bool}, {}, True),
    # relative_step / scale_parameter off: the update follows train.learning_rate and its
    # schedule (mlx's defaults, relative steps, ignore the learning rate altogether)
    "adafactor": (optim.Adafactor, {"eps": "pair", "clip_threshold": float, "decay_rate": float,
                                    "beta_1": "float?", "scale_parameter": bool,
                                    "relative_step": bool, "warmup_init": bool},
                  {"relative_step": False, "scale_parameter": False}, True),
    "muon": (optim.Muon, {"momentum": float, "nesterov": bool, "ns_steps": int}, {}, True),
}


def _coerce(value, kind, key: str):
    """A YAML value as the parameter's kind, or a UserError naming the key."""
    if kind == "float?" and value is None:
        return None
    if kind == "pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise UserError(f"{key}: expected two numbers [a, b], got {value!r}")
        return tuple(_coerce(v, float, key) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, str):  # YAML 1.1 reads 1e-8 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise UserError(f"{key}: expected a finite number, got {value!r}")


def optimizer_kwargs(name: str, config: dict | None, weight_decay: float) -> dict:
    """The keyword arguments (besides the learning rate) of optimizer `name`: our defaults,
    then `config` (train.optimizer_config), checked by name and kind; a UserError otherwise."""
    if name not in OPTIMIZERS:
        raise UserError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    _, kinds, defaults, has_decay = OPTIMIZERS[name]
    kwargs = dict(defaults)
    for key, value in (config or {}).items():
        dotted = f"train.optimizer_config.{key}"
        if key == "weight_decay":
            raise UserError(f"{dotted}: the weight decay is train.weight_decay (one place for "
                            "every optimizer)")
        if key not in kinds:
            raise UserError(f"{dotted}: {name} has no parameter {key!r} (its parameters: "
                            f"{', '.join(kinds)})")
        kwargs[key] = _coerce(value, kinds[key], dotted)
    if has_decay:
        kwargs["weight_decay"] = weight_decay
    elif weight_decay:
        raise UserError(f"train.weight_decay={weight_decay}: {name} has no weight decay "
                        "(use adamw, or weight_decay 0)")
    if name == "sgd" and kwargs.get("nesterov") and (kwargs.get("momentum", 0.0) <= 0
                                                     or kwargs.get("dampening", 0.0) != 0):
        raise UserError("train.optimizer_config.nesterov: SGD's Nesterov momentum needs "
                        "momentum > 0 and dampening 0")
    return kwargs


def learning_rate(cfg):
    """The learning rate: cosine decay or constant, after a linear warm-up (a schedule of the
    optimizer's step, so it lives in the optimizer's state and resumes with it)."""
    t = cfg.train
    decay_steps = max(1, t.steps - t.warmup_steps)
    if t.lr_schedule == "cosine":
        lr = optim.cosine_decay(t.learning_rate, decay_steps, t.learning_rate * t.min_lr_ratio)
    else:
        lr = t.learning_rate
    if t.warmup_steps > 0:
        warm = optim.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
        lr = optim.join_schedules([warm, lr if callable(lr) else (lambda _: t.learning_rate)],
                                  [t.warmup_steps])
    return lr


def make_optimizer(cfg) -> optim.Optimizer:
    """train.optimizer with train.optimizer_config, the weight decay and the lr schedule."""
    t = cfg.train
    kwargs = optimizer_kwargs(t.optimizer, t.optimizer_config, t.weight_decay)
    return OPTIMIZERS[t.optimizer][0](learning_rate=learning_rate(cfg), **kwargs)


def _clip_or_norm(grads, max_norm: float):
    if max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    return grads, mx.sqrt(sum((v * v).sum() for _, v in tree_flatten(grads)))


class OptimizerStep:
    """Compiled gradient clipping and optimizer update for one (model, optimizer) pair.

    The update function captures `optimizer.state`; a restore that replaces that dict (a
    resumed run) is noticed and the function is compiled again for the new one."""

    def __init__(self, model, optimizer: optim.Optimizer, grad_clip: float):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.clip = mx.compile(partial(_clip_or_norm, max_norm=grad_clip))
        self._apply, self._for_state = None, None

    def apply(self, grads) -> None:
        if self._apply is None or self._for_state is not self.optimizer.state:
            model, opt = self.model, self.optimizer
            state = [model.state, opt.state]

            @partial(mx.compile, inputs=state, outputs=state)
            def update(g):
                opt.update(model, g)

            self._apply, self._for_state = update, opt.state
        self._apply(grads)
        mx.eval(self.model.parameters(), self.optimizer.state)


def optimizer_step(model, optimizer: optim.Optimizer, grad_clip: float) -> OptimizerStep:
    """The compiled step of this (model, optimizer), made on first use and kept on the
    optimizer itself (a table keyed by the optimizer would hold it, and the model, forever)."""
    step = getattr(optimizer, "_aropd_step", None)
    if step is None or step.model is not model or step.grad_clip != grad_clip:
        step = OptimizerStep(model, optimizer, grad_clip)
        optimizer._aropd_step = step
    return step
