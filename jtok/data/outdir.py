"""Where `prepare` writes: checks of --out, and the staged write that replaces it whole.

`prepare` never writes into the output directory itself. It builds the new data in a
temporary sibling (`.NAME.new-XXXX`, same file system) and, only once every file is
written and synced, swaps it in: the old directory is renamed aside, the new one renamed
in, then the old one deleted. A failure before the swap leaves the old directory as it
was (the sibling is removed); a failed rename puts the old directory back. Readers see
the old directory or the new one, never a mix. An existing empty directory is kept (it may
be a mount point or the current directory) and the files are moved into it, manifest last.

`--overwrite` replaces only what `prepare` writes: a directory holding any other file is
refused (naming it), so no user file is ever deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from jtok.data.format import MANIFEST_FILE, OUTPUT_FILES, DataError
from jtok.io import fsync_dir


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """The directory to write (absolute, a symlink resolved), after refusing what must not
    be replaced."""
    out = Path(os.path.abspath(out))
    if out == out.parent:
        raise DataError(f"--out {out} is a file system root; give a directory for the data")
    if out.is_symlink():
        if not out.exists():
            raise DataError(f"--out {out} is a broken symlink")
        out = out.resolve()
    if out.exists():
        if not out.is_dir():
            raise DataError(f"--out {out} exists and is not a directory")
        try:
            names = sorted(entry.name for entry in out.iterdir())
        except OSError as err:
            raise DataError(f"cannot read --out {out}: {err.strerror}") from None
        if names and not overwrite:
            raise DataError(f"output directory {out} is not empty (overwrite=True, or "
                            "--overwrite, replaces it)")  # fmt: skip
        foreign = [name for name in names if name not in OUTPUT_FILES]
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise DataError(f"--overwrite replaces only a prepared data directory, but {out} "
                            f"also holds {foreign[0]!r}{more}; move it away or pick another "
                            "--out")  # fmt: skip
        if not os.access(out, os.W_OK | os.X_OK):
            raise DataError(f"--out {out} is not writable")
        cwd = Path(os.path.realpath(os.getcwd()))
        if names and cwd.is_relative_to(out.resolve()):
            raise DataError(f"--out {out} holds the current directory; --overwrite replaces "
                            "it whole, so run jtok from outside it")  # fmt: skip
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise DataError(f"cannot create --out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"cannot write in {parent} (read-only or not writable); prepare builds "
                        f"the data there before moving it to --out {out}")  # fmt: skip
    return out


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and missing ancestors; return the ones created, deepest first."""
    missing = []
    while not os.path.lexists(directory) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except OSError as err:
            _remove_empty(missing)
            raise DataError(f"cannot create {path}: {err.strerror}") from None
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for path in directories:  # deepest first
        with contextlib.suppress(OSError):
            path.rmdir()


def _directory_mode(out: Path) -> int:
    if out.is_dir():
        return stat.S_IMODE(out.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _move_files_into(stage: Path, out: Path) -> None:
    """Fill an empty `out` (keeping the directory itself) from `stage`, manifest last."""
    names = sorted((p.name for p in stage.iterdir()), key=lambda name: name == MANIFEST_FILE)
    moved = []
    try:
        for name in names:
            os.rename(stage / name, out / name)
            moved.append(out / name)
    except OSError as err:
        for path in moved:
            with contextlib.suppress(OSError):
                path.unlink()
        raise DataError(f"cannot move the new data into {out}: {err.strerror}") from None
    fsync_dir(out)


def _swap_in(stage: Path, out: Path, log: Callable[[str], Any]) -> None:
    """Rename `stage` to `out`; an existing `out` goes aside first and is deleted last.

    An existing empty `out` (a mount point, the current directory) is kept and filled.
    """
    if out.is_dir() and not any(out.iterdir()):
        _move_files_into(stage, out)
        return
    if not os.path.lexists(out):
        try:
            os.rename(stage, out)
        except OSError as err:
            raise DataError(f"cannot move the new data into {out}: {err.strerror}") from None
        fsync_dir(out.parent)
        return
    aside = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
    try:
        os.rename(out, aside)
    except OSError as err:
        raise DataError(f"cannot replace {out}: {err.strerror}; it is unchanged") from None
    try:
        os.rename(stage, out)
    except OSError as err:
        os.rename(aside, out)
        raise DataError(f"cannot move the new data into {out}: {err.strerror}; the old data "
                        "is back in place") from None  # fmt: skip
    fsync_dir(out.parent)
    try:
        shutil.rmtree(aside)
    except OSError as err:
        log(f"warning: could not delete the old data at {aside}: {err.strerror}")


def _locked(directory: Path) -> int:
    """An open descriptor of `directory` holding an exclusive flock on it: the kernel drops
    the lock when the process dies, so a stage nobody holds was left by a killed prepare."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _remove_stale_stages(out: Path, log: Callable[[str], Any]) -> None:
    """Delete the `.NAME.new-*` folders of killed prepares of `out` (their writer's lock is
    gone); a stage another live prepare holds is left alone."""
    if not out.parent.is_dir():
        return
    for stage in out.parent.glob(f".{glob.escape(out.name)}.new-*"):
        if stage.is_symlink() or not stage.is_dir():
            continue
        try:
            fd = _locked(stage)
        except OSError:
            continue  # a prepare at work, or not ours to judge
        try:
            shutil.rmtree(stage, ignore_errors=True)
        finally:
            os.close(fd)
        log(f"removed {stage.name}, left by an interrupted prepare")


@contextlib.contextmanager
def staged_directory(out: Path, log: Callable[[str], Any] = print) -> Iterator[Path]:
    """A fresh directory beside `out` to write into; swapped in for `out` if the block ends
    normally, removed (and `out` untouched) if it raises. The stage is flock'ed while it is
    written, so the next prepare can tell a killed prepare's stage from a live one's."""
    _remove_stale_stages(out, log)
    created = _make_parents(out.parent)
    try:
        # Made under a name the stale-stage sweep does not match, locked, then renamed: a
        # concurrent prepare never sees this stage unlocked (the lock follows the inode).
        making_prefix = f".{out.name}.making-"
        making = Path(tempfile.mkdtemp(dir=out.parent, prefix=making_prefix))
    except OSError as err:
        _remove_empty(created)
        raise DataError(f"cannot write in {out.parent}: {err.strerror}") from None
    try:
        lock: int | None = _locked(making)
    except OSError:  # a file system without flock: the stage is then never judged stale
        lock = None
    stage = making.with_name(f".{out.name}.new-{making.name[len(making_prefix):]}")
    try:
        os.rename(making, stage)
    except OSError as err:
        shutil.rmtree(making, ignore_errors=True)
        if lock is not None:
            os.close(lock)
        _remove_empty(created)
        raise DataError(f"cannot write in {out.parent}: {err.strerror}") from None
    try:
        yield stage
        os.chmod(stage, _directory_mode(out))
        fsync_dir(stage)
        _swap_in(stage, out, log)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    shutil.rmtree(stage, ignore_errors=True)  # gone already unless files moved one by one
