"""`prepare`: text in, a prepared data directory out (tokenizer, id files, manifest).

See `jtok.data` for the directory's format. Inputs are streamed twice (train the
tokenizer, then encode), so memory does not grow with the corpus.
"""


from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jtok.data.corpus import DEFAULT_CORPUS_NAME, default_corpus_wheel
from jtok.data.format import (
    EOT_TOKEN,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPLIT_FILES,
    TOKENIZER_FILE,
    DataError,
)
from jtok.data.sources import READ_BYTES, _documents, _ReadStats, _resolve_inputs, _Source
from jtok.data.tokenizer import (
    _encode,
    _end_of_text_id,
    _tokenizer_file,
    _train_tokenizer,
    load_tokenizer,
    token_dtype,
)

if TYPE_CHECKING:
    pass



# ---- prepare ----------------------------------------------------------------------------


def _draws_val(seed: int, index: int, val_fraction: float) -> bool:
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def _assign_splits(texts: Iterator[str], seed: int,
                   val_fraction: float) -> Iterator[tuple[str, str]]:  # fmt: skip
    """Label each document 'train' or 'val' from (seed, its index) alone.

    A hash of (seed, index) sends a document to val with probability val_fraction, so both
    passes of `prepare` (and any rerun) agree without storing anything. Both splits must be
    non-empty: document 0 always trains, and if nothing else drew val the last document is
    held out (one document of lookahead decides that); a lone document is cut in two.
    """
    pending: tuple[str, str] | None = None
    any_val = False
    index = -1
    for index, text in enumerate(texts):
        if pending is not None:
            any_val |= pending[0] == "val"
            yield pending
        draws_val = index > 0 and _draws_val(seed, index, val_fraction)
        pending = ("val" if draws_val else "train", text)
    if pending is None:
        return
    split, text = pending
    if index == 0:
        if len(text) < 2:
            raise DataError("the inputs hold a single character; need text for train and val")
        cut = len(text) - min(len(text) - 1, max(1, round(len(text) * val_fraction)))
        yield "train", text[:cut]
        yield "val", text[cut:]
    else:
        yield ("val" if not any_val else split), text


def _file_digest(path: str | os.PathLike) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(READ_BYTES):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": os.path.getsize(path)}


def _write_json_atomically(path: Path, data: dict) -> None:
    """Write to a scratch file beside `path`, then rename: readers see all of it or none."""
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            os.chmod(scratch, 0o644)  # mkstemp makes it private; a manifest is for everyone
            json.dump(data, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, path)
    except BaseException:
        os.unlink(scratch)
        raise


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
    val_fraction: float = 0.005,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict:
    """Tokenize the inputs into `out_dir` (see the module docstring); return the manifest.

    `inputs` are files or globs: .jsonl (field `jsonl_field` of each line, which is also the
    field read from `hf_dataset` rows), .parquet (column `parquet_column`), anything else
    text. With no inputs and no `hf_dataset` the default corpus is used. `tokenizer` is a
    tokenizer.json or a folder holding one; without it a byte-level BPE of `vocab_size` is
    trained on the train documents. Arguments, inputs, tokenizer and `out_dir` are checked
    before anything is written; an error while reading removes what was written so far.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer is None and vocab_size < 257:
        raise DataError(f"vocab_size must be at least 257 (256 bytes + {EOT_TOKEN})")
    sources = _resolve_inputs(inputs)
    if hf_dataset is not None:
        sources.append(_Source("hf", hf_dataset))
    if not sources:
        sources = [_Source("default", str(default_corpus_wheel(log=log)))]
    loaded = load_tokenizer(tokenizer) if tokenizer is not None else None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output directory {out} is not empty (overwrite=True replaces it)")

    options = {"jsonl_field": jsonl_field, "parquet_column": parquet_column, "hf_split": hf_split}
    outputs = [out / name for name in (MANIFEST_FILE, TOKENIZER_FILE, *SPLIT_FILES.values())]
    out.mkdir(parents=True, exist_ok=True)
    try:
        for path in outputs:  # the manifest first: a stale one must not vouch for new files
            path.unlink(missing_ok=True)
        if loaded is None:
            log(f"training a byte-level BPE tokenizer (vocab_size={vocab_size}) on train text")
            texts = _documents(sources, options, _ReadStats())
            labelled = _assign_splits(texts, seed, val_fraction)
            train_texts = (text for split, text in labelled if split == "train")
            loaded = _train_tokenizer(train_texts, vocab_size, progress)
            loaded.save(str(out / TOKENIZER_FILE))
            eot_id = loaded.token_to_id(EOT_TOKEN)
        else:
            shutil.copyfile(_tokenizer_file(tokenizer), out / TOKENIZER_FILE)
            eot_id = _end_of_text_id(loaded, tokenizer)
        vocab = loaded.get_vocab_size()
        dtype = token_dtype(vocab)

        from tqdm import tqdm

        log(f"encoding {len(sources)} source(s) into {out}")
        stats = _ReadStats()
        labelled = _assign_splits(_documents(sources, options, stats), seed, val_fraction)
        sinks = {split: open(out / name, "wb") for split, name in SPLIT_FILES.items()}
        bar = tqdm(desc="encoding", unit="B", unit_scale=True, disable=not progress)
        try:
            counts = _encode(loaded, labelled, eot_id, dtype, sinks, bar.update)
            for sink in sinks.values():
                sink.flush()
                os.fsync(sink.fileno())
        finally:
            bar.close()
            for sink in sinks.values():
                sink.close()

        source_records = []
        for source in sources:
            if source.kind == "hf":
                name = f"hf:{source.location}:{hf_split}"
                digest = stats.stream_digests.get(source.location, hashlib.sha256())
                record = {"sha256": digest.hexdigest(),
                          "bytes": stats.stream_bytes.get(source.location, 0)}  # fmt: skip
            else:
                name = DEFAULT_CORPUS_NAME if source.kind == "default" else source.location
                record = _file_digest(source.location)
            source_records.append({"path": name, **record})
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer": TOKENIZER_FILE,
            "tokenizer_sha256": _file_digest(out / TOKENIZER_FILE)["sha256"],
            "vocab_size": vocab,
            "eot_id": eot_id,
            "dtype": dtype.name,
            "splits": {s: {"file": SPLIT_FILES[s], **c} for s, c in counts.items()},
            "sources": source_records,
            "undecodable_bytes_replaced": stats.undecodable_bytes,
            "seed": seed,
            "val_fraction": val_fraction,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        _write_json_atomically(out / MANIFEST_FILE, manifest)
    except BaseException:
        for path in outputs:  # leave no half-prepared directory behind
            path.unlink(missing_ok=True)
        raise
    for split, count in counts.items():
        log(f"{split}: {count['tokens']:,} tokens, {count['documents']:,} documents, "
            f"{count['bytes']:,} bytes -> {out / SPLIT_FILES[split]}")  # fmt: skip
    log(f"undecodable bytes replaced with U+FFFD: {stats.undecodable_bytes:,}")
    return manifest


