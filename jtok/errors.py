"""The base class of every error that reports a user mistake.

The CLI prints such errors as one line and exits with status 2. It lives in a module of
its own, free of heavy imports, so that `jtok --help` does not have to load torch.
"""

from __future__ import annotations

import errno
import os
import re

# The machine's state, not a defect: a full disk or quota, a read-only file system, a path
# the user may not write, a file too large for it.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES,
                                errno.EPERM, errno.EFBIG})  # fmt: skip


class JTokError(Exception):
    """A mistake in a config, data, checkpoint, spec or command-line argument."""


def environment_errno(err: BaseException) -> int | None:
    """The errno of an error the machine's state caused (ENVIRONMENT_ERRNOS), else None:
    an OSError's own, or the OS error code inside a safetensors write error's text ("I/O
    error: No space left on device (os error 28)"); safetensors raises its own type."""
    number = err.errno if isinstance(err, OSError) else None
    if number is None and type(err).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)|Os \{ code: (\d+)", str(err))
        number = int(found.group(1) or found.group(2)) if found else None
    return number if number in ENVIRONMENT_ERRNOS else None


def environment_message(err: BaseException, number: int) -> str:
    """"No space left on device: FILE" for an error with `environment_errno` `number`."""
    detail = getattr(err, "strerror", None) or os.strerror(number)
    where = f": {err.filename}" if getattr(err, "filename", None) else ""
    return detail + where
