"""The torch side of the parity harness: the same Hugging Face checkpoint through transformers,
a LoRA mirror of mlx-lm's `LoRALinear`, adapters saved by an aropd-mlx run, scoring of the
student view and the teacher views, and the loss through the torch mirror of the objective.

Everything runs in float32 with `attn_implementation="eager"` (PLATFORM.md, "torch parity").
The frozen self-teacher is the base model: every LoRA layer switched off.

    student = TorchStudent.load("/path/to/model", adapter="runs/lab", device="cpu")
    out = student.step(prompts, tokens, mask, lengths, views=("partial", "full"), settings=s)
    out.loss, out.per_token, out.grads["model.layers.0.self_attn.q_proj.lora_a"]

Shapes: N rows, T response positions, V vocabulary, H hidden size.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aropd_mlx.backends.torch import objective as tobj
from aropd_mlx.errors import UserError
from aropd_mlx.jsonio import read_json


# ----------------------------------------------------------------------------- LoRA mirror

class LoRALinear(nn.Module):
    """mlx-lm's LoRALinear in torch: y = linear(x) + scale * (dropout(x) @ lora_a) @ lora_b,
    lora_a (in, r), lora_b (r, out). Parameter names match mlx-lm's (`linear`, `lora_a`,
    `lora_b`), so adapter keys load by name. `enabled = False` gives the base layer exactly."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        self.enabled = True
        out_dims, in_dims = linear.weight.shape
        kw = {"dtype": linear.weight.dtype, "device": linear.weight.device}
        self.lora_a = nn.Parameter(torch.zeros(in_dims, rank, **kw))
        self.lora_b = nn.Parameter(torch.zeros(rank, out_dims, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if not self.enabled:
            return y
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b
        return y + (self.scale * z).to(x.dtype)


@dataclass(frozen=True)
class LoraSpec:
    """What adapter_config.json says (mlx-lm's format, also written by aropd-mlx)."""

    rank: int = 8
    scale: float = 20.0
    dropout: float = 0.0
    num_layers: int = -1  # the last `num_layers` transformer layers; -1 here means all
    keys: tuple[str, ...] | None = None  # None: mlx-lm's default (every linear of a layer)

    @classmethod
    def from_adapter_config(cls, config: dict, where: str = "adapter_config.json") -> "LoraSpec":
        kind = config.get("fine_tune_type", "lora")
        if kind != "lora":
            raise UserError(f"{where}: fine_tune_type {kind!r}; parity supports LoRA adapters only")
        p = config.get("lora_parameters") or {}
        try:
            keys = p.get("keys")
            return cls(rank=int(p["rank"]), scale=float(p["scale"]),
                       dropout=float(p.get("dropout", 0.0)),
                       num_layers=int(config.get("num_layers", -1)),
                       keys=tuple(keys) if keys else None)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: lora_parameters needs rank and scale ({e})") from None


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / "adapter_config.json"
    if not path.is_file():
        raise UserError(f"adapter {directory}: no adapter_config.json there")
    return read_json(path)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"parity: {type(model).__name__} has no model.layers (unsupported)")
    return layers


def lora_targets(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the modules mlx-lm's `linear_to_lora_layers` turns into LoRA layers.

    mlx-lm's rule: the keys (module paths inside one transformer layer) default to every
    Linear/Embedding found in any layer; they apply to `layers[-max(num_layers, 0):]` (so 0
    also means all). A key naming a module outside the layers (e.g. lm_head) is refused: the
    fused loss needs a plain output head."""
    layers = _decoder_layers(model)
    keys = set(spec.keys) if spec.keys else {
        name for layer in layers for name, m in layer.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding))}
    outside = sorted(k for k in keys if k in dict(model.named_modules()))
    if outside:
        raise UserError(f"parity: LoRA on {outside[0]} (outside the transformer layers) "
                        "is not supported")
    n, count = len(layers), max(spec.num_layers, 0)
    first = max(n - count, 0) if count else 0  # mlx-lm slices layers[-count:], and [-0:] is all
    return [f"model.layers.{i}.{name}" for i in range(first, n)
            for name, m in layers[i].named_modules() if name in keys]


def attach_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Replace the target linears by LoRALinear (zero lora weights); returns their names."""
    targets = lora_targets(model, spec)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise UserError(f"parity: LoRA on {name} ({type(base).__name__}) is not supported")
        setattr(parent, child, LoRALinear(base, spec.rank, spec.scale, spec.dropout))
    return targets


# ----------------------------------------------------------------------------- loading

def resolve_device(device: str) -> str:
    """"auto" = cuda when torch sees one, else cpu; an unavailable "cuda" is a UserError."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda: torch sees no CUDA device here (use --device cpu)")
    if device not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def load_hf_model(path: str, device: str = "cpu") -> nn.Module:
    """The checkpoint through transformers, float32, eager attention, eval mode, frozen."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager")
    except Exception as e:  # transformers raises many types; the user needs one line
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"transformers cannot load {path}: {text}") from None
    model.requires_grad_(False)
    return model.to(device).eval()


@contextmanager
def exact_float32():
    """No TF32 on CUDA inside the block (the default for matmuls is already off; be explicit)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class TorchStep:
    """One step's results on the torch side, as numpy float32 arrays."""

    logprobs: dict[str, np.ndarray]  # view -> (N, T) log-prob of each response token
    target: np.ndarray | None  # (N, T) target log-prob of each response token (None: no teacher)
    per_token: np.ndarray  # (N, T) masked per-token loss
    loss: float
    grads: dict[str, np.ndarray]  # trained parameter name (LoRA, or every weight) -> gradient


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy()


def _torch_settings(settings):
    """The objective settings in the torch mirror's own type, when it defines one."""
    cls = getattr(tobj, "ObjectiveSettings", None)
    if cls is None or isinstance(settings, cls):
        return settings
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in asdict(settings).items() if k in names})


# ----------------------------------------------------------------------------- the student

class TorchStudent:
    """A transformers model with the LoRA mirror attached; the teacher is the same model with
    LoRA off (the frozen self-teacher).

    `full=True` mirrors full fine-tuning instead: no LoRA, every weight trains (a tied head
    through both of its uses), and the frozen teacher is the model's weights as loaded (at
    step 0: the student itself)."""

    def __init__(self, model: nn.Module, spec: LoraSpec | None, device: str, full: bool = False):
        self.model, self.spec, self.device, self.full = model, spec, device, full
        self.targets = [] if full else attach_lora(model, spec)
        if full:
            model.requires_grad_(True)
            # torch's padding_idx drops the pad row's lookup gradient; mlx-lm's embedding has
            # no such rule (a sampled pad id is an input like any other): mirror mlx-lm
            model.get_input_embeddings().padding_idx = None
        self.model.to(device)

    @classmethod
    def load_full(cls, path: str, device: str = "cpu") -> "TorchStudent":
        """The checkpoint for a full fine-tune (see the class docstring)."""
        return cls(load_hf_model(path, resolve_device(device)), None, resolve_device(device),
                   full=True)

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """What the step differentiates: the LoRA weights, or every trainable weight (full)."""
        if self.full:
            return {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return self.lora_parameters()

    @classmethod
    def load(cls, path: str, adapter: str | Path | None = None, device: str = "cpu",
             spec: LoraSpec | None = None, dropout: float | None = 0.0) -> "TorchStudent":
        """`adapter`: a directory with adapters.safetensors + adapter_config.json; its config
        decides the LoRA layout (else `spec`, else mlx-lm's defaults). `dropout` overrides the
        config's (0.0 by default: parity compares deterministic passes; None keeps it)."""
        device = resolve_device(device)
        if adapter is not None:
            spec = LoraSpec.from_adapter_config(read_adapter_config(adapter),
                                                f"{adapter}/adapter_config.json")
        spec = spec or LoraSpec()
        if dropout is not None:
            spec = LoraSpec(**{**asdict(spec), "dropout": dropout})
        student = cls(load_hf_model(path, device), spec, device)
        if adapter is not None:
            student.load_adapter(adapter)
        return student

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters()
                if n.endswith((".lora_a", ".lora_b"))}

    def load_adapter(self, directory: str | Path) -> None:
        """Load adapters.safetensors (mlx-lm names) into the LoRA layers; the saved names must
        be exactly the LoRA parameters mlx-lm's rule gives for this config."""
        from safetensors.torch import load_file

        path = Path(directory) / "adapters.safetensors"
        if not path.is_file():
            raise UserError(f"adapter {directory}: no adapters.safetensors there")
        self.set_lora_weights({k: v.float().numpy() for k, v in load_file(str(path)).items()},
                              where=f"adapter {directory}")

    def set_lora_weights(self, weights: dict[str, np.ndarray], where: str = "adapter") -> None:
        params = self.lora_parameters()
        extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
        if extra or missing:
            name, what = (extra[0], "is not a LoRA parameter here") if extra else \
                (missing[0], "is missing")
            raise UserError(f"{where}: {name} {what} (LoRA layers differ from mlx-lm's rule?)")
        with torch.no_grad():
            for k, v in weights.items():
                if tuple(v.shape) != tuple(params[k].shape):
                    raise UserError(f"{where}: {k} has shape {tuple(v.shape)}, "
                                    f"expected {tuple(params[k].shape)}")
                params[k].copy_(torch.as_tensor(np.asarray(v, np.float32)))
                params[k].requires_grad_(True)

    @contextmanager
    def lora_disabled(self):
        """The frozen teacher: every LoRA layer off, so the model is exactly the base."""
        layers = [m for m in self.model.modules() if isinstance(m, LoRALinear)]
        for m in layers:
            m.enabled = False
        try:
            yield self.model
        finally:
            for m in layers:
                m.enabled = True

    def response_logits(self, prompts: list[list[int]], tokens: np.ndarray,
                        lengths: list[int], pad_id: int = 0) -> torch.Tensor:
        """(N, T, V) logits predicting each response token; row i's token t is predicted at
        position len(prompt_i) - 1 + t of `prompt_i + response_i[:-1]` (right-padded; with a
        causal mask the padding never reaches earlier positions, so no attention mask)."""
        n, t = tokens.shape
        rows = [list(p) + [int(x) for x in tokens[i, :max(lengths[i] - 1, 0)]]
                for i, p in enumerate(prompts)]
        width = max(1, max(len(p) for p in prompts) + t - 1)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        starts = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)
        where = (starts[:, None] + torch.arange(t)[None, :]).clamp(max=width - 1)  # (N, T)
        hidden = self.model.model(input_ids=ids.to(self.device)).last_hidden_state  # (N, L, H)
        index = where.to(self.device)[:, :, None].expand(-1, -1, hidden.shape[-1])
        picked = torch.gather(hidden, 1, index)  # (N, T, H)
        return self.model.get_output_embeddings()(picked).float()  # (N, T, V)

    def step(self, prompts: dict[str, list[list[int]]], tokens: np.ndarray, mask: np.ndarray,
             lengths: list[int], views: tuple[str, ...], settings, pad_id: int = 0) -> TorchStep:
        """Score the student (LoRA on, `prompts["student"]`) and the teacher `views` (LoRA off,
        no grad), take the loss from the torch mirror's `naive_loss` and its LoRA gradients.
        views: () for SFT, (anchor,) for single-view OPD, ("partial", "full") for AR-OPD."""
        tok = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=self.device)
        msk = torch.as_tensor(np.asarray(mask), dtype=torch.float32, device=self.device)
        params = self.trained_parameters()
        for p in params.values():
            p.grad = None
        with exact_float32():
            teacher = {}
            with torch.no_grad(), self.lora_disabled():
                for v in views:
                    teacher[v] = self.response_logits(prompts[v], tokens, lengths, pad_id)
            student = self.response_logits(prompts["student"], tokens, lengths, pad_id)
            out = tobj.naive_loss(student, tok, msk, teacher.get(views[0]) if views else None,
                                  teacher.get(views[1]) if len(views) > 1 else None,
                                  settings=_torch_settings(settings))
            out.loss.backward()
        logprobs = {"student": _gather_logprobs(student, tok)}
        logprobs.update({f"teacher:{v}": _gather_logprobs(x, tok) for v, x in teacher.items()})
        target = _target_at_tokens(out, [teacher[v] for v in views], tok, settings)
        grads = {k: _numpy(p.grad) if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
                 for k, p in params.items()}
        return TorchStep(logprobs=logprobs, target=None if target is None else _numpy(target),
                         per_token=_numpy(out.per_token), loss=float(out.loss.item()), grads=grads)


def _gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """(N, T) log_softmax(logits) at each response token, without gradient."""
    with torch.no_grad():
        return _numpy(torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0])


def _target_at_tokens(out, teacher_logits: list[torch.Tensor], tokens: torch.Tensor,
                      settings) -> torch.Tensor | None:
    """(N, T) target log-prob of each response token: the mirror's "target_logprob"
    diagnostic, else rebuilt from its public target function (no teacher view: None)."""
    if not teacher_logits:
        return None
    if "target_logprob" in (getattr(out, "diagnostics", None) or {}):
        return out.diagnostics["target_logprob"]
    tau = settings.teacher_temperature
    with torch.no_grad():
        if len(teacher_logits) == 1:
            target = torch.log_softmax(teacher_logits[0].float() / tau, -1)
        else:  # log_softmax(x / tau) is what the teacher temperature means for each view
            target = tobj.anchored_residual_target(teacher_logits[0].float() / tau,
                                                   teacher_logits[1].float() / tau,
                                                   lam=settings.lam, clip=settings.clip)
        return target.gather(-1, tokens[..., None])[..., 0]
