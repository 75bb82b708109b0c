"""Stores: where token-indexed rows live. The model asks a store for rows; it never knows
where they are.

Every store holds all tables of a model as one (n_tok_layers * V * n, d) matrix, row
``(l * V + x) * n + i`` being table i's row for key x in the l-th table-carrying layer,
and answers `rows(keys)` with one gather for all layers: `TokenRows`, one (U, n, d) block
per layer for the U distinct keys of the batch (jtok.tables.keys).

- `TokenTables` (placement "device"): the matrix is a Parameter on the model's device. With
  ``sparse_grad`` its gradient holds only the gathered rows, for `RowAdam`; in JTok-M
  training only the rows some position routes to (jtok.tables.routed).
- `HostTables` (placement "host", jtok.tables.host): the matrix and its row-optimizer
  state stay in host memory; only a batch's gathered rows travel to the accelerator.
- `ShardedTables` (placement "sharded", jtok.tables.sharded): each of W processes holds
  1/W of the rows and their optimizer state; rows travel to the processes that read them.

Placement is a run-time choice (`train.table_placement`, `--table-placement`), not part
of the model config: `make_store(cfg, placement)` builds the store a model uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jtok.config import ModelConfig
from jtok.errors import JTokError
from jtok.tables.keys import CurrentTokenKey, RowKeys

PLACEMENTS = ("device", "host", "sharded")


class TableStoreError(JTokError):
    """A table store cannot be built or used as asked."""


@dataclass
class TokenRows:
    """The table rows a batch needs, gathered once for every layer.

    ``layers[i]`` has shape (U, tables_per_layer, d) for the i-th table-carrying layer;
    position p of the flattened batch reads row ``inverse_N[p]``. (On the sharded store's
    pre-mixed path each is an `OwnerMixedRows` instead: the rows stay with their owners; and
    when the device store trains JTok-M, a `jtok.tables.routed.RoutedRows`: read after
    the layer's router.)
    """

    layers: tuple[Tensor, ...]
    inverse_N: Tensor


class LazyTokenRows:
    """TokenRows whose gather is still running (a background thread, a side stream).

    The model reads ``layers`` only when the first table-carrying layer needs them, so the
    gather overlaps the embedding and everything before that layer. An error in the
    gather surfaces here, on first use, as a TableStoreError (never a hang)."""

    def __init__(self, resolve: Callable[[], tuple[Tensor, ...]], inverse_N: Tensor):
        self._resolve = resolve
        self._layers: tuple[Tensor, ...] | None = None
        self.inverse_N = inverse_N

    @property
    def layers(self) -> tuple[Tensor, ...]:
        if self._layers is None:
            self._layers = self._resolve()
        return self._layers


class OwnerMixedRows:
    """A layer's JTok-M rows left where they live, in place of its (U, n, d) block: the
    sharded store's pre-mixed path (jtok.tables.sharded_premix). JTokM calls `mix` with its
    routing instead of mixing gathered rows itself."""

    def mix(self, weights_NK: Tensor, index_NK: Tensor) -> Tensor:
        """Eq 12 per position: e_ND = sum_k weights_NK[:, k] E_{l, index_NK[:, k]}[x]."""
        raise NotImplementedError


class _TableLayout:
    """Shape bookkeeping every store shares: layers, tables per layer, row addresses."""

    def _init_layout(self, cfg: ModelConfig) -> None:
        self.layers = cfg.tokmod_layers
        self.tables_per_layer = cfg.tokmod.tables_per_layer
        self.vocab_size = cfg.vocab_size
        self.d_model = cfg.d_model
        self.dedup = cfg.tokmod.dedup
        self.sparse_grad = cfg.tokmod.sparse_grad
        self.key = CurrentTokenKey(cfg.vocab_size, dedup=cfg.tokmod.dedup)
        self.n_rows = len(self.layers) * cfg.vocab_size * self.tables_per_layer

    def slot(self, layer: int) -> int:
        """Index into `TokenRows.layers` of a table-carrying layer."""
        return self.layers.index(layer)

    def row_index(self, keys_U: Tensor) -> Tensor:
        """Rows of the table matrix for key values (U,), all layers and tables: (L*U*n,)."""
        layer_start_L1, table_n = self._offsets(keys_U.device)
        token_row = (layer_start_L1 + keys_U[None, :]) * self.tables_per_layer  # (L, U)
        return (token_row[:, :, None] + table_n).reshape(-1)

    def _offsets(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # Two small constant tensors, made once per device: rebuilding them each forward is
        # two kernel launches of pure overhead when decoding one token. Under torch.compile
        # fresh ones, which the compiler folds (a cache would be a side effect to replay
        # on every call).
        def made() -> tuple[Tensor, Tensor]:
            layer_start = torch.arange(len(self.layers), device=device) * self.vocab_size
            return layer_start[:, None], torch.arange(self.tables_per_layer, device=device)

        if torch.compiler.is_compiling():
            return made()
        cache = self.__dict__.setdefault("_offset_cache", {})
        if device not in cache:
            cache[device] = made()
        return cache[device]

    def split_layers(self, rows: Tensor, count: int) -> tuple[Tensor, ...]:
        # (L*U*n, d) -> L blocks of (U, n, d). unbind's backward is one stack, so the
        # gradient of all layers is assembled in one pass, not one full copy per layer.
        return rows.view(len(self.layers), count, self.tables_per_layer, -1).unbind(0)

    def lookup(self, ids: Tensor) -> TokenRows:
        """Rows of every layer for token ids of any shape (the key, then `rows`)."""
        return self.rows(self.key(ids), ids.device)


class TokenTables(_TableLayout, nn.Module):
    """The device store: every table of a model as one Parameter on the model's device."""

    # Optimizer roles of this module's parameters (jtok.training.optim.parameter_roles).
    PARAM_ROLES = {"weight": "table"}
    placement = "device"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self._init_layout(cfg)
        self.weight = nn.Parameter(torch.empty(self.n_rows, cfg.d_model))
        # JTok-M training reads each layer's rows after its router (jtok.tables.routed),
        # where fewer than all n of a key's rows are routed to, with deduplicated keys (the
        # condition for bit-identical results).
        tok = cfg.tokmod
        self.routed_gather = tok.kind == "jtokm" and tok.top_k < tok.n_e and tok.dedup

    def layer_weight(self, layer: int) -> Tensor:
        """The tables of one layer as a (V, n, d) view: E_{l,i}[x] = layer_weight(l)[x, i]."""
        rows = self.vocab_size * self.tables_per_layer
        start = self.slot(layer) * rows
        return self.weight[start : start + rows].view(self.vocab_size, self.tables_per_layer, -1)

    def rows(self, keys: RowKeys, device: torch.device | None = None) -> TokenRows:
        """One gather for all layers; the rows live where the Parameter does."""
        # A sparse gradient only where one is taken: inductor lowers the plain gather into its
        # own loops (fused with the layers that read it), the sparse one stays a library call.
        sparse = self.sparse_grad and torch.is_grad_enabled()
        # Not under torch.compile: the routed rows' gradients reach the Parameter through a
        # collector their backward writes to (a Python side effect), which the compiler
        # runs once while tracing and never again, so compiled tables got no gradient at
        # all. The up-front gather compiles, and trains to the same values.
        if sparse and self.routed_gather and not torch.compiler.is_compiling():
            from jtok.tables.routed import routed_layers

            return TokenRows(routed_layers(self, keys), keys.inverse_N)
        rows = F.embedding(self.row_index(keys.distinct_U), self.weight, sparse=sparse)
        return TokenRows(self.split_layers(rows, keys.count), keys.inverse_N)


DeviceTables = TokenTables  # the name by placement


def make_store(cfg: ModelConfig, placement: str = "device") -> nn.Module:
    """The table store of a model with tables, for a placement in PLACEMENTS."""
    if placement == "device":
        return TokenTables(cfg)
    if placement == "host":
        from jtok.tables.host import HostTables

        return HostTables(cfg)
    if placement == "sharded":
        from jtok.tables.sharded import ShardedTables

        return ShardedTables(cfg)
    raise TableStoreError(f"table placement must be one of {list(PLACEMENTS)}, got "
                          f"{placement!r}")  # fmt: skip
