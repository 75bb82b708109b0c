"""The manifest of a prepared directory, and the checks that let training trust it.

Two levels of checking:

- `load_manifest(dir)` (cheap, every reader): the JSON is a manifest of this format, its
  fields have the right types, and the paths it names (`tokenizer`, each split's `file`)
  are relative and resolve inside the data directory: no absolute path, no `..`, no
  symlink that leads out. `open_split` also checks a split's size against its token count.
- `verify_data_dir(dir)` (what training and evaluation call once when they open data):
  all of the above, plus the tokenizer file's sha256 against `tokenizer_sha256`, each
  split's `sample_sha256` (see below), and each split's `max_token_id` below `vocab_size`.
  It returns the manifest with every split's `max_token_id` filled in, so that
  `check_vocab(manifest, model_vocab_size)` decides from the manifest, without a scan.

Split fingerprints: at prepare time each split records `max_token_id` (its largest id,
counted while encoding) and `sample_sha256`, the sha256 of its size and of sampled bytes:
the whole file up to 4 MiB, else the first and last MiB and 32 blocks of 64 KiB evenly
spaced in between (about 4 MiB read whatever the size). So a file that was replaced,
regenerated, truncated or extended no longer matches its manifest, while opening a
multi-GB split reads a few MiB; small files are verified completely. An edit of a few
bytes in the middle of a large split can slip past the sample (it is not a full hash).

Manifests written before these fields existed still load: a split without `max_token_id`
is scanned for its largest id (in chunks, once per process for an unchanged file).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jtok.data.format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MANIFEST_KEYS,
    TOKEN_DTYPES,
    DataError,
)

SAMPLE_WHOLE_BYTES = 4 << 20  # files up to this size are hashed completely
SAMPLE_EDGE_BYTES = 1 << 20  # else: the first and last MiB ...
SAMPLE_BLOCK_BYTES = 64 << 10  # ... and SAMPLE_BLOCKS blocks of this size in between
SAMPLE_BLOCKS = 32
_HASH_READ_BYTES = 1 << 20
_SCANNED: dict[tuple, int] = {}  # (path, size, mtime, inode) -> largest id, for old manifests


# ---- the manifest -----------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _inside(data_dir: Path, value: Any, field: str, manifest_path: Path) -> Path:
    """`data_dir / value`, refused unless it is a relative path that stays inside `data_dir`."""
    where = f"{manifest_path}: field {field!r}"
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} must be a file name inside the data directory, got {value!r}")
    if os.path.isabs(value):
        raise DataError(f"{where} is the absolute path {value!r}; it must name a file inside "
                        "the data directory")  # fmt: skip
    if ".." in Path(value).parts:
        raise DataError(f"{where} = {value!r} leaves the data directory ('..')")
    path = data_dir / value
    base = data_dir.resolve()
    resolved = path.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise DataError(f"{where} = {value!r} resolves to {resolved}, outside the data "
                        "directory (a symlink?)")  # fmt: skip
    return path


def _check_fields(manifest: dict, data_dir: Path, path: Path) -> None:
    """Types and paths of the fields readers use; each failure names the field."""

    def bad(field: str, expected: str) -> DataError:
        return DataError(f"{path} is corrupt: field {field!r} must be {expected}")

    vocab = manifest["vocab_size"]
    if not _is_int(vocab) or vocab < 1:
        raise bad("vocab_size", "a positive integer")
    if not _is_int(manifest["eot_id"]) or not 0 <= manifest["eot_id"] < vocab:
        raise bad("eot_id", f"an id below vocab_size {vocab}")
    if manifest["dtype"] not in TOKEN_DTYPES:
        raise bad("dtype", " or ".join(TOKEN_DTYPES))
    if not isinstance(manifest["tokenizer_sha256"], str):
        raise bad("tokenizer_sha256", "a hex digest")
    _inside(data_dir, manifest["tokenizer"], "tokenizer", path)
    splits = manifest["splits"]
    if not isinstance(splits, dict) or not splits:
        raise bad("splits", "an object of splits")
    for name, info in splits.items():
        if not isinstance(info, dict):
            raise bad(f"splits.{name}", "an object")
        if not _is_int(info.get("tokens")) or info["tokens"] < 0:
            raise bad(f"splits.{name}.tokens", "a count")
        largest = info.get("max_token_id")
        if largest is not None and not _is_int(largest):
            raise bad(f"splits.{name}.max_token_id", "an integer")
        if largest is not None and largest >= vocab:
            raise DataError(f"{path} is inconsistent: split {name!r} holds token id {largest} "
                            f"but vocab_size is {vocab}; prepare the data again")  # fmt: skip
        _inside(data_dir, info.get("file"), f"splits.{name}.file", path)


def load_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, checked enough that its fields can be trusted.

    Cheap: reads the manifest only (see the module docstring; `verify_data_dir` also
    checks the files it names).
    """
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{data_dir} has no {MANIFEST_FILE}; run jtok data prepare") from None
    except (OSError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err).splitlines()[0]
        raise DataError(f"{path} is unreadable or corrupt: {reason}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a jtok data manifest of format {FORMAT_VERSION}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{path} is corrupt: missing {', '.join(missing)}")
    _check_fields(manifest, data_dir, path)
    return manifest


def _as_manifest(data: str | os.PathLike | dict) -> dict:
    return data if isinstance(data, dict) else load_manifest(data)


# ---- the files it names -----------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_HASH_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _sample_ranges(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes `sample_sha256` covers (see the module docstring)."""
    if size <= SAMPLE_WHOLE_BYTES:
        return [(0, size)]
    first, last = SAMPLE_EDGE_BYTES, size - SAMPLE_EDGE_BYTES
    step = (last - first - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1) // 4 * 4  # whole ids
    middle = [(first + i * step, SAMPLE_BLOCK_BYTES) for i in range(SAMPLE_BLOCKS)]
    return [(0, SAMPLE_EDGE_BYTES), *middle, (last, SAMPLE_EDGE_BYTES)]


def sample_sha256(path: str | os.PathLike) -> str:
    """The fingerprint of a split file: sha256 of its size and sampled bytes."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as file:
        for offset, length in _sample_ranges(size):
            file.seek(offset)
            digest.update(file.read(length))
    return digest.hexdigest()


def split_path(data_dir: str | os.PathLike, manifest: dict, split: str) -> Path:
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir} has no split {split!r} (has {sorted(manifest['splits'])})")
    return Path(data_dir) / manifest["splits"][split]["file"]


def _open_split(data_dir: str | os.PathLike, manifest: dict, split: str) -> np.memmap:
    path = split_path(data_dir, manifest, split)
    tokens = manifest["splits"][split]["tokens"]
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    size = path.stat().st_size if path.is_file() else None
    if size != tokens * dtype.itemsize or size == 0:
        raise DataError(f"{path} is missing, empty or not the {tokens} tokens the "
                        "manifest lists; prepare the data again")  # fmt: skip
    return np.memmap(path, dtype=dtype, mode="r")


def open_split(data_dir: str | os.PathLike, split: str) -> np.memmap:
    """A read-only memory map of one split's ids, after checking its size against the manifest."""
    return _open_split(data_dir, load_manifest(data_dir), split)


def max_token_id(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """The largest id in `tokens`, read in chunks so a memory map is never loaded whole."""
    return max((int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)),
               default=-1)  # fmt: skip


def _scanned_max(path: Path, tokens: np.ndarray) -> int:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _SCANNED:
        _SCANNED[key] = max_token_id(tokens)
    return _SCANNED[key]


def verify_data_dir(data_dir: str | os.PathLike) -> dict:
    """The manifest of `data_dir` after every check that opening data for training needs.

    Beyond `load_manifest`: the tokenizer file exists and has the recorded sha256, every
    split has its recorded size and fingerprint, and no split holds an id at or above
    `vocab_size`. The returned manifest (a copy) has `max_token_id` for every split,
    scanned once for a manifest written before prepare recorded it.
    """
    manifest = json.loads(json.dumps(load_manifest(data_dir)))  # a copy we may fill in
    data_dir = Path(data_dir)
    tokenizer = data_dir / manifest["tokenizer"]
    if not tokenizer.is_file():
        raise DataError(f"{tokenizer} is missing; prepare the data again")
    actual = file_sha256(tokenizer)
    if actual != manifest["tokenizer_sha256"]:
        raise DataError(f"{tokenizer} has sha256 {actual[:12]}... but {MANIFEST_FILE} records "
                        f"{manifest['tokenizer_sha256'][:12]}...: the tokenizer changed after "
                        "the data was prepared; prepare the data again")  # fmt: skip
    for split, info in manifest["splits"].items():
        tokens = _open_split(data_dir, manifest, split)
        path = split_path(data_dir, manifest, split)
        recorded = info.get("sample_sha256")
        if recorded is not None and sample_sha256(path) != recorded:
            raise DataError(f"{path} does not match {MANIFEST_FILE} (its content changed "
                            "after prepare); prepare the data again")  # fmt: skip
        if info.get("max_token_id") is None:
            info["max_token_id"] = _scanned_max(path, tokens)
        if info["max_token_id"] >= manifest["vocab_size"]:
            raise DataError(f"{path} holds token id {info['max_token_id']} but {MANIFEST_FILE} "
                            f"says vocab_size is {manifest['vocab_size']}: the data does not "
                            "match its manifest; prepare the data again")  # fmt: skip
    return manifest


def check_vocab(data: str | os.PathLike | dict, model_vocab_size: int) -> None:
    """Refuse data whose ids a model with `model_vocab_size` embeddings cannot look up.

    Given a directory, it is verified first (`verify_data_dir`), so the splits' recorded
    largest ids decide, without a scan; given a manifest (from `verify_data_dir` or
    `load_manifest`), its `vocab_size` and any `max_token_id` it records decide.
    """
    manifest = data if isinstance(data, dict) else verify_data_dir(data)
    if manifest["vocab_size"] > model_vocab_size:
        raise DataError(
            f"the data's tokenizer has {manifest['vocab_size']} ids (max id "
            f"{manifest['vocab_size'] - 1}) but the model's vocab_size is {model_vocab_size}; "
            f"set vocab_size >= {manifest['vocab_size']}"
        )
    for split, info in manifest["splits"].items():
        largest = info.get("max_token_id")
        if largest is not None and largest >= model_vocab_size:
            raise DataError(f"{split} holds token id {largest} but the model's vocab_size is "
                            f"{model_vocab_size}")  # fmt: skip


def check_tokenizer(data: str | os.PathLike | dict, expected_sha256: str) -> None:
    """Refuse to evaluate a checkpoint on ids made by a tokenizer other than its own."""
    actual = _as_manifest(data)["tokenizer_sha256"]
    if actual != expected_sha256:
        raise DataError(f"the data was tokenized with tokenizer sha256 {actual[:12]}... but the "
                        f"checkpoint was trained with {expected_sha256[:12]}...")  # fmt: skip
