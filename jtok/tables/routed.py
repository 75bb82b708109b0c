"""The device store's routed gather: JTok-M training reads a layer's rows after its router.

The up-front gather (`TokenTables.rows`) reads all n tables' rows of every distinct key
before the forward, but each position mixes only K of them (Eq 12): at n_e / K = 4 most
gathered rows are never used, yet each is copied, stacked into the gradient, zero-tested
and coalesced every step. Here each layer reads, once it has routed, only the (key, table)
pairs some position chose: at n_e 64, K 16 about a quarter of the rows, and a step takes
about 0.75x the time (benchmarks/README.md).

Results equal the up-front gather's to the bit (tests/test_tables_routed.py): a routed
row's values are the same, its gradient is the same sum in the same order (the relabelling
of rows below keeps their order, and embedding_bag's backward orders by it), and rows no
position chose get no gradient either way, so RowAdam steps the same rows with the same
values. One caveat: the gradient's squared norm is summed over fewer rows (the up-front
gradient also holds the unrouted rows' zeros), which can move its last bit; that changes a
step only when gradient clipping acts and the total norm's last bit moves with it (not seen
in our tests). With deduplicated keys only: without dedup a row appears once per position,
and the coalesce that sums those copies orders them by the whole gradient's layout. Eager
only: under torch.compile the store takes the up-front gather (the hand-over of gradients
below is a side effect the compiled backward would drop; tested).

One gradient per forward. Each layer's gather is its own autograd node, so with the table
Parameter as their input autograd would add one sparse gradient per layer into
``weight.grad``, and sparse additions concatenate: quadratic in the number of layers (a
28-layer model paid 2.4x the up-front gather's gradient assembly). Instead every layer's
gather hands its rows' gradient to the forward's `_RoutedGradients`, and a sink node, which
autograd runs only after every layer's gather (their input is its output), assembles one
sparse gradient for the Parameter, in row order. This is ours because
no library gathers rows whose addresses are known only mid-forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from jtok.tables.keys import RowKeys


class _RoutedGradients:
    """The routed rows' gradients of one forward, per table-carrying layer (slot)."""

    def __init__(self):
        self.pieces: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def add(self, slot: int, row_index: Tensor, grad_rows: Tensor) -> None:
        self.pieces.setdefault(slot, []).append((row_index, grad_rows))

    def take(self) -> tuple[Tensor, Tensor, bool] | None:
        """(row indices, gradient rows, whether each row is there once and in order), then
        forget them: each piece reaches the Parameter once, also where a backward is run
        in parts (reentrant activation checkpointing runs one per layer)."""
        if not self.pieces:
            return None
        parts = [part for slot in sorted(self.pieces) for part in self.pieces[slot]]
        in_order = all(len(found) == 1 for found in self.pieces.values())
        self.pieces = {}
        if len(parts) == 1:
            return parts[0][0], parts[0][1], in_order
        return (torch.cat([index for index, _ in parts]), torch.cat([g for _, g in parts]),
                in_order)  # fmt: skip


class _GradientSink(torch.autograd.Function):
    """The link from the table Parameter to every layer's routed gather: forward gives a
    0-dim tensor the gathers take as input; backward, which autograd runs after all of
    them, returns their rows' gradients as one sparse gradient of the Parameter."""

    @staticmethod
    def forward(ctx, weight: Tensor, collector: _RoutedGradients) -> Tensor:
        ctx.collector, ctx.shape = collector, weight.shape
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx, _grad: Tensor):
        taken = ctx.collector.take()
        if taken is None:
            return None, None
        row_index, grad_rows, in_order = taken
        # Slots cover disjoint, increasing ranges of rows and each slot's rows are distinct
        # and ascending, so the gradient is coalesced as built (RowAdam steps it without a
        # sort; autograd's accumulation may drop the flag, which only costs a clip a sort).
        # (Indices in range by construction: the invariant check would cost a pass.)
        grad = torch.sparse_coo_tensor(row_index.unsqueeze(0), grad_rows, ctx.shape,
                                       check_invariants=False, is_coalesced=in_order)  # fmt: skip
        return grad, None


class _RoutedGather(torch.autograd.Function):
    """Rows ``row_index`` of the table; their gradient goes to the forward's collector."""

    @staticmethod
    def forward(ctx, sink: Tensor, weight: Tensor, row_index: Tensor,
                collector: _RoutedGradients, slot: int) -> Tensor:  # fmt: skip
        ctx.save_for_backward(row_index)
        ctx.collector, ctx.slot = collector, slot
        return F.embedding(row_index, weight)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        (row_index,) = ctx.saved_tensors
        ctx.collector.add(ctx.slot, row_index, grad_rows)
        sink_grad = torch.zeros((), dtype=grad_rows.dtype, device=grad_rows.device)
        return sink_grad, None, None, None, None


def routed_layers(store, keys: RowKeys) -> tuple[RoutedRows, ...]:
    """One `RoutedRows` per table-carrying layer of `store` (a `TokenTables`), sharing the
    forward's gradient sink and the addresses of every (layer, key, table) row."""
    if torch.compiler.is_compiling():  # `TokenTables.rows` takes the up-front gather there
        raise RuntimeError("the routed gather cannot run under torch.compile: its gradients "
                           "are collected by a side effect the compiled backward drops")
    collector = _RoutedGradients()
    sink = _GradientSink.apply(store.weight, collector) if store.weight.requires_grad else None
    row_index = store.row_index(keys.distinct_U)  # (L * U * n,): small next to the rows
    return tuple(RoutedRows(store, slot, keys, row_index, sink, collector)
                 for slot in range(len(store.layers)))  # fmt: skip


class RoutedRows:
    """One layer's JTok-M rows on the device store, read after the layer's router has run:
    only the (key, table) pairs some position routes to, each once (see the module).
    `JTokM` mixes them (Eq 12) as it mixes an up-front block."""

    def __init__(self, store, slot: int, keys: RowKeys, row_index: Tensor,
                 sink: Tensor | None, collector: _RoutedGradients):  # fmt: skip
        self.store, self.slot, self.keys, self.row_index = store, slot, keys, row_index
        self.sink, self.collector = sink, collector

    def gather(self, index_NK: Tensor) -> tuple[Tensor, Tensor]:
        """(the routed rows (P, d), bag_NK): position p's k-th choice is row bag_NK[p, k]."""
        keys = self.keys
        n_pairs = keys.count * self.store.tables_per_layer
        # Pair p = u * n + i is table i's row for distinct key u, the layer's block of
        # `row_index`. The routed pairs, each once and ascending, by marking (no sort:
        # linear in U * n and N * K).
        pair_NK = keys.inverse_N.unsqueeze(1) * self.store.tables_per_layer + index_NK
        used = torch.zeros(n_pairs, dtype=torch.bool, device=pair_NK.device)
        used[pair_NK] = True
        routed_P = used.nonzero().squeeze(1)
        slot_of = torch.empty(n_pairs, dtype=torch.int64, device=pair_NK.device)
        slot_of[routed_P] = torch.arange(routed_P.numel(), device=pair_NK.device)
        rows = self.row_index[self.slot * n_pairs + routed_P]
        weight = self.store.weight
        if self.sink is None:  # the tables are frozen: no gradient to collect
            return F.embedding(rows, weight), slot_of[pair_NK]
        return (_RoutedGather.apply(self.sink, weight.detach(), rows, self.collector, self.slot),
                slot_of[pair_NK])  # fmt: skip
