"""How the `jtok` program tunes glibc's allocator: freed memory is kept for reuse.

A CPU training step allocates and frees the same large buffers every step: the logits and
their gradient (batch x seq_len x vocab floats: 64 MiB each at the small preset's 2,048
tokens and V = 8192), JTok-M's gathered rows and their gradients. glibc serves any block
above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it with `munmap`
on free, and it gives the top of its heap back to the kernel once more than its trim
threshold is free there. Each step then faults every page of those buffers in again, and
the kernel zeroes each one. Measured on this project's 2-core VM (benchmarks/README.md,
"The jtok program keeps freed memory"): about 74,000 page faults and 150-220 ms of kernel
time per step of the small preset. With freed memory kept there are none in the steady
state, and the step takes 0.90x the time for the baseline, 0.86x for JTok-M (8 alternating
pairs of processes), at 7% more peak memory. Results are bit-identical: PyTorch aligns
every CPU buffer to 64 bytes wherever it comes from.

So when `jtok` runs as a program (`jtok ...`, `python -m jtok ...`, torchrun's workers),
`keep_freed_memory` tells glibc (`mallopt`):
- never to serve a block with its own mmap (M_MMAP_MAX = 0): large blocks come from the
  heap and are reused;
- to keep up to 2 GiB free at the heap's top (M_TRIM_THRESHOLD), so the next step's peak
  finds its pages already mapped.

The cost: the process keeps what it freed, and large blocks fragment the heap a little
(PyTorch asks for 64-byte aligned blocks, which a freed block of the same size does not
always fit). A training process reaches the same peak every step, so its resident memory
stays near that peak: 7% above glibc's defaults at the small preset (2,020 MiB against
1,890). Nothing is changed
- when the environment sets glibc's mmap or trim settings (`MALLOC_MMAP_MAX_`,
  `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TOP_PAD_` or their
  `GLIBC_TUNABLES` names): the user's choice stands (a `mallopt` call would override it);
- with ``JTOK_SYSTEM_MALLOC=1``;
- outside glibc (another C library, another OS), and when `main` is called with an argv
  (tests, or a program that embeds jtok): a library does not choose its caller's
  allocator.
An allocator preloaded with ``LD_PRELOAD`` (jemalloc, tcmalloc) replaces `malloc`, so
glibc's settings do not apply to it; the setting says so.
"""

from __future__ import annotations

import ctypes
import os

OPT_OUT = "JTOK_SYSTEM_MALLOC"
# mallopt parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int takes: about 2 GiB

_setting = "glibc defaults (not configured)"


def allocator_setting() -> str:
    """What this process's allocator does with freed memory, in words (benchmark records)."""
    return _setting


def _glibc_version() -> str | None:
    try:
        found = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; absent elsewhere
    except (AttributeError, ValueError, OSError):
        return None
    return found if found and found.startswith("glibc") else None


# What a user may already have set for the two settings (glibc's tunables and the older
# environment variables); the top pad and mmap threshold are read as a choice too.
_TUNABLES = ("mmap_max", "trim_threshold", "mmap_threshold", "top_pad")
_VARIABLES = tuple(f"MALLOC_{name.upper()}_" for name in _TUNABLES)


def _users_choice(environ) -> str | None:
    """The environment variable that already sets what `keep_freed_memory` would, if any."""
    for name in _VARIABLES:
        if name in environ:
            return name
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(f"glibc.malloc.{name}" in tunables for name in _TUNABLES):
        return "GLIBC_TUNABLES"
    return None


def keep_freed_memory(environ=None, libc=None) -> str:
    """Tell glibc to keep freed memory (see the module's docstring); returns the setting.

    `environ` (default os.environ) and `libc` (default: this process's C library) are
    parameters so the rules can be tested without changing the test process."""
    global _setting
    environ = os.environ if environ is None else environ
    preloaded = environ.get("LD_PRELOAD", "")
    if environ.get(OPT_OUT, "") not in ("", "0"):
        _setting = f"glibc defaults ({OPT_OUT} set)"
    elif (choice := _users_choice(environ)) is not None:
        _setting = f"the environment's ({choice} set)"
    elif (version := _glibc_version() if libc is None else "glibc (given)") is None:
        _setting = "the platform's (not glibc)"
    else:
        try:
            mallopt = (ctypes.CDLL(None) if libc is None else libc).mallopt
        except (OSError, AttributeError):  # a stripped or unusual build: leave it alone
            _setting = f"{version} defaults (no mallopt)"
            return _setting
        done = mallopt(_M_MMAP_MAX, 0) == 1
        done = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
        _setting = (f"{version}: freed memory kept (no mmap per block, 2 GiB trim threshold)"
                    if done else f"{version} defaults (mallopt refused)")  # fmt: skip
        if preloaded:
            _setting += f"; LD_PRELOAD={preloaded} may replace malloc"
    return _setting
