"""The parity harness: MLX (fused loss, trainer path) against torch (transformers + LoRA mirror +
the torch objective) on one batch, for every method, with fresh and trained-looking adapters,
on llama and qwen2 checkpoints, one of them written by transformers' own save_pretrained."""
import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

from aropd_mlx.backends.torch.model import LoraSpec, TorchStudent, resolve_device  # noqa: E402
from aropd_mlx.backends.torch.parity import format_parity, run_parity  # noqa: E402
from aropd_mlx.errors import UserError  # noqa: E402
from aropd_mlx.lab.tiny import char_vocab, write_tokenizer  # noqa: E402
from aropd_mlx.models import ModelSettings, load_student, save_adapters, trainable  # noqa: E402
from aropd_mlx.views import METHODS  # noqa: E402

FAST = {"max_new_tokens": 16}  # short rollouts keep the whole file well under a minute


def _random_adapter(model_path, out, settings: ModelSettings, seed: int):
    """Adapters as a run would leave them: lora_b non-zero, so student != frozen teacher."""
    from mlx.utils import tree_unflatten

    model, _ = load_student(settings, seed=seed)
    mx.random.seed(seed + 100)
    new = [(k, 0.02 * mx.random.normal(v.shape)) for k, v in trainable(model).items()
           if k.endswith("lora_b")]
    model.update(tree_unflatten(new))
    save_adapters(out, model, settings)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_llama, tiny_qwen2, tmp_path_factory):
    """llama: mlx-lm's default layout (every linear of every layer); qwen2: the last layer's
    q/v projections only (checks the layer and key selection of the mirror)."""
    root = tmp_path_factory.mktemp("adapters")
    llama = ModelSettings(path=str(tiny_llama), lora_rank=4)
    qwen = ModelSettings(path=str(tiny_qwen2), lora_rank=4, lora_layers=1,
                         lora_keys=("self_attn.q_proj", "self_attn.v_proj"))
    return {"tiny_llama": _random_adapter(tiny_llama, root / "llama", llama, 1),
            "tiny_qwen2": _random_adapter(tiny_qwen2, root / "qwen2", qwen, 2)}


def _assert_pass(report):
    assert report["pass"], format_parity(report)
    names = {c["quantity"] for c in report["checks"]}
    assert "logprob student" in names and "loss" in names
    assert any(n.startswith("grad ") for n in names)
    json.dumps(report)  # JSON-able


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_parity_with_adapter(fixture, method, request, adapters):
    path = request.getfixturevalue(fixture)
    report = run_parity(str(path), adapter=adapters[fixture], device="cpu", method=method,
                        seed=3, **FAST)
    _assert_pass(report)
    views = {"sft": [], "opd": ["student"], "partial-opd": ["partial"], "full-opd": ["full"],
             "ar-opd": ["partial", "full"]}[method]
    assert report["views"] == views
    names = {c["quantity"] for c in report["checks"]}
    assert {f"logprob teacher:{v}" for v in views} <= names
    assert ("target logprob" in names) == bool(views)
    assert report["loss"]["mlx"] > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_parity_fresh_adapters(fixture, method, request):
    report = run_parity(str(request.getfixturevalue(fixture)), device="cpu", method=method,
                        seed=0, **FAST)
    _assert_pass(report)


@pytest.mark.parametrize("settings", [
    {"alpha": 0.5, "clip": None, "lam": 1.2},
    {"alpha": 1.0, "loss_type": "sampled_kl", "skip_first_tokens": 0, "reduction": "token"},
])
def test_parity_other_objective_settings(tiny_llama, adapters, settings):
    from aropd_mlx.objective import ObjectiveSettings

    report = run_parity(str(tiny_llama), adapter=adapters["tiny_llama"], device="cpu",
                        settings=ObjectiveSettings(**settings), **FAST)
    _assert_pass(report)


def test_parity_fails_when_one_side_differs(tiny_llama, adapters, tmp_path):
    """One LoRA weight changed on the torch side only: the harness must say FAIL, and only the
    student's numbers may move (the frozen teacher has LoRA off)."""
    from safetensors.numpy import load_file, save_file

    other = tmp_path / "perturbed"
    shutil.copytree(adapters["tiny_llama"], other)
    weights = load_file(str(other / "adapters.safetensors"))
    key = "model.layers.1.self_attn.v_proj.lora_b"
    weights[key] = weights[key].copy()
    weights[key][0, 0] += 0.05
    save_file(weights, str(other / "adapters.safetensors"))
    report = run_parity(str(tiny_llama), adapter=adapters["tiny_llama"], torch_adapter=other,
                        device="cpu", method="ar-opd", **FAST)
    assert not report["pass"]
    by_name = {c["quantity"]: c for c in report["checks"]}
    assert not by_name["logprob student"]["pass"]
    assert not by_name[f"grad {key}"]["pass"]
    assert by_name["logprob teacher:partial"]["pass"] and by_name["target logprob"]["pass"]
    assert "FAIL" in format_parity(report)


def test_parity_on_a_save_pretrained_checkpoint(tmp_path):
    """A checkpoint written by transformers itself (random init, tied embeddings, a
    non-default rope theta) plus our tokenizer files loads in both backends and agrees."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(char_vocab()), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # transformers 5 nests the theta in rope_parameters; mlx-lm reads only the top-level key
    saved["rope_theta"] = (saved.get("rope_parameters") or {}).get("rope_theta", 500000.0)
    saved["tie_word_embeddings"] = True  # explicit: the libraries' defaults differ
    (tmp_path / "config.json").write_text(json.dumps(saved))
    write_tokenizer(tmp_path)
    for method in ("ar-opd", "sft"):
        _assert_pass(run_parity(str(tmp_path), device="cpu", method=method, seed=1, **FAST))
    # full fine-tuning: every weight, the tied embedding through both of its uses
    report = run_parity(str(tmp_path), device="cpu", method="ar-opd", seed=1,
                        fine_tune="full", **FAST)
    _assert_pass(report)
    assert "grad model.embed_tokens.weight" in {c["quantity"] for c in report["checks"]}


@pytest.mark.parametrize("method", ["ar-opd", "opd", "sft"])
def test_parity_full_fine_tune_of_a_tied_model(tiny_qwen2, method):
    """Full fine-tuning of a tied model: MLX's gradient of every weight (the tied embedding's
    output side from the fused loss's head gradient) equals torch autograd over the HF model
    with the mirror's naive_loss."""
    report = run_parity(str(tiny_qwen2), device="cpu", method=method, seed=2,
                        fine_tune="full", **FAST)
    _assert_pass(report)
    grads = {c["quantity"][5:]: c for c in report["checks"] if c["quantity"].startswith("grad ")}
    assert "model.embed_tokens.weight" in grads and len(grads) > 10
    assert grads["model.embed_tokens.weight"]["max_abs"] is not None


def test_parity_catches_a_frozen_tied_head(tiny_qwen2, monkeypatch):
    """The fused loss without the head's gradient (the old behaviour): the harness FAILs on
    the tied embedding's gradient, and only there."""
    import dataclasses

    from aropd_mlx import head as head_module

    real = head_module.head_from_model
    monkeypatch.setattr(head_module, "head_from_model",
                        lambda m: dataclasses.replace(real(m), trainable=False))
    report = run_parity(str(tiny_qwen2), device="cpu", method="ar-opd", seed=2,
                        fine_tune="full", **FAST)
    failed = [c["quantity"] for c in report["checks"] if not c["pass"]]
    assert failed == ["grad model.embed_tokens.weight"], format_parity(report)


def test_parity_full_fine_tune_trains_an_untied_head(tiny_llama):
    report = run_parity(str(tiny_llama), device="cpu", method="ar-opd", seed=2,
                        fine_tune="full", **FAST)
    _assert_pass(report)
    names = {c["quantity"] for c in report["checks"]}
    assert "grad model.embed_tokens.weight" in names and "grad lm_head.weight" in names


@pytest.mark.parametrize("layers,keys", [(-1, None), (0, None), (1, None), (9, None),
                                         (1, ("self_attn.q_proj", "mlp.down_proj"))])
def test_lora_layout_matches_mlx_lm(tiny_llama, layers, keys):
    """The torch mirror puts LoRA on exactly the modules mlx-lm's linear_to_lora_layers does."""
    settings = ModelSettings(path=str(tiny_llama), lora_layers=layers, lora_keys=keys)
    model, _ = load_student(settings)
    torch_side = TorchStudent.load(str(tiny_llama), device="cpu",
                                   spec=LoraSpec(num_layers=layers, keys=keys))
    theirs = {k: tuple(v.shape) for k, v in torch_side.lora_parameters().items()}
    assert theirs == {k: tuple(v.shape) for k, v in trainable(model).items()}


def test_target_fallback_matches_mlx():
    """Without the mirror's target_logprob diagnostic, the torch side rebuilds the target from
    anchored_residual_target at the teacher temperature; it must equal MLX's target."""
    from types import SimpleNamespace

    from aropd_mlx.backends.torch.model import _target_at_tokens
    from aropd_mlx.objective import ObjectiveSettings, gather_last, target_logprobs

    rng = np.random.default_rng(0)
    p, f = (3 * rng.standard_normal((2, 5, 11)).astype(np.float32) for _ in range(2))
    tok = rng.integers(0, 11, (2, 5))
    s = ObjectiveSettings(lam=1.2, clip=2.0, teacher_temperature=0.7)
    ours = np.array(gather_last(target_logprobs(mx.array(p), mx.array(f), settings=s),
                                mx.array(tok)))
    theirs = _target_at_tokens(SimpleNamespace(diagnostics={}),
                               [torch.tensor(p), torch.tensor(f)], torch.tensor(tok), s)
    assert np.abs(theirs.numpy() - ours).max() < 1e-5


def test_bad_inputs_are_one_line_errors(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="method"):
        run_parity(str(tiny_llama), method="grpo", device="cpu")
    with pytest.raises(UserError, match="adapter_config.json"):
        run_parity(str(tiny_llama), adapter=tmp_path, device="cpu")
    with pytest.raises(UserError, match="device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cuda"):
            resolve_device("cuda")


def test_cli_parity_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from aropd_mlx.cli.parity import parity_command

    app = typer.Typer()
    app.command("parity")(parity_command)
    app.command("other")(lambda: None)  # two commands: typer keeps the subcommand name
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["parity", "--device", "cpu", "--max-new-tokens", "8",
                                      "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and json.loads(out.read_text())["pass"] is True
    assert "matmuls: MLX MLX_ENABLE_TF32=" in result.output
    bad = CliRunner().invoke(app, ["parity", "--method", "nope"])
    assert bad.exit_code == 2


def test_parity_multiplies_in_full_fp32_unless_told(monkeypatch):
    """MLX's CUDA backend multiplies fp32 in TF32 unless MLX_ENABLE_TF32=0 (on an H200 that put
    the log-probs 1.9e-4 apart, past the 1e-4 limit): parity turns TF32 off on both sides, but
    a value the user set stays, and a failing report then says what to rerun with."""
    import torch

    from aropd_mlx.backends.torch.parity import TF32_VAR, full_fp32_matmuls

    monkeypatch.delenv(TF32_VAR, raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert full_fp32_matmuls() == {"mlx_enable_tf32": "0", "torch_allow_tf32": False}
    assert os.environ[TF32_VAR] == "0"
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    monkeypatch.setenv(TF32_VAR, "1")
    assert full_fp32_matmuls()["mlx_enable_tf32"] == "1"
    failing = {"checks": [{"quantity": "loss", "pass": False, "max_abs": 1.0, "max_rel": 1.0,
                           "kind": "rel", "limit": 1e-4, "floor": 1e-5}],
               "device": {"mlx": "gpu", "torch": "cuda"}, "method": "ar-opd",
               "teacher": "frozen", "model": "m", "adapter": None, "rows": 1,
               "response_tokens": 1, "loss": {"mlx": 1.0, "torch": 2.0}, "pass": False,
               "tf32": {"mlx_enable_tf32": "1", "torch_allow_tf32": False}}
    text = format_parity(failing)
    assert f"{TF32_VAR}=1" in text and f"rerun with {TF32_VAR}=0" in text
    failing["tf32"]["mlx_enable_tf32"] = "0"
    assert "rerun with" not in format_parity(failing)
