"""Experiment tracking: each step's metrics line to Weights & Biases and/or TensorBoard.

`train.report_to: [wandb, tensorboard]` (or one name; mlx-lm's `report_to`). Rank 0 logs, to
each tracker, exactly what it appends to metrics.jsonl (the diagnostics included, on the steps
that carry them), under the same names and step numbers; the resolved config at the start; at
the end the report plots (`aropd-mlx report`, when matplotlib is there) and the summary.

    tracking = Tracking(cfg, resume=False)   # inert until started; nothing imported yet
    tracking.start(run_dir, first_step=0)    # the run directory is final: open the trackers
    tracking.log(line)                       # one metrics line
    tracking.finish(run_dir, summary)        # plots, summary, close

Where: W&B writes under RUN/wandb (its project: train.project_name, default aropd-mlx; one W&B
run per run directory, its id kept in RUN/tracking.json so that `--resume` continues it;
WANDB_MODE=offline works as usual), TensorBoard under RUN/tensorboard
(`tensorboard --logdir RUN/tensorboard`). Lines logged before start() (a run writing into a
staging directory until its first checkpoint, `--overwrite`) wait and go out once it starts.

A resumed run repeats the steps after its checkpoint bit for bit, so their values are those
already logged (all but the timings): W&B continues the same run (online it keeps the first
copy: the steps it has are skipped; offline each start is a file of that run id, merged by
`wandb sync`), TensorBoard is told to drop what it holds from the resumed step on (a purge
event, as torch's `purge_step`).
Both libraries are optional extras, imported only when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
import uuid
from pathlib import Path

from aropd_mlx.errors import UserError, note

TRACKERS = {"wandb": "wandb", "tensorboard": "tensorboard"}  # name -> the package it needs
INSTALL = {"wandb": "pip install 'aropd-mlx[wandb]' (or: pip install wandb)",
           "tensorboard": "pip install 'aropd-mlx[tensorboard]' (or: pip install tensorboard)"}


def check_trackers(names) -> None:
    """A one-line UserError for a tracker whose package is not installed (imports nothing)."""
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"train.report_to: unknown tracker {name!r} (use "
                            f"{' or '.join(TRACKERS)})")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"train.report_to: {name} is not installed: {INSTALL[name]}")


def _scalars(line: dict) -> dict[str, float]:
    """The numeric entries of a metrics line but its step (booleans as 0/1)."""
    return {k: float(v) for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v))}


class _WandB:
    def __init__(self, run_dir: Path, cfg, config: dict, resume: bool):
        import wandb

        self.wandb = wandb
        record = run_dir / "tracking.json"
        saved = json.loads(record.read_text()) if resume and record.is_file() else {}
        run_id = saved.get("wandb_id") or uuid.uuid4().hex[:12]
        record.write_text(json.dumps({**saved, "wandb_id": run_id}))
        (run_dir / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(project=cfg.train.project_name or "aropd-mlx", name=run_dir.name,
                              dir=str(run_dir), config=config, id=run_id, resume="allow")

    def log(self, line: dict) -> None:
        step = int(line["step"])
        if step < (getattr(self.run, "step", 0) or 0):  # a resumed run's repeated step
            return
        self.run.log(_scalars(line), step=step)

    def finish(self, plots: list[Path], summary: dict, step: int) -> None:
        if plots:
            self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p)) for p in plots}, step=step)
        self.run.summary.update({k: v for k, v in summary.items()
                                 if isinstance(v, (int, float, str))})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _TensorBoard:
    def __init__(self, run_dir: Path, config_text: str, purge_step: int | None):
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.pb = (event_pb2, summary_pb2)
        self.writer = EventFileWriter(str(run_dir / "tensorboard"))
        if purge_step is not None:  # TensorBoard drops what earlier files hold from here on
            self._event(purge_step, session_log=event_pb2.SessionLog(
                status=event_pb2.SessionLog.START))
        text = summary_pb2.Summary.Value(
            tag="config", metadata=summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")),
            tensor=tensor_pb2.TensorProto(dtype=7, string_val=[config_text.encode()]))  # string
        self._event(0, summary=summary_pb2.Summary(value=[text]))

    def _event(self, step: int, **fields) -> None:
        self.writer.add_event(self.pb[0].Event(wall_time=time.time(), step=step, **fields))

    def log(self, line: dict) -> None:
        Summary = self.pb[1].Summary
        values = [Summary.Value(tag=k, simple_value=v) for k, v in _scalars(line).items()]
        self._event(int(line["step"]), summary=Summary(value=values))
        self.writer.flush()  # a step takes seconds: every line on disk at once

    def finish(self, plots: list[Path], summary: dict, step: int) -> None:
        Summary = self.pb[1].Summary
        images = []
        for p in plots:
            png = p.read_bytes()  # PNG header: width, height at bytes 16..24 (big-endian)
            width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
            images.append(Summary.Value(tag=f"plots/{p.stem}", image=Summary.Image(
                height=height, width=width, colorspace=4, encoded_image_string=png)))
        if images:
            self._event(step, summary=Summary(value=images))

    def close(self, failed: bool) -> None:
        self.writer.close()


class Tracking:
    """The trackers of one run (none: every call does nothing)."""

    def __init__(self, cfg, *, resume: bool = False):
        self.cfg, self.resume, self.names = cfg, resume, tuple(cfg.train.report_to)
        self.trackers: list | None = None
        self.pending: list[dict] = []
        self.last_step = 0

    def start(self, run_dir: Path, first_step: int = 0) -> None:
        """Open the trackers in the (final) run directory; `first_step`: the step a resumed
        run continues after (0: a fresh run)."""
        if not self.names or self.trackers is not None:
            return
        check_trackers(self.names)  # here: only the rank that logs needs the packages
        import yaml

        from aropd_mlx.config import to_dict

        config = to_dict(self.cfg)
        run_dir, self.trackers = Path(run_dir), []
        self.last_step = max(self.last_step, first_step)  # a resumed finished run: its plots there
        for name in self.names:
            if name == "wandb":
                self.trackers.append(_WandB(run_dir, self.cfg, config, self.resume))
            else:
                # a resumed run's events past its checkpoint (step 0 too: none) go: the
                # metrics past it were cut back, and the steps are logged again
                purge = first_step + 1 if self.resume else None
                text = "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```"
                self.trackers.append(_TensorBoard(run_dir, text, purge))
        for line in self.pending:
            self.log(line)
        self.pending = []

    def log(self, line: dict) -> None:
        if not self.names:
            return
        if self.trackers is None:
            self.pending.append(line)
            return
        self.last_step = int(line["step"])
        for t in self.trackers:
            t.log(line)

    def finish(self, run_dir: Path, summary: dict) -> None:
        """The report plots (RUN/plots, as `aropd-mlx report` draws them) and the summary."""
        if not self.trackers:
            return
        plots = []
        if importlib.util.find_spec("matplotlib") is not None:
            from aropd_mlx.report import report

            try:
                plots = report([run_dir], out=Path(run_dir) / "plots")
            except (UserError, OSError, ValueError) as e:
                note(f"report_to: no plots ({e})")
        for t in self.trackers:
            t.finish(plots, summary, self.last_step)

    def close(self, failed: bool = False) -> None:
        for t in self.trackers or []:
            t.close(failed)
        self.trackers = None

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.close(failed=exc_type is not None)
