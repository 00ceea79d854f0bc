"""`aropd-mlx parity`: MLX against the torch mirror on one batch (docs/PARITY.md).

    aropd-mlx parity                                   # a fresh tiny model, offline, CPU torch
    aropd-mlx parity --method sft --seed 3
    aropd-mlx parity --fine-tune full                  # every weight's gradient (tied embedding too)
    aropd-mlx parity --model Qwen/Qwen2.5-0.5B-Instruct --adapter runs/qwen --device cuda \
        --json-out parity.json

Prints one row per compared quantity; exits 1 when any is past its fp32 limit, 2 on bad input.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import typer

from .common import handles_errors


def _model_path(model: Optional[str], tmp: str) -> str:
    """None: a fresh tiny llama in `tmp` (offline anywhere); "lab": the lab's cached model."""
    if model is None:
        from aropd_mlx.lab.tiny import build_tiny_model

        return str(build_tiny_model(Path(tmp) / "tiny"))
    if model == "lab":
        from aropd_mlx.config import load_config
        from aropd_mlx.lab.defaults import lab_settings_for
        from aropd_mlx.lab.setup import prepare_lab

        typer.echo("parity: using the lab model (built once and cached; minutes the first time)",
                   err=True)
        return str(prepare_lab(lab_settings_for(load_config())).model_path)
    return model


@handles_errors
def parity_command(
    model: Optional[str] = typer.Option(
        None, "--model", help="Model path or Hub id; 'lab' for the lab model. "
        "Default: a freshly built tiny model (offline)."),
    adapter: Optional[Path] = typer.Option(
        None, "--adapter", help="Run or adapter directory (adapters.safetensors + "
        "adapter_config.json). Default: fresh adapters."),
    device: str = typer.Option("auto", "--device", help="Torch device: auto | cpu | cuda."),
    method: str = typer.Option("ar-opd", "--method",
                               help="sft | opd | partial-opd | full-opd | ar-opd"),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the report as JSON."),
    seed: int = typer.Option(0, "--seed", help="Prompts, rollouts and fresh adapters."),
    prompts: int = typer.Option(2, "--prompts", help="Lab-style prompts in the batch."),
    group_size: int = typer.Option(2, "--group-size", help="Rollouts per prompt."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Rollout length cap."),
    fine_tune: str = typer.Option("lora", "--fine-tune", help="lora | full (compare every "
                                  "weight's gradient; no --adapter)."),
):
    """MLX against the torch mirror on one batch: log-probs, target, loss, LoRA gradients."""
    from aropd_mlx.backends.torch.parity import format_parity, full_fp32_matmuls, run_parity

    from aropd_mlx.jsonio import output_path, write_json

    json_out = output_path(json_out, "--json-out") if json_out is not None else None
    full_fp32_matmuls()  # before any MLX work on a GPU: MLX reads the TF32 switch once
    with tempfile.TemporaryDirectory(prefix="aropd-parity-model-") as tmp:
        report = run_parity(_model_path(model, tmp), adapter=adapter, device=device,
                            method=method, seed=seed, n_prompts=prompts, group_size=group_size,
                            max_new_tokens=max_new_tokens, fine_tune=fine_tune)
    if model is None:
        report["model"] = "(fresh tiny llama)"
    typer.echo(format_parity(report))
    if json_out is not None:
        write_json(json_out, report)
        typer.echo(f"report: {json_out}")
    if not report["pass"]:
        raise typer.Exit(1)
