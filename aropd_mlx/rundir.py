"""The run directory's life: one run at a time, never a silent overwrite, and an `--overwrite`
that keeps the old run whole until the new one has a checkpoint of its own.

- A run holds an exclusive lock (`fcntl.flock`, non-blocking) on `DIR/.run.lock` from the
  moment it writes there to its end: a second run on the same directory fails at once.
- A new run into a directory that holds a previous run is refused (`--resume` continues it,
  `--overwrite` replaces it).
- `--overwrite` writes the new run into a staging directory next to it (`.DIR.overwrite`) and
  swaps it in (one atomic exchange where the OS has one, else two renames) right after its first
  checkpoint: a crash before then leaves the old run as it was. Without an atomic exchange, a
  crash between the two renames leaves the old run at `.DIR.replaced`: the next run puts it back.
- The run directory is the real one (a symlink or `.` resolved): staging happens next to it.

    check_run_start("runs/x", resume=False, overwrite=False)  # before any work: one line if refused
    with RunDir("runs/x", overwrite=True) as run:
        path = run.open()     # lock, create; the staging directory when replacing a run
        ...                   # write the run into `path`
        path = run.commit()   # after the first checkpoint: the new run replaces the old one
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import sys
from pathlib import Path

from aropd_mlx.checkpoint import check_run_dir, fsync_dir, list_checkpoints
from aropd_mlx.errors import UserError, note

LOCK = ".run.lock"
# What a run writes in its directory: any of these there means a previous run.
RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl", "adapters.safetensors",
             "adapter_config.json", "summary.json", "diagnostics.json", "eval_before.json",
             "lab.json")
# Also the run's own, though never without the files above: the report's plots (`aropd-mlx
# report RUN`, train.report_to), the trackers' folders and record (tracking.py), and compare's
# result.json. An --overwrite replaces them with the rest of the run.
RUN_EXTRAS = ("plots", "tensorboard", "wandb", "tracking.json", "result.json")


def _runs_own(name: str) -> bool:
    """A run file, the lock, or a temporary name a killed run may leave (`*.tmp`, `.tmp-*`)."""
    return name in RUN_FILES or name in RUN_EXTRAS or \
        name in (LOCK, "adapters.tmp.safetensors") or name.endswith(".tmp") or name.startswith(".tmp")


def _real(path: str | Path) -> Path:
    """The run directory itself: a symlink to it, `.` or `..` resolved (staging goes beside it)."""
    return Path(path).expanduser().resolve()


def _replaced(path: Path) -> Path:
    return path.parent / f".{path.name}.replaced"


def _staging(path: Path) -> Path:
    return path.parent / f".{path.name}.overwrite"


def previous_run(path: str | Path) -> list[str]:
    """The run files in `path` (empty: no previous run there)."""
    path = Path(path).expanduser()
    return [name for name in RUN_FILES if (path / name).exists()] if path.is_dir() else []


def _held_by_another(path: Path) -> bool:
    """Is the lock of run directory `path` held (by another run)? Takes nothing."""
    lock = path / LOCK
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _in_use(path: Path) -> UserError:
    return UserError(f"run directory {path} is in use: another run holds its lock "
                     f"({path / LOCK}); wait for it to end, or choose another --out")


def check_run_start(path: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Raise a UserError (one line, nothing written) unless a run may start in `path` now.
    A run an interrupted --overwrite left aside is put back first (put_back)."""
    path = _real(path)
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it: "
                        "give one of them")
    if path.is_dir() and _held_by_another(path):
        raise _in_use(path)
    put_back(path)
    _check_previous(path, resume, overwrite)


def put_back(final: str | Path) -> None:
    """An --overwrite stopped between its two renames (no atomic exchange) left the old run at
    `.DIR.replaced`, the new one at `.DIR.overwrite` and DIR (`final`) without a run. The new
    run has its first checkpoint there (commit() runs right after it): the swap is finished, as
    the --overwrite asked (its --resume goes on with the new run). Where no new run with a
    checkpoint is left, the old run goes back to DIR instead: a run is never lost. The CLI's
    --resume reads DIR/config.yaml first: call this before."""
    final = _real(final)
    old, new = _replaced(final), _staging(final)
    if not previous_run(old) or previous_run(final):  # nothing to put back
        return
    if _held_by_another(old) or (new.is_dir() and _held_by_another(new)):
        raise _in_use(final)  # that --overwrite is still running
    finish = new.is_dir() and bool(list_checkpoints(new))
    source = new if finish else old
    try:
        if final.is_dir() and {p.name for p in final.iterdir()} <= {LOCK}:
            if _held_by_another(final):
                raise _in_use(final)
            (final / LOCK).unlink(missing_ok=True)
            final.rmdir()  # empty: the run takes its place
        os.rename(source, final)
    except FileNotFoundError:  # another run put it back first
        return
    except OSError as e:
        raise UserError(f"{source} holds the run an interrupted --overwrite left, and {final} "
                        f"has none; cannot move it there ({e.strerror or e}): move {source} to "
                        f"{final} yourself") from None
    fsync_dir(final.parent)
    if finish:
        shutil.rmtree(old, ignore_errors=True)  # as that --overwrite's commit() would have
        note(f"{final}: finished an interrupted --overwrite: the new run is in place, the "
             "old one it replaced is deleted")
    else:
        note(f"{final}: put back the run an interrupted --overwrite left at {old}")


def _check_previous(path: Path, resume: bool, overwrite: bool) -> None:
    found = [] if resume else previous_run(path)
    if found and not overwrite:
        raise UserError(f"{path} already holds a run ({', '.join(found[:3])}): use --resume "
                        "to continue it, --overwrite to replace it, or another --out")
    if found:
        foreign = sorted(p.name for p in path.iterdir() if not _runs_own(p.name))
        if foreign:
            raise UserError(f"--overwrite replaces a whole run directory, and {path} also holds "
                            f"{', '.join(foreign[:3])}: move those, or choose another --out")


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2, macOS renamex_np); False where the
    OS or file system has no such call."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform == "darwin":
            fn, args = libc.renamex_np, (bytes(a), bytes(b), 0x2)  # RENAME_SWAP
        else:
            fn, args = libc.renameat2, (-100, bytes(a), -100, bytes(b), 0x2)  # AT_FDCWD, EXCHANGE
    except (OSError, AttributeError):
        return False
    if fn(*args) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


class RunDir:
    """The directory one run writes, locked for the run's life (a context manager; re-entrant).

    `files` ({name: text}) are written into the run directory when it is opened (the CLI's
    evaluation before training, the lab record): they land in the new run, never in an old one."""

    def __init__(self, path: str | Path, *, resume: bool = False, overwrite: bool = False,
                 files: dict[str, str] | None = None):
        self.final = _real(path)
        self.resume, self.overwrite = resume, overwrite
        self.files = dict(files or {})
        self.path: Path | None = None  # where the run writes now
        self.staged = False  # writing into the staging directory (the old run still in place)
        self._fds: list[int] = []
        self._depth = 0

    def __enter__(self) -> "RunDir":
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.close()

    @property
    def staging(self) -> Path:
        return _staging(self.final)

    @property
    def replaced(self) -> Path:
        return _replaced(self.final)

    def _lock(self, path: Path) -> None:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(self.final) from None
        self._fds.append(fd)

    def open(self) -> Path:
        """Create and lock the run directory; returns where the run writes (the staging
        directory while an --overwrite keeps the old run)."""
        if self.path is not None:
            return self.path
        check_run_dir(self.final)
        put_back(self.final)
        created = True
        try:
            self.final.mkdir(parents=True)
        except FileExistsError:
            created = False
        except OSError as e:
            raise UserError(f"cannot create output directory {self.final}: "
                            f"{e.strerror or e} (out / --out)") from None
        try:
            self._lock(self.final)
            _check_previous(self.final, self.resume, self.overwrite)  # again, now under the lock
            for left in (self.staging, self.replaced):  # what a killed --overwrite left
                if left.is_symlink():
                    left.unlink()  # the link only, never what it points to
                elif left.is_dir():
                    shutil.rmtree(left, ignore_errors=True)
            if self.overwrite and previous_run(self.final):
                try:
                    self.staging.mkdir()
                except OSError as e:
                    raise UserError(f"--overwrite cannot create its staging directory "
                                    f"{self.staging} ({e.strerror or e}): move that away") from None
                self._lock(self.staging)
                self.path, self.staged = self.staging, True
            else:
                self.path = self.final
            for name, text in self.files.items():
                tmp = self.path / f"{name}.tmp"
                tmp.write_text(text)
                os.replace(tmp, self.path / name)
        except BaseException:
            self.close()
            if created:
                shutil.rmtree(self.final, ignore_errors=True)
            raise
        return self.path

    def commit(self) -> Path:
        """The staged run replaces the old one (after its first checkpoint); returns the final
        path. Without staging, nothing to do."""
        if not self.staged:
            return self.path
        old = self.staging  # after an exchange it holds the old run
        here = _cwd_under(self.final)
        if not _exchange(self.staging, self.final):
            old = self.replaced
            os.rename(self.final, old)
            os.rename(self.staging, self.final)
        fsync_dir(self.final.parent)
        if here is not None:  # the working directory was in the old run, about to be deleted
            _chdir_nearest(self.final / here)
        self.path, self.staged = self.final, False
        shutil.rmtree(old, ignore_errors=True)
        os.close(self._fds.pop(0))  # the old run's lock, now deleted with it
        return self.final

    def close(self) -> None:
        """Release the lock; a staged run that never reached a checkpoint is removed."""
        if self.staged:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staged = False
        for fd in self._fds:
            os.close(fd)
        self._fds, self.path = [], None


def _cwd_under(path: Path) -> Path | None:
    """Where the working directory is inside `path` (`.`: path itself); None: not inside it."""
    try:
        return Path(os.getcwd()).relative_to(path)
    except (OSError, ValueError):
        return None


def _chdir_nearest(path: Path) -> None:
    """Work in `path` from now on (a relative --out such as `.` names the new run), or in the
    nearest folder above it that exists."""
    while not path.is_dir() and path.parent != path:
        path = path.parent
    os.chdir(path)
