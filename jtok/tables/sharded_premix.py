"""The sharded store's all-to-all, and its pre-mixed path (JTok-M's Eq 12 at the owners).

Raw path (jtok.tables.sharded): the batch's distinct keys' rows travel, all n tables of
every table-carrying layer, before the forward starts; the requester mixes them.

Pre-mixed path (here): the router runs where the hidden state lives, layer by layer, and
its top-K indices and weights travel to the rows' owners with the keys; each owner forms
Eq 12, e = sum_{i in G} w_i E_{l,i}[x], from the rows it holds, so one d-vector per
(position, layer) comes back instead of n rows per (distinct key, layer). Backward: the
vector's gradient g goes to the owner, which forms the row gradients w_i g (Eq 12's
derivative in E_{l,i}[x]) as a sparse gradient of its own block, and the weights'
gradients dL/dw_i = <g, E_{l,i}[x]>, where the rows are, which go back to the router.

Which owner: the n rows of a (layer, key) group are consecutive (row (l V + x) n + i), so
they usually sit in one owner's block; a group that a block boundary cuts asks both
owners, each mixing the rows it holds (Eq 12 is a sum), and the requester adds the parts.
Who asks whom is known from the keys alone, before the router has run, so the counts of
every layer travel once per batch (in the sharded store's counts exchange) and each layer
then costs two all-to-alls forward (requests, vectors) and two backward (gradients, dL/dw).
Deduplication: the owner reads each row straight from its block (one embedding_bag, no
gathered copy); the requests themselves are per position, as the weights are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from jtok.tables.keys import RowKeys, is_identity
from jtok.tables.store import OwnerMixedRows


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exchange(tensor: Tensor, send_counts: list[int], recv_counts: list[int],
             meter: dict | None = None, kind: str = "data") -> Tensor:  # fmt: skip
    """all_to_all of rows: `send_counts[p]` consecutive rows go to process p. The bytes that
    leave this process are added to ``meter[kind]`` (what the benchmarks and tests read)."""
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    rank, size = world()
    if size > 1:
        dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts)
    else:
        out.copy_(tensor)
    if meter is not None:
        row = tensor.element_size() * math.prod(tensor.shape[1:])
        meter[kind] = meter.get(kind, 0) + (sum(send_counts) - send_counts[rank]) * row
    return out


def raw_row_bytes(d: int, backward: bool) -> int:
    """Bytes between a requester and an owner per raw row: its int64 address, the fp32 row
    back, and (training) the row's gradient out again."""
    return 8 + 4 * d + (4 * d if backward else 0)


def premix_entry_bytes(d: int, top_k: int, backward: bool) -> int:
    """Bytes per pre-mixed request (position, layer, owner): the int32 address of the group,
    K int32 table indices and K fp32 weights; the fp32 mixed vector back; (training) its
    gradient out and the K weight gradients back."""
    return 4 + 8 * top_k + 4 * d + ((4 * d + 4 * top_k) if backward else 0)


@dataclass
class PremixEntries:
    """One batch's requests, every layer: entry = (layer, position, owner), grouped by layer,
    then owner, positions ascending."""

    pos: tuple[Tensor, ...]  # per layer: (M_l,) position of each entry
    base: tuple[Tensor, ...]  # per layer: (M_l,) int32 address of the group's first row
    #                           in the owner's block (negative where a boundary cuts it)
    counts_LW: Tensor  # (L, W) entries per layer and owner
    n_positions: int


def premix_entries(store, keys: RowKeys) -> PremixEntries:
    """Who asks whom for each (position, layer), from the keys alone."""
    L, n, W, block = len(store.layers), store.tables_per_layer, store.world_size, store.block
    distinct = keys.distinct_U.to(store.weight.device)
    if is_identity(keys.inverse_N):
        key_N = distinct
    else:
        key_N = distinct[keys.inverse_N.to(distinct.device)]
    N = key_N.numel()
    layer_L1 = torch.arange(L, device=key_N.device)[:, None]
    first_LN = ((layer_L1 * store.vocab_size + key_N[None]) * n).reshape(-1)
    owner_first = torch.div(first_LN, block, rounding_mode="floor")
    span = torch.div(first_LN + (n - 1), block, rounding_mode="floor") - owner_first + 1
    if bool((span == 1).all()):  # the usual case: every group in one block
        lp, owner = torch.arange(L * N, device=key_N.device), owner_first
    else:  # a group cut by a boundary: one entry per owner holding part of it
        lp = torch.repeat_interleave(torch.arange(L * N, device=key_N.device), span)
        first_entry = torch.cumsum(span, 0) - span
        step = torch.arange(lp.numel(), device=key_N.device) - first_entry[lp]
        owner = owner_first[lp] + step
    group = torch.div(lp, N, rounding_mode="floor") * W + owner
    order = torch.argsort(group, stable=True)
    counts_LW = torch.bincount(group, minlength=L * W).view(L, W)
    lp, owner = lp[order], owner[order]
    if store.n_rows + n >= 2**31:
        raise ValueError("a table block of 2^31 rows or more: the int32 requests overflow")
    base = (first_LN[lp] - owner * block).to(torch.int32)
    per_layer = counts_LW.sum(1).tolist()
    pos = torch.remainder(lp, N) if N else lp
    return PremixEntries(pos.split(per_layer), base.split(per_layer), counts_LW, N)


class PremixLayer(OwnerMixedRows):
    """One table-carrying layer's rows, left with their owners: `mix` is Eq 12 done there."""

    def __init__(self, store, pos: Tensor, base: Tensor, send_counts: list[int],
                 recv_counts: list[int], n_positions: int):  # fmt: skip
        self.store, self.pos, self.base = store, pos, base
        self.send_counts, self.recv_counts = send_counts, recv_counts
        self.n_positions = n_positions

    def mix(self, weights_NK: Tensor, index_NK: Tensor) -> Tensor:
        """e_ND = sum_k weights_NK[:, k] E_{l, index_NK[:, k]}[x] (Eq 12), fp32."""
        if weights_NK.shape[0] != self.n_positions:
            raise ValueError(f"{weights_NK.shape[0]} routed positions for a batch of "
                             f"{self.n_positions}")  # fmt: skip
        return _OwnerMix.apply(self.store.weight, weights_NK, index_NK, self)


class _OwnerMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight_local: Tensor, weights_NK: Tensor, index_NK: Tensor,
                layer: PremixLayer) -> Tensor:  # fmt: skip
        store, pos = layer.store, layer.pos
        K, d, held = index_NK.shape[1], weight_local.shape[1], weight_local.shape[0]
        w_MK = weights_NK.detach()[pos].float().contiguous()
        request = torch.cat([layer.base[:, None], index_NK[pos].to(torch.int32),
                             w_MK.view(torch.int32)], dim=1)  # one message: the bits of w
        got = exchange(request, layer.send_counts, layer.recv_counts, store.meter)
        addr = got[:, :1].long() + got[:, 1 : 1 + K].long()  # rows in this block
        w = got[:, 1 + K :].contiguous().view(torch.float32)
        owned = None
        if got.shape[0] and not bool(((addr >= 0) & (addr < held)).all()):
            # Groups cut by a block boundary: mix only the rows held here (the rest weigh 0).
            owned = (addr >= 0) & (addr < held)
            w, addr = w * owned, addr.clamp(0, max(held - 1, 0))
        with torch.autocast(weight_local.device.type, enabled=False):  # fp32, as the tables
            if got.shape[0]:
                mixed = F.embedding_bag(addr, weight_local.detach(), mode="sum",
                                        per_sample_weights=w)  # Eq 12, the rows held here
            else:
                mixed = weight_local.new_zeros(0, d)
        back = exchange(mixed, layer.recv_counts, layer.send_counts, store.meter)
        # Each entry's part back to its position (a cut group's two parts add up).
        e_ND = back.new_zeros(layer.n_positions, d).index_add_(0, pos, back)
        ctx.save_for_backward(weight_local, addr, w, owned)
        ctx.layer = layer
        ctx.weights_dtype = weights_NK.dtype
        return e_ND

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        weight_local, addr, w, owned = ctx.saved_tensors
        layer = ctx.layer
        store, pos = layer.store, layer.pos
        d, K = weight_local.shape[1], addr.shape[1]
        g_own = exchange(grad_ND.float()[pos], layer.send_counts, layer.recv_counts, store.meter)
        # Row gradients w_i g (Eq 12), this process's share of the mean over processes (as
        # the raw path's owner divides, and DDP averages the backbone's gradients).
        values = (w[:, :, None] * g_own[:, None, :]).reshape(-1, d) / store.world_size
        index = addr.reshape(1, -1)
        if owned is not None:
            keep = owned.reshape(-1)
            index, values = index[:, keep], values[keep]
        grad_rows = torch.sparse_coo_tensor(index, values, weight_local.shape,
                                            check_invariants=False)  # fmt: skip
        # dL/dw_i = <g, E_{l,i}[x]>, where the rows are; back to the router.
        if addr.shape[0]:
            dw_MK = torch.bmm(F.embedding(addr, weight_local.detach()),
                              g_own[:, :, None]).squeeze(-1)  # fmt: skip
        else:
            dw_MK = g_own.new_zeros(0, K)
        if owned is not None:
            dw_MK = dw_MK * owned
        dw_back = exchange(dw_MK, layer.recv_counts, layer.send_counts, store.meter)
        grad_w = dw_back.new_zeros(layer.n_positions, K).index_add_(0, pos, dw_back)
        return grad_rows, grad_w.to(ctx.weights_dtype), None, None
