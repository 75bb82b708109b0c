"""Data for jtok: raw text in, memory-mappable token files out, batches for train and eval.

`prepare` turns text, JSONL or Parquet files (or a Hugging Face dataset, or by default
Shakespeare's plays) into a directory that training and evaluation read:

    tokenizer.json   the tokenizer that made the ids (a trained byte-level BPE, or yours)
    train.bin        ids of the training documents, each followed by <|endoftext|>
    val.bin          the same for the held-out documents
    manifest.json    counts, dtype, tokenizer hash, source hashes and per split its file,
                     tokens, documents, bytes, largest id (`max_token_id`) and a sampled
                     fingerprint (`sample_sha256`); written last, so a directory that has
                     a manifest is complete

The .bin files are raw little-endian uint16 (uint32 past 65536 ids) so they memory-map:
`TokenBatches` samples random training windows and `eval_batches` walks consecutive ones
without loading a split. Preparing streams the inputs twice (train the tokenizer, then
encode) and never holds the corpus or its ids, so its memory does not grow with the corpus.
It checks everything it was given first, builds the directory beside the target and swaps
it in whole, so existing data is never damaged. Training and evaluation open a directory
with `verify_data_dir` (paths inside the directory, tokenizer hash, split sizes and
fingerprints, ids below the vocabulary), then `check_vocab(manifest, model_vocab_size)`.

Modules: `format` (file names, DataError), `sources` (readers, decoding, binary check),
`corpus` (the default corpus, the cache), `bench_corpus` (the docs-en benchmark corpus),
`tokenizer`, `outdir` (the staged output directory), `build` (prepare), `manifest` (the
manifest and its checks), `dataset` (batches from prepared data).
"""

from jtok.data.bench_corpus import build_docs_en
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
    verify_data_dir,
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
    "TOKENIZER_FILE", "DataError", "TokenBatches", "build_docs_en", "cache_dir",
    "check_tokenizer", "check_vocab", "default_corpus_wheel", "encode_text_file",
    "eval_batches", "load_manifest", "load_tokenizer", "max_token_id", "open_split", "prepare",
    "read_default_corpus", "token_dtype", "verify_data_dir",
]  # fmt: skip
