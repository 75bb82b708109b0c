"""Processes launched by torchrun (gloo on CPU, nccl on GPU): the process group, the
device of each process, small collectives, and the averaging of sparse table gradients.

The backbone's dense gradients are averaged by torch's own engine (DDP or FSDP2, see
jtok.parallel.wrap), overlapped with backward. The replicated tables' sparse gradients
(the rows of the distinct tokens each process saw, a different set on each) are not a
case either engine handles: `average_table_gradients` all-gathers them and sums them
row-wise, which no all-reduce can do. (The sharded store of embedding parallelism, which
exchanges rows with their owners instead, replaces this for large tables.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from jtok.tables.row_adam import nonzero_positions


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this call made the process group, so shutdown ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, option: str = "train.device") -> torch.device:
    """The device of a config's ``train.device`` (or of the command-line `option` that
    names one): "auto" takes CUDA when available.

    "cuda" on a machine without CUDA, or an unknown name, is a one-line ConfigError that
    names `option`."""
    from jtok.config import DEVICES, ConfigError

    if preference not in DEVICES:
        raise ConfigError(f"{option}: must be one of {list(DEVICES)}, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")  # fmt: skip
        raise ConfigError(f"{option}: 'cuda' requested but {why}; use cpu or auto")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistEnv:
    """Join the process group torchrun describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_preference)
    if world_size <= 1:
        return DistEnv(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:  # a caller that trains several runs in one launch makes the group once
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                   owns_group=owns)  # fmt: skip


def shutdown(env: DistEnv) -> None:
    # Only the group this process made for one run: destroying and making process groups
    # again and again in one launch can hang in gloo's rendezvous.
    if env.enabled and env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(env.world_size)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _all_gather_rows(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Concatenate each process's `tensor` (any number of rows) along dim 0."""
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(env.world_size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts, strict=True)])


def average_table_gradients(params: list[torch.nn.Parameter], env: DistEnv) -> None:
    """Replace each replicated table's sparse gradient by its mean over processes.

    Every process calls it with the same parameters (a table no local token touched takes
    part with an empty gradient), so every process runs the same collectives."""
    if not env.enabled:
        return
    for param in params:
        grad = param.grad
        if grad is None:
            no_rows = torch.empty(1, 0, dtype=torch.long, device=param.device)
            grad = torch.sparse_coo_tensor(no_rows, param.new_empty(0, *param.shape[1:]),
                                           param.shape)  # fmt: skip
        grad = grad.coalesce()
        # Only the rows with a nonzero gradient travel (the rows RowAdam steps). Besides the
        # bytes, this makes the mean independent of the zero rows a store's gradient holds
        # (the device store's up-front and routed gathers differ only in those): coalesce
        # orders the sum of a row's copies from 3+ processes by the whole layout.
        kept = nonzero_positions(grad.values())
        indices = _all_gather_rows(grad.indices()[:, kept].T.contiguous(), env).T
        values = _all_gather_rows(grad.values().index_select(0, kept), env) / env.world_size
        param.grad = torch.sparse_coo_tensor(indices, values, grad.shape).coalesce()
