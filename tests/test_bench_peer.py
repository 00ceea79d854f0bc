"""The peer benchmark's interleaving and statistics, without TRL: fake TRL children (a tiny
python script speaking aropd_mlx.bench.peer_trl's protocol, reporting preset step times) and a
fake "ours", so every number below is computed by hand."""
import io
import json
import math
import sys
import textwrap

import pytest

from aropd_mlx.bench import peer, peer_stats, peer_trl

FAKE_CHILD = textwrap.dedent('''
    import json, os, sys
    from aropd_mlx.bench.peer_trl import plan, say, wait_for_go, StopRounds
    spec = json.loads(sys.argv[1])
    fake = spec["fake"]
    warmup, rounds, k = plan(spec)
    assert k == len(fake["rounds"][0]), (k, fake)
    if fake.get("die_at_start"):
        sys.exit(3)
    with open(fake["log"], "a") as f:
        f.write(f"start {spec['trainer']}-{spec['mode']} {os.getpid()}\\n")
    try:
        for r in range(rounds):
            wait_for_go()
            if fake.get("die_in_round") == r:
                print("boom", file=sys.stderr); sys.exit(4)
            with open(fake["log"], "a") as f:
                f.write(f"round {r} {spec['trainer']}-{spec['mode']} {os.getpid()}\\n")
            times = fake["rounds"][r]
            print("some library noise on stdout", flush=True)
            say("ROUND", {"round": r, "step_seconds": times,
                          "step_cpu_seconds": [2 * t for t in times]})
    except StopRounds:
        sys.exit(0)
    say("RESULT", {"trainer": spec["trainer"], "mode": spec["mode"], "device": spec["device"],
                   "completion_tokens_mean": spec["max_new_tokens"], "pid": os.getpid()})
''')

# per round, per side: the step times each side reports (2 steps per round)
OURS_ROUNDS = [[0.9, 1.1], [2.0, 2.0], [1.0, 1.0]]          # round medians 1.0, 2.0, 1.0
TRL_ROUNDS = {
    "gkd-default": [[3.0, 3.0], [4.0, 6.0], [3.3, 3.3]],    # 3.0, 5.0, 3.3 -> ratios 3, 2.5, 3.3
    "gkd-tuned": [[0.5, 0.5], [1.0, 1.0], [0.6, 0.6]],      # 0.5, 1.0, 0.6 -> ratios 0.5, 0.5, 0.6
    "distill-tuned": [[2.0, 2.0], [5.0, 5.0], [1.5, 1.5]],  # 2.0, 5.0, 1.5 -> ratios 2, 2.5, 1.5
}


class FakeOurs:
    def __init__(self, log, rounds):
        self.log, self.rounds, self.calls = log, rounds, 0
        self.completion_tokens_mean = 8.0

    def measure(self, k):
        with open(self.log, "a") as f:
            f.write(f"round {self.calls} ours\n")
        times = self.rounds[self.calls]
        assert len(times) == k
        self.calls += 1
        return {"step_seconds": times, "step_cpu_seconds": [2 * t for t in times]}


def _run(tmp_path, peers, trl_rounds, model_name="lab", **fake_extra):
    script = tmp_path / "fake_child.py"
    script.write_text(FAKE_CHILD)
    log = tmp_path / "events.log"
    log.write_text("")

    def child_cmd(spec):
        name = f"{spec['trainer']}-{spec['mode']}"
        fake = {"rounds": trl_rounds[name], "log": str(log), **fake_extra.get(name, {})}
        return [sys.executable, str(script), json.dumps({**spec, "fake": fake})]

    lines = []
    r = peer.bench_peer(model_name, rows=2, max_new_tokens=4, rounds=3, steps_per_round=2,
                        peers=peers, model_path=tmp_path, child_cmd=child_cmd,
                        ours_factory=lambda *a: FakeOurs(log, OURS_ROUNDS), log=lines.append,
                        timeout=120)
    return r, log.read_text().splitlines(), lines


def test_spread_and_verdict_by_hand():
    s = peer_stats.spread([3.0, 2.5, 3.3])
    assert s["median"] == 3.0 and s["min"] == 2.5 and s["max"] == 3.3 and s["n"] == 3
    assert s["q1"] == pytest.approx(2.75) and s["q3"] == pytest.approx(3.15)
    one = peer_stats.spread([1.5])
    assert one["median"] == one["min"] == one["max"] == one["q1"] == one["q3"] == 1.5
    assert math.isnan(peer_stats.spread([])["median"])
    assert peer_stats.verdict(1.3, 1.9, 1.2) == "yes"
    assert peer_stats.verdict(1.2, 1.9, 1.2) == "yes"      # the goal is ">="
    assert peer_stats.verdict(0.5, 1.1, 1.2) == "NO"
    assert peer_stats.verdict(1.1, 1.3, 1.2) == "straddles"
    assert peer_stats.verdict(1.0, 2.0, None) == "-"
    assert peer_stats.round_ratios([3.0, 5.0], [1.0, 2.0]) == [3.0, 2.5]


def test_interleaved_rounds_with_fake_children(tmp_path):
    peers = ("gkd-default", "gkd-tuned", "distill-tuned")
    r, events, printed = _run(tmp_path, peers, TRL_ROUNDS)
    # round-robin: every side's round r before any side's round r + 1, in a fixed order
    rounds = [e for e in events if e.startswith("round")]
    sides = ["ours", "gkd-default", "gkd-tuned", "distill-tuned"]
    assert [(e.split()[1], e.split()[2]) for e in rounds] == [
        (str(i), s) for i in range(3) for s in sides]
    assert r["order"] == [f"{i}:{n}" for i in range(3) for n in
                          ["aropd-mlx opd", "trl gkd-default", "trl gkd-tuned", "trl distill-tuned"]]
    # each child started once (before round 0) and served all its rounds from one process
    starts = [e for e in events if e.startswith("start")]
    assert len(starts) == 3 and all(events.index(s) < events.index(rounds[0]) for s in starts)
    for s in starts:
        pid = s.split()[2]
        assert sum(1 for e in rounds if e.endswith(pid)) == 3
    # per side: median s/step of each round, then median and min-max over rounds
    ours = r["runs"]["aropd-mlx opd"]
    assert ours["round_seconds_per_step"] == [1.0, 2.0, 1.0]
    assert ours["seconds_per_step"] == 1.0
    assert (ours["spread"]["min"], ours["spread"]["max"]) == (1.0, 2.0)
    assert ours["tokens_per_s"] == 8 / 1.0
    assert len(ours["step_seconds"]) == 6
    d = r["runs"]["trl gkd-default"]
    assert d["round_seconds_per_step"] == [3.0, 5.0, 3.3] and d["seconds_per_step"] == 3.3
    assert d["completion_tokens_mean"] == 4 and d["device"] == "cpu"  # the child's RESULT
    # ratios TRL / ours per round, median and spread over rounds, verdicts
    q = r["ratios"]["trl gkd-default"]
    assert q["per_round"] == pytest.approx([3.0, 2.5, 3.3])
    assert q["median"] == pytest.approx(3.0)
    assert (q["min"], q["max"]) == pytest.approx((2.5, 3.3))
    assert q["goal"] == 3.0 and q["verdict"] == "straddles"
    t = r["ratios"]["trl gkd-tuned"]
    assert t["per_round"] == pytest.approx([0.5, 0.5, 0.6]) and t["median"] == pytest.approx(0.5)
    assert t["goal"] is None and t["verdict"] == "-"
    f = r["ratios"]["trl fastest"]  # gkd-tuned: the lowest median s/step (0.6)
    assert f["config"] == "trl gkd-tuned" and f["goal"] == 1.2 and f["verdict"] == "NO"
    assert f["median"] == pytest.approx(0.5)
    assert r["ratios"]["trl distill-tuned"]["median"] == pytest.approx(2.0)
    assert r["speedups"]["trl gkd-default"] == pytest.approx(3.0)
    assert r["speedups_cpu"]["trl gkd-default"] == pytest.approx(3.0)  # cpu = 2x wall on both
    # printed: the straddle is said in words; the suite's table carries it too
    text = peer.format_peer(r)
    assert "STRADDLES" in text and "3 rounds x 2 timed steps" in text
    assert any("round 3/3" in line for line in printed)
    from aropd_mlx.bench.suite import goal_rows

    rows = {row["measure"].split(",")[0]: row for row in goal_rows("peer", r)}
    assert rows["opd speed vs trl gkd-default"]["met"] == "straddles"
    assert rows["opd speed vs trl gkd-default"]["result"] == "3.00x [2.50-3.30]"
    assert rows["opd speed vs trl fastest (gkd-tuned)"]["met"] == "NO"
    assert rows["opd speed vs trl fastest (gkd-tuned)"]["goal"] == ">= 1.2x"


def test_fastest_goal_on_56m_and_a_clear_yes(tmp_path):
    fast = {"gkd-tuned": [[0.3, 0.3], [0.6, 0.6], [0.3, 0.3]]}  # 0.3, 0.6, 0.3 vs 1, 2, 1
    r, _, _ = _run(tmp_path, ("gkd-tuned",), fast, model_name="56m")
    f = r["ratios"]["trl fastest"]
    assert f["goal"] == 1.5 and f["median"] == pytest.approx(0.3) and f["verdict"] == "NO"
    slow = {"gkd-default": [[4.0, 4.0], [8.0, 8.0], [3.0, 3.0]]}  # ratios 4, 4, 3
    r, _, _ = _run(tmp_path, ("gkd-default",), slow)
    assert r["ratios"]["trl gkd-default"]["verdict"] == "yes"
    assert r["ratios"]["trl fastest"]["verdict"] == "yes"  # 3x >= 1.2x in every round


def test_a_failing_child_is_reported_and_the_others_go_on(tmp_path):
    r, _, _ = _run(tmp_path, ("gkd-default", "gkd-tuned", "distill-tuned"), TRL_ROUNDS,
                   **{"gkd-tuned": {"die_in_round": 1}, "distill-tuned": {"die_at_start": True}})
    assert "exit 4" in r["runs"]["trl gkd-tuned"]["error"]
    assert "boom" in r["runs"]["trl gkd-tuned"]["error"]
    assert "exit 3" in r["runs"]["trl distill-tuned"]["error"]
    assert set(r["ratios"]) == {"trl gkd-default", "trl fastest"}
    assert r["ratios"]["trl fastest"]["config"] == "trl gkd-default"
    assert "error: exit 4" in peer.format_peer(r)


def test_round_keeper_protocol(capsys):
    keeper = peer_trl.RoundKeeper(warmup=1, rounds=2, k=2, inp=io.StringIO("go\ngo\n"))
    for _ in range(5):
        keeper.begin()
        keeper.end()
    out = [line.split(" ", 1) for line in capsys.readouterr().out.splitlines()]
    assert [o[0] for o in out] == ["AROPD_PEER_WAIT", "AROPD_PEER_ROUND",
                                   "AROPD_PEER_WAIT", "AROPD_PEER_ROUND"]
    rounds = [json.loads(o[1]) for o in out if len(o) == 2]
    assert [x["round"] for x in rounds] == [0, 1]
    assert all(len(x["step_seconds"]) == len(x["step_cpu_seconds"]) == 2 for x in rounds)
    stop = peer_trl.RoundKeeper(warmup=0, rounds=1, k=1, inp=io.StringIO("stop\n"))
    with pytest.raises(peer_trl.StopRounds):
        stop.begin()
    assert peer_trl.plan({"steps": 3}) == (1, 1, 3)  # the old one-shot spec
    assert peer_trl._common_args({"rows": 2, "mode": "tuned", "device": "cuda"}, "/x", 5)[
        "use_cpu"] is False
