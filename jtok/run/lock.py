"""An exclusive lock on a run directory, held for the whole life of a training run.

`flock` on RUN/.jtok.lock: the kernel drops it when the holder dies, so a lock left by a
killed process is free again at once, and nothing has to be cleaned up. A trainer,
`--overwrite`, `--resume` and a sweep all take this same lock; readers (eval, sample)
take none. Under torchrun only rank 0 holds it.

flock locks belong to an open file description, so a second `open` + `flock` by the same
process would block on its own lock (a sweep holds a run's lock, then trains it). Locks
are therefore re-entrant within a process: a registry counts nested holds of a path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from jtok.errors import JTokError
from jtok.run.files import LOCK_FILE


class RunBusyError(JTokError):
    """The run directory cannot be locked: another process holds it, or it cannot be made."""


_held: dict[str, tuple[object, int]] = {}  # resolved lock path -> (open file, depth)


def _holder_pid(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "?"
    return text or "?"


def try_lock(run_dir: Path | str) -> bool:
    """Take the run's lock if free (creating the directory); False if another process holds it."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        key = str(path.resolve())
        if key in _held:
            handle, depth = _held[key]
            _held[key] = (handle, depth + 1)
            return True
        handle = open(path, "a+")
    except OSError as err:
        raise RunBusyError(f"cannot use {run_dir} as a run directory: "
                           f"{err.strerror or err}") from None  # fmt: skip
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    _held[key] = (handle, 1)
    return True


def unlock(run_dir: Path | str) -> None:
    key = str((Path(run_dir) / LOCK_FILE).resolve())
    handle, depth = _held[key]
    if depth > 1:
        _held[key] = (handle, depth - 1)
        return
    del _held[key]
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def lock_run(run_dir: Path | str) -> None:
    """Take the run's lock or raise RunBusyError naming the holder's pid."""
    if not try_lock(run_dir):
        pid = _holder_pid(Path(run_dir) / LOCK_FILE)
        raise RunBusyError(f"{run_dir} is in use by another jtok process (pid {pid}); wait for "
                           "it to finish or stop it first")  # fmt: skip


@contextlib.contextmanager
def run_lock(run_dir: Path | str):
    """Hold the run's lock for the block; RunBusyError if another process holds it."""
    lock_run(run_dir)
    try:
        yield
    finally:
        unlock(run_dir)


def is_locked(run_dir: Path | str) -> bool:
    """Whether some process (this one included) holds the run's lock. Creates nothing."""
    path = Path(run_dir) / LOCK_FILE
    if str(path.resolve()) in _held:
        return True
    if not path.is_file():
        return False
    with open(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False
