"""Backbone data parallelism with torch's own engine: DDP or FSDP2 (`fully_shard`).

`parallelize` wraps the model for `train.parallel` when torchrun started more than one
process, in this order (torchtitan's): FSDP2 shards each block, then the root; DDP wraps
the whole model. The token-indexed tables are left out of both (DDP ignores their
parameter, FSDP2 gets it as `ignored_params`): their gradients are sparse rows that
neither engine reduces, and jtok averages them itself (jtok.parallel.distributed) until
the sharded store takes the tables over. Gradient accumulation syncs only on the last
micro-batch (`sync_gradients`).

FSDP2 keeps parameters, gradients and optimizer state as DTensors, each process holding a
shard; a launch's checkpoints are DCP's (jtok.run.dcp), which reads them into any layout.
A single-process checkpoint resumed under FSDP2 is sharded by `shard_optimizer_state`.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from jtok.errors import JTokError
from jtok.parallel.distributed import DistEnv

PARALLEL_MODES = ("ddp", "fsdp")


class ParallelError(JTokError):
    """A parallel configuration that cannot run."""


def table_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the model's registered token tables (the device store's)."""
    from jtok.tables.store import TokenTables

    return [(f"{name}.weight" if name else "weight", module.weight)
            for name, module in model.named_modules() if isinstance(module, TokenTables)]


def parallelize(model: nn.Module, env: DistEnv, mode: str, precision: str) -> nn.Module:
    """The module to run forward through: `model` wrapped for `mode` (or itself, alone)."""
    if not env.enabled:
        return model
    if mode not in PARALLEL_MODES:
        raise ParallelError(f"train.parallel must be one of {list(PARALLEL_MODES)}, got {mode!r}")
    tables = table_parameters(model)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # A documented hook of DDP for parameters it must neither bucket nor reduce.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [name for name, _ in tables])
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        # Buffers are kept equal by the trainer (the MoE load is all-reduced before the
        # bias update); broadcasting rank 0's at every forward would drop the others' load
        # counts between accumulated micro-batches. Newer torch deprecates the argument for
        # forward_sync_buffers=False, which still syncs at init, and itself advises keeping
        # broadcast_buffers=False where no buffer may be synced: its warning is expected.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated",
                                    category=FutureWarning)  # fmt: skip
            return DistributedDataParallel(model, device_ids=device_ids,
                                           broadcast_buffers=False)  # fmt: skip
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = env.device.type == "cuda" and precision in ("auto", "bf16")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 else MixedPrecisionPolicy())  # fmt: skip
    ignored = {param for _, param in tables}
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy, ignored_params=ignored or None)
    return model


def sync_gradients(wrapped: nn.Module, mode: str, enabled: bool, last_micro: bool):
    """Context for one micro-batch's backward: reduce gradients only on the last one."""
    if not enabled or last_micro:
        if mode == "fsdp" and enabled:
            wrapped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if mode == "ddp":
        return wrapped.no_sync()
    wrapped.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def _is_dtensor(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def shard_like(full: torch.Tensor, like) -> torch.Tensor:
    """`full` laid out as `like` is (the same DTensor sharding), or `full` itself."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh,
                             like.placements)  # fmt: skip


def shard_optimizer_state(states: list[dict], optimizers) -> list[dict]:
    """Full optimizer states (jtok's checkpoint format) sharded like their parameters."""
    out = []
    for state, opt in zip(states, optimizers.optimizers, strict=True):
        params = [p for group in opt.param_groups for p in group["params"]]
        per_param = {}
        for pid, entries in state["state"].items():
            param = params[int(pid)]
            per_param[pid] = {k: shard_like(v, param) if isinstance(v, torch.Tensor)
                              and v.shape == param.shape else v
                              for k, v in entries.items()}  # fmt: skip
        out.append({"state": per_param, "param_groups": state["param_groups"]})
    return out
