"""The sharded store: embedding parallelism, each process holding 1/W of the table rows.

Layout: contiguous row blocks. Process r owns rows [r * B, min((r + 1) * B, R)) of the
(R, d) table matrix, B = ceil(R / W). Contiguous blocks are what DCP reshards natively (a
modulo layout would need a custom planner), and a checkpoint gathered from them is the
single-process matrix, so a run resumes on any number of processes.

Two ways for a batch's rows to meet its hidden states, chosen per batch:

- Raw rows (`_ShardedGather`): a process sends the row addresses of its batch's distinct
  keys to their owners (one all-to-all of int64 ids), the owners gather (one index_select
  each) and send the rows back (one all-to-all of (rows, d)): n rows per distinct key and
  layer, all before the forward. Backward: each row's gradient goes back to its owner,
  which adds what every process sent for its rows and divides by W (the mean over
  processes, as DDP's averaging of the backbone's gradients), as a sparse gradient of its
  block: RowAdam steps only the owner's rows, and its state is the owner's alone.
  Deduplicated on both sides: a process asks for each distinct key once
  (jtok.tables.keys), and an owner reads each requested row once per asking process.
- Pre-mixed (JTok-M, jtok.tables.sharded_premix): the router's top-K indices and weights
  travel to the owners, which return Eq 12's mixed vector, one d-vector per position and
  layer; in backward the vector's gradient goes to the owner, which forms the row
  gradients and dL/dw_i = <g, E_i[x]> for the router.

The rule, per batch: the path with fewer bytes crossing between processes, forward and
(when gradients are on) backward, summed over all processes. Raw: each distinct row
address sent to another process costs 8 + 4d (+ 4d) bytes; pre-mixed: each (position,
layer, owner) request to another process costs 4 + 8K + 4d (+ 4d + 4K). Both counts come
from the keys alone, before any row moves, and they travel in the counts all-to-all every
batch needs anyway: every process receives every process's two totals and makes the same
choice, with no extra collective. Why per batch: raw rows scale with distinct ids times n
(every table of a key travels, since the rows move before the router runs), pre-mixed
vectors with positions, and with Zipfian ids the distinct count grows much slower than the
batch, so the winner changes within ordinary micro-batch sizes. At the `small` preset (V =
8,192, n_e = 5, K = 2) raw is 2.4x the pre-mixed bytes at 512 tokens per process, 1.6x at
2,048, 1.1x at 8,192, 0.86x at 16,384 and 0.63x at 32,768; at n_e = 16, K = 4 pre-mixed
wins up to about 100k tokens (benchmarks/sharded_exchange.py; benchmarks/README.md has the
timings). The rule counts bytes, not messages: pre-mixed makes 4 all-to-alls per layer and
step, raw 3 per step; on one CPU host (gloo) the two paths' step times are within noise.
JTok (one table per layer) always takes the raw path: with K = 1 and w = 1 the pre-mixed
vector is the row itself, and one row per distinct key is never more bytes than one per
position.

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
from jtok.tables.sharded_premix import (
    PremixLayer,
    exchange,
    premix_entries,
    premix_entry_bytes,
    raw_row_bytes,
    world,
)
from jtok.tables.store import TableStoreError, TokenRows, _TableLayout

EXCHANGE_PATHS = ("auto", "raw", "premixed")


def choose_path(rule: str, raw_bytes: int, premixed_bytes: int, can_premix: bool) -> str:
    """The exchange path of one batch, from the global byte counts of both."""
    if rule not in EXCHANGE_PATHS:
        raise TableStoreError(f"sharded exchange path must be one of {list(EXCHANGE_PATHS)}, "
                              f"got {rule!r}")  # fmt: skip
    if not can_premix or rule == "raw":
        return "raw"
    if rule == "premixed":
        return "premixed"
    return "premixed" if premixed_bytes < raw_bytes else "raw"  # a tie: raw, fewer messages


class _Plan:
    """One batch's exchange: both paths counted, the counts agreed in one all-to-all, the
    path chosen, and (raw) the row addresses sent to their owners."""

    def __init__(self, store: ShardedTables, keys: RowKeys):
        W, L, rank = store.world_size, len(store.layers), store.rank
        backward = torch.is_grad_enabled()
        self.rows = store.row_index(keys.distinct_U.to(store.weight.device))
        owner = torch.div(self.rows, store.block, rounding_mode="floor")
        raw_counts = torch.bincount(owner, minlength=W)
        can_premix = store.tables_per_layer > 1  # JTok-M (JTok: always raw, see above)
        entries = premix_entries(store, keys) if can_premix else None
        pre_counts_LW = (entries.counts_LW if entries is not None
                         else raw_counts.new_zeros(L, W))  # fmt: skip
        away = torch.ones(W, dtype=torch.long, device=raw_counts.device)
        away[rank] = 0  # what a process asks of itself crosses nothing
        raw_b = int((raw_counts * away).sum()) * raw_row_bytes(store.d_model, backward)
        pre_b = int((pre_counts_LW.sum(0) * away).sum()) * premix_entry_bytes(
            store.d_model, store.top_k, backward)
        # To each owner: its counts of both paths, and this process's two byte totals
        # (the same to everyone, so every process sums the same numbers).
        message = torch.cat([raw_counts[:, None], pre_counts_LW.T,
                             torch.tensor([[raw_b, pre_b]], device=raw_counts.device)
                             .expand(W, 2)], dim=1)  # fmt: skip
        got = exchange(message, [1] * W, [1] * W, store.meter, "control").tolist()
        totals = (sum(row[L + 1] for row in got), sum(row[L + 2] for row in got))
        self.path = choose_path(store.exchange_path, totals[0], totals[1], can_premix)
        store.last_exchange = {"path": self.path, "raw_bytes": totals[0],
                               "premixed_bytes": totals[1]}  # fmt: skip
        if self.path == "premixed":
            self.layers = tuple(
                PremixLayer(store, entries.pos[i], entries.base[i],
                            pre_counts_LW[i].tolist(), [row[1 + i] for row in got],
                            entries.n_positions)
                for i in range(L))  # fmt: skip
            return
        self.order = torch.argsort(owner, stable=True)  # rows grouped by owner
        self.send_counts = raw_counts.tolist()
        self.recv_counts = [row[0] for row in got]
        requested = exchange(self.rows[self.order], self.send_counts, self.recv_counts,
                             store.meter)  # fmt: skip
        self.local = requested - store.start  # the owner's rows, in its block


class _ShardedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight_local: Tensor, plan: _Plan, store: ShardedTables) -> Tensor:
        served = weight_local.index_select(0, plan.local)
        answered = exchange(served, plan.recv_counts, plan.send_counts, store.meter)
        out = torch.empty_like(answered)
        out[plan.order] = answered  # back to the batch's order
        ctx.plan, ctx.store = plan, store
        ctx.shape = weight_local.shape
        return out

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        plan, store = ctx.plan, ctx.store
        sent = exchange(grad_rows[plan.order].contiguous(), plan.send_counts,
                        plan.recv_counts, store.meter)  # fmt: skip
        grad = torch.sparse_coo_tensor(plan.local[None], sent / store.world_size, ctx.shape,
                                       check_invariants=False)  # fmt: skip
        return grad, None, None


class ShardedTables(_TableLayout, nn.Module):
    """Every token-indexed table of a model, its rows split across the processes."""

    placement = "sharded"
    # "auto" picks per batch the path with fewer bytes; "raw" and "premixed" force one (the
    # same on every process: tests and benchmarks set it on the class or the instance).
    exchange_path = "auto"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._init_layout(cfg)
        self.top_k = cfg.tokmod.top_k if cfg.tokmod.kind == "jtokm" else 1
        self.rank, self.world_size = world()
        # Bytes this process has sent to others ("data": rows, vectors, requests, gradients;
        # "control": the counts), and the last batch's choice with both paths' global bytes.
        self.meter: dict[str, int] = {"data": 0, "control": 0}
        self.last_exchange: dict | None = None
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
        """The batch's rows: gathered here (raw), or left with their owners for each layer's
        JTok-M to mix there (pre-mixed), whichever moves fewer bytes (`choose_path`)."""
        plan = _Plan(self, keys)
        if plan.path == "premixed":
            return TokenRows(plan.layers, keys.inverse_N)
        gathered = _ShardedGather.apply(self._local_weight, plan, self)
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
