"""`jtok sweep`, `jtok fit`, `jtok demo`: studies and the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jtok.cli.common import UsageError


def cmd_demo(args: argparse.Namespace) -> int:
    from jtok.studies.demo import format_table, run_demo

    if args.steps <= 0:
        raise UsageError("--steps must be positive")
    summary = run_demo(args.out, steps=args.steps, progress=not args.no_progress)
    print(format_table(summary))
    print(f"\nwrote {args.out / 'summary.json'} and {args.out / 'loss_curves.png'}")
    return 0


# ---- jtok sweep -------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    from jtok.studies.sweep import describe, finished_runs, parse_shard, run_sweep

    runs = run_sweep(args.spec, args.out, shard=parse_shard(args.shard), dry_run=args.dry_run,
                     progress=not args.no_progress, only=args.only,
                     log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    if args.dry_run:
        print(describe(runs))
    else:
        finished = finished_runs(args.out)
        n_done = sum(run.name in finished for run in runs)
        where = args.out / "results.jsonl"
        if n_done == len(runs):
            print(f"{len(runs)} runs done; results in {where}")
        else:  # the rest were claimed by other processes sharing the sweep
            print(f"{n_done} of {len(runs)} runs done, {len(runs) - n_done} still running in "
                  f"another process; results in {where}")  # fmt: skip
    return 0


def register(sub) -> None:
    sw = sub.add_parser(
        "sweep",
        help="run a grid of trainings for scaling-law / isoFLOP studies (resumable)",
        description="Run every training of a sweep spec (YAML/JSON: base config, axes, "
        "budget in tokens or FLOPs; see jtok/sweep.py) into OUT/runs/, appending one line "
        "per finished run to OUT/results.jsonl for `jtok fit`. Re-running skips finished "
        "runs and resumes interrupted ones. Several processes may run the same spec and "
        "OUT at once: each locks the run it trains and passes over runs locked by another.",
    )
    sw.add_argument("spec", type=Path, help="sweep spec (YAML or JSON)")
    sw.add_argument("--out", type=Path, required=True, help="sweep directory")
    sw.add_argument("--shard", help="I/N: run only every N-th run starting at I (0-based)")
    sw.add_argument("--only", action="append", metavar="GLOB",
                    help="run only runs whose names match (shell pattern, e.g. '*d24*'; "
                    "repeatable)")
    sw.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(handler=cmd_sweep)

    from jtok.studies.fit import add_fit_arguments, cmd_fit

    fit = sub.add_parser(
        "fit",
        help="fit scaling laws and isoFLOP frontiers to a sweep's results",
        description="Fit, from DIR/results.jsonl (written by `jtok sweep`): the log-linear "
        "law of loss in eta at a fixed backbone; isoFLOP minima, frontiers and the compute "
        "saving / loss gap between two variants with bootstrap CIs; the parametric law "
        "L(N, D) = E + A/N^alpha + B/D^beta with and without N_eff = N_c (1 + eta gamma). "
        "Writes DIR/fit.json, DIR/REPORT_fit.md and PNG plots.",
    )
    add_fit_arguments(fit)
    fit.set_defaults(handler=cmd_fit)

    de = sub.add_parser(
        "demo",
        help="train baseline, JTok and JTok-M side by side (about 10 minutes on CPU)",
        description="On the default corpus (Shakespeare), train one small backbone three "
        "ways (baseline, JTok, JTok-M) for the same tokens; print a table and write "
        "OUT/summary.json and OUT/loss_curves.png. Re-running resumes unfinished runs.",
    )
    de.add_argument("--out", type=Path, required=True, help="output directory")
    de.add_argument("--steps", type=int, default=600, help="optimizer steps per variant")
    de.add_argument("--no-progress", action="store_true")
    de.set_defaults(handler=cmd_demo)
