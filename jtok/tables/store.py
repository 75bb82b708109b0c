"""Where token-indexed rows live: today one fused Parameter on the model's device.

All tables of a model are one parameter ``weight`` of shape ``(n_tok_layers * V * n, d)``
with n tables per layer: row ``(l * V + x) * n + i`` is table i's row for token x in the
l-th table-carrying layer. A forward does one gather for all layers (`TokenTables.lookup`),
and with ``dedup`` that gather reads each distinct token id of the batch once (token
frequencies are Zipfian, so a batch has far fewer distinct ids than positions); the result
splits into one contiguous (U, n, d) block per layer. With ``sparse_grad`` the gradient
holds only the gathered rows, for `jtok.tables.row_adam.RowAdam`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jtok.config import ModelConfig


@dataclass
class TokenRows:
    """The table rows a batch needs, gathered once for every layer.

    ``layers[i]`` has shape (U, tables_per_layer, d) for the i-th table-carrying layer;
    position p of the flattened batch reads row ``inverse_N[p]``.
    """

    layers: tuple[Tensor, ...]
    inverse_N: Tensor


class TokenTables(nn.Module):
    """Every token-indexed table of a model, one (d,) row per (layer, token, table)."""

    # Optimizer roles of this module's parameters (jtok.training.optim.parameter_roles).
    PARAM_ROLES = {"weight": "table"}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layers = cfg.tokmod_layers
        self.tables_per_layer = cfg.tokmod.tables_per_layer
        self.vocab_size = cfg.vocab_size
        self.dedup = cfg.tokmod.dedup
        self.sparse_grad = cfg.tokmod.sparse_grad
        n_rows = len(self.layers) * cfg.vocab_size * self.tables_per_layer
        self.weight = nn.Parameter(torch.empty(n_rows, cfg.d_model))

    def slot(self, layer: int) -> int:
        """Index into `TokenRows.layers` of a table-carrying layer."""
        return self.layers.index(layer)

    def layer_weight(self, layer: int) -> Tensor:
        """The tables of one layer as a (V, n, d) view: E_{l,i}[x] = layer_weight(l)[x, i]."""
        rows = self.vocab_size * self.tables_per_layer
        start = self.slot(layer) * rows
        return self.weight[start : start + rows].view(self.vocab_size, self.tables_per_layer, -1)

    def row_index(self, ids: Tensor) -> Tensor:
        """Rows of `weight` for token ids (U,), all layers and tables: (n_layers * U * n,)."""
        n = self.tables_per_layer
        layer_start = torch.arange(len(self.layers), device=ids.device) * self.vocab_size
        token_row = (layer_start[:, None] + ids[None, :]) * n  # (L, U)
        return (token_row[:, :, None] + torch.arange(n, device=ids.device)).reshape(-1)

    def lookup(self, ids: Tensor) -> TokenRows:
        """Gather the rows of every layer, in one gather, for token ids of any shape."""
        flat_ids = ids.reshape(-1)
        if self.dedup:
            row_ids, inverse_N = torch.unique(flat_ids, return_inverse=True)
        else:
            row_ids = flat_ids
            inverse_N = torch.arange(flat_ids.numel(), device=ids.device)
        rows = F.embedding(self.row_index(row_ids), self.weight, sparse=self.sparse_grad)
        # (L*U*n, d) -> L blocks of (U, n, d). unbind's backward is one stack, so the
        # gradient of all layers is assembled in one pass, not one full copy per layer.
        rows_LUnD = rows.view(len(self.layers), row_ids.numel(), self.tables_per_layer, -1)
        return TokenRows(layers=rows_LUnD.unbind(0), inverse_N=inverse_N)
