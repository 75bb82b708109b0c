"""Reading prepared data: training and eval batches over memory-mapped splits.

The manifest and its checks live in `jtok.data.manifest` (re-exported here).
"""


from __future__ import annotations

import io
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from jtok.data.format import DataError
from jtok.data.manifest import (  # noqa: F401  (re-exported: the readers of prepared data)
    check_tokenizer,
    check_vocab,
    load_manifest,
    max_token_id,
    open_split,
    verify_data_dir,
)
from jtok.data.sources import _documents, _ReadStats, _refuse_binary, _Source
from jtok.data.tokenizer import _encode, _end_of_text_id, load_tokenizer, token_dtype, vocab_size_of

# ---- reading prepared data --------------------------------------------------------------


def _tokens(data: str | os.PathLike | np.ndarray, split: str) -> np.ndarray:
    return data if isinstance(data, np.ndarray) else open_split(data, split)


class TokenBatches:
    """Random training windows where the batch of a step is a pure function of (seed, step).

    Each step draws `global_batch_size` window starts from a generator seeded by
    (seed, step), and rank r of W takes rows [r*B/W, (r+1)*B/W). So resuming needs only the
    step, and W ranks together see exactly the single-process batch. `data` is a prepared
    directory (its `split` is read) or an array of ids.
    """

    def __init__(self, data: str | os.PathLike | np.ndarray, split: str, seq_len: int,
                 global_batch_size: int, seed: int = 0) -> None:  # fmt: skip
        if seq_len < 1 or global_batch_size < 1:
            raise DataError(f"seq_len and global batch size must be positive, got "
                            f"{seq_len} and {global_batch_size}")  # fmt: skip
        self.tokens = _tokens(data, split)
        if len(self.tokens) < seq_len + 1:
            raise DataError(f"the {split} split has {len(self.tokens)} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}")  # fmt: skip
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.global_batch_size = global_batch_size

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """(inputs, targets) int64 of shape (global_batch_size // world_size, seq_len)."""
        if self.global_batch_size % world_size:
            raise DataError(f"global batch size {self.global_batch_size} is not divisible by "
                            f"the world size {world_size}")  # fmt: skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.global_batch_size)
        rows = self.global_batch_size // world_size
        starts = starts[rank * rows : (rank + 1) * rows]
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def eval_batches(data: str | os.PathLike | np.ndarray, split: str, seq_len: int,
                 batch_size: int, max_tokens: int | None = None,
                 ) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    """(inputs, targets) over consecutive windows that predict every token once, in order.

    Targets cover ids 1..n-1 of the split (the first `max_tokens` of them if given) exactly
    once: full windows in batches of `batch_size` (the last batch may be smaller), then any
    remainder as one shorter window.
    """
    tokens = _tokens(data, split)
    n_targets = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    full_windows = max(n_targets, 0) // seq_len
    starts = [(first, min(batch_size, full_windows - first))
              for first in range(0, full_windows, batch_size)]  # fmt: skip
    if n_targets > full_windows * seq_len:
        starts.append((full_windows, 1))
    for first, rows in starts:
        begin = first * seq_len
        end = min(begin + rows * seq_len, n_targets)
        block = torch.from_numpy(np.asarray(tokens[begin : end + 1], dtype=np.int64))
        yield block[:-1].reshape(rows, -1), block[1:].reshape(rows, -1)


def encode_text_file(path: str | os.PathLike, tokenizer_path: str | os.PathLike, *,
                     encoding: str = "utf-8", errors: str = "replace") -> np.ndarray:  # fmt: skip
    """Ids of a raw text file, made exactly as `prepare` makes them for a text input.

    Same ~64 KiB documents, each followed by end-of-text, so evaluating on a file measures
    what evaluating on it after `prepare` would. A binary file is refused; undecodable
    bytes become U+FFFD unless `errors` is "strict".
    """
    if not os.path.isfile(path):
        raise DataError(f"text file not found: {path}")
    _refuse_binary(str(path), encoding)
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(vocab_size_of(tokenizer))
    options = {"encoding": encoding, "errors": errors}
    texts = _documents([_Source("text", str(path))], options, _ReadStats())
    sink = io.BytesIO()
    _encode(tokenizer, (("text", t) for t in texts), _end_of_text_id(tokenizer, tokenizer_path),
            dtype, {"text": sink}, lambda _: None)  # fmt: skip
    return np.frombuffer(sink.getvalue(), dtype=dtype)
