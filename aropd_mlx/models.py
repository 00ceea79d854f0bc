"""Models: load through mlx-lm, attach LoRA/DoRA, teacher modes, adapters in mlx-lm's format.

The teacher is a *parameter snapshot* of the trainable weights, swapped in for scoring:
- frozen: the adapters with the LoRA delta off (lora_b = 0, DoRA magnitudes at their start)
  -> exactly the base model, no second copy of the base weights in memory;
- ema: an exponential moving average of the adapters (the paper: mix-up 0.01 every step);
- a path: a separate model whose tokenizer and vocabulary must match the student's; its hidden
  size may differ, as its views are projected by its own output head (`Teacher.head`).

Full fine-tuning trains every weight, the output head included; a tied embedding trains
through both of its uses (fused.py gives the output side its gradient).

    model, tokenizer = load_student(ModelSettings(path="Qwen/Qwen2.5-0.5B-Instruct"))
    teacher = Teacher.create(model, tokenizer, ModelSettings(...))
    with teacher.active(model) as scorer: hidden = scorer.model(ids)
    logits = teacher.head(model)(hidden)                 # each view through its own model's head
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from aropd_mlx.errors import UserError
from aropd_mlx.jsonio import read_json
from aropd_mlx.head import OutputHead, head_from_model


@dataclass(frozen=True)
class ModelSettings:
    path: str = "lab"  # a Hub id, a local path, or "lab" for the built-in lab model
    fine_tune_type: str = "lora"  # lora | dora | full
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    lora_layers: int = -1  # the last layers that get adapters (full: that train) (-1: all)
    lora_keys: tuple[str, ...] | None = None  # None: mlx-lm's default (every Linear in a layer)
    teacher: str = "frozen"  # frozen | ema | PATH
    # EMA teacher: every step teacher <- (1 - m) teacher + m student, over the trainable
    # arrays; with LoRA that averages A and B separately (delta EMA(B)·EMA(A), not the paper's
    # EMA of the full weights; docs/METHOD.md)
    ema_mixup: float = 0.01
    trust_remote_code: bool = False
    adapter: str | None = None  # start from these adapters (a run directory or adapter dir)

    def validate(self) -> None:
        if self.fine_tune_type not in ("lora", "dora", "full"):
            raise UserError(f"model.fine_tune_type must be lora, dora or full, got {self.fine_tune_type!r}")
        if self.lora_rank < 1:
            raise UserError(f"model.lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0.0 < self.ema_mixup <= 1.0:
            raise UserError(f"model.ema_mixup must be in (0, 1], got {self.ema_mixup}")

    def lora_parameters(self) -> dict:
        params = {"rank": self.lora_rank, "scale": self.lora_scale, "dropout": self.lora_dropout}
        if self.lora_keys:
            params["keys"] = list(self.lora_keys)
        return params


def check_local_model(path: Path, trust_remote_code: bool) -> None:
    """What mlx-lm would fail on obscurely, said plainly: no config, an architecture it does not
    implement, tokenizer code from the repository (refused without --trust-remote-code)."""
    from mlx_lm.utils import _get_classes

    if not (path / "config.json").is_file():
        raise UserError(f"model path {path}: no config.json there (not a model directory)")
    config = read_json(path / "config.json")
    if "model_type" not in config:
        raise UserError("missing field 'model_type'", where=f"{path / 'config.json'}")
    try:
        _get_classes(config)
    except ValueError:
        custom = " (its auto_map points to custom modeling code)" if "auto_map" in config else ""
        raise UserError(f"model {path}: model_type {config['model_type']!r} is not an architecture "
                        f"mlx-lm implements{custom}; --trust-remote-code cannot help, mlx-lm runs "
                        "only its own architectures") from None
    tok_cfg = path / "tokenizer_config.json"
    if not trust_remote_code and tok_cfg.is_file() and "auto_map" in read_json(tok_cfg):
        raise UserError(f"model {path}: its tokenizer runs custom code from the model directory "
                        f"(auto_map in {tok_cfg.name}); pass --trust-remote-code if you trust it")


def _load_error(path: str, e: Exception) -> UserError:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    kind = type(e).__name__
    if "trust_remote_code" in text or "contains custom code" in text:
        return UserError(f"model {path} needs custom code from its repository; pass "
                         "--trust-remote-code if you trust it")
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "outgoing traffic has been disabled" in text:
        return UserError(f"model {path}: not a local directory, not in the local Hugging Face cache, "
                         "and the Hub cannot be reached (offline)")
    if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
        return UserError(f"model {path}: no such model on the Hub, or it is private/gated ({kind})")
    return UserError(f"cannot load model {path}: {text}")


def load_base(path: str, trust_remote_code: bool = False):
    """mlx_lm.load with one-line errors: a missing path, an unreachable Hub id, remote code."""
    from mlx_lm import load

    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local:
        check_local_model(local, trust_remote_code)
    try:
        return load(str(local) if looks_local else path,
                    tokenizer_config={"trust_remote_code": trust_remote_code})
    except UserError:
        raise
    except Exception as e:  # mlx-lm, transformers and huggingface_hub raise many kinds
        raise _load_error(path, e) from None


def attach_adapters(model: nn.Module, settings: ModelSettings, seed: int = 0) -> None:
    """Freeze the base and add trainable LoRA/DoRA layers (or unfreeze all for full).

    The adapters' random init is drawn from `seed`: the same run always starts the same."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(seed)
    model.freeze()
    if settings.fine_tune_type == "full":
        if any("scales" in m for _, m in model.named_modules()):  # QuantizedLinear/Embedding
            raise UserError("model.fine_tune_type full needs an unquantized base: this model is "
                            "quantized and its packed weights cannot be trained; use lora or dora")
        if settings.lora_layers >= 0:  # an mlx-lm config's num_layers: as mlx_lm.lora trains,
            n = settings.lora_layers   # its last n layers only (its slice: 0 is every layer)
            for layer in model.layers[-n:] if n else model.layers:
                layer.unfreeze()
            return
        # every weight trains, the output head included (fused.py gives a trainable head its
        # gradient, chunk by chunk): a tied embedding through both of its uses. A frozen
        # untied head would cap the logits at its random scale when training from scratch
        # (the lab's warm start: a uniformly underconfident model, LAB.md)
        model.unfreeze()
        return
    n_layers = len(model.layers) if settings.lora_layers < 0 else settings.lora_layers
    linear_to_lora_layers(model, n_layers, settings.lora_parameters(),
                          use_dora=settings.fine_tune_type == "dora")
    model.eval()  # new LoRA layers start in training mode: dropout only inside the update


def load_student(settings: ModelSettings, path: str | None = None, seed: int = 0):
    model, tokenizer = load_base(path or settings.path, settings.trust_remote_code)
    attach_adapters(model, settings, seed)
    if settings.adapter:
        load_adapter_weights(model, settings.adapter)
    return model, tokenizer


def trainable(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def hidden_states(model: nn.Module, inputs: mx.array) -> mx.array:
    """Final normed hidden states (B, L, H): everything the model does before its output head."""
    return model.model(inputs)


_CHECKPOINTED: dict[type, type] = {}
_DROPOUT_KEYS: dict[int, mx.array] = {}  # id(an nn.Dropout) -> its key, inside a checkpointed layer


class _KeyedDropout(nn.Dropout):
    """nn.Dropout whose mask comes from the key a checkpointed layer gave it: the backward's
    recomputation of the layer draws the very mask its forward drew (from the global generator
    it would draw another one, and the gradient would belong to no loss)."""

    def __call__(self, x: mx.array) -> mx.array:
        mask = mx.random.bernoulli(self._p_1, x.shape, key=_DROPOUT_KEYS[id(self)])
        return (mask * x) * (1 / self._p_1)


@contextmanager
def _keyed_dropouts(drops: list, keys: mx.array):
    for drop, key in zip(drops, keys):
        drop.__class__, _DROPOUT_KEYS[id(drop)] = _KeyedDropout, key
    try:
        yield
    finally:
        for drop in drops:
            drop.__class__ = nn.Dropout
            _DROPOUT_KEYS.pop(id(drop), None)


def _checkpointed_class(cls: type) -> type:
    """A subclass of a layer class whose __call__ runs under mx.checkpoint: the backward
    recomputes the layer's activations from its input instead of keeping them (mlx-lm's
    tuner.trainer.grad_checkpoint does the same by patching the class itself, which would
    reach every instance in the process: the teacher, other models). Dropout in the layer
    (model.lora_dropout, in training) draws its masks from keys drawn once per call, outside
    the recomputed function, so the recomputation repeats them."""
    if cls not in _CHECKPOINTED:
        call = cls.__call__

        def __call__(self, *args, **kwargs):
            drops = [m for _, m in self.named_modules()
                     if type(m) is nn.Dropout and m.training and m._p_1 < 1]
            keys = []  # a key is two uint32 words; drawn from the global generator
            if drops:
                base = mx.random.randint(0, 1 << 30, (2,)).astype(mx.uint32)
                keys = mx.random.split(base, len(drops))

            def inner(params, *args, **kwargs):
                self.update(params)
                with _keyed_dropouts(drops, keys):
                    return call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})
    return _CHECKPOINTED[cls]


@contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True):
    """Inside: the model's decoder layers (these instances only) recompute their activations
    in the backward (train.grad_checkpoint). Memory kept for the backward drops from every
    layer's activations to each layer's input, for about one more forward of compute."""
    layers = list(getattr(model, "layers", [])) if enabled else []
    saved = [layer.__class__ for layer in layers]
    try:
        for layer in layers:
            layer.__class__ = _checkpointed_class(layer.__class__)
        yield model
    finally:
        for layer, cls in zip(layers, saved):
            layer.__class__ = cls


def check_supported(model: nn.Module, tokenizer) -> None:
    """The fused loss needs logits = head(hidden): verify it on a few tokens, once."""
    if not hasattr(model, "model") or not hasattr(model.model, "embed_tokens"):
        raise UserError(f"unsupported architecture {type(model).__module__}: no model.embed_tokens")
    ids = mx.array([[tokenizer.eos_token_id or 0] * 3])
    direct = model(ids)
    via_head = head_from_model(model)(hidden_states(model, ids))
    if direct.shape != via_head.shape or not mx.allclose(direct, via_head, atol=1e-3, rtol=1e-3):
        raise UserError(f"unsupported architecture {type(model).__module__}: logits are not a "
                        "plain projection of the final hidden states (softcapping or scaling)")


@dataclass
class Teacher:
    """How the self-teacher scores: a parameter snapshot swapped into the student, or a model."""

    mode: str
    params: dict[str, mx.array] = field(default_factory=dict)
    model: nn.Module | None = None
    mixup: float = ModelSettings.ema_mixup

    @classmethod
    def create(cls, model, tokenizer, settings: ModelSettings) -> "Teacher":
        if settings.teacher == "frozen":
            snap = {k: (mx.zeros_like(v) if k.endswith("lora_b") else mx.array(v))
                    for k, v in trainable(model).items()}
            if settings.fine_tune_type == "dora" and settings.adapter:
                raise UserError("teacher: frozen with DoRA needs fresh adapters (no model.adapter)")
            if settings.fine_tune_type == "full" and settings.adapter:  # it would be the adapter's
                raise UserError("teacher: frozen is the base weights, and full fine-tuning from "
                                "model.adapter has replaced them; use teacher ema, a teacher "
                                "model, or no model.adapter")
            return cls("frozen", snap)
        if settings.teacher == "ema":
            return cls("ema", {k: mx.array(v) for k, v in trainable(model).items()},
                       mixup=settings.ema_mixup)
        try:
            other, other_tok = load_base(settings.teacher, settings.trust_remote_code)
        except UserError as e:
            raise UserError(f"teacher {settings.teacher!r} (model.teacher / --teacher: frozen, ema "
                            f"or a model): {e}") from None
        check_same_vocabulary(tokenizer, other_tok, model, other, settings.teacher)
        try:  # its views go through its own head: logits must be a plain projection there too
            check_supported(other, other_tok)
        except UserError as e:
            raise UserError(f"teacher {settings.teacher!r}: {e}") from None
        other.freeze()
        return cls("model", model=other)

    def head(self, student: nn.Module) -> OutputHead:
        """The head that projects the teacher's hidden states: a separate model's own head (over
        the student's ids: a head padded past the tokenizer is cut), or the snapshot's (the
        student's head unless it trains: a tied embedding, full fine-tune)."""
        vocab = head_from_model(student).vocab
        with self.active(student) as scorer:
            return head_from_model(scorer).first_rows(vocab)

    @contextmanager
    def active(self, student: nn.Module):
        """Yields the module to score with; the student's own weights are restored after."""
        if self.model is not None:
            yield self.model
            return
        saved = trainable(student)
        student.update(tree_unflatten(list(self.params.items())))
        try:
            yield student
        finally:
            student.update(tree_unflatten(list(saved.items())))

    def after_update(self, student: nn.Module) -> None:
        """EMA: teacher <- (1 - mixup) teacher + mixup student, after every optimizer step."""
        if self.mode != "ema":
            return
        current = trainable(student)
        m = self.mixup
        self.params = {k: (1 - m) * v + m * current[k] for k, v in self.params.items()}
        mx.eval(self.params)


def check_same_vocabulary(tok_a, tok_b, model_a, model_b, where: str) -> None:
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    ha, hb = head_from_model(model_a), head_from_model(model_b)
    if vocab_a != vocab_b:
        if len(vocab_a) != len(vocab_b):
            how = f"{len(vocab_b)} vs {len(vocab_a)} entries"
        else:
            token = next((t for t in sorted(vocab_a) if vocab_a[t] != vocab_b.get(t)), "?")
            how = f"same size, but {token!r} is id {vocab_b.get(token)} vs {vocab_a.get(token)}"
        raise UserError(f"teacher {where}: its tokenizer differs from the student's ({how}); "
                        "a separate teacher must share the vocabulary")
    # heads padded past the tokenizer (rows no token id reaches) may differ: the teacher's is cut
    # to the student's rows (Teacher.head); every id the tokenizer makes must lie in both
    if hb.vocab < ha.vocab or len(vocab_a) > ha.vocab:
        raise UserError(f"teacher {where}: output vocabulary {hb.vocab} rows against the "
                        f"student's {ha.vocab} (tokenizer: {len(vocab_a)} ids); the teacher's "
                        "head must cover every row of the student's")


def adapter_config(settings: ModelSettings, model: nn.Module) -> dict:
    n_layers = len(model.layers) if settings.lora_layers < 0 else settings.lora_layers
    return {"fine_tune_type": settings.fine_tune_type, "num_layers": n_layers,
            "lora_parameters": settings.lora_parameters(), "base_model": settings.path}


def save_adapters(directory: str | Path, model: nn.Module, settings: ModelSettings) -> None:
    """adapters.safetensors + adapter_config.json, loadable by mlx_lm (`--adapter-path`).

    Written to temporary names and renamed, so a crash never leaves a half-written adapter."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / "adapters.safetensors"
    tmp = directory / "adapters.tmp.safetensors"
    cfg_tmp = directory / "adapter_config.json.tmp"
    try:
        mx.save_safetensors(str(tmp), trainable(model))
        cfg_tmp.write_text(json.dumps(adapter_config(settings, model), indent=2))
        os.replace(tmp, weights)
        os.replace(cfg_tmp, directory / "adapter_config.json")
    except (OSError, RuntimeError) as e:  # a full disk is a RuntimeError from MLX
        tmp.unlink(missing_ok=True)
        cfg_tmp.unlink(missing_ok=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
        raise UserError(f"cannot write adapters to {directory}: {why} (checkpoints are intact; "
                        "free space, then --resume)") from None


def load_adapter_weights(model: nn.Module, directory: str | Path) -> None:
    path = Path(directory) / "adapters.safetensors"
    if not path.is_file():
        raise UserError(f"adapter {directory}: no adapters.safetensors there")
    try:
        weights = mx.load(str(path))
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(f"adapter {path} is unreadable ({str(e).strip() or type(e).__name__})") from None
    expected = trainable(model)
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise UserError(f"adapter {directory}: {unknown[0]} is not a trainable parameter of this "
                        "model (different rank, layers or base?)")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise UserError(f"adapter {directory}: {k} has shape {v.shape}, expected {expected[k].shape}")
    model.update(tree_unflatten(list(weights.items())))
