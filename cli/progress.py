"""A live progress bar for training steps: loss, lambda, tokens/s and the ETA."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepProgress:
    def __init__(self, total: int, resume: bool = False):
        self.total = total
        self.console = Console(file=sys.stderr)
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, transient=False, disable=not self.console.is_terminal,
        )
        self.task = None
        self.plain = not self.console.is_terminal
        self.every = max(1, total // 20)
        self.last_kl: tuple[int, float] | None = None  # (step, KL(S||T)) of the latest diagnostics

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("train", total=self.total, loss="-", extra="")
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def update(self, line: dict) -> None:
        extra = f"{line['tokens_per_s']:.0f} tok/s"
        if "kl_student_target" in line:  # diagnostics come every train.diagnostics_every steps
            self.last_kl = (line["step"], line["kl_student_target"])
        if self.last_kl:
            extra += f"  KL(S||T) {self.last_kl[1]:.4f} (step {self.last_kl[0]})"
        self.progress.update(self.task, completed=line["step"], loss=f"{line['loss']:.4f}", extra=extra)
        if self.plain and (line["step"] % self.every == 0 or line["step"] == self.total):
            # Not a terminal (CI, a log file): a line every 5% instead of a live bar.
            print(f"step {line['step']}/{self.total}  loss {line['loss']:.4f}  {extra}  "
                  f"{line['time_step']:.2f}s/step", file=sys.stderr, flush=True)
