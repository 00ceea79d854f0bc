"""Data-parallel training with mlx.launch: ranks start and all report, a 2-rank update equals a
1-rank update on the whole batch, only rank 0 writes, resume checks the world size.

Every launched rank writes a marker file with its rank and status: mlx.launch can exit 0 while
a rank failed (PLATFORM.md), so its exit code alone proves nothing."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aropd_mlx import distributed as dist

TESTS = str(Path(__file__).resolve().parent)

PRELUDE = """
import json, os, sys, traceback
sys.path.insert(0, {tests!r})
MARK = {marks!r}
def mark(rank, status, **info):
    with open(os.path.join(MARK, f"rank-{{rank}}.json"), "w") as f:
        json.dump({{"rank": rank, "status": status, **info}}, f)
try:
    from aropd_mlx import distributed as dist
    world = dist.init()
{body}
    mark(world.rank, "ok", size=world.size, **globals().get("INFO", {{}}))
except BaseException as e:
    mark(int(os.environ.get("MLX_RANK", -1)), "failed", error=f"{{type(e).__name__}}: {{e}}",
         trace=traceback.format_exc())
    raise
"""


def launch(tmp_path: Path, body: str, n: int = 2, python: bool = True, timeout: int = 120) -> dict:
    """Run `body` (its world is `world`; names put in dict INFO land in the marker) on n ranks
    over loopback; return {rank: marker}, asserting that EVERY rank finished with status ok."""
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    for old in marks.iterdir():
        old.unlink()
    script = tmp_path / "rank_script.py"
    script.write_text(PRELUDE.format(tests=TESTS, marks=str(marks),
                                     body=textwrap.indent(textwrap.dedent(body), "    ")))
    cmd = ["mlx.launch", "-n", str(n), "--backend", "ring", "--"]
    cmd += [sys.executable, str(script)] if python else [str(script)]
    env = {**os.environ, dist.JOIN_TIMEOUT_ENV: "30"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    found = {json.loads(p.read_text())["rank"]: json.loads(p.read_text()) for p in marks.iterdir()}
    missing = sorted(set(range(n)) - set(found))
    failed = {r: m["error"] for r, m in found.items() if m["status"] != "ok"}
    assert not missing and not failed, (
        f"launcher exit {proc.returncode}; ranks without a marker: {missing}; failed: {failed}\n"
        f"{proc.stderr[-3000:]}")
    return found


def test_world_of_one_is_a_plain_run(monkeypatch):
    monkeypatch.delenv("MLX_RANK", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK", raising=False)
    monkeypatch.setattr(dist, "_WORLD", None)
    w = dist.init()
    assert (w.rank, w.size, w.group) == (0, 1, None) and w.is_main and not w.distributed
    items = list(range(7))
    assert w.shard(items) is items and w.sum_floats([1.5]) == [1.5]
    tree = {"a": object()}
    assert w.sum_tree(tree) is tree and dist.rank_salt(0) == 0


def test_shards_cover_the_batch_in_order():
    for n in range(3, 10):
        parts = [dist.World(rank=r, size=3).shard(list(range(n))) for r in range(3)]
        assert sum(parts, []) == list(range(n)) and all(parts)  # n >= size: nobody empty
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_two_ranks_start_and_reduce(tmp_path):
    marks = launch(tmp_path, """
        import mlx.core as mx
        s = world.sum_floats([world.rank + 1.0])[0]
        t = world.sum_tree({"g": mx.full((3,), float(world.rank + 1))})["g"].tolist()
        INFO = {"sum": s, "tree": t}
    """)
    assert sorted(marks) == [0, 1]
    for m in marks.values():
        assert m["size"] == 2 and m["sum"] == 3.0 and m["tree"] == [3.0, 3.0, 3.0]


def test_a_rank_that_fails_is_reported(tmp_path):
    """The classic mistake (no `python` before a non-executable script): the launcher may exit
    0, but no rank ran; the marker check catches it."""
    with pytest.raises(AssertionError, match="ranks without a marker: \\[0, 1\\]"):
        launch(tmp_path, "pass", python=False, timeout=60)


def test_a_missing_peer_is_a_clear_error(tmp_path):
    """A rank whose peer never starts gives up with one line instead of waiting forever."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["127.0.0.1:47391"], ["127.0.0.1:47392"]]))
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(hosts), dist.JOIN_TIMEOUT_ENV: "2"}
    proc = subprocess.run([sys.executable, "-c", "from aropd_mlx import distributed as d; d.init()"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "rank 0 could not reach the other ranks within 2 s" in proc.stderr


def test_two_rank_update_equals_one_rank_update(tiny_llama, tmp_path):
    """Same replayed rollouts: a 1-rank update on batch B vs a 2-rank update on B/2 each."""
    marks = launch(tmp_path, f"""
        import mlx.core as mx, mlx.optimizers as optim, numpy as np
        from dataclasses import replace
        from mlx.utils import tree_flatten
        from aropd_mlx import trainer
        from aropd_mlx.batches import METHOD_VIEWS, PromptEncoder, draw_batch
        from aropd_mlx.models import Teacher, load_student, trainable
        from aropd_mlx.rollout import Responses
        from aropd_mlx.scoring import score_views
        from helpers import lab_examples, tiny_config
        cfg = tiny_config({str(tiny_llama)!r}, {str(tmp_path / 'unused')!r},
                          **{{"train.method": "ar-opd", "train.batch_size": 4,
                             "model.lora_dropout": 0.0}})
        model, tok = load_student(cfg.model)
        ref, _ = load_student(cfg.model)
        teacher = Teacher.create(model, tok, cfg.model)
        enc = PromptEncoder(cfg, tok)
        batch = draw_batch(cfg, lab_examples(), enc, 0)
        rows, resp = trainer.draw_responses(cfg, model, tok, batch, 0)   # same on both ranks
        pad = tok.pad_token_id or 0
        views = METHOD_VIEWS[cfg.train.method]
        with teacher.active(model) as scorer:
            th = score_views(scorer, {{v: rows[v] for v in views}}, np.array(resp.tokens),
                             resp.lengths, pad)
        settings = trainer.objective_for(cfg)

        def update(m, scored, world):
            acc = trainer.accumulate(cfg, m, scored, settings, world=world)
            return trainer.apply_update(cfg, m, optim.SGD(learning_rate=0.5), acc)

        one = update(ref, trainer.Scored(rows, resp, th, None, pad), dist.World())
        n = resp.tokens.shape[0]
        sl = slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)
        part = Responses(resp.tokens[sl], resp.mask[sl], resp.lengths[sl], resp.finished[sl])
        two = update(model, trainer.Scored({{k: v[sl] for k, v in rows.items()}}, part,
                                           {{k: v[sl] for k, v in th.items()}}, None, pad), world)
        a = {{k: np.array(v) for k, v in trainable(ref).items()}}
        b = {{k: np.array(v) for k, v in trainable(model).items()}}
        start = {{k: np.array(v) for k, v in trainable(load_student(cfg.model)[0]).items()}}
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7)
        assert any(not np.array_equal(a[k], start[k]) for k in a)   # a real update
        np.testing.assert_allclose([two[0], two[1]], [one[0], one[1]], rtol=1e-5)
        for k in one[3]:
            np.testing.assert_allclose(two[3][k], one[3][k], rtol=1e-4, atol=1e-6)
        INFO = {{"rows": sl.stop - sl.start, "loss": two[0], "norm": two[1],
                 "digest": float(sum(v.sum() for v in b.values()))}}
    """)
    assert [marks[r]["rows"] for r in (0, 1)] == [4, 4]  # 4 prompts x G=2, split in halves
    assert marks[0]["digest"] == marks[1]["digest"]  # both ranks hold the same weights


def test_two_rank_training_writes_once_and_resume_checks_world_size(tiny_llama, tmp_path):
    out = tmp_path / "run"
    body = f"""
        from aropd_mlx.models import Teacher, load_student
        from aropd_mlx.trainer import train
        from helpers import lab_examples, tiny_config
        cfg = tiny_config({str(tiny_llama)!r}, {str(out)!r}, **{{"train.steps": 2, "train.save_every": 1}})
        model, tok = load_student(cfg.model)
        summary = train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model),
                        resume=RESUME)
        INFO = {{"steps": summary["steps_done"], "rank_field": summary.get("rank")}}
    """
    marks = launch(tmp_path, body.replace("RESUME", "False"))
    assert marks[0]["steps"] == marks[1]["steps"] == 2 and marks[1]["rank_field"] == 1
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and all(l["world_size"] == 2 for l in lines)
    assert lines[0]["response_tokens"] > 0 and "time_allreduce" in lines[0]
    state = json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())
    assert state["world_size"] == 2 and (out / "adapters.safetensors").is_file()

    # resume with one rank: refused in one line
    from aropd_mlx.errors import UserError
    from aropd_mlx.models import Teacher, load_student
    from aropd_mlx.trainer import train
    from helpers import lab_examples, tiny_config

    cfg = tiny_config(tiny_llama, out, **{"train.steps": 3, "train.save_every": 1})
    model, tok = load_student(cfg.model)
    with pytest.raises(UserError, match="checkpoint was written by a 2-rank run; resume with the "
                                        "same world size"):
        train(cfg, model, tok, lab_examples(), teacher=Teacher.create(model, tok, cfg.model),
              resume=True)
