"""The sharded store: embedding parallelism, each process holding 1/W of the table rows.

Layout: contiguous row blocks. Process r owns rows [r * B, min((r + 1) * B, R)) of the
(R, d) table matrix, B = ceil(R / W). Contiguous blocks are what DCP reshards natively (a
modulo layout would need a custom planner), and a checkpoint gathered from them is the
single-process matrix, so a run resumes on any number of processes.

Forward (`_ShardedGather`): a process sends the row addresses of its batch's distinct keys
to their owners (one all-to-all of int64 ids), the owners gather (one index_select each)
and send the rows back (one all-to-all of (rows, d)). Both sides are deduplicated: a
process asks for each distinct key once (jtok.tables.keys), and an owner reads each
requested row once per asking process.

Backward: each row's gradient goes back to its owner (one all-to-all), which adds what
every process sent for its rows and divides by W (the mean over processes, as DDP's
averaging of the backbone's gradients), as a sparse gradient of its block: RowAdam steps
only the owner's rows, and its state is the owner's alone.

Raw rows travel here (L * U * n rows of d); pre-mixing the K routed rows at the owner
(one d-vector per position and layer) is the alternative the distributed-training issue
asks to measure: at a Zipfian batch (about 670 distinct ids in 2,048 tokens, K = 2)
raw rows can be fewer bytes (see benchmarks/README.md).

The block is a Parameter the module does not register (as the host store's): DDP and
FSDP2 must leave it alone, and `state_dict` must stay the single-process matrix, which
the trainer gathers for checkpoints (`gather_full`).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from jtok.config import ModelConfig
from jtok.tables.keys import RowKeys
from jtok.tables.store import TokenRows, _TableLayout


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _exchange(tensor: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
    """all_to_all of rows: `send_counts[p]` consecutive rows go to process p."""
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts)
    else:
        out.copy_(tensor)
    return out


class _Routing:
    """Who asks whom for which rows, for one batch: kept for the backward."""

    def __init__(self, store: ShardedTables, rows: Tensor):
        world = store.world_size
        owner = torch.div(rows, store.block, rounding_mode="floor")
        self.order = torch.argsort(owner, stable=True)  # rows grouped by owner
        self.send_counts = torch.bincount(owner, minlength=world).tolist()
        counts = torch.tensor(self.send_counts, dtype=torch.long, device=rows.device)
        recv = _exchange(counts, [1] * world, [1] * world) if world > 1 else counts
        self.recv_counts = recv.tolist()
        requested = _exchange(rows[self.order], self.send_counts, self.recv_counts)
        self.local = requested - store.start  # the owner's rows, in its block


class _ShardedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight_local: Tensor, rows: Tensor, store: ShardedTables) -> Tensor:
        routing = _Routing(store, rows)
        served = weight_local.index_select(0, routing.local)
        answered = _exchange(served, routing.recv_counts, routing.send_counts)
        out = torch.empty_like(answered)
        out[routing.order] = answered  # back to the batch's order
        ctx.routing, ctx.store = routing, store
        ctx.shape = weight_local.shape
        return out

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        routing, store = ctx.routing, ctx.store
        sent = _exchange(grad_rows[routing.order].contiguous(), routing.send_counts,
                         routing.recv_counts)  # fmt: skip
        grad = torch.sparse_coo_tensor(routing.local[None], sent / store.world_size, ctx.shape,
                                       check_invariants=False)  # fmt: skip
        return grad, None, None


class ShardedTables(_TableLayout, nn.Module):
    """Every token-indexed table of a model, its rows split across the processes."""

    placement = "sharded"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._init_layout(cfg)
        self.rank, self.world_size = _world()
        self.block = math.ceil(self.n_rows / self.world_size)
        self.start = min(self.n_rows, self.rank * self.block)
        self.stop = min(self.n_rows, self.start + self.block)
        weight = torch.empty(self.stop - self.start, cfg.d_model, device="meta")
        object.__setattr__(self, "_local_weight", nn.Parameter(weight))

    @property
    def weight(self) -> nn.Parameter:
        """This process's block of rows, [start, stop) of the matrix."""
        return self._local_weight

    def store_parameters(self) -> list[nn.Parameter]:
        return [self._local_weight]

    def materialize(self, device: torch.device | str | None = None) -> None:
        """Allocate this process's block, by default on its current device (torchrun sets
        one CUDA device per process) or the CPU."""
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if torch.cuda.is_available() else torch.device("cpu"))  # fmt: skip
        if self._local_weight.device.type == "meta":
            weight = torch.empty(self.stop - self.start, self.d_model, device=device)
            object.__setattr__(self, "_local_weight", nn.Parameter(weight))

    @torch.no_grad()
    def init_rows(self, generator: torch.Generator, std: float) -> None:
        """N(0, std^2), the values the single-process matrix gets from `generator` at this
        point: the draws are made in blocks of rows in order and the others' discarded,
        so the result does not depend on W (memory stays one block)."""
        d, chunk = self.d_model, max(1, (1 << 22) // self.d_model)
        for first in range(0, self.stop, chunk):
            last = min(self.stop, first + chunk)
            draw = torch.empty(last - first, d, device=self._local_weight.device)
            draw.normal_(0.0, std, generator=generator)
            lo, hi = max(first, self.start), min(last, self.stop)
            if lo < hi:
                block = self._local_weight[lo - self.start : hi - self.start]
                block.copy_(draw[lo - first : hi - first])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Only the trainer's gathered matrix (gather_full) is a checkpoint; a bare
        # state_dict() holds no table, so nothing can mistake a block for the matrix.
        return

    def rows(self, keys: RowKeys, device: torch.device | None = None) -> TokenRows:
        rows = self.row_index(keys.distinct_U.to(self._local_weight.device))
        gathered = _ShardedGather.apply(self._local_weight, rows, self)
        return TokenRows(self.split_layers(gathered, keys.count), keys.inverse_N)

    @torch.no_grad()
    def gather_rows(self, local: Tensor) -> Tensor:
        """Every process's block of a per-row tensor (the rows, an optimizer moment, a step
        count), concatenated into the whole: a collective every process joins."""
        if self.world_size == 1:
            return local.detach().clone()
        padded = local.new_zeros((self.block, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)[: self.n_rows]

    def gather_full(self) -> Tensor:
        """The whole (R, d) matrix on every process."""
        return self.gather_rows(self._local_weight)

    def local_rows(self, full: Tensor) -> Tensor:
        """This process's block of a whole per-row tensor."""
        return full[self.start : self.stop]

    @torch.no_grad()
    def load_full(self, matrix: Tensor) -> None:
        """Take this process's block of a full (R, d) matrix."""
        self._local_weight.copy_(self.local_rows(matrix))
