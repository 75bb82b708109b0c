"""`jtok bench`: training-step throughput, interleaved medians."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jtok.cli.common import (
    UsageError,
    add_model_arguments,
    nonnegative_int,
    positive_int,
    resolve_model_config,
)

VARIANTS = ("baseline", "jtok", "jtokm")  # as jtok.bench.train_step.VARIANTS (no torch here)


def parse_variants(text: str) -> list[str]:
    """`baseline,jtok` -> ["baseline", "jtok"]: known names, each once, at least one."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise UsageError(f"--variants: unknown variant {unknown[0]!r} "
                         f"(known: {', '.join(VARIANTS)})")  # fmt: skip
    if not names:
        raise UsageError(f"--variants: name at least one of {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def cmd_bench(args: argparse.Namespace) -> int:
    from jtok.parallel.resources import check_memory, check_output_file

    cfg = resolve_model_config(args)
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len {cfg.max_seq_len}")
    variants = parse_variants(args.variants)
    if args.out is not None:
        check_output_file(args.out, "--out")

    from jtok.bench.train_step import format_report, train_step_benchmark, variant_config

    # Every variant's model and optimizer are held at once, on the CPU.
    sparse = args.optimizer == "sparse"
    held = [variant_config(cfg, v, sparse) for v in dict.fromkeys(["baseline", *variants])]
    check_memory(held, "cpu", training=True, batch=args.batch, seq_len=args.seq_len,
                 what=f"jtok bench ({len(held)} variants)")  # fmt: skip
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
        from jtok.io import write_json_atomic

        write_json_atomic(args.out, result)
    return 0


def register(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="training-step throughput of baseline vs JTok vs JTok-M",
        description="Time full training steps (forward, backward, optimizer) of the same "
        "backbone without modulation, with JTok and with JTok-M, interleaving the variants "
        "over repetitions; report medians and ratios to the baseline. Token ids are drawn "
        "from a Zipf law so deduplication sees text-like repetition. Sizes that cannot fit "
        "in memory are refused before anything is allocated.",
    )
    add_model_arguments(bench, default_preset="small")
    bench.add_argument("--variants", default="baseline,jtok,jtokm",
                       help="comma list of baseline, jtok, jtokm (default: all three)")
    bench.add_argument("--batch", type=positive_int, default=8)
    bench.add_argument("--seq-len", type=positive_int, default=256)
    bench.add_argument("--steps", type=positive_int, default=5, help="timed steps per repetition")
    bench.add_argument("--reps", type=positive_int, default=5, help="interleaved repetitions")
    bench.add_argument("--warmup", type=nonnegative_int, default=2,
                       help="untimed steps per variant")
    bench.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    bench.add_argument("--optimizer", choices=["adamw", "sparse"], default="sparse",
                       help="adamw: AdamW on everything (dense table gradients); sparse: "
                       "sparse table gradients updated row-wise by RowAdam (default: sparse)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--out", type=Path, help="also write the JSON result here (a file in "
                       "an existing folder)")  # fmt: skip
    bench.set_defaults(handler=cmd_bench)
