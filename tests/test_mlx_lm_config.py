"""A config written for `mlx_lm.lora` runs with `aropd-mlx train -c`: each key mapped to ours,
mlx-lm's defaults for the keys left out, unknown keys and values we cannot honour rejected in
one line naming the file and line; and the adapters the run writes still load in mlx_lm's
`load`/`generate` and fuse with `mlx_lm.fuse`."""
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from aropd_mlx.cli.main import app
from aropd_mlx.config import load_config, yaml_keys
from aropd_mlx.errors import UserError

EXAMPLE = Path(__file__).parent.parent / "examples" / "configs" / "mlx-lm-lora.yaml"


def rows(n, start=0):
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"Q:{i}+1"},
                                            {"role": "assistant", "content": f"{i}+1={i + 1}"}],
                               "answer": str(i + 1)}) + "\n" for i in range(start, start + n))


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(rows(6))
    (data / "valid.jsonl").write_text(rows(2, start=6))
    (data / "test.jsonl").write_text(rows(2, start=8))
    return data


def test_the_example_maps_every_key(tmp_path):
    cfg = load_config(EXAMPLE)
    assert cfg.model.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.fine_tune_type == "lora"
    assert (cfg.model.lora_layers, cfg.model.lora_rank, cfg.model.lora_scale,
            cfg.model.lora_dropout) == (16, 8, 20.0, 0.0)
    assert cfg.model.lora_keys == ("self_attn.q_proj", "self_attn.v_proj")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.seed, cfg.train.save_every) == (
        200, 4, 0, 50)
    assert (cfg.train.lr_schedule, cfg.train.learning_rate, cfg.train.warmup_steps) == (
        "cosine", 1e-5, 10)
    assert cfg.train.min_lr_ratio == pytest.approx(0.1)
    assert cfg.out == "runs/mlx-lm-lora" and cfg.data.max_prompt_tokens == 1024
    assert (cfg.data.train, cfg.data.split) == ("examples/data/mlx-lm-chat", "train")
    assert (cfg.data.eval, cfg.data.eval_split) == ("examples/data/mlx-lm-chat", "validation")
    assert cfg.rollout.group_size == 4 and cfg.objective.lam == 0.8  # our sections beside
    assert (cfg.train.optimizer, cfg.train.weight_decay) == ("adamw", 0.0)


def test_left_out_keys_take_mlx_lm_defaults(tmp_path, folder):
    path = tmp_path / "lora.yaml"
    path.write_text(f"model: some/model\ndata: {folder}\n")
    cfg = load_config(path)
    assert (cfg.model.lora_layers, cfg.train.batch_size, cfg.train.steps, cfg.train.learning_rate,
            cfg.train.lr_schedule, cfg.train.save_every, cfg.out) == (
        16, 4, 1000, 1e-5, "constant", 100, "adapters")
    assert cfg.data.eval == str(folder)
    assert {"model.path", "data.train", "data.eval", "train.steps"} <= yaml_keys(path)
    path.write_text("model: some/model\ndata: owner/hub-set\n")  # not a local path: the Hub
    assert load_config(path).data.train == "hf://datasets/owner/hub-set"
    path.write_text(f"model: m\niters: 5\ndata:\n  train: {folder}\n  answer_from: boxed\n"
                    "  columns: {question: q}\n")  # our own data section beside mlx-lm's keys
    cfg = load_config(path)
    assert (cfg.data.train, cfg.data.answer_from, cfg.data.columns, cfg.train.steps) == (
        str(folder), "boxed", {"question": "q"}, 5)
    path.write_text("model: m\niters: 5\ndata:\n  answer_form: boxed\n")
    with pytest.raises(UserError, match=r"lora.yaml:4: unknown key 'data.answer_form'"):
        load_config(path)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adafactor", "muon"])
def test_every_mlx_lm_optimizer_maps_with_its_config(name, tmp_path, capsys):
    """mlx-lm's `optimizer` + `optimizer_config.<name>` (mlx's parameter names) run as ours;
    the weight decay goes to train.weight_decay, the other optimizers' entries are ignored."""
    from aropd_mlx.optimizer import OPTIMIZERS, make_optimizer

    params = {"adam": "betas: [0.9, 0.95]", "adamw": "eps: 1.0e-6\n    weight_decay: 0.05",
              "sgd": "momentum: 0.9\n    weight_decay: 0.01", "adafactor": "beta_1: 0.9",
              "muon": "momentum: 0.9\n    ns_steps: 3"}[name]
    path = tmp_path / "lora.yaml"
    path.write_text(f"model: m\noptimizer: {name.upper() if name == 'sgd' else name}\n"
                    f"optimizer_config:\n  {name}:\n    {params}\n  adamw:\n    eps: 0.5\n"
                    if name != "adamw" else
                    f"model: m\noptimizer: {name}\noptimizer_config:\n  {name}:\n    {params}\n"
                    "  sgd:\n    momentum: 0.5\n")
    cfg = load_config(path)
    assert cfg.train.optimizer == name and "weight_decay" not in (cfg.train.optimizer_config or {})
    opt = make_optimizer(cfg)
    assert type(opt) is OPTIMIZERS[name][0]
    expect = {"adam": {"betas": (0.9, 0.95)}, "adamw": {"eps": 1e-6, "weight_decay": 0.05},
              "sgd": {"momentum": 0.9, "weight_decay": 0.01}, "adafactor": {"beta_1": 0.9},
              "muon": {"momentum": 0.9, "ns_steps": 3}}[name]
    for key, value in expect.items():
        assert getattr(opt, key) == pytest.approx(value), key
    assert ("relative_step" in capsys.readouterr().err) == (name == "adafactor")
    keys = yaml_keys(path)
    assert "train.optimizer" in keys and any(k.startswith("train.optimizer_config.") for k in keys)
    path.write_text("model: m\n")  # mlx-lm's default: Adam
    assert load_config(path).train.optimizer == "adam"


def test_grad_checkpoint_maps_where_it_exists(tmp_path, capsys):
    from dataclasses import fields

    from aropd_mlx.config import TrainSettings

    path = tmp_path / "lora.yaml"
    path.write_text("model: m\ngrad_checkpoint: true\n")
    cfg = load_config(path)
    if "grad_checkpoint" in {f.name for f in fields(TrainSettings)}:
        assert cfg.train.grad_checkpoint is True
    else:  # accepted; one note says it is not honoured
        assert "grad_checkpoint" in capsys.readouterr().err


BAD = {  # name: (yaml, needles)
    "unknown_key": ("model: m\niters: 2\nitres: 3\n", ["lora.yaml:3", "unknown key 'itres'",
                                                       "did you mean iters"]),
    "optimizer_lion": ("model: m\noptimizer: lion\n", ["lora.yaml:2", "'lion' cannot be honoured",
                                                       "adafactor", "muon"]),
    "optimizer_param": ("model: m\noptimizer: sgd\noptimizer_config:\n  sgd:\n    betas: [0.9, 0.99]\n",
                        ["lora.yaml:3", "train.optimizer_config.betas", "sgd has no parameter",
                         "mlx-lm's optimizer_config"]),
    "optimizer_name": ("model: m\noptimizer_config:\n  adamx: {}\n",
                       ["lora.yaml:2", "'optimizer_config.adamx'"]),
    "adam_decay": ("model: m\noptimizer: adam\noptimizer_config:\n  adam:\n    weight_decay: 0.1\n",
                   ["lora.yaml:3", "adam has no weight decay"]),
    "lora_alpha": ("model: m\nlora_parameters:\n  rank: 4\n  alpha: 16\n",
                   ["lora.yaml:4", "'lora_parameters.alpha'"]),
    "schedule_name": ("model: m\nlr_schedule:\n  name: linear_schedule\n  arguments: [0.0, 1.0e-5, 10]\n",
                      ["lora.yaml:2", "'linear_schedule' cannot be honoured"]),
    "schedule_decay": ("model: m\niters: 100\nlr_schedule:\n  name: cosine_decay\n  arguments: [1.0e-5, 50]\n",
                       ["lora.yaml:3", "decay over 50 steps", "100"]),
    "report_to": ("model: m\nreport_to: swanlab\n", ["lora.yaml:2", "train.report_to: 'swanlab'",
                                                     "mlx-lm's report_to"]),
    "accumulation": ("model: m\ngrad_accumulation_steps: 4\n", ["lora.yaml:2", "grad_accumulation_steps"]),
    "test_only": ("model: m\ntrain: false\n", ["lora.yaml:2", "aropd-mlx eval"]),
    "bad_value_named_by_line": ("model: m\niters: 0\n", ["lora.yaml:2", "train.steps", "mlx-lm's iters"]),
    "bad_rank": ("model: m\nlora_parameters:\n  rank: 0\n", ["lora.yaml:3", "model.lora_rank"]),
    "mixed_formats": ("model:\n  path: m\niters: 3\n", ["lora.yaml:1", "model", "mlx-lm"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_what_cannot_be_honoured_is_one_line(name, tmp_path):
    text, needles = BAD[name]
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_a_run_from_an_mlx_lm_yaml_loads_and_fuses_in_mlx_lm(tiny_llama, folder, tmp_path):
    run = tmp_path / "adapters"
    path = tmp_path / "lora.yaml"
    path.write_text(f"""model: {tiny_llama}
train: true
data: {folder}
fine_tune_type: lora
optimizer: adamw
num_layers: 1
batch_size: 2
iters: 2
learning_rate: 1.0e-3
save_every: 2
steps_per_report: 1
adapter_path: {run}
seed: 3
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 4
  scale: 10.0
  dropout: 0.0
rollout:
  group_size: 2
  max_new_tokens: 6
""")
    result = CliRunner().invoke(app, ["train", "-c", str(path), "--no-eval"])
    assert result.exit_code == 0, result.stdout + result.stderr
    adapter_cfg = json.loads((run / "adapter_config.json").read_text())
    assert adapter_cfg["num_layers"] == 1 and adapter_cfg["lora_parameters"]["rank"] == 4
    saved = load_config(run / "config.yaml")
    assert saved.train.steps == 2 and saved.data.eval == str(folder)

    from mlx_lm import generate, load

    model, tok = load(str(tiny_llama), adapter_path=str(run))
    assert isinstance(generate(model, tok, prompt="Q:1+1\n", max_tokens=3), str)
    fused = tmp_path / "fused"
    done = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(tiny_llama),
                           "--adapter-path", str(run), "--save-path", str(fused)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    fused_model, _ = load(str(fused))
    ids = mx.array([tok.encode("Q:1+1")])
    assert mx.allclose(fused_model(ids), model(ids), atol=1e-4).item()
    # --resume with the same command: the mlx-lm keys compare as ours
    result = CliRunner().invoke(app, ["train", "-c", str(path), "--no-eval", "--resume",
                                      "--steps", "3"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert load_config(run / "config.yaml").train.steps == 3
