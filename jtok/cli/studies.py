"""`jtok sweep`, `jtok fit`, `jtok demo`: studies and the demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jtok.cli.common import UsageError


def cmd_demo(args: argparse.Namespace) -> int:
    from jtok.studies.demo import CURVES_FILE, SUMMARY_FILE, format_table, run_demo

    if args.steps <= 0:
        raise UsageError("--steps must be positive")
    summary = run_demo(args.out, steps=args.steps,
                       progress=not args.no_progress and sys.stderr.isatty())
    print(format_table(summary))
    print(f"\nwrote {args.out / SUMMARY_FILE} and {args.out / CURVES_FILE}")
    return 0


# ---- jtok sweep -------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    from jtok.run.files import RESULTS_FILE
    from jtok.studies.sweep import describe, finished_runs, parse_shard, run_sweep

    runs = run_sweep(args.spec, args.out, shard=parse_shard(args.shard), dry_run=args.dry_run,
                     progress=not args.no_progress, only=args.only,
                     log=lambda msg: print(msg, file=sys.stderr))  # fmt: skip
    if args.dry_run:
        print(describe(runs))
    else:
        finished = finished_runs(args.out)
        n_done = sum(run.name in finished for run in runs)
        where = args.out / RESULTS_FILE
        if n_done == len(runs):
            print(f"{len(runs)} runs done; results in {where}")
        else:  # the rest were claimed by other processes sharing the sweep
            print(f"{n_done} of {len(runs)} runs done, {len(runs) - n_done} still running in "
                  f"another process; results in {where}")  # fmt: skip
    return 0


# ---- jtok fit ---------------------------------------------------------------------------


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    from jtok.studies.fit import BOOTSTRAP_METHODS, LOSS_FIELDS, PARAM_COUNTS

    parser.add_argument("dir", type=Path, metavar="DIR", help="sweep directory (results.jsonl)")
    parser.add_argument("--json", action="store_true", help="print fit.json as one JSON object")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="write fit_*.png figures (default: on)")  # fmt: skip
    parser.add_argument("--baseline", default=None, metavar="NAME",
                        help="variant label of the baseline (default: baseline)")  # fmt: skip
    parser.add_argument("--treatment", default=None, metavar="NAME",
                        help="variant compared against it in the headline (default: jtokm)")
    parser.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                        help="resamples for confidence intervals, 0 = none (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="bootstrap seed")
    parser.add_argument("--loss", choices=LOSS_FIELDS, default="final_val_loss",
                        help="which loss of each run to fit (default: final_val_loss)")
    parser.add_argument("--window", type=int, default=None, metavar="K",
                        help="fit each isoFLOP parabola to the K sizes around the profile's "
                             "best run, K >= 3 (default: all sizes)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, metavar="OUT",
                        help="write fit.json, REPORT_fit.md and figures here (default: DIR)")
    parser.add_argument("--noise", type=float, default=None, metavar="SIGMA",
                        help="measured sd of one run's loss (nats), from repeated seeds: the "
                             "floor of the bootstrap's noise and the sigma of the power line "
                             "(default: the spread of repeated seeds in the results, if any)")
    parser.add_argument("--params", choices=PARAM_COUNTS, default="all",
                        help="N_c to fit in: all backbone parameters, or without the input "
                             "embedding and head (default: all)")  # fmt: skip
    parser.add_argument("--include-edge-minima", action="store_true",
                        help="keep isoFLOP minima at the smallest or largest size of their "
                             "grid in the frontiers (default: flagged and left out)")
    parser.add_argument("--bootstrap-method", choices=BOOTSTRAP_METHODS, default="case",
                        help="case: redraw (backbone, seed) cases within each budget, covers "
                             "the quadratic's misfit; parametric: noise around each fitted "
                             "quadratic (default: case)")  # fmt: skip
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                        help="profiles share the bootstrap draw of runs at the same budget, "
                             "backbone and seed (default: on)")  # fmt: skip
    parser.add_argument("--variants", type=_variant_list, default=None, metavar="A,B,...",
                        help="fit only these variants, comma-separated (default: all)")


def _variant_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated variant names")
    return names


def cmd_fit(args: argparse.Namespace) -> int:
    from jtok.studies.fit import format_summary, run_fit

    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    # A variant named on the command line must exist (a typo would fit nothing); the
    # defaults may be absent from a study that has no such variant (a note says so).
    required = [n for n in (args.baseline, args.treatment) if n is not None]
    result = run_fit(args.dir, baseline=args.baseline or "baseline",
                     treatment=args.treatment or "jtokm", required_variants=required,
                     bootstrap=args.bootstrap, seed=args.seed, plots=args.plots,
                     loss_field=args.loss, window=args.window, noise=args.noise,
                     out=args.out, variants=args.variants, params=args.params,
                     include_edge=args.include_edge_minima,
                     bootstrap_method=args.bootstrap_method, paired=args.paired)  # fmt: skip
    print(json.dumps(result) if args.json else format_summary(result))
    return 0


def register(sub) -> None:
    sw = sub.add_parser(
        "sweep",
        help="run a grid of trainings for scaling-law / isoFLOP studies (resumable)",
        description="Run every training of a sweep spec (YAML/JSON: base config, axes, "
        "budget in tokens or FLOPs; see jtok/studies/sweep_spec.py) into OUT/runs/, "
        "appending one line per finished run to OUT/results.jsonl for `jtok fit`. "
        "Re-running skips finished runs and resumes interrupted ones. Several processes "
        "may run the same spec and OUT at once: each locks the run it trains and passes "
        "over runs locked by another.",
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

    fit = sub.add_parser(
        "fit",
        help="fit scaling laws and isoFLOP frontiers to a sweep's results",
        description="Fit, from DIR/results.jsonl (written by `jtok sweep`): the log-linear "
        "law of loss in eta at a fixed backbone; isoFLOP minima, frontiers and the compute "
        "saving / loss gap between two variants with bootstrap CIs (minima at a grid's edge "
        "flagged and left out); the smallest effects the design detects; the parametric law "
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
