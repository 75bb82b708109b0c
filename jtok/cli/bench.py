"""`jtok bench`: training-step throughput (default) or `jtok bench decode`: prefill and
decode throughput; variants interleaved, medians and paired ratios to the baseline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jtok.cli.common import (
    UsageError,
    add_model_arguments,
    nonnegative_int,
    parse_overrides,
    positive_int,
    resolve_model_config,
)

VARIANTS = ("baseline", "jtok", "jtokm")  # as jtok.bench.train_step.VARIANTS (no torch here)
PLACEMENTS = ("device", "host")  # as jtok.bench.decode.PLACEMENTS
MODES = ("train", "decode")

# Options of one mode only, with their defaults there (None elsewhere: given in the other
# mode, they are refused rather than silently ignored).
TRAIN_ONLY = {"batch": 8, "seq_len": 256, "steps": 5, "optimizer": "sparse", "phases": False}
DECODE_ONLY = {"batches": "1,16", "new_tokens": 64, "prompt_len": 32,
               "host_check": True, "share": True}  # fmt: skip
WARMUP = {"train": 2, "decode": 1}
PLACEMENTS_DEFAULT = {"train": "device", "decode": "device,host"}


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


def parse_placements(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in PLACEMENTS]
    if unknown or not names:
        raise UsageError(f"--placements: name one or both of {', '.join(PLACEMENTS)}"
                         + (f" (got {unknown[0]!r})" if unknown else ""))  # fmt: skip
    return list(dict.fromkeys(names))


def parse_batches(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise UsageError(f"--batches: expected positive integers separated by commas, got "
                         f"{text!r}")  # fmt: skip
    return list(dict.fromkeys(sizes))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _apply_mode_defaults(args: argparse.Namespace) -> None:
    """Fill the chosen mode's defaults; refuse the other mode's options."""
    own, other = (TRAIN_ONLY, DECODE_ONLY) if args.mode == "train" else (DECODE_ONLY, TRAIN_ONLY)
    for name in other:
        if getattr(args, name) is not None:
            raise UsageError(f"{_flag(name)} applies to `jtok bench "
                             f"{'decode' if args.mode == 'train' else '(train)'}`, not to "
                             f"`jtok bench {args.mode}`")  # fmt: skip
    args.seq_len_default = args.seq_len is None
    for name, default in own.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.warmup is None:
        args.warmup = WARMUP[args.mode]
    if args.compile and args.warmup == 0:  # else the compile lands in the first timing
        raise UsageError("--compile compiles in the warm-up: give --warmup 1 or more")
    if args.placements is None:
        args.placements = PLACEMENTS_DEFAULT[args.mode]
    from jtok.parallel.resources import usable_cpus

    cpus = usable_cpus()
    if args.threads is not None and args.threads > cpus:
        # More threads than cores time the contention between them, not the models.
        raise UsageError(f"--threads {args.threads} exceeds the {cpus} CPUs this process may "
                         "run on")  # fmt: skip


def _write(result: dict, args: argparse.Namespace, report) -> None:
    if args.json:
        print(json.dumps(result))
    else:
        print(report(result))
    if args.out is not None:
        from jtok.io import write_json_atomic

        write_json_atomic(args.out, result)


def cmd_bench(args: argparse.Namespace) -> int:
    from jtok.parallel.resources import check_output_file
    from jtok.run.files import owning_jtok_folder

    _apply_mode_defaults(args)
    cfg = resolve_model_config(args)
    variants = parse_variants(args.variants)
    if args.out is not None:
        check_output_file(args.out, "--out")
        owner = owning_jtok_folder(args.out)
        if owner is not None:  # its config.json, manifest.json, results.jsonl...
            raise UsageError(f"--out {args.out} is inside {owner[1]} ({owner[0]}); write the "
                             "benchmark's JSON elsewhere")  # fmt: skip
        if args.out.exists() and not args.overwrite:
            raise UsageError(f"--out {args.out} exists; use --overwrite to replace it")
    if {"tokmod.kind", "model.tokmod.kind"} & set(parse_overrides(args.overrides)):
        raise UsageError("--set tokmod.kind: --variants chooses the modulation of each model")
    if args.mode == "decode":
        return _bench_decode(args, cfg, variants)

    from jtok.parallel.resources import check_memory

    if args.seq_len_default:  # the default follows a short-context preset (tiny: 128)
        args.seq_len = min(args.seq_len, cfg.max_seq_len)
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} exceeds max_seq_len {cfg.max_seq_len}")
    from jtok.bench.train_step import (
        configurations,
        format_report,
        train_step_benchmark,
        variant_config,
    )
    from jtok.parallel.distributed import resolve_device

    placements = parse_placements(args.placements)
    sparse = args.optimizer == "sparse"
    if "host" in placements and not sparse:
        raise UsageError("--placements host: host tables train with sparse gradients and "
                         "RowAdam (--optimizer sparse)")  # fmt: skip
    device = resolve_device(args.device, option="--device")
    # Every configuration's model and optimizer are held at once, each with its tables
    # where its placement puts them.
    held = configurations(variants, placements)
    check_memory([variant_config(cfg, v, sparse) for v, _ in held], device, training=True,
                 batch=args.batch, seq_len=args.seq_len,
                 table_placement=[placement for _, placement in held],
                 what=f"jtok bench ({len(held)} configurations)")  # fmt: skip
    result = train_step_benchmark(
        cfg, variants=variants, batch=args.batch, seq_len=args.seq_len, steps=args.steps,
        reps=args.reps, warmup=args.warmup, threads=args.threads, optimizer=args.optimizer,
        progress=not args.json, placements=tuple(placements), device=device,
        phases=args.phases, compile_model=args.compile,
    )  # fmt: skip
    _write(result, args, format_report)
    return 0


def _bench_decode(args: argparse.Namespace, cfg, variants: list[str]) -> int:
    from jtok.parallel.distributed import resolve_device
    from jtok.parallel.resources import check_memory

    batches = parse_batches(args.batches)
    placements = parse_placements(args.placements)
    length = args.prompt_len + args.new_tokens
    if length > cfg.max_seq_len:
        raise UsageError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} = "
                         f"{length} exceeds max_seq_len {cfg.max_seq_len}")  # fmt: skip
    device = resolve_device(args.device, option="--device")

    from jtok.bench.decode import decode_benchmark, format_report
    from jtok.bench.train_step import variant_config

    # Every model is held at once: the baseline, and each variant at each placement.
    tables = [v for v in variants if v != "baseline"]
    for placement in placements:
        held = [variant_config(cfg, v, True) for v in tables]
        if placement == placements[0]:
            held.insert(0, variant_config(cfg, "baseline", True))
        if held:
            check_memory(held, device, training=False, batch=max(batches), seq_len=length,
                         table_placement=placement,
                         what=f"jtok bench decode ({len(held)} models, {placement} tables)")
    result = decode_benchmark(
        cfg, variants=variants, batches=batches, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, reps=args.reps, warmup=args.warmup, placements=placements,
        device=device, threads=args.threads, compile_model=args.compile,
        check_host=args.host_check, share=args.share, progress=not args.json,
    )  # fmt: skip
    _write(result, args, format_report)
    return 0


def register(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="training-step (default) or decode throughput of baseline vs JTok vs JTok-M",
        description="`jtok bench [options]`: time full training steps (forward, backward, "
        "optimizer) of the same backbone without modulation, with JTok and with JTok-M. "
        "`jtok bench decode [options]`: time the prefill and the greedy decode loop (KV "
        "cache, one token per row and step) at each --batches size, with the tables on "
        "the model's device and in host memory. Variants are interleaved over repetitions; "
        "medians and paired ratios to the baseline are reported. Token ids are drawn from "
        "a Zipf law so deduplication sees text-like repetition. Sizes that cannot fit in "
        "memory are refused before anything is allocated.",
    )
    bench.add_argument("mode", nargs="?", choices=MODES, default="train",
                       help="train (default): the training step; decode: prefill and decode")
    add_model_arguments(bench, default_preset="small")
    bench.add_argument("--variants", default="baseline,jtok,jtokm",
                       help="comma list of baseline, jtok, jtokm (default: all three; the "
                       "baseline is always timed, as every ratio's reference)")  # fmt: skip
    bench.add_argument("--reps", type=positive_int, default=5, help="interleaved repetitions")
    bench.add_argument("--warmup", type=nonnegative_int, default=None,
                       help="untimed steps (train, default 2) or runs (decode, default 1) per "
                       "variant")  # fmt: skip
    bench.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads (at most the CPUs this process may run on)")
    bench.add_argument("--placements", default=None,
                       help="comma list of device, host: where the tables live (default: "
                       "device for the training step, both for decode)")  # fmt: skip
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where the models run (default auto: CUDA when available)")
    bench.add_argument("--compile", action="store_true",
                       help="torch.compile every model, baseline included (decode: automatic "
                       "dynamic shapes; train: as train.compile, compiled in the warm-up)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--out", type=Path, help="also write the JSON result here (a file in "
                       "an existing folder)")  # fmt: skip
    bench.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    train = bench.add_argument_group("train mode")
    train.add_argument("--batch", type=positive_int, default=None, help="sequences (default 8)")
    train.add_argument("--seq-len", type=positive_int, default=None,
                       help="tokens per sequence (default 256, or the model's max_seq_len if "
                       "shorter)")
    train.add_argument("--steps", type=positive_int, default=None,
                       help="timed steps per repetition (default 5)")
    train.add_argument("--optimizer", choices=["adamw", "sparse"], default=None,
                       help="adamw: AdamW on everything (dense table gradients); sparse: "
                       "sparse table gradients updated row-wise by RowAdam (default: sparse)")
    train.add_argument("--phases", action="store_const", const=True, default=None,
                       help="also time each phase of a step (forward, backward, each "
                       "optimizer's step, ...): medians per configuration; on CUDA each "
                       "phase boundary waits for the device")  # fmt: skip
    decode = bench.add_argument_group("decode mode")
    decode.add_argument("--batches", default=None,
                        help="comma list of batch sizes (default 1,16)")
    decode.add_argument("--new-tokens", type=positive_int, default=None,
                        help="decode steps per run (default 64)")
    decode.add_argument("--prompt-len", type=positive_int, default=None,
                        help="prompt tokens per row (default 32)")
    decode.add_argument("--no-host-check", dest="host_check", action="store_const",
                        const=False, default=None,
                        help="skip the one-step training check of where host tables and "
                        "their optimizer state live")  # fmt: skip
    decode.add_argument("--no-share-backbone", dest="share", action="store_const",
                        const=False, default=None,
                        help="give every variant its own backbone copy (default: all decode "
                        "with the baseline's backbone tensors, so that where two copies lie "
                        "in memory does not move the ratios)")  # fmt: skip
    bench.set_defaults(handler=cmd_bench)
