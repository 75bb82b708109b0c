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

Modules: `format` (file names, DataError), `sources` (readers), `corpus` (the default
corpus, the cache), `tokenizer`, `build` (prepare), `dataset` (reading prepared data).
"""

from jtok.data.build import prepare
from jtok.data.corpus import DEFAULT_CORPUS, cache_dir, default_corpus_wheel, read_default_corpus
from jtok.data.dataset import (
    TokenBatches,
    check_tokenizer,
    check_vocab,
    encode_text_file,
    eval_batches,
    load_manifest,
    max_token_id,
    open_split,
)
from jtok.data.format import (
    EOT_TOKEN,
    FORMAT_VERSION,
    MANIFEST_FILE,
    SPLIT_FILES,
    TOKENIZER_FILE,
    DataError,
)
from jtok.data.tokenizer import load_tokenizer, token_dtype

__all__ = [
    "DEFAULT_CORPUS", "EOT_TOKEN", "FORMAT_VERSION", "MANIFEST_FILE", "SPLIT_FILES",
    "TOKENIZER_FILE", "DataError", "TokenBatches", "cache_dir", "check_tokenizer", "check_vocab",
    "default_corpus_wheel", "encode_text_file", "eval_batches", "load_manifest",
    "load_tokenizer", "max_token_id", "open_split", "prepare", "read_default_corpus",
    "token_dtype",
]  # fmt: skip
