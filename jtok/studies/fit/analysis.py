"""`run_fit`: every fit a sweep directory supports, written to fit.json, REPORT_fit.md, PNGs.

All checks of the inputs and of the output folder come before any computing or writing,
so a mistake leaves the disk as it was. The two text files are written atomically
(`jtok.io`): a reader, or a crash, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from jtok.io import write_json_atomic, write_text_atomic
from jtok.studies.fit.bootstrap import BOOTSTRAP_METHODS
from jtok.studies.fit.isoflops import isoflop_analysis, paper_frontier_check
from jtok.studies.fit.parametric import parametric_analysis
from jtok.studies.fit.plots import write_plots
from jtok.studies.fit.report import format_report, paper_claims
from jtok.studies.fit.results import (
    LOSS_FIELDS,
    PARAM_COUNTS,
    RESULTS_FILE,
    FitError,
    load_results,
)
from jtok.studies.fit.stats import Z_DETECT, eta_laws, paired_gains, paired_summary, power_analysis

FIT_JSON = "fit.json"
REPORT_FILE = "REPORT_fit.md"


def _usable_runs(runs: list[dict], loss_field: str, notes: list[str]) -> list[dict]:
    latest = {r["name"]: r for r in runs}  # a re-run appends its name again: the last wins
    if len(latest) < len(runs):
        notes.append(f"{len(runs) - len(latest)} repeated run names: kept the last record")
    bad = [r["name"] for r in latest.values() if not math.isfinite(r[loss_field])]
    if bad:
        notes.append(f"left out {len(bad)} run(s) with a non-finite {loss_field}: "
                     + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))  # fmt: skip
    return [r for r in latest.values() if math.isfinite(r[loss_field])]


def _sized_runs(runs: list[dict], params: str) -> list[dict]:
    """The runs with N_c in the parameter count the fits use: as recorded ("all": input
    embedding and head included) or without the embedding and head ("non-embedding")."""
    if params == "all":
        return runs
    for run in runs:
        if run["N_c_non_embedding"] is None:
            raise FitError(f"--params non-embedding: run {run['name']} cannot be counted "
                           f"without its embedding and head: {run['non_embedding_unknown']}")
    return [dict(run, N_c=run["N_c_non_embedding"]) for run in runs]


def _detectable_saving(power: dict, iso: dict | None, treatment: str) -> None:
    """Add to `power` the compute saving the isoFLOP design resolves: 2.80 / 1.96 times the
    half-width of the bootstrap's 95% interval of the saving (mid of the loss range), the
    normal approximation of a 0.05-level test with power 0.8."""
    ci = ((iso or {}).get("comparisons", {}).get(treatment, {}).get("compute_saving_ci")
          or [None] * 3)[1]  # fmt: skip
    if ci and all(v is not None and math.isfinite(v) for v in ci):
        half = (ci[1] - ci[0]) / 2
        power["saving"] = {"ci_half_width": half, "mde": Z_DETECT / 1.96 * half}


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars to Python, tuples to lists, NaN / inf to null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _check_sweep_dir(directory: Path) -> None:
    if not directory.exists():
        raise FitError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise FitError(f"{directory}: not a directory (give the sweep directory that holds "
                       f"{RESULTS_FILE})")  # fmt: skip


def _check_output_dir(out_dir: Path, directory: Path) -> None:
    """Refuse, before any work, an output folder the fit must not or cannot write into.

    A folder that does not exist yet is created only once the fit succeeded; until then
    its nearest existing ancestor is what must be a writable directory."""
    if out_dir.resolve() != directory.resolve() and (out_dir / RESULTS_FILE).exists():
        raise FitError(f"{out_dir} holds another sweep's {RESULTS_FILE}: writing its fit files "
                       "there would replace that sweep's; choose another folder")  # fmt: skip
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == out_dir else f" ({existing} is a file)"
        raise FitError(f"output folder {out_dir} is not a directory{where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FitError(f"output folder {out_dir} is not writable ({existing}: permission denied)")


def run_fit(directory: str | Path, *, baseline: str = "baseline", treatment: str = "jtokm",
            bootstrap: int = 1000, seed: int = 0, plots: bool = True,
            loss_field: str = "final_val_loss", window: int | None = None,
            noise: float | None = None, out: str | Path | None = None,
            variants: list[str] | None = None, params: str = "all",
            required_variants: list[str] | None = None,
            include_edge: bool = False, bootstrap_method: str = "case",
            paired: bool = True) -> dict:  # fmt: skip
    """Every fit the sweep in `directory` supports; writes fit.json, REPORT_fit.md, PNGs
    there, or into `out` (a variant of the analysis kept beside the main one). `variants`
    restricts the fit to those variant labels: a grid that grows by a variant keeps its
    earlier analysis, whose pooled residual spread would otherwise change.

    `params`: N_c with ("all") or without ("non-embedding") the input embedding and head.
    `include_edge`: keep isoFLOP minima at the grid's edge in the frontiers. `noise`: one
    run's loss sd, measured from seeds (without it, the spread of repeated seeds in the
    results, if any): the bootstrap's noise floor and the power line's sigma.
    `bootstrap_method`, `paired`: see `jtok.studies.fit.bootstrap`."""
    directory = Path(directory)
    _check_sweep_dir(directory)
    if loss_field not in LOSS_FIELDS:
        raise FitError(f"loss field must be one of {LOSS_FIELDS}, got {loss_field!r}")
    if bootstrap < 0:
        raise FitError(f"bootstrap resamples must be >= 0, got {bootstrap}")
    if params not in PARAM_COUNTS:
        raise FitError(f"parameter count must be one of {', '.join(PARAM_COUNTS)}, got {params!r}")
    if bootstrap_method not in BOOTSTRAP_METHODS:
        raise FitError(f"bootstrap method must be one of {', '.join(BOOTSTRAP_METHODS)}, "
                       f"got {bootstrap_method!r}")  # fmt: skip
    if noise is not None and not (math.isfinite(noise) and noise > 0):
        raise FitError(f"the noise must be a positive number of nats, got {noise}")
    out_dir = directory if out is None else Path(out)
    _check_output_dir(out_dir, directory)
    notes: list[str] = []
    runs = _usable_runs(load_results(directory), loss_field, notes)
    present = {run["variant"] for run in runs}
    missing = [name for name in required_variants or [] if name not in present]
    if missing:
        raise FitError(f"variant {missing[0]!r}: no runs in {directory} "
                       f"(variants: {', '.join(sorted(present))})")  # fmt: skip
    if variants is not None:
        unknown = [name for name in variants if name not in present]
        if unknown:
            raise FitError(f"--variants {','.join(unknown)}: no such variant in {directory} "
                           f"(variants: {', '.join(sorted(present))})")  # fmt: skip
        runs = [run for run in runs if run["variant"] in variants]
    runs = _sized_runs(runs, params)
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[run["variant"]] += 1
    for role, name in (("baseline", baseline), ("treatment", treatment)):
        if name not in counts:
            notes.append(f"{role} {name!r} has no runs (variants: {', '.join(sorted(counts))})")
    laws = eta_laws(runs, baseline, loss_field)
    if not laws:
        notes.append("eta law: no (variant, backbone, amount) with 3 or more eta > 0 values")
    pairs = paired_gains(runs, baseline, loss_field)
    power = power_analysis(runs, pairs, laws, baseline, treatment, noise, loss_field)
    iso, iso_notes = isoflop_analysis(
        runs, baseline, loss_field, bootstrap, seed, window, power["sigma"],
        include_edge=include_edge, method=bootstrap_method, paired=paired,
        noise_source=power["sigma_source"] or "given")  # fmt: skip
    _detectable_saving(power, iso, treatment)
    parametric, par_notes = parametric_analysis(runs, baseline, treatment, loss_field)
    notes += iso_notes + par_notes
    if not (laws or iso or parametric):
        raise FitError(f"{directory}: too few runs for any fit ({len(runs)} usable): "
                       + "; ".join(notes))  # fmt: skip
    result = {
        "source": str(directory / RESULTS_FILE), "output": str(out_dir),
        "loss_field": loss_field,
        "baseline": baseline, "treatment": treatment, "runs": len(runs),
        "variants": dict(sorted(counts.items())), "variant_filter": variants,
        "isoflop_window": window, "params": params, "include_edge_minima": include_edge,
        "bootstrap_method": bootstrap_method, "paired": paired, "noise": noise,
        "eta_law": laws, "power": power,
        "paired_gains": pairs, "paired_summary": paired_summary(pairs), "isoflops": iso,
        "parametric": parametric, "paper_check": paper_frontier_check(), "notes": notes,
    }  # fmt: skip
    result["files"] = [FIT_JSON, REPORT_FILE]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if plots:
            result["files"] += write_plots(result, runs, out_dir)
        result = _jsonable(result)
        result["claims"] = paper_claims(result)
        write_text_atomic(out_dir / REPORT_FILE, format_report(result))
        write_json_atomic(out_dir / FIT_JSON, result)  # last: its presence means a whole fit
    except OSError as err:  # a full disk, or a folder that changed under the checks above
        raise FitError(f"cannot write into {out_dir}: {err.strerror or err}") from None
    return result
