"""data.eval_fraction: a deterministic held-out part of the training file, not trained on."""
import json
import random

import pytest
from typer.testing import CliRunner

from aropd_mlx.config import DataSettings, load_config
from aropd_mlx.data import Example, split, train_and_eval, write_examples
from aropd_mlx.errors import UserError


def examples(n):
    return [Example(id=f"e{i}", question=f"what is {i} + 1?", solution=f"{i} + 1 = {i + 1}",
                    answer=str(i + 1)) for i in range(n)]


@pytest.mark.parametrize("n, fraction, n_eval", [(20, 0.2, 4), (10, 0.25, 2), (7, 0.01, 1),
                                                  (2, 0.9, 1), (100, 0.0, 0)])
def test_split_sizes_and_partition(n, fraction, n_eval):
    exs = examples(n)
    train, held = split(exs, fraction)
    assert len(held) == n_eval and len(train) == n - n_eval
    assert sorted(e.id for e in train + held) == sorted(e.id for e in exs)  # a partition
    assert not {e.id for e in train} & {e.id for e in held}
    # both parts keep the file order
    pos = {e.id: i for i, e in enumerate(exs)}
    assert [pos[e.id] for e in train] == sorted(pos[e.id] for e in train)


def test_split_depends_on_content_not_on_order():
    exs = examples(50)
    shuffled = exs[:]
    random.Random(3).shuffle(shuffled)
    _, held_a = split(exs, 0.2)
    _, held_b = split(shuffled, 0.2)
    assert {e.id for e in held_a} == {e.id for e in held_b}
    assert split(exs, 0.2) == split(exs, 0.2)
    # not simply the first or the last lines of the file
    ids = {e.id for e in held_a}
    assert ids != {e.id for e in exs[:10]} and ids != {e.id for e in exs[-10:]}


def test_split_needs_two_examples():
    with pytest.raises(UserError, match="eval_fraction"):
        split(examples(1), 0.5)


def test_train_and_eval_holds_out_only_without_an_eval_file(tmp_path):
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_examples(train_file, examples(20))
    write_examples(eval_file, examples(3))
    need = ("question", "solution", "answer")
    train, held = train_and_eval(DataSettings(train=str(train_file), eval_fraction=0.2), need)
    assert (len(train), len(held)) == (16, 4)
    train, held = train_and_eval(DataSettings(train=str(train_file), eval=str(eval_file),
                                              eval_fraction=0.2), need)
    assert (len(train), len(held)) == (20, 3)  # an eval file wins; the fraction is unused
    train, held = train_and_eval(DataSettings(train=str(train_file)), need)
    assert (len(train), len(held)) == (20, 0)


def test_held_out_examples_need_answers(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"q{i}"}) for i in range(4)) + "\n")
    with pytest.raises(UserError, match="train.jsonl:1.*answer"):
        train_and_eval(DataSettings(train=str(f), eval_fraction=0.5), ("question",))


def test_qwen_math_example_does_not_evaluate_on_its_training_file():
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "examples" / "configs" / "qwen-math.yaml")
    assert cfg.data.eval != cfg.data.train
    assert cfg.data.eval is not None or cfg.data.eval_fraction > 0


def test_train_cli_trains_on_the_rest(tiny_llama, tmp_path, monkeypatch):
    """The CLI's call site: the trainer sees only the training part, evaluation the held-out one."""
    import aropd_mlx.trainer as trainer_mod
    from aropd_mlx.cli.main import app

    data = tmp_path / "train.jsonl"
    write_examples(data, examples(10))
    seen = {}

    def fake_train(cfg, model, tok, exs, **kw):
        seen["train"] = [e.id for e in exs]
        raise SystemExit(0)

    monkeypatch.setattr(trainer_mod, "train", fake_train)
    (tmp_path / "run.yaml").write_text("data:\n  eval_fraction: 0.3\n")
    result = CliRunner().invoke(app, ["train", "-c", str(tmp_path / "run.yaml"), "--model",
                                      str(tiny_llama), "--data", str(data), "--out",
                                      str(tmp_path / "out"), "--steps", "1", "--no-eval"])
    assert result.exit_code == 0, result.output
    want_train, _ = split(examples(10), 0.3)
    assert seen["train"] == [e.id for e in want_train] and len(seen["train"]) == 7
