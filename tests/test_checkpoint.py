"""Checkpoints are ordered by their step, not their name: past step 999999 the names grow a
digit (`step-1000000` sorts before `step-999999` as text), and the newest must still be kept
and be the one `--resume` starts from."""
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from aropd_mlx import checkpoint as ckpt
from aropd_mlx.trainer import restore


def _model_at(step: int) -> nn.Module:
    model = nn.Linear(2, 2)
    model.update({"weight": mx.full((2, 2), float(step)), "bias": mx.full((2,), float(step))})
    return model


def test_checkpoints_past_step_999999_keep_and_resume_the_newest(tmp_path):
    run = tmp_path / "run"
    for step in (999998, 999999, 1000000):
        model, opt = _model_at(step), optim.SGD(learning_rate=0.1)
        opt.init(model.trainable_parameters())
        ckpt.save_checkpoint(run, step, params=dict(tree_flatten(model.trainable_parameters())),
                             optimizer_state=opt.state, teacher=None, state={}, keep=2)
    # keep=2: the two newest stay, the oldest is pruned
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-1000000", "step-999999"]
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-999999", "step-1000000"]
    # resume starts from the newest checkpoint, and restores its weights
    model, opt = nn.Linear(2, 2), optim.SGD(learning_rate=0.1)
    opt.init(model.trainable_parameters())
    state = restore(run, model, opt, teacher=None)
    assert state.step == 1000000
    assert mx.array_equal(model.weight, mx.full((2, 2), 1000000.0)).item()


def test_other_names_in_checkpoints_are_not_checkpoints(tmp_path):
    run = tmp_path / "run"
    for name in ("step-000002", "step-abc", "step-", "step-²"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "state.json").write_text('{"step": 2}')
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002"]
