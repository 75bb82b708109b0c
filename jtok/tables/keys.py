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


class CurrentTokenKey:
    """The key of JTok / JTok-M: the current token id, the same for every layer.

    With `dedup` each distinct id of the batch is read once (token frequencies are
    Zipfian: 2,048 tokens hold about 670 distinct ids); without it every position reads
    its own copy. With one token per sequence (incremental decoding) a sort over a batch
    of at most a few dozen ids saves nothing and costs a kernel, so `torch.unique` is
    skipped when T = 1 (the rows' values are the same either way).
    """

    def __init__(self, num_keys: int, dedup: bool = True):
        self.num_keys = num_keys  # key values are in [0, num_keys)
        self.dedup = dedup

    def __call__(self, ids_BT: Tensor, history: Tensor | None = None) -> RowKeys:
        flat = ids_BT.reshape(-1)
        if self.dedup and ids_BT.shape[-1] > 1:
            distinct, inverse = torch.unique(flat, return_inverse=True)
            return RowKeys(distinct, inverse)
        return RowKeys(flat, torch.arange(flat.numel(), device=flat.device))
