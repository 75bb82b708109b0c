"""Data parallelism across processes launched by torchrun (gloo on CPU, nccl on GPU).

Each process computes the gradient of its share of the global batch; `average_gradients`
then averages them over processes, after backward and before clipping and the optimizer
step. Dense gradients travel as one flat all-reduce. Sparse table gradients (rows of the
distinct tokens each process saw, a different set per process) are all-gathered and
summed row-wise, which no all-reduce can do. Averaging after backward instead of hooking
into it (as torch's DistributedDataParallel does) gives up overlapping communication
with backward, and in exchange handles sparse gradients, MoE experts that received no
token on some process, and gradient accumulation without special cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str) -> torch.device:
    """The device of a config's ``train.device``: "auto" takes CUDA when available.

    "cuda" on a machine without CUDA, or an unknown name, is a one-line ConfigError."""
    from jtok.config import DEVICES, ConfigError

    if preference not in DEVICES:
        raise ConfigError(f"train.device: must be one of {list(DEVICES)}, got {preference!r}")
    if preference == "cuda" and not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if torch.version.cuda is None
               else "no CUDA device is visible")  # fmt: skip
        raise ConfigError(f"train.device: 'cuda' requested but {why}; use cpu or auto")
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
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
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


def average_gradients(model: torch.nn.Module, env: DistEnv) -> None:
    """Replace every gradient by its mean over processes (dense and sparse alike).

    A parameter without a gradient on some process (an MoE expert no local token
    chose) takes part with zeros, so every process runs the same collectives.
    """
    if not env.enabled:
        return
    dense, sparse = [], []
    for param in model.parameters():
        if param.grad is not None and param.grad.is_sparse:
            sparse.append(param)
        elif param.grad is not None or param.requires_grad:
            dense.append(param)
    for param in dense:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    if dense:
        flat = torch.cat([p.grad.reshape(-1) for p in dense])
        all_reduce_mean_(flat, env)
        offset = 0
        for p in dense:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
    for param in sparse:
        grad = param.grad.coalesce()
        indices = _all_gather_rows(grad.indices().T.contiguous(), env).T
        values = _all_gather_rows(grad.values(), env) / env.world_size
        param.grad = torch.sparse_coo_tensor(indices, values, grad.shape).coalesce()
