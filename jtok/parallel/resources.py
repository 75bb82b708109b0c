"""What the machine must provide before a command starts work: memory, writable outputs.

`check_memory` compares `jtok.flops.estimate_memory` (a lower bound on what a model needs)
with the memory available on the device, so a size that cannot fit fails at once with
one line naming both figures, instead of an allocator error (or the kernel's OOM killer)
minutes later. `check_output_file` / `check_output_dir` refuse an output path jtok could
not write, before anything runs; neither changes anything on the file system.

Set ``JTOK_NO_MEMORY_CHECK=1`` to skip the memory check (e.g. with swap to spare).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from jtok.config import ModelConfig
from jtok.errors import JTokError
from jtok.flops import MemoryEstimate, estimate_memory, memory_plan, table_memory


class ResourceError(JTokError):
    """The machine cannot provide what a command needs (memory, a writable output)."""


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity where the platform has one."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def available_memory(device) -> int | None:
    """Bytes that can still be allocated on `device` (a torch.device or a name): free
    memory of a CUDA device; on CPU, MemAvailable of /proc/meminfo, capped by a cgroup
    memory limit. None when unknown (another OS, another device type, meta)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(device)[0])
    if kind != "cpu":
        return None
    figures = [_meminfo_available(), _cgroup_headroom()]
    known = [f for f in figures if f is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """The cgroup's memory limit less its usage (cgroup v2, then v1); None if unlimited."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
         "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):  # fmt: skip
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 writes a huge number for "none"
            return max(0, int(limit) - usage)
        return None
    return None


def format_bytes(n: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def check_memory(
    cfg: ModelConfig | Sequence[ModelConfig], device, training: bool, what: str,
    batch: int = 0, seq_len: int | None = None, table_placement: str | Sequence[str] = "device",
    world_size: int = 1, parallel: str = "ddp",
) -> MemoryEstimate:  # fmt: skip
    """Raise ResourceError if the model(s) cannot fit in `device`'s available memory.

    cfg: the model config, or a list of configs whose models are held at once (e.g. the
        variants of `jtok bench`, or one per process sharing the machine); their
        parameters and optimizer states add up, activations count the largest one's.
    device: where the model will live (torch.device or "cpu" / "cuda" / "cuda:1").
    training: count gradients and optimizer state (AdamW, RowAdam for sparse tables)
        besides the parameters; False for eval / sampling.
    what: names the job in the message, e.g. "jtok train" or "jtok bench (3 variants)".
    batch, seq_len: sequences per forward and their length, to count activations too
        (batch 0: parameters and optimizer state only).
    table_placement: "host" counts the tables (and their row-optimizer state) against
        host memory instead of an accelerator's; one placement for every config, or one
        per config (e.g. `jtok bench` holding device-table and host-table models at once).
    world_size, parallel: one process's share under torchrun (FSDP2 shards the backbone;
        jtok.flops.memory_plan). A refusal names the largest item and the `jtok info`
        command that prints the whole plan.

    Returns the estimate. Does nothing (beyond estimating) when the available memory is
    unknown or JTOK_NO_MEMORY_CHECK=1. The message is one line, e.g. "jtok bench needs
    at least 41.2 GiB (params 9.3 GiB, grads ..., ...), but cpu has 22.1 GiB available".
    """
    cfgs = [cfg] if isinstance(cfg, ModelConfig) else list(cfg)
    kind = getattr(device, "type", str(device).split(":")[0])
    act_bytes = 2 if kind == "cuda" else 4  # bf16 autocast on CUDA
    placements = ([table_placement] * len(cfgs) if isinstance(table_placement, str)
                  else list(table_placement))  # fmt: skip
    if len(placements) != len(cfgs):
        raise ValueError("check_memory: one table placement per config")
    if len(cfgs) == 1 and (world_size > 1 or parallel == "fsdp"):
        _check_plan(cfgs[0], device, kind, training, what, batch, seq_len, placements[0],
                    world_size, parallel, act_bytes)  # fmt: skip
    split = [placement == "host" and kind != "cpu" for placement in placements]
    each = [estimate_memory(one, training, batch, seq_len, act_bytes, include_tables=not off)
            for one, off in zip(cfgs, split, strict=True)]  # fmt: skip
    if any(split) and os.environ.get("JTOK_NO_MEMORY_CHECK", "") in ("", "0"):
        host_need = sum(table_memory(one, training).total
                        for one, off in zip(cfgs, split, strict=True) if off)  # fmt: skip
        host_have = available_memory("cpu")
        if host_have is not None and host_need > host_have:
            raise ResourceError(f"{what}: the host tables need {format_bytes(host_need)}, but "
                                f"the host has {format_bytes(host_have)} available")  # fmt: skip
    need = MemoryEstimate(
        params=sum(e.params for e in each), grads=sum(e.grads for e in each),
        optimizer=sum(e.optimizer for e in each),
        activations=max((e.activations for e in each), default=0),  # one forward at a time
    )  # fmt: skip
    if os.environ.get("JTOK_NO_MEMORY_CHECK", "") not in ("", "0"):
        return need
    have = available_memory(device)
    if have is not None and need.total > have:
        parts = [f"{name} {format_bytes(getattr(need, name))}"
                 for name in ("params", "grads", "optimizer", "activations")
                 if getattr(need, name)]  # fmt: skip
        raise ResourceError(
            f"{what} needs at least {format_bytes(need.total)} of memory ({', '.join(parts)}), "
            f"but {device} has {format_bytes(have)} available; use a smaller model or batch "
            "(JTOK_NO_MEMORY_CHECK=1 skips this check)"
        )
    return need


def _check_plan(cfg, device, kind, training, what, batch, seq_len, table_placement,
                world_size, parallel, act_bytes) -> None:  # fmt: skip
    if os.environ.get("JTOK_NO_MEMORY_CHECK", "") not in ("", "0"):
        return
    placement = "host" if table_placement == "host" and kind != "cpu" else "device"
    plan = memory_plan(cfg, training, world_size, parallel, placement, batch, seq_len, act_bytes)
    for side, total, where in (("device", plan["device_total"], device),
                               ("host", plan["host_total"], "cpu")):  # fmt: skip
        have = available_memory(where)
        if have is None or total <= have:
            continue
        item, size = max(plan[side].items(), key=lambda kv: kv[1])
        raise ResourceError(
            f"{what} needs {format_bytes(total)} per process on {where} (largest: {item} "
            f"{format_bytes(size)}), but {format_bytes(have)} is available; see the plan: "
            f"jtok info --world-size {world_size} --parallel {parallel} "
            f"--table-placement {table_placement} ..."
        )


# ---- output paths --------------------------------------------------------------------------


def check_output_file(path: Path | str, what: str) -> None:
    """Refuse a file path jtok could not write (a folder, a missing or read-only parent
    folder, a read-only file), naming it as `what` (e.g. "--out"). Changes nothing."""
    path = Path(path)
    if path.is_dir():
        raise ResourceError(f"{what} {path} is a folder; give a file path")
    parent = path.parent
    if not parent.is_dir():
        state = "is not a folder" if parent.exists() else "does not exist"
        raise ResourceError(f"{what} {path}: folder {parent} {state}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ResourceError(f"{what} {path} is read-only")
    _probe_writable(parent, what, path)


def check_output_dir(path: Path | str, what: str) -> None:
    """Refuse a folder jtok could not create or write into (a file, a read-only folder or
    a read-only ancestor where it would be created), naming it as `what`. Changes nothing."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = path if existing == path else f"{path} (its parent {existing})"
        raise ResourceError(f"{what} {where} is a file, not a folder")
    _probe_writable(existing, what, path)


def _probe_writable(folder: Path, what: str, path: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ResourceError(f"{what} {path}: folder {folder} is read-only")
    try:  # permissions can say yes on a read-only file system: try, then clean up
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".jtok-probe-")
    except OSError as err:
        raise ResourceError(f"{what} {path}: cannot write in {folder}: {err.strerror}") from None
    os.close(fd)
    os.unlink(probe)
