"""Tokenizers: load or train a byte-level BPE, and encode documents into id files."""


from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from jtok.data.format import EOT_TOKEN, TOKENIZER_FILE, DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ENCODE_BATCH_CHARS = 1 << 20  # text per encode_batch call: keeps every core busy, bounded
_EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>")


# ---- tokenizers -------------------------------------------------------------------------


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("tokenizing needs the tokenizers package: pip install tokenizers") from None
    return tokenizers


def _tokenizer_file(path_or_dir: str | os.PathLike) -> Path:
    path = Path(path_or_dir)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no tokenizer at {path} (give a tokenizer.json or a folder holding one)")
    return file


def load_tokenizer(path_or_dir: str | os.PathLike) -> Tokenizer:
    """A `tokenizers.Tokenizer` from a tokenizer.json or a Hugging Face tokenizer folder."""
    file = _tokenizer_file(path_or_dir)
    try:
        return _tokenizers().Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust side raises a bare Exception for a bad file
        raise DataError(f"{file} is not a tokenizers file: {err}") from None


def _end_of_text_id(tokenizer: Tokenizer, path_or_dir: str | os.PathLike) -> int:
    """The document separator: a folder's configured eos_token, else a well-known name."""
    names = list(_EOT_CANDIDATES)
    config = _tokenizer_file(path_or_dir).parent / "tokenizer_config.json"
    try:
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"{config} is unreadable: {err}") from None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str):
        names.insert(0, eos)
    for name in names:
        if (token_id := tokenizer.token_to_id(name)) is not None:
            return token_id
    raise DataError(f"tokenizer {path_or_dir} has no end-of-text token (tried {names})")


def _train_tokenizer(texts: Iterator[str], vocab_size: int, progress: bool) -> Tokenizer:
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT_TOKEN], show_progress=progress,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def vocab_size_of(tokenizer: Tokenizer) -> int:
    """How many embedding rows the tokenizer's ids need: one past its largest id.

    Usually its vocabulary size; larger when a loaded vocabulary skips ids.
    """
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    return max(tokenizer.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned type that holds every id of the vocabulary."""
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def _encode(
    tokenizer: Tokenizer,
    labelled: Iterable[tuple[str, str]],
    eot_id: int,
    dtype: np.dtype,
    sinks: dict[str, BinaryIO],
    on_bytes: Callable[[int], Any],
) -> dict[str, dict]:
    """Write each (split, text) document's ids and an end-of-text id to its split's sink.

    Documents are encoded in batches of about ENCODE_BATCH_CHARS, so memory holds one
    batch of text and ids at a time whatever the corpus size. Each split's count has
    tokens, documents, bytes (UTF-8 of its text) and max_token_id (its largest id).
    """
    limit = np.iinfo(dtype).max
    counts = {split: {"tokens": 0, "documents": 0, "bytes": 0, "max_token_id": -1}
              for split in sinks}  # fmt: skip
    batch: list[tuple[str, str]] = []
    batch_chars = 0

    def flush() -> None:
        encodings = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
        for (split, text), encoding in zip(batch, encodings, strict=True):
            count = counts[split]
            largest = max(max(encoding.ids, default=-1), eot_id)
            if largest > limit:
                raise DataError(f"the tokenizer made id {largest}, more than {dtype.name} holds")
            ids = np.array([*encoding.ids, eot_id], dtype=dtype)
            sinks[split].write(ids.tobytes())
            n_bytes = len(text.encode("utf-8"))
            count["max_token_id"] = max(count["max_token_id"], largest)
            count["tokens"] += ids.size
            count["documents"] += 1
            count["bytes"] += n_bytes
            on_bytes(n_bytes)
        batch.clear()

    for split, text in labelled:
        batch.append((split, text))
        batch_chars += len(text)
        if batch_chars >= ENCODE_BATCH_CHARS:
            flush()
            batch_chars = 0
    if batch:
        flush()
    return counts


