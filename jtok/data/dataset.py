"""Reading prepared data: the manifest, memory-mapped splits, training and eval batches."""


from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from jtok.data.format import FORMAT_VERSION, MANIFEST_FILE, MANIFEST_KEYS, DataError
from jtok.data.sources import _documents, _ReadStats, _Source
from jtok.data.tokenizer import _encode, _end_of_text_id, load_tokenizer, token_dtype

if TYPE_CHECKING:
    pass



# ---- reading prepared data --------------------------------------------------------------


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, checked enough that its fields can be trusted."""
    path = Path(data_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{data_dir} has no {MANIFEST_FILE}; run jtok data prepare") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable or corrupt: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a jtok data manifest of format {FORMAT_VERSION}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{path} is corrupt: missing {', '.join(missing)}")
    return manifest


def open_split(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """A read-only memory map of one split's ids, after checking its size against the manifest."""
    manifest = load_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir} has no split {split!r} (has {sorted(manifest['splits'])})")
    info = manifest["splits"][split]
    path = Path(data_dir) / info["file"]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    size = path.stat().st_size if path.is_file() else None
    if size != info["tokens"] * dtype.itemsize or size == 0:
        raise DataError(f"{path} is missing, empty or not the {info['tokens']} tokens the "
                        "manifest lists; prepare the data again")  # fmt: skip
    return np.memmap(path, dtype=dtype, mode="r")


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id in `tokens`, read in chunks so a memory map is never loaded whole."""
    return max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)),
               default=-1)  # fmt: skip


def _as_manifest(data: str | os.PathLike | dict) -> dict:
    return data if isinstance(data, dict) else load_manifest(data)


def check_vocab(data: str | os.PathLike | dict, model_vocab_size: int) -> None:
    """Refuse data whose ids a model with `model_vocab_size` embeddings cannot look up.

    The manifest's tokenizer size decides; given a directory, each split is also scanned,
    which catches a .bin that does not belong to its manifest.
    """
    manifest = _as_manifest(data)
    if manifest["vocab_size"] > model_vocab_size:
        raise DataError(
            f"the data's tokenizer has {manifest['vocab_size']} ids (max id "
            f"{manifest['vocab_size'] - 1}) but the model's vocab_size is {model_vocab_size}; "
            f"set vocab_size >= {manifest['vocab_size']}"
        )
    if isinstance(data, dict):
        return
    for split in manifest["splits"]:
        largest = max_token_id(open_split(data, split))
        if largest >= model_vocab_size:
            raise DataError(f"{split} holds token id {largest} but the model's vocab_size is "
                            f"{model_vocab_size}")  # fmt: skip


def check_tokenizer(data: str | os.PathLike | dict, expected_sha256: str) -> None:
    """Refuse to evaluate a checkpoint on ids made by a tokenizer other than its own."""
    actual = _as_manifest(data)["tokenizer_sha256"]
    if actual != expected_sha256:
        raise DataError(f"the data was tokenized with tokenizer sha256 {actual[:12]}... but the "
                        f"checkpoint was trained with {expected_sha256[:12]}...")  # fmt: skip


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


def encode_text_file(path: str | os.PathLike, tokenizer_path: str | os.PathLike) -> np.ndarray:
    """Ids of a raw text file, made exactly as `prepare` makes them for a text input.

    Same ~64 KiB documents, each followed by end-of-text, so evaluating on a file measures
    what evaluating on it after `prepare` would.
    """
    if not os.path.isfile(path):
        raise DataError(f"text file not found: {path}")
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.get_vocab_size())
    texts = _documents([_Source("text", str(path))], {}, _ReadStats())
    sink = io.BytesIO()
    _encode(tokenizer, (("text", t) for t in texts), _end_of_text_id(tokenizer, tokenizer_path),
            dtype, {"text": sink}, lambda _: None)  # fmt: skip
    return np.frombuffer(sink.getvalue(), dtype=dtype)
