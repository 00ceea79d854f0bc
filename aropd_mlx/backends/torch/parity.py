"""The parity harness: one training step's numbers from MLX and from the torch mirror.

One batch is drawn once, on the MLX side, exactly as the trainer draws it (on-policy samples
from `aropd_mlx.rollout.sample`, or the oracle traces for SFT); the same token ids are then
replayed in both backends. MLX runs the trainer's path (scoring.score_views for the teacher
views under the frozen teacher, the fused loss, nn.value_and_grad over the LoRA parameters);
torch runs transformers (float32, eager attention), the LoRA mirror and the mirror's
`naive_loss` with autograd. Compared: per-token log-probs of the student and of each teacher
view at the response tokens, the target log-probs, the per-token loss, the loss and every
LoRA gradient.

    report = run_parity("/path/to/model", adapter="runs/lab", method="ar-opd")
    print(format_parity(report)); report["pass"]

    python -c "from aropd_mlx.backends.torch.parity import *; from aropd_mlx.lab.tiny import \
build_tiny_model as b; print(format_parity(run_parity(str(b('/tmp/tiny')))))"

Differences (torch is the reference): "abs" = max |mlx - torch|; "rel" = that divided by the
max |torch| of the same tensor (for the loss: by |torch loss|). Log-probs compare only at
response tokens (mask = 1); masked per-token losses are 0 on both sides.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from aropd_mlx.errors import UserError
from aropd_mlx.views import METHODS

# fp32 limits: log-probs absolute, losses relative, gradients relative to the tensor's max |g|.
# A per-token divergence inherits the log-probs' absolute rounding (~1e-6 on tiny models),
# which is large next to a near-zero KL, so losses pass within rel * max|ref| + loss_abs_floor.
# Gradients get a tiny floor for the same reason: where the true gradient is 0 (OPD with fresh
# adapters: student == teacher) both sides hold only rounding noise (~1e-8 on tiny models).
THRESHOLDS = {"logprob_abs": 1e-4, "loss_rel": 1e-4, "loss_abs_floor": 1e-5, "grad_rel": 1e-3,
              "grad_abs_floor": 1e-7}


# MLX runs float32 matmuls as TF32 on CUDA GPUs (and on M5-class Macs) unless this variable is
# "0"; it is read when MLX first multiplies on the GPU. Measured on an H200 (docs/PARITY.md):
# TF32 on puts the tiny model's log-probs 1.9e-4 apart, off 9.5e-7.
TF32_VAR = "MLX_ENABLE_TF32"


def full_fp32_matmuls() -> dict:
    """Both backends multiply in full float32, unless the user set MLX_ENABLE_TF32 already.

    Parity checks the math at the fp32 limits, so TF32 (a 10-bit mantissa for the products) is
    off on both sides: MLX through its environment variable (call this before MLX's first GPU
    matmul), torch through its backend flags. Returns what applies, for the report."""
    os.environ.setdefault(TF32_VAR, "0")
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    except ImportError:  # no torch: the harness fails later with its own message
        pass
    return {"mlx_enable_tf32": os.environ[TF32_VAR], "torch_allow_tf32": False}


def _tf32_on(report: dict) -> bool:
    return report.get("tf32", {}).get("mlx_enable_tf32", "0").strip() not in ("0", "")


@dataclass
class SideResult:
    """One backend's numbers for the batch (numpy float32)."""

    logprobs: dict[str, np.ndarray]  # "student" / "teacher:<view>" -> (N, T)
    target: np.ndarray | None  # (N, T) target log-prob of each response token
    per_token: np.ndarray  # (N, T)
    loss: float
    grads: dict[str, np.ndarray]


@dataclass
class ParityBatch:
    """Everything both backends replay: prompts per view, response ids, the settings."""

    prompts: dict[str, list[list[int]]]  # view -> N prompts (row i answers prompt i // G)
    tokens: np.ndarray  # (N, T) int32 response ids, right-padded
    mask: np.ndarray  # (N, T) float32, 1 on response tokens
    lengths: list[int]
    views: tuple[str, ...]  # the teacher views of the method (trainer.METHOD_VIEWS)
    settings: object  # ObjectiveSettings as the trainer uses it (SFT: nll)
    pad_id: int


# ----------------------------------------------------------------------------- MLX side

def model_settings(model_path: str, adapter: str | Path | None, fine_tune: str = "lora"):
    """ModelSettings for the MLX student: the adapter's own LoRA layout when given (dropout 0:
    parity compares deterministic passes), else the project's defaults; or a full fine-tune."""
    from aropd_mlx.backends.torch.model import LoraSpec, read_adapter_config
    from aropd_mlx.models import ModelSettings

    if fine_tune == "full":
        if adapter is not None:
            raise UserError("parity: a full fine-tune starts from the model itself (no --adapter)")
        return ModelSettings(path=model_path, fine_tune_type="full", lora_dropout=0.0)
    if adapter is None:
        return ModelSettings(path=model_path, lora_dropout=0.0)
    spec = LoraSpec.from_adapter_config(read_adapter_config(adapter),
                                        f"{adapter}/adapter_config.json")
    return ModelSettings(path=model_path, lora_rank=spec.rank, lora_scale=spec.scale,
                         lora_dropout=0.0, lora_layers=spec.num_layers, lora_keys=spec.keys,
                         adapter=str(adapter))


def lab_examples(n: int, seed: int, k_max: int = 4):
    """Lab-style problems and the lab's view settings (short: k in 2..k_max)."""
    from aropd_mlx.data import Example
    from aropd_mlx.lab import task
    from aropd_mlx.lab.defaults import view_overrides
    from aropd_mlx.views import ViewSettings

    views = ViewSettings(**{k.split(".", 1)[1]: v for k, v in view_overrides(k_max).items()})
    records = task.generate(n, min(2, k_max), k_max, seed=seed, prefix="parity")
    return [Example(**r) for r in records], views


def draw_batch(model, tokenizer, method: str, examples, views, settings, *, seed: int,
               group_size: int, max_new_tokens: int) -> ParityBatch:
    """The trainer's own batch for step 0: PromptEncoder, then draw_responses (sampled once)."""
    from aropd_mlx.config import RunConfig, TrainSettings
    from aropd_mlx.rollout import RolloutSettings
    from aropd_mlx.batches import METHOD_VIEWS, PromptEncoder
    from aropd_mlx.trainer import draw_responses, objective_for

    if not getattr(tokenizer, "chat_template", None):
        views = replace(views, use_chat_template=False)
    cfg = RunConfig(views=views, objective=settings,
                    rollout=RolloutSettings(group_size=group_size, max_new_tokens=max_new_tokens),
                    train=TrainSettings(method=method, seed=seed, batch_size=len(examples)))
    cfg.validate()
    encoder = PromptEncoder(cfg, tokenizer)
    batch = [e for e in map(encoder, examples) if e is not None]
    if not batch:
        raise UserError("parity: every prompt is longer than data.max_prompt_tokens")
    rows, resp = draw_responses(cfg, model, tokenizer, batch, 0)
    return ParityBatch(prompts=rows, tokens=np.array(resp.tokens), mask=np.array(resp.mask),
                       lengths=list(resp.lengths), views=METHOD_VIEWS[method],
                       settings=objective_for(cfg), pad_id=tokenizer.pad_token_id or 0)


def _mlx_logprobs(head, hidden, tokens: np.ndarray) -> np.ndarray:
    """(N, T) log-probs at the response tokens, one row of (T, V) logits at a time."""
    import mlx.core as mx

    rows = []
    for i in range(tokens.shape[0]):
        z = head(hidden[i]).astype(mx.float32)  # (T, V)
        lp = z - mx.logsumexp(z, axis=-1, keepdims=True)
        rows.append(mx.take_along_axis(lp, mx.array(tokens[i])[:, None], axis=-1)[:, 0])
    out = mx.stack(rows)
    mx.eval(out)
    return np.array(out)


def mlx_side(model, tokenizer, batch: ParityBatch, model_settings) -> SideResult:
    """The trainer's step without the optimizer: frozen-teacher scoring, fused loss, grads."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from aropd_mlx.fused import fused_loss
    from aropd_mlx.head import head_from_model
    from aropd_mlx.models import Teacher
    from aropd_mlx.scoring import response_hidden, score_views

    views, tokens, lengths, pad = batch.views, batch.tokens, batch.lengths, batch.pad_id
    teacher_h, teacher_head = {}, None
    if views:
        teacher = Teacher.create(model, tokenizer, replace(model_settings, teacher="frozen"))
        with teacher.active(model) as scorer:
            teacher_h = score_views(scorer, {v: batch.prompts[v] for v in views}, tokens,
                                    lengths, pad)
            teacher_head = head_from_model(scorer)
    head = head_from_model(model)
    resp_tokens, resp_mask = mx.array(tokens), mx.array(batch.mask)

    def loss_fn(m):  # the head from `m`: a tied head under full fine-tuning trains
        sh = response_hidden(m, batch.prompts["student"], tokens, lengths, pad)
        out = fused_loss(sh, head_from_model(m), resp_tokens, resp_mask,
                         teacher_h[views[0]] if views else None,
                         teacher_h[views[1]] if len(views) > 1 else None,
                         teacher_head=teacher_head, settings=batch.settings)
        return out.loss, out

    (loss, out), grads = nn.value_and_grad(model, loss_fn)(model)
    mx.eval(loss, grads, out.per_token, out.diagnostics)  # one sync point, as in the trainer
    target = out.diagnostics.get("target_logprob") if views else None
    student_h = mx.stop_gradient(response_hidden(model, batch.prompts["student"], tokens,
                                                 lengths, pad))
    logprobs = {"student": _mlx_logprobs(head, student_h, tokens)}
    logprobs.update({f"teacher:{v}": _mlx_logprobs(teacher_head, teacher_h[v], tokens)
                     for v in views})
    return SideResult(logprobs=logprobs, target=None if target is None else np.array(target),
                      per_token=np.array(out.per_token), loss=float(loss.item()),
                      grads={k: np.array(v) for k, v in tree_flatten(grads)})


# ----------------------------------------------------------------------------- compare

def _check(quantity: str, ours: np.ndarray, ref: np.ndarray, kind: str, limit: float,
           floor: float = 0.0) -> dict:
    """kind "abs": pass when max|ours - ref| <= limit; "rel": when it is <= limit * max|ref|
    + floor (the "max_rel" reported is max|ours - ref| / max|ref|, floor not included)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return {"quantity": quantity, "max_abs": None, "max_rel": None, "kind": kind,
                "limit": limit, "pass": False, "note": f"shape {ours.shape} vs {ref.shape}"}
    diff = float(np.max(np.abs(ours - ref))) if ours.size else 0.0
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    allowed = limit if kind == "abs" else limit * scale + floor
    ok = math.isfinite(diff) and math.isfinite(scale) and diff <= allowed
    if not ok and not (math.isfinite(diff) and math.isfinite(scale)):
        return {"quantity": quantity, "max_abs": None, "max_rel": None, "kind": kind,
                "limit": limit, "pass": False, "note": "NaN or inf on a side"}
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else None)  # None: ref is all 0
    out = {"quantity": quantity, "max_abs": diff, "max_rel": rel, "kind": kind, "limit": limit,
           "pass": bool(ok)}
    if floor:
        out["floor"] = floor
    return out


def compare(ours: SideResult, ref: SideResult, mask: np.ndarray,
            thresholds: dict | None = None) -> list[dict]:
    """Checks of MLX (`ours`) against torch (`ref`); log-probs at response tokens only."""
    th = {**THRESHOLDS, **(thresholds or {})}
    on = np.asarray(mask) > 0
    checks = []
    for name in sorted(set(ours.logprobs) | set(ref.logprobs), key=lambda n: (n != "student", n)):
        a, b = ours.logprobs.get(name), ref.logprobs.get(name)
        if a is None or b is None:
            checks.append({"quantity": f"logprob {name}", "max_abs": None, "max_rel": None,
                           "kind": "abs", "limit": th["logprob_abs"], "pass": False,
                           "note": "missing on one side"})
            continue
        checks.append(_check(f"logprob {name}", a[on], b[on], "abs", th["logprob_abs"]))
    if ours.target is not None or ref.target is not None:
        if ours.target is None or ref.target is None:
            checks.append({"quantity": "target logprob", "max_abs": None, "max_rel": None,
                           "kind": "abs", "limit": th["logprob_abs"], "pass": False,
                           "note": "missing on one side"})
        else:
            checks.append(_check("target logprob", ours.target[on], ref.target[on], "abs",
                                 th["logprob_abs"]))
    floor = th["loss_abs_floor"]
    checks.append(_check("per-token loss", ours.per_token, ref.per_token, "rel", th["loss_rel"],
                         floor))
    checks.append(_check("loss", np.array([ours.loss]), np.array([ref.loss]), "rel",
                         th["loss_rel"], floor))
    for name in sorted(set(ours.grads) | set(ref.grads)):
        if name not in ours.grads or name not in ref.grads:
            checks.append({"quantity": f"grad {name}", "max_abs": None, "max_rel": None,
                           "kind": "rel", "limit": th["grad_rel"], "pass": False,
                           "note": "missing on one side"})
            continue
        checks.append(_check(f"grad {name}", ours.grads[name], ref.grads[name], "rel",
                             th["grad_rel"], th["grad_abs_floor"]))
    return checks


# ----------------------------------------------------------------------------- the harness

def _examples(records):
    from aropd_mlx.data import Example

    out = []
    for i, r in enumerate(records):
        if isinstance(r, Example):
            out.append(r)
            continue
        if "question" not in r:
            raise UserError(f"parity prompts: item {i} has no 'question'")
        out.append(Example(id=str(r.get("id", f"parity-{i}")), question=r["question"],
                           solution=r.get("solution"), answer=r.get("answer")))
    return out


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlx", "mlx-lm", "torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_parity(model_path: str, adapter: str | Path | None = None, device: str = "auto",
               method: str = "ar-opd", seed: int = 0, *, examples=None, views=None,
               settings=None, n_prompts: int = 2, group_size: int = 2, max_new_tokens: int = 32,
               thresholds: dict | None = None, torch_adapter: str | Path | None = None,
               fine_tune: str = "lora") -> dict:
    """MLX against torch on one batch; returns a JSON-able report with "pass" and "checks".

    examples: data-schema dicts or Examples (default: `n_prompts` lab-style problems, with the
    lab's views); views: ViewSettings (default: the lab's, or ViewSettings() for given
    examples); settings: ObjectiveSettings (default: the project's; SFT uses nll as the
    trainer does). adapter: a run or adapter directory (default: fresh adapters, lora_b = 0).
    torch_adapter: other adapters for the torch side only (to see the harness fail).
    fine_tune: "lora", or "full" (every weight trains, the tied embedding through both of its
    uses; an untied lm_head trains too): every weight's gradient is compared."""
    tf32 = full_fp32_matmuls()
    import mlx.core as mx

    from aropd_mlx.backends.torch.model import TorchStudent, resolve_device
    from aropd_mlx.models import load_student, save_adapters
    from aropd_mlx.objective import ObjectiveSettings
    from aropd_mlx.views import ViewSettings

    if method not in METHODS:
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if fine_tune not in ("lora", "full"):
        raise UserError(f"parity: fine_tune must be lora or full, got {fine_tune!r}")
    if examples is None and n_prompts < 1:
        raise UserError(f"parity: the number of prompts must be >= 1, got {n_prompts}")
    device = resolve_device(device)
    msettings = model_settings(str(model_path), adapter, fine_tune)
    model, tokenizer = load_student(msettings, seed=seed)  # seed: the fresh lora_a draw
    if examples is None:
        examples, lab_views = lab_examples(n_prompts, seed)
        views = views or lab_views
    examples, views = _examples(examples), views or ViewSettings()
    batch = draw_batch(model, tokenizer, method, examples, views,
                       settings or ObjectiveSettings(), seed=seed, group_size=group_size,
                       max_new_tokens=max_new_tokens)
    ours = mlx_side(model, tokenizer, batch, msettings)
    if fine_tune == "full":
        student = TorchStudent.load_full(str(model_path), device)
    else:
        with tempfile.TemporaryDirectory(prefix="aropd-parity-") as tmp:
            theirs = torch_adapter or adapter
            if theirs is None:  # the fresh MLX adapters, through the same file format
                save_adapters(tmp, model, msettings)
                theirs = tmp
            student = TorchStudent.load(str(model_path), theirs, device)
    ref = student.step(batch.prompts, batch.tokens, batch.mask, batch.lengths, batch.views,
                       batch.settings, batch.pad_id)
    checks = compare(ours, ref, batch.mask, thresholds)
    return {
        "pass": all(c["pass"] for c in checks),
        "model": str(model_path), "adapter": None if adapter is None else str(adapter),
        "torch_adapter": None if torch_adapter is None else str(torch_adapter),
        "method": method, "seed": seed, "teacher": "frozen", "lora_dropout": 0.0,
        "fine_tune": fine_tune,
        "device": {"mlx": mx.default_device().type.name, "torch": device}, "tf32": tf32,
        "rows": int(batch.tokens.shape[0]), "response_tokens": int(batch.mask.sum()),
        "views": list(batch.views), "settings": asdict(batch.settings),
        "loss": {"mlx": ours.loss, "torch": ref.loss},
        "thresholds": {**THRESHOLDS, **(thresholds or {})},
        "checks": checks, "versions": _versions(),
    }


def _num(x) -> str:
    return "-" if x is None else f"{x:.2e}"


def format_parity(report: dict) -> str:
    """A readable table: one row per quantity, the LoRA gradients summarized by their worst."""
    checks = report["checks"]
    grads = [c for c in checks if c["quantity"].startswith("grad ")]
    rows = [c for c in checks if not c["quantity"].startswith("grad ")]
    if grads:
        worst = max(grads, key=lambda c: (not c["pass"], c["max_rel"] if c["max_rel"] is not None
                                          else math.inf))
        kind = "LoRA tensors" if report.get("fine_tune", "lora") == "lora" else "tensors"
        rows.append({**worst, "quantity": f"grad ({len(grads)} {kind}), worst",
                     "pass": all(c["pass"] for c in grads),
                     "max_abs": max((c["max_abs"] or 0.0) for c in grads),
                     "where": worst["quantity"][5:]})
    dev = report["device"]
    lines = [f"parity: MLX ({dev['mlx']}) vs torch ({dev['torch']}), method {report['method']}, "
             f"teacher {report['teacher']}",
             f"model {report['model']}, adapter {report['adapter'] or '(fresh, lora_b = 0)'}, "
             f"{report['rows']} rows, {report['response_tokens']} response tokens, "
             f"loss mlx {report['loss']['mlx']:.6g} torch {report['loss']['torch']:.6g}"]
    if "tf32" in report:
        lines.append(f"matmuls: MLX {TF32_VAR}={report['tf32']['mlx_enable_tf32']}, torch "
                     f"allow_tf32 {report['tf32']['torch_allow_tf32']}")
    lines.append("")
    width = max(len(r["quantity"]) for r in rows)
    lines.append(f"{'quantity':<{width}}  {'max abs':>9}  {'max rel':>9}  {'limit':>18}  result")
    lines.append("-" * (width + 54))
    for r in rows:
        limit = f"{r['kind']} {r['limit']:.0e}" + (f" +{r['floor']:.0e}" if r.get("floor") else "")
        result = "ok" if r["pass"] else "FAIL"
        lines.append(f"{r['quantity']:<{width}}  {_num(r['max_abs']):>9}  {_num(r['max_rel']):>9}"
                     f"  {limit:>18}  {result}")
        if r.get("where"):
            lines.append(f"{'':<{width}}    ({r['where']})")
    failed = [c for c in checks if not c["pass"]]
    lines.append("")
    for c in failed[:10]:
        why = c.get("note") or f"{_num(c['max_abs'])} abs, {_num(c['max_rel'])} rel"
        lines.append(f"FAIL {c['quantity']}: {why}")
    if len(failed) > 10:
        lines.append(f"... and {len(failed) - 10} more (see the JSON report)")
    lines.append("PASS: MLX and torch agree within the fp32 limits" if report["pass"] else
                 f"FAIL: {len(failed)} of {len(checks)} checks past their limits")
    if failed and _tf32_on(report):
        lines.append(f"({TF32_VAR}={report['tf32']['mlx_enable_tf32']}: MLX multiplied in TF32 on "
                     f"a GPU, not fp32; rerun with {TF32_VAR}=0 for the fp32 limits)")
    return "\n".join(lines)
