"""The prepared-data format: file names, token dtype, manifest keys, and DataError."""

from __future__ import annotations

from jtok.errors import JTokError

FORMAT_VERSION = 1
EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
MANIFEST_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size", "eot_id", "dtype", "splits")
TOKEN_DTYPES = ("uint16", "uint32")
# Everything `prepare` writes into a data directory: the only files --overwrite may replace.
OUTPUT_FILES = (MANIFEST_FILE, TOKENIZER_FILE, *SPLIT_FILES.values())
ERRORS_MODES = ("strict", "replace")  # what prepare does with bytes its encoding cannot decode


class DataError(JTokError):
    """A mistake in the data or how it was asked for; the message alone says what to fix."""
