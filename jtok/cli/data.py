"""`jtok data prepare`."""

from __future__ import annotations

import argparse
from pathlib import Path

from jtok.cli.common import UsageError


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from jtok import data

    if args.vocab_size <= 0:
        raise UsageError(f"--vocab-size must be positive, got {args.vocab_size}")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    manifest = data.prepare(
        args.inputs, args.out, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
        jsonl_field=args.field, parquet_column=args.field, hf_dataset=args.hf_dataset,
        hf_split=args.hf_split, val_fraction=args.val_fraction, seed=args.seed,
        overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    splits = manifest["splits"]
    print(f"wrote {args.out}: vocab {manifest['vocab_size']}, train {splits['train']['tokens']:,} "
          f"tokens, val {splits['val']['tokens']:,} tokens")  # fmt: skip
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
        "Without inputs: Shakespeare's plays, fetched once into the user cache.",
    )
    prep.add_argument("inputs", nargs="*", help="text / .jsonl / .parquet files or globs")
    prep.add_argument("--out", type=Path, required=True, help="output directory")
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    prep.add_argument("--tokenizer", help="existing tokenizer.json or HF tokenizer directory")
    prep.add_argument("--field", default="text", help="JSONL field / Parquet column")
    prep.add_argument("--hf-dataset", help="a Hugging Face dataset name (needs network)")
    prep.add_argument("--hf-split", default="train")
    prep.add_argument("--val-fraction", type=float, default=0.005)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(handler=cmd_data_prepare)
