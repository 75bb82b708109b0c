"""`jtok data prepare` and `jtok data corpus`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jtok.cli.common import UsageError

DEFAULT_VOCAB = 8192
MAX_VOCAB = 1 << 22  # 4.2M ids; the largest public LM vocabularies are ~260K


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from jtok import data

    if args.tokenizer is not None and args.vocab_size is not None:
        # The vocabulary is the given tokenizer's; a size would be silently ignored.
        raise UsageError("--vocab-size sets the size of a tokenizer trained here; with "
                         "--tokenizer the vocabulary is that tokenizer's: drop one")  # fmt: skip
    if args.vocab_size is None:
        args.vocab_size = DEFAULT_VOCAB
    if args.vocab_size <= 0:
        raise UsageError(f"--vocab-size must be positive, got {args.vocab_size}")
    if args.vocab_size > MAX_VOCAB:
        # The BPE trainer allocates per candidate id: past a few million it only exhausts
        # memory (and aborts the process without a Python error).
        raise UsageError(f"--vocab-size {args.vocab_size:,} is larger than {MAX_VOCAB:,}, "
                         "the most a byte-level BPE can usefully learn here")  # fmt: skip
    if args.val is not None and args.val_fraction is not None:
        raise UsageError("give --val FILE... or --val-fraction, not both")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    manifest = data.prepare(
        args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        jsonl_field=args.field, parquet_column=args.field, hf_dataset=args.hf_dataset,
        hf_split=args.hf_split, val=args.val, val_fraction=args.val_fraction, seed=args.seed,
        encoding=args.encoding, errors=args.errors, overwrite=args.overwrite,
        progress=not args.no_progress and sys.stderr.isatty(),  # no bars in log files
    )  # fmt: skip
    splits = manifest["splits"]
    print(f"wrote {args.out}: vocab {manifest['vocab_size']}, train {splits['train']['tokens']:,} "
          f"tokens, val {splits['val']['tokens']:,} tokens")  # fmt: skip
    return 0


def cmd_data_corpus(args: argparse.Namespace) -> int:
    from jtok.data.bench_corpus import build_docs_en

    build_docs_en(args.out)
    return 0


def register(sub) -> None:
    data_cmd = sub.add_parser("data", help="prepare training data",
                              description="Turn text into training shards.")
    data_sub = data_cmd.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="tokenize text into train/val shards",
        description="Train a byte-level BPE tokenizer (or use --tokenizer) and write token "
        "ids as memory-mappable train.bin / val.bin with a manifest.json. Inputs: text files "
        "or globs, .jsonl (field --field), .parquet (column --field), or --hf-dataset. "
        "Without inputs: Shakespeare's plays, fetched once into the user cache. The output "
        "is built beside --out and swapped in when complete: a failure leaves --out as it was.",
    )
    prep.add_argument("inputs", nargs="*", help="text / .jsonl / .parquet files or globs")
    prep.add_argument("--out", type=Path, required=True, help="output directory")
    prep.add_argument("--vocab-size", type=int, default=None,
                      help=f"size of the BPE vocabulary trained here (default {DEFAULT_VOCAB}; "
                      "not with --tokenizer)")  # fmt: skip
    prep.add_argument("--tokenizer", help="existing tokenizer.json or HF tokenizer directory")
    prep.add_argument("--field", default="text", help="JSONL field / Parquet column")
    prep.add_argument("--hf-dataset", help="a Hugging Face dataset name (needs network)")
    prep.add_argument("--hf-split", default="train")
    prep.add_argument("--val", nargs="+", metavar="FILE",
                      help="validation files or globs (text, .jsonl, .parquet), instead of "
                      "holding out --val-fraction of the inputs")  # fmt: skip
    prep.add_argument("--val-fraction", type=float, default=None,
                      help="share of input documents held out for validation (default 0.005)")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--encoding", default="utf-8",
                      help="encoding of text and JSONL inputs (default utf-8; e.g. latin-1)")
    prep.add_argument("--errors", choices=["strict", "replace"], default="strict",
                      help="undecodable bytes: strict = an error naming the file and offset "
                      "(default); replace = U+FFFD, counted in the manifest")  # fmt: skip
    prep.add_argument("--overwrite", action="store_true",
                      help="replace an existing data directory (only once the new one is "
                      "complete; a directory holding other files is refused)")  # fmt: skip
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(handler=cmd_data_prepare, command="data prepare")

    corpus = data_sub.add_parser(
        "corpus",
        help="build a benchmark text corpus",
        description="Build a named benchmark corpus. docs-en: the reStructuredText prose of "
        "the Debian packages linux-doc-6.1 and python3.11-doc (fetched with apt-get download, "
        "unpacked with dpkg-deb, about 35 MB), split into DIR/docs-en/{train,val}.txt by a "
        "hash of each file's path (about 2% val), with a manifest.json. Does nothing if "
        "the corpus is already built.",
    )
    corpus.add_argument("name", choices=["docs-en"], help="the corpus to build")
    corpus.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="where DIR/docs-en/ is written")  # fmt: skip
    corpus.set_defaults(handler=cmd_data_corpus, command="data corpus")
