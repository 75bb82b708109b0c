"""`prepare`: text in, a prepared data directory out (tokenizer, id files, manifest).

See `jtok.data` for the directory's format. Inputs are streamed twice (train the
tokenizer, then encode), so memory does not grow with the corpus. Everything the user
gave is checked before anything is written, and the output is built beside `out_dir`
and swapped in whole (`jtok.data.outdir`), so a failure never damages existing data.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jtok.data.corpus import DEFAULT_CORPUS_NAME, default_corpus_wheel
from jtok.data.format import (
    EOT_TOKEN,
    ERRORS_MODES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPLIT_FILES,
    TOKENIZER_FILE,
    DataError,
)
from jtok.data.manifest import file_sha256, sample_sha256
from jtok.data.outdir import check_out_dir, staged_directory
from jtok.data.sources import (
    _check_sources,
    _documents,
    _ReadStats,
    _resolve_inputs,
    _Source,
    check_encoding,
)
from jtok.data.tokenizer import (
    _encode,
    _end_of_text_id,
    _tokenizer_file,
    _train_tokenizer,
    load_tokenizer,
    token_dtype,
    vocab_size_of,
)
from jtok.io import write_json_atomic

DEFAULT_VAL_FRACTION = 0.005
# When no document draws val, the last one is cut only past twice this many characters (or
# twice the asked share): a smaller val split measures nothing, so a short document goes whole.
MIN_CUT_VAL_CHARS = 1000
MAX_WORD_BACKOFF = 100  # characters a cut may move back to reach the start of a word


# ---- prepare ----------------------------------------------------------------------------


def _draws_val(seed: int, index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def _assign_splits(texts: Iterator[str], seed: int,
                   val_fraction: float) -> Iterator[tuple[str, str]]:  # fmt: skip
    """Label each document 'train' or 'val' from (seed, its index) alone.

    A hash of (seed, index) sends a document to val with probability val_fraction, so both
    passes of `prepare` (and any rerun) agree without storing anything. Both splits must be
    non-empty: document 0 always trains, and if nothing else drew val (few documents, or a
    tiny fraction) the last document is held out (one document of lookahead decides that)
    if it is at most twice S = max(val_fraction x all characters read, MIN_CUT_VAL_CHARS);
    a longer one is cut, its last S characters before any trailing whitespace (widened back
    to the start of a word, at most MAX_WORD_BACKOFF characters) held out and the rest
    trained on. A lone document is cut at val_fraction of its length (at least one
    character each side), with no minimum. Holding out a long last document whole could
    put most of the data in val (a file of two documents, one of them long).
    """
    pending: tuple[str, str] | None = None
    any_val = False
    total_chars = 0
    index = -1
    for index, text in enumerate(texts):
        if pending is not None:
            any_val |= pending[0] == "val"
            yield pending
        total_chars += len(text)
        draws_val = index > 0 and _draws_val(seed, index, val_fraction)
        pending = ("val" if draws_val else "train", text)
    if pending is None:
        return
    split, text = pending
    if any_val or split == "val":
        yield split, text
        return
    if total_chars < 2:
        raise DataError("the inputs hold a single character; need text for train and val")
    held_out = max(MIN_CUT_VAL_CHARS, round(total_chars * val_fraction))
    if index == 0:  # a lone document: document 0 trains, so it is cut in two at the share
        held_out = min(max(1, round(len(text) * val_fraction)), len(text) - 1)
    elif len(text) <= 2 * held_out:  # whole, if that at most doubles the asked val share
        yield "val", text
        return
    # Measured on the text without its trailing whitespace (which goes to val with the tail),
    # so val is never whitespace alone.
    cut = max(1, len(text.rstrip()) - held_out)
    # Back to the start of the word the cut falls in (a cut inside a word makes two pieces
    # no tokenizer saw in the text), but only a word's length: text without spaces (CJK,
    # minified code) is cut where the share falls, not at a space far back.
    space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
    if space > 0 and cut - space <= MAX_WORD_BACKOFF and text[:space].strip():
        cut = space + 1
    yield "train", text[:cut]
    yield "val", text[cut:]


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def _source_record(source: _Source, stats: _ReadStats, hf_split: str) -> dict[str, Any]:
    if source.kind == "hf":
        digest = stats.stream_digests.get(source.location, hashlib.sha256())
        return {"path": f"hf:{source.location}:{hf_split}", "sha256": digest.hexdigest(),
                "bytes": stats.stream_bytes.get(source.location, 0)}  # fmt: skip
    name = DEFAULT_CORPUS_NAME if source.kind == "default" else source.location
    return {"path": name, "sha256": file_sha256(source.location),
            "bytes": os.path.getsize(source.location)}  # fmt: skip


def _same_files(sources: list[_Source], val_sources: list[_Source]) -> None:
    train = {os.path.realpath(s.location) for s in sources}
    for source in val_sources:
        if os.path.realpath(source.location) in train:
            raise DataError(f"{source.location} is both a training input and a --val file")


def prepare(
    inputs: list[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    tokenizer: str | None = None,
    jsonl_field: str = "text",
    parquet_column: str = "text",
    hf_dataset: str | None = None,
    hf_split: str = "train",
    val: list[str] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    encoding: str = "utf-8",
    errors: str = "strict",
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict:
    """Tokenize the inputs into `out_dir` (see the module docstring); return the manifest.

    `inputs` are files or globs: .jsonl (field `jsonl_field` of each line, which is also the
    field read from `hf_dataset` rows), .parquet (column `parquet_column`), anything else
    text. With no inputs and no `hf_dataset` the default corpus is used. The validation
    split is either the files/globs `val` (read like the inputs) or a `val_fraction` of the
    input documents (default 0.005), not both. Text and JSONL are decoded with `encoding`;
    `errors` "strict" refuses undecodable bytes (naming file and offset), "replace" turns
    each into U+FFFD and counts it. `tokenizer` is a tokenizer.json or a folder holding
    one; without it a byte-level BPE of `vocab_size` is trained on the train documents.

    Arguments, inputs (binary files are refused), tokenizer and `out_dir` are checked
    before anything is written; the data is then built in a sibling directory and swapped
    in, so any failure leaves `out_dir` as it was. `overwrite` replaces a directory that
    holds only what prepare writes.
    """
    if val is not None and val_fraction is not None:
        raise DataError("give a validation set (--val) or --val-fraction, not both")
    if val is not None and not val:
        raise DataError("--val needs at least one file or glob")
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer is None and vocab_size < 257:
        raise DataError(f"vocab_size must be at least 257 (256 bytes + {EOT_TOKEN})")
    if errors not in ERRORS_MODES:
        raise DataError(f"errors must be one of {', '.join(ERRORS_MODES)}, got {errors!r}")
    encoding = check_encoding(encoding)
    sources = _resolve_inputs(inputs)
    val_sources = _resolve_inputs(val) if val else []
    _same_files(sources, val_sources)
    _check_sources(sources + val_sources, encoding)
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else None
    out = check_out_dir(out_dir, overwrite)
    if hf_dataset is not None:
        sources.append(_Source("hf", hf_dataset))
    if not sources:
        sources = [_Source("default", str(default_corpus_wheel(log=log)))]

    options = {"jsonl_field": jsonl_field, "parquet_column": parquet_column,
               "hf_split": hf_split, "encoding": encoding, "errors": errors}  # fmt: skip

    def labelled(stats: _ReadStats) -> Iterator[tuple[str, str]]:
        if val_sources:
            yield from (("train", text) for text in _documents(sources, options, stats))
            yield from (("val", text) for text in _documents(val_sources, options, stats))
        else:
            yield from _assign_splits(_documents(sources, options, stats), seed, val_fraction)

    with staged_directory(out, log) as stage:
        if loaded is None:
            log(f"training a byte-level BPE tokenizer (vocab_size={vocab_size}) on train text")
            train_texts = (text for split, text in labelled(_ReadStats()) if split == "train")
            loaded = _train_tokenizer(train_texts, vocab_size, progress)
            loaded.save(str(stage / TOKENIZER_FILE))
            eot_id = loaded.token_to_id(EOT_TOKEN)
        else:
            shutil.copyfile(_tokenizer_file(tokenizer), stage / TOKENIZER_FILE)
            eot_id = _end_of_text_id(loaded, tokenizer)
        _fsync(stage / TOKENIZER_FILE)
        vocab = vocab_size_of(loaded)
        dtype = token_dtype(vocab)

        from tqdm import tqdm

        log(f"encoding {len(sources) + len(val_sources)} source(s) into {out}")
        stats = _ReadStats()
        sinks = {split: open(stage / name, "wb") for split, name in SPLIT_FILES.items()}
        bar = tqdm(desc="encoding", unit="B", unit_scale=True, disable=not progress)
        try:
            counts = _encode(loaded, labelled(stats), eot_id, dtype, sinks, bar.update)
            for sink in sinks.values():
                sink.flush()
                os.fsync(sink.fileno())
        finally:
            bar.close()
            for sink in sinks.values():
                sink.close()
        for split, count in counts.items():
            count["sample_sha256"] = sample_sha256(stage / SPLIT_FILES[split])
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer": TOKENIZER_FILE,
            "tokenizer_sha256": file_sha256(stage / TOKENIZER_FILE),
            "vocab_size": vocab,
            "eot_id": eot_id,
            "dtype": dtype.name,
            "splits": {s: {"file": SPLIT_FILES[s], **c} for s, c in counts.items()},
            "sources": [_source_record(s, stats, hf_split) for s in sources],
            "val_sources": [_source_record(s, stats, hf_split) for s in val_sources],
            "encoding": encoding,
            "errors": errors,
            "undecodable_bytes_replaced": stats.undecodable_bytes,
            "seed": seed,
            "val_fraction": None if val_sources else val_fraction,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(stage / MANIFEST_FILE, manifest)  # last: it vouches for the rest
    for split, count in counts.items():
        log(f"{split}: {count['tokens']:,} tokens, {count['documents']:,} documents, "
            f"{count['bytes']:,} bytes -> {out / SPLIT_FILES[split]}")  # fmt: skip
    if errors == "replace":
        log(f"undecodable bytes replaced with U+FFFD: {stats.undecodable_bytes:,}")
    return manifest
