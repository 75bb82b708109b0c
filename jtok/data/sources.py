"""Reading raw text sources: text files (cut into documents), JSONL, Parquet, HF datasets."""


from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jtok.data.corpus import read_default_corpus
from jtok.data.format import DataError

if TYPE_CHECKING:
    pass

DOC_CHARS = 64 * 1024  # a text file is cut into documents of about this size at blank lines
MAX_DOC_CHARS = 4 * DOC_CHARS  # ... or at a line end, if no blank line comes by this size
READ_BYTES = 1 << 20



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


