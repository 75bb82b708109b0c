"""Keys: which table rows each position of a batch reads.

A key turns token ids (B, T) into row addresses for every table-carrying layer. It needs
the ids alone (no hidden state), so it can run on the data side before the forward starts,
which is what lets a host store fetch rows ahead of the compute that uses them.

A key returns `RowKeys`: the distinct key values of the batch and, for each position,
which of them it reads. A store maps a key value to rows (layer, value, table) of its
tables. Today's key is the current token id (`CurrentTokenKey`); keys that depend on
earlier tokens (hashed n-grams: a later issue) implement the same two members, taking
the previous ids of a sequence from `history` where the batch continues one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RowKeys:
    """Row addresses of a batch: its distinct key values, and the one each position reads."""

    distinct_U: Tensor  # int64 (U,): key values, ascending when deduplicated
    inverse_N: Tensor  # int64 (B*T,): position -> index into distinct_U

    @property
    def count(self) -> int:
        return self.distinct_U.numel()


_identities: dict[tuple[int, torch.device], Tensor] = {}
_IDENTITY_LIMIT = 256  # distinct (length, device) pairs kept; more start the cache afresh


def identity(n: int, device: torch.device | str | None = None) -> Tensor:
    """arange(n) on `device`, made once: the inverse map of a batch whose every position
    reads its own row (one token per sequence). The same tensor object is returned on
    every call, so consumers can recognise it (`is_identity`) and skip the gather it
    would cost; nobody may write into it."""
    device = torch.device(device if device is not None else "cpu")
    if torch.compiler.is_compiling():  # no cache (a side effect) inside a compiled graph
        return torch.arange(n, device=device)
    key = (n, device)
    found = _identities.get(key)
    if found is None or found._version != 0:  # absent, or (wrongly) written into
        if len(_identities) >= _IDENTITY_LIMIT:
            _identities.clear()
        with torch.inference_mode(False):  # a normal tensor even when made in inference
            found = _identities[key] = torch.arange(n, device=device)
        # Also under the tensor's own device ("cuda" -> "cuda:0"), which is_identity reads.
        _identities[(n, found.device)] = found
    return found


def is_identity(inverse_N: Tensor) -> bool:
    """Whether `inverse_N` is `identity`'s map (position p reads distinct key p)."""
    if torch.compiler.is_compiling():
        return False
    cached = _identities.get((inverse_N.shape[0], inverse_N.device))
    return cached is inverse_N and inverse_N._version == 0  # and never written into
    # (the cached map is never an inference tensor, which has no version counter)


def inverse_to(inverse_N: Tensor, device: torch.device | str) -> Tensor:
    """`inverse_N` on `device`; the identity map stays the (cached) identity there."""
    if is_identity(inverse_N):
        return identity(inverse_N.shape[0], device)
    return inverse_N.to(device, non_blocking=True)


class CurrentTokenKey:
    """The key of JTok / JTok-M: the current token id, the same for every layer.

    With `dedup` each distinct id of the batch is read once (token frequencies are
    Zipfian: 2,048 tokens hold about 670 distinct ids); without it every position reads
    its own copy. With one token per sequence (incremental decoding) a sort over a batch
    of at most a few dozen ids saves nothing and costs a kernel, so `torch.unique` is
    skipped when T = 1 (the rows' values are the same either way), and the inverse map is
    the cached `identity`, which the mixers recognise and skip.
    """

    def __init__(self, num_keys: int, dedup: bool = True):
        self.num_keys = num_keys  # key values are in [0, num_keys)
        self.dedup = dedup

    def __call__(self, ids_BT: Tensor, history: Tensor | None = None) -> RowKeys:
        flat = ids_BT.reshape(-1)
        if self.dedup and ids_BT.shape[-1] > 1:
            distinct, inverse = torch.unique(flat, return_inverse=True)
            return RowKeys(distinct, inverse)
        return RowKeys(flat, identity(flat.numel(), flat.device))
