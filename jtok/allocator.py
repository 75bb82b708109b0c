"""What the process's C allocator does with freed memory, for benchmark records.

A CPU training step allocates and frees the same large buffers every step: the logits and
their gradient (batch x seq_len x vocab floats: 64 MiB each at the small preset's 2,048
tokens and V = 8192), JTok-M's gathered rows and their gradients. glibc serves any block
above its mmap threshold (at most 32 MiB) with a fresh `mmap` and returns it with `munmap`
on free, and it gives the top of its heap back to the kernel once more than its trim
threshold is free there; each step then faults every page of those buffers in again.
glibc can be told to keep freed memory instead, from the environment:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 jtok train ...

Measured on this project's 2-core VM (benchmarks/README.md, "glibc's allocator, kept or
not"): the small preset's step takes 0.90x the time (baseline) and 0.86x (JTok-M), with
bit-identical results and 7% more peak memory. But the heap fragments (PyTorch asks for
64-byte aligned blocks, which a freed block of the same size does not always fit), and the
cost grows with the largest buffers: with 512 MiB logits (V = 65536) the peak grew by 40%
and the memory held between steps from 0.5 to 2.9 GiB. So jtok does not choose this
for its users; the studies on small models use it (results/README.md). The setting covers
the main thread's heap; other threads' arenas still map blocks above 64 MiB.

`allocator_setting` says which applies, so a benchmark's figures can be compared.
"""

from __future__ import annotations

import os

# glibc's names for what decides whether freed memory is kept: the environment variables
# and the tunables (GLIBC_TUNABLES=glibc.malloc.NAME=VALUE:...).
_TUNABLES = ("mmap_max", "trim_threshold", "mmap_threshold", "top_pad")
_VARIABLES = tuple(f"MALLOC_{name.upper()}_" for name in _TUNABLES)


def glibc_version() -> str | None:
    """"glibc 2.36", or None under another C library or OS."""
    try:
        found = os.confstr("CS_GNU_LIBC_VERSION")
    except (AttributeError, ValueError, OSError):
        return None
    return found if found and found.startswith("glibc") else None


def allocator_environment(environ=None) -> dict[str, str]:
    """The environment's settings of the allocator (the variables above, the malloc
    tunables, a preloaded library), by name."""
    environ = os.environ if environ is None else environ
    found = {name: environ[name] for name in _VARIABLES if name in environ}
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":")
                if t.startswith("glibc.malloc.")]  # fmt: skip
    if tunables:
        found["GLIBC_TUNABLES"] = ":".join(tunables)
    if environ.get("LD_PRELOAD"):
        found["LD_PRELOAD"] = environ["LD_PRELOAD"]
    return found


def allocator_setting(environ=None) -> str:
    """The allocator in words: "glibc 2.36 defaults", "glibc 2.36 with MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=...", "the platform's (not glibc)"; a preloaded library is named."""
    settings = allocator_environment(environ)
    version = glibc_version()
    if version is None:
        base = "the platform's (not glibc)"
    else:
        chosen = [f"{k}={v}" for k, v in settings.items() if k != "LD_PRELOAD"]
        base = f"{version} with {' '.join(chosen)}" if chosen else f"{version} defaults"
    if "LD_PRELOAD" in settings:
        base += f"; LD_PRELOAD={settings['LD_PRELOAD']} may replace malloc"
    return base
