"""The parent's side of the peer benchmark's protocol with its long-lived TRL children.

Each child runs `python -m aropd_mlx.bench.peer_trl SPEC` (the child's side, whose docstring
describes the line protocol); `PeerChild` starts it, waits for its warm-up, asks it for one
round at a time and collects its result. `PeerError` is any failure of a child.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time

from aropd_mlx.bench.peer_trl import PREFIX


class PeerError(RuntimeError):
    pass


def trl_command(spec: dict) -> list[str]:
    return [sys.executable, "-m", "aropd_mlx.bench.peer_trl", json.dumps(spec)]


class PeerChild:
    """One child speaking peer_trl's protocol: started (and warmed up) by `start`, then one
    `run_round()` per round; the child is blocked on stdin between rounds."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None,
                 start_timeout: float = 1800, round_timeout: float = 1800):
        self.name, self.argv, self.env = name, argv, env
        self.start_timeout, self.round_timeout = start_timeout, round_timeout
        self.lines: queue.Queue = queue.Queue()
        self.proc = None
        self.result: dict | None = None

    def start(self) -> None:
        self.err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1, env=self.env)
        threading.Thread(target=self._pump, daemon=True).start()
        self._expect(("WAIT",), self.start_timeout)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.lines.put(line[len(PREFIX):].rstrip("\n"))
        self.lines.put(None)  # EOF

    def _expect(self, kinds: tuple[str, ...], timeout: float) -> tuple[str, dict | None]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.close(kill=True)
                raise PeerError(f"no {'/'.join(kinds)} within {timeout:.0f}s") from None
            if line is None:
                raise PeerError(self._died())
            kind, _, payload = line.partition(" ")
            data = json.loads(payload) if payload else None
            if kind == "RESULT":
                self.result = data
            if kind in kinds:
                return kind, data

    def _died(self) -> str:
        rc = self.proc.wait()
        self.err.seek(0)
        tail = self.err.read().strip().splitlines()[-3:]
        return f"exit {rc}: " + (" | ".join(tail) or "(nothing on stderr)")

    def run_round(self) -> dict:
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise PeerError(self._died()) from None
        _, data = self._expect(("ROUND",), self.round_timeout)
        self._expect(("WAIT", "RESULT"), self.round_timeout)  # idle again before the next side
        return data

    def finish(self, timeout: float = 120) -> dict | None:
        """After the last round: the child's RESULT (configuration, completion lengths)."""
        if self.result is None and self.proc and self.proc.poll() is None:
            try:
                self._expect(("RESULT",), timeout)
            except PeerError:
                pass
        self.close()
        return self.result

    def close(self, kill: bool = False) -> None:
        if not self.proc:
            return
        if self.proc.poll() is None:
            try:
                if kill:
                    self.proc.kill()
                else:
                    self.proc.stdin.write("stop\n")
                    self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # torch brings its own BLAS; keep the MLX preload out of it
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env
