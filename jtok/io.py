"""The one atomic writer and the one JSONL reader / appender of jtok.

Every JSON file jtok writes (run configs, checkpoint state, manifests, sweep specs, fit
results, summaries) goes through `write_json_atomic`: a temporary file in the same
directory, fsync, rename over the target, fsync of the directory. A reader sees the old
file or the new one, never a mix, and a crash at any point leaves one of the two.

Every JSON-lines file (metrics.jsonl, results.jsonl) is read by `read_jsonl` with one
policy: a torn last line (no newline at the end, and not valid JSON: a writer died in
the middle of it) is dropped with a warning; any other line that is not a JSON object is
corruption and an error naming the file and line. `append_jsonl` first cuts such a torn
tail, so the next record does not glue onto it. Appenders must hold the lock of what
they write (the run directory's or the sweep's): two writers would interleave.

This module is at the bottom of the import graph (like `jtok.errors`): data, run,
training and studies code all use it.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from jtok.errors import JTokError


class FileFormatError(JTokError):
    """A jtok file is corrupt or is not what its name says; the message names the file."""


def fsync_dir(directory: Path | str) -> None:
    """Make a rename or a new file in `directory` durable (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` where `out` is (a sibling of it): a rename when `out` is
    absent; else the old folder is renamed aside first and removed only once `tmp` is in
    place, so a crash leaves either the old folder or the new one, never half of each."""
    import shutil

    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)


def write_text_atomic(path: Path | str, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file, fsync and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path | str, content: bytes) -> None:
    """Write `content` to `path` through a temporary file, fsync and a rename."""
    path = Path(path)
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.chmod(scratch, file_mode())  # mkstemp makes it private: these are for everyone
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, path)
    except BaseException:
        _unlink_quietly(scratch)
        raise
    fsync_dir(path.parent)


def file_mode() -> int:
    """The mode a plain new file gets under the process's umask (0644 under umask 022).

    Read from /proc where it can be: setting the umask to read it back would, for a moment,
    apply 0 to files other threads create."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_tensors(tensors: dict, path: Path | str, metadata: dict[str, str] | None = None):
    """safetensors' save_file, with the file's mode set as for any file the user writes:
    safetensors creates it 0600, which makes a shared checkpoint or export unreadable."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_json_atomic(path: Path | str, data: Any) -> None:
    """Write `data` as indented JSON, atomically (see the module docstring)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path | str, what: str = "file") -> Any:
    """A JSON file's content; a missing, unreadable or invalid file is a FileFormatError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise FileFormatError(f"{what} {path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise FileFormatError(
            f"{what} {path} is not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg})"
        ) from None
    except OSError as err:
        raise FileFormatError(f"cannot read {what} {path}: {err.strerror}") from None


def read_jsonl(path: Path | str, what: str = "file") -> list[dict]:
    """The records of a JSON-lines file (empty when it does not exist); see the policy above."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as err:
        raise FileFormatError(f"cannot read {what} {path}: {err.strerror}") from None
    lines = raw.split(b"\n")
    torn_tail = lines[-1] != b""  # the file does not end with a newline
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if torn_tail and number == len(lines):
                warnings.warn(f"{path}: dropped a half-written last line (line {number})",
                              stacklevel=2)  # fmt: skip
                break
            raise FileFormatError(f"{what} {path} is corrupt at line {number}: not JSON") from None
        if not isinstance(record, dict):
            raise FileFormatError(f"{what} {path} is corrupt at line {number}: not an object")
        records.append(record)
    return records


def cut_torn_tail(path: Path | str) -> None:
    """Remove a last line without its newline (a writer died in it), so appends stay lines.

    A last line that is complete JSON only lacks its newline: it is kept and terminated.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return
    if not raw or raw.endswith(b"\n"):
        return
    head, _, tail = raw.rpartition(b"\n")
    try:
        json.loads(tail.decode("utf-8"))
        fixed = raw + b"\n"
    except (UnicodeDecodeError, json.JSONDecodeError):
        warnings.warn(f"{path}: removed a half-written last line", stacklevel=2)
        fixed = head + b"\n" if head else b""
    write_bytes_atomic(path, fixed)


def append_jsonl(path: Path | str, record: dict, durable: bool = True) -> None:
    """Append one record as a line (after cutting a torn tail); fsync unless `durable` is off."""
    path = Path(path)
    cut_torn_tail(path)
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        if durable:
            os.fsync(file.fileno())


def rewrite_jsonl(path: Path | str, records: list[dict]) -> None:
    """Replace a JSON-lines file with `records`, atomically."""
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
