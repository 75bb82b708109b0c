"""Reading raw text sources: text files (cut into documents), JSONL, Parquet, HF datasets.

Text and JSONL files are decoded with the `encoding` option (default UTF-8). With
errors="strict" a byte the encoding cannot decode is a DataError naming the file and the
byte's offset; with "replace" each such byte becomes one U+FFFD and is counted. Binary
files (a known magic number, or a NUL byte in the first 8 KiB of an ASCII-compatible
encoding) are refused before anything is read in full.
"""


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
from typing import Any

from jtok.data.corpus import read_default_corpus
from jtok.data.format import DataError

DOC_CHARS = 64 * 1024  # a text file is cut into documents of about this size at blank lines
MAX_DOC_CHARS = 4 * DOC_CHARS  # ... or at a line end, if no blank line comes by this size
READ_BYTES = 1 << 20



# ---- reading sources --------------------------------------------------------------------


_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPE = "jtok-escape"  # codec error handler: each undecodable byte -> one lone surrogate
SNIFF_BYTES = 8192  # how much of a text input is looked at to tell text from binary
_MAGIC = [  # (prefix, what): files that are certainly not text, by their first bytes
    (b"\x1f\x8b", "a gzip"), (b"PK\x03\x04", "a zip"), (b"PK\x05\x06", "a zip"),
    (b"\x89PNG\r\n\x1a\n", "a PNG"), (b"\x7fELF", "an ELF"), (b"\xff\xd8\xff", "a JPEG"),
    (b"GIF87a", "a GIF"), (b"GIF89a", "a GIF"), (b"%PDF-", "a PDF"), (b"PAR1", "a Parquet"),
    (b"\xfd7zXZ\x00", "an xz"), (b"\x28\xb5\x2f\xfd", "a zstd"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z"), (b"BZh91AY&SY", "a bzip2"),
]  # fmt: skip
_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _escape_bytes(err: UnicodeError) -> tuple[str, int]:
    if not isinstance(err, UnicodeDecodeError):
        raise err
    bad = err.object[err.start : err.end]
    return "".join(chr(0xDC00 + b) for b in bad), err.end


codecs.register_error(_ESCAPE, _escape_bytes)


def check_encoding(encoding: str) -> str:
    """The codec's canonical name; an unknown or non-text codec is a DataError."""
    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError):
        raise DataError(f"unknown encoding {encoding!r} (try utf-8, latin-1, cp1252)") from None
    if not getattr(info, "_is_text_encoding", True):
        raise DataError(f"{encoding!r} is not a text encoding")
    return info.name


def _ascii_compatible(encoding: str) -> bool:
    return b"\n\0".decode(encoding, "ignore") == "\n\0"


def _refuse_binary(path: str, encoding: str = "utf-8") -> None:
    """A DataError if the file starts like a binary format or (in an ASCII-compatible
    encoding) has a NUL byte in its first SNIFF_BYTES."""
    try:
        with open(path, "rb") as file:
            head = file.read(SNIFF_BYTES)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"{path} is {what} file, not text; pass text, .jsonl or .parquet")
    if b"\0" in head and _ascii_compatible(encoding):
        hint = (" (it looks like UTF-16: try --encoding utf-16)"
                if head.startswith(_UTF16_32_BOMS) else "")  # fmt: skip
        nul = head.index(b"\0")
        raise DataError(f"{path} looks binary (a NUL byte at offset {nul}), not "
                        f"{encoding} text{hint}")  # fmt: skip


def _decode_error(path: str, offset: int, err: UnicodeDecodeError, encoding: str,
                  line: int | None = None) -> DataError:  # fmt: skip
    where = f"{path}:{line}" if line is not None else path
    byte = err.object[err.start]
    return DataError(f"{where}: byte offset {offset} (0x{byte:02x}) is not valid {encoding}; "
                     "pass the right --encoding, or --errors replace")  # fmt: skip


@dataclass
class _ReadStats:
    """What one pass over the sources observed; a fresh one per pass so nothing counts twice."""

    undecodable_bytes: int = 0
    stream_digests: dict[str, Any] = field(default_factory=dict)
    stream_bytes: dict[str, int] = field(default_factory=dict)

    def clean(self, text: str) -> str:
        """Turn each byte that could not be decoded into one U+FFFD and count it.

        With errors="replace" files are decoded with an error handler that keeps every
        undecodable byte as one lone surrogate; replacing those (and any lone surrogate a
        JSON \\u escape made, which no tokenizer accepts) makes the count exact: one mark
        per bad byte.
        """
        text, count = _SURROGATE.subn("\ufffd", text)
        self.undecodable_bytes += count
        return text


@dataclass
class _Source:
    kind: str  # "text", "jsonl", "parquet", "default" (a wheel path) or "hf" (a dataset)
    location: str


def _bom_length(head: bytes, encoding: str) -> int:
    """Bytes of a UTF-8 byte-order mark that open a UTF-8 file: a marker, not text (Python's
    "utf-8" codec would keep it as U+FEFF in the first document)."""
    return len(codecs.BOM_UTF8) if (codecs.lookup(encoding).name == "utf-8"
                                    and head.startswith(codecs.BOM_UTF8)) else 0  # fmt: skip


def _decoded_chunks(path: str, encoding: str = "utf-8", errors: str = "replace") -> Iterator[str]:
    handler = "strict" if errors == "strict" else _ESCAPE
    decoder = codecs.getincrementaldecoder(encoding)(errors=handler)
    with open(path, "rb") as file:
        # Bytes of the file handed to the decoder so far: a UTF-8 mark is skipped, not decoded.
        offset = _bom_length(file.read(len(codecs.BOM_UTF8)), encoding)
        file.seek(offset)
        while True:
            block = file.read(READ_BYTES)
            pending = len(decoder.getstate()[0])  # bytes held back from the last block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                raise _decode_error(path, offset - pending + err.start, err, encoding) from None
            yield text
            if not block:
                return
            offset += len(block)


def _document_end(text: str, start: int) -> int | None:
    """Where the document starting at `start` ends: past the first blank line after DOC_CHARS."""
    blank = text.find("\n\n", start + DOC_CHARS)
    if blank >= 0:
        return blank + 2
    if len(text) - start < MAX_DOC_CHARS:
        return None  # read more before deciding
    line_end = text.rfind("\n", start, start + MAX_DOC_CHARS)
    return line_end + 1 if line_end > start else start + MAX_DOC_CHARS


def _text_documents(path: str, encoding: str, errors: str) -> Iterator[str]:
    """A text file as documents of about DOC_CHARS, so one big file still gives many."""
    buffer = ""
    for chunk in _decoded_chunks(path, encoding, errors):
        buffer += chunk
        start = 0
        while (end := _document_end(buffer, start)) is not None:
            yield buffer[start:end]
            start = end
        buffer = buffer[start:]
    yield buffer


def _jsonl_documents(path: str, text_field: str, encoding: str, errors: str) -> Iterator[str]:
    handler = "strict" if errors == "strict" else _ESCAPE
    offset = 0
    with open(path, "rb") as file:
        for line_no, raw in enumerate(file, 1):
            if line_no == 1 and (bom := _bom_length(raw, encoding)):
                raw, offset = raw[bom:], bom
            try:
                line = raw.decode(encoding, handler)
            except UnicodeDecodeError as err:
                raise _decode_error(path, offset + err.start, err, encoding, line_no) from None
            offset += len(raw)
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
            if errors == "strict" and _SURROGATE.search(value):
                raise DataError(f"{path}:{line_no}: field {text_field!r} holds a lone surrogate "
                                "escape (\\ud800-\\udfff), which is not text; pass --errors "
                                "replace")  # fmt: skip
            yield value


def _parquet_documents(path: str, column: str, encoding: str, errors: str) -> Iterator[str]:
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
            if isinstance(value, bytes):  # a binary column: decoded like a text file
                try:
                    value = value.decode(encoding, "strict" if errors == "strict" else _ESCAPE)
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}: column {column!r} holds bytes that are not valid "
                                    f"{encoding} (0x{err.object[err.start]:02x}); pass the "
                                    "right --encoding, or --errors replace") from None
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
    encoding = options.get("encoding", "utf-8")
    errors = options.get("errors", "replace")
    for source in sources:
        if source.kind == "text":
            texts = _text_documents(source.location, encoding, errors)
        elif source.kind == "jsonl":
            texts = _jsonl_documents(source.location, options["jsonl_field"], encoding, errors)
        elif source.kind == "parquet":
            texts = _parquet_documents(source.location, options["parquet_column"], encoding,
                                       errors)  # fmt: skip
        elif source.kind == "default":
            texts = read_default_corpus(source.location)
        else:
            texts = _hf_documents(source.location, options["hf_split"],
                                  options["jsonl_field"], stats)  # fmt: skip
        found = False
        for text in texts:
            if errors == "strict" and source.kind == "hf" and _SURROGATE.search(text):
                raise DataError(f"Hugging Face dataset {source.location!r} holds a lone "
                                "surrogate, which is not text; pass --errors replace")  # fmt: skip
            text = stats.clean(text)
            if text and not text.isspace():
                found = True
                yield text
        if not found:
            raise DataError(f"{source.location}: no text found")


def _resolve_inputs(inputs: Iterable[str | os.PathLike]) -> list[_Source]:
    """Files and glob matches in the order given (duplicates once), typed by extension."""
    paths: list[str] = []
    for item in map(os.fspath, inputs):
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


def _check_sources(sources: list[_Source], encoding: str) -> None:
    """Refuse binary files among the text and JSONL inputs (cheap: their first bytes)."""
    for source in sources:
        if source.kind in ("text", "jsonl"):
            _refuse_binary(source.location, encoding)
        if source.kind == "jsonl" and not _ascii_compatible(encoding):
            raise DataError(f"{source.location}: JSONL needs an ASCII-compatible encoding, "
                            f"not {encoding}")  # fmt: skip


