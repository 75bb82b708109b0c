"""`jtok bench`: training-step throughput, interleaved medians."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jtok.cli.common import UsageError, add_model_arguments, resolve_model_config


def cmd_bench(args: argparse.Namespace) -> int:
    from jtok.bench.train_step import format_report, train_step_benchmark

    cfg = resolve_model_config(args)
    for name in ("batch", "seq_len", "steps", "reps"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len {cfg.max_seq_len}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    result = train_step_benchmark(
        cfg, variants=variants, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
        reps=args.reps, warmup=args.warmup, threads=args.threads, optimizer=args.optimizer,
        progress=not args.json,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(format_report(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def register(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="training-step throughput of baseline vs JTok vs JTok-M",
        description="Time full training steps (forward, backward, optimizer) of the same "
        "backbone without modulation, with JTok and with JTok-M, interleaving the variants "
        "over repetitions; report medians and ratios to the baseline. Token ids are drawn "
        "from a Zipf law so deduplication sees text-like repetition.",
    )
    add_model_arguments(bench, default_preset="small")
    bench.add_argument("--variants", default="baseline,jtok,jtokm",
                       help="comma list of baseline, jtok, jtokm (default: all three)")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--seq-len", type=int, default=256)
    bench.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    bench.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.add_argument("--optimizer", choices=["adamw", "sparse"], default="sparse",
                       help="adamw: AdamW on everything (dense table gradients); sparse: "
                       "sparse table gradients updated row-wise by RowAdam (default: sparse)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--out", type=Path, help="also write the JSON result here")
    bench.set_defaults(handler=cmd_bench)
