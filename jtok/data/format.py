"""The prepared-data format: file names, token dtype, manifest keys, and DataError."""

from __future__ import annotations

from jtok.errors import JTokError

FORMAT_VERSION = 1
EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}
MANIFEST_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size", "eot_id", "dtype", "splits")


class DataError(JTokError):
    """A mistake in the data or how it was asked for; the message alone says what to fix."""

