"""Data-parallel training on MLX's own distributed engine (`mlx.launch`).

    mlx.launch -n 2 --backend ring -- aropd-mlx train ...                 # two ranks, one machine
    mlx.launch --hostfile hosts.json --backend ring -- aropd-mlx train ... # two Macs (DISTRIBUTED.md)

`init()` returns the `World` this process belongs to. (The 1-rank vs 2-rank step benchmark:
aropd_mlx/bench/distributed.py.) Not launched by `mlx.launch` (no
MLX_RANK in the environment), it is a world of one that calls nothing in mx.distributed: every
reduction below returns its input unchanged, so a plain run behaves exactly as before.

Each step every rank draws the same global batch (data.batch_at), takes its contiguous shard
(`shard`), samples and scores its own rollouts with its own seeds, and the trainer sums the
gradients, the loss weight and the metric sums over ranks before the update (`World.reduce`):
the update equals a one-rank run on the whole batch, and every rank applies it, so the weights never drift apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from aropd_mlx.errors import UserError

# Seconds a rank waits for the others to join before it gives up with a clear message
# (MLX's ring backend otherwise waits forever for a peer that never started).
JOIN_TIMEOUT_ENV = "AROPD_DIST_JOIN_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 120.0


@dataclass
class World:
    """This process's place in the run: rank, size and the group (None for a world of one)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    last_reduce_s: float = 0.0  # seconds of the last gradient all-reduce (metrics)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global batch: rank r gets
        items[r*n//size : (r+1)*n//size] (shares differ by at most one; concatenated in rank
        order they are the batch)."""
        if self.size == 1:
            return items
        n = len(items)
        return items[self.rank * n // self.size:(self.rank + 1) * n // self.size]

    def all_sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def sum_floats(self, values: list[float]) -> list[float]:
        """Sum host numbers over ranks in one small all-reduce (float32 on the wire)."""
        if self.size == 1:
            return [float(v) for v in values]
        out = mx.distributed.all_sum(mx.array(np.asarray(values, dtype=np.float32)), group=self.group)
        return [float(v) for v in np.array(out)]

    def max_floats(self, values: list[float]) -> list[float]:
        if self.size == 1:
            return [float(v) for v in values]
        out = mx.distributed.all_max(mx.array(np.asarray(values, dtype=np.float32)), group=self.group)
        return [float(v) for v in np.array(out)]

    def sum_tree(self, tree):
        """All-sum a tree of arrays (the LoRA gradients) as ONE flat float32 buffer: one ring
        all-reduce per step whose size is the size of the trainable parameters."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        if not flat:
            return tree
        buf = mx.concatenate([v.astype(mx.float32).reshape(-1) for _, v in flat])
        buf = mx.distributed.all_sum(buf, group=self.group)
        out, i = [], 0
        for k, v in flat:
            out.append((k, buf[i:i + v.size].reshape(v.shape).astype(v.dtype)))
            i += v.size
        return tree_unflatten(out)

    def reduce(self, grads, values: list[float]):
        """A step's cross-rank reduction: (the gradients summed over ranks, the host numbers
        summed over ranks), evaluated; its seconds go to `last_reduce_s` (metrics). A world of
        one returns both unchanged."""
        if self.size == 1:
            return grads, [float(v) for v in values]
        start = time.perf_counter()
        grads = self.sum_tree(grads)
        values = self.sum_floats(values)
        mx.eval(grads)
        self.last_reduce_s = time.perf_counter() - start
        return grads, values

    def check_same(self, what: str, value: int) -> None:
        """A UserError on every rank unless all ranks hold the same small integer `value`."""
        if self.size == 1:
            return
        lo, hi = self.max_floats([-float(value), float(value)])
        if -lo != hi:
            raise UserError(f"ranks disagree on {what} (rank {self.rank} has {value}; the values "
                            f"range over {-lo:g}..{hi:g}); every rank must run the same command on "
                            "the same data, and --resume needs the run directory on every machine")


_WORLD: World | None = None

_WATCHER = """
import os, select, signal, sys
pid, timeout, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
ready, _, _ = select.select([sys.stdin], [], [], timeout)
if not ready:
    sys.stderr.write(message + "\\n"); sys.stderr.flush()
    os.kill(pid, signal.SIGTERM)
"""


def launched() -> bool:
    """Whether this process was started by mlx.launch (or another MLX launcher)."""
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


def _single_host_ring() -> bool:
    """`mlx.launch -n 1` hands the ring backend an empty hostfile, which MLX cannot parse."""
    path = os.environ.get("MLX_HOSTFILE")
    try:
        return path is not None and not open(path).read().strip()
    except OSError:
        return False


def init(timeout: float | None = None) -> World:
    """The world of this process (made once, then cached). A world of one, without touching
    mx.distributed, unless launched; a rank that cannot reach the others within `timeout`
    seconds (AROPD_DIST_JOIN_TIMEOUT, default 120) exits with a one-line error."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not launched() or _single_host_ring():
        _WORLD = World()
        return _WORLD
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    timeout = float(os.environ.get(JOIN_TIMEOUT_ENV, DEFAULT_JOIN_TIMEOUT)) if timeout is None else timeout

    # init blocks inside C++ holding the GIL, so no Python thread or signal handler can time it
    # out: a tiny watcher process waits on a pipe, and if init has not closed it in time it
    # prints one line and ends this rank (the launcher then stops the others).
    message = (f"aropd-mlx: error: rank {rank} could not reach the other ranks within {timeout:g} s "
               "(a rank failed to start, or a host/port in the hostfile is unreachable; see "
               f"docs/DISTRIBUTED.md; {JOIN_TIMEOUT_ENV} sets the wait)")
    watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(os.getpid()), str(timeout), message],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        group = mx.distributed.init(strict=False)
        if group.size() > 1:  # every rank is up: one tiny all-reduce proves the ring works
            mx.eval(mx.distributed.all_sum(mx.ones(1), group=group))
    except Exception as e:  # noqa: BLE001 - any backend failure becomes one line
        raise UserError(f"rank {rank}: the distributed backend failed to start ({e})") from None
    finally:
        watcher.stdin.close()
        watcher.wait()
    _WORLD = World(group.rank(), group.size(), group if group.size() > 1 else None)
    return _WORLD


def current() -> World:
    """The world made by init(); a world of one if init() was never called."""
    return _WORLD if _WORLD is not None else World()


def rank_salt(rank: int) -> int:
    """Added to a step seed's salt so each rank draws its own rollouts; 0 for rank 0, so rank 0
    (and every one-rank run) keeps exactly the seeds of a plain run."""
    return rank * 1_000_033
