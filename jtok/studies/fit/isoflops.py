"""isoFLOP analysis of a sweep's runs: compute-optimal minima, frontiers, and the saving
between profiles.

Per (profile, budget) a quadratic in log10 N_c gives the compute-optimal (N_opt, L_opt);
per profile the frontier log2 L_opt = m log10 C + k (the paper's axes); between the baseline
and each other profile the compute saving at equal loss and the loss gap at equal compute,
with bootstrap intervals (`jtok.studies.fit.bootstrap`). A profile is a variant, split by
any other sweep axis its runs differ on (never pooled across, say, table sizes).

A minimum whose lowest-loss size is the smallest or largest of its grid is flagged and, by
default, left out of the frontier: it bounds the optimum on one side only, so its L_opt is
an upper bound and its N_opt a guess, and a line through it is biased. The plain functions
(minimum, frontier line, saving, gap) live in `jtok.studies.fit.frontier`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict

import numpy as np

from jtok.studies.fit.bootstrap import BOOTSTRAP_METHODS, ProfilePoints, bootstrap_frontiers
from jtok.studies.fit.frontier import (
    PAPER_BUDGETS,
    PAPER_FRONTIERS,
    PAPER_LOSS_GAP,
    IsoMinimum,
    best_size_at_edge,
    compare_frontiers,
    comparison_points,
    compute_saving,
    fit_frontier,
    fit_window,
    frontier_lines,
    implied_saving,
    isoflop_minimum,
    loss_gap,
    minimum_of_log,
    paper_frontier_check,
)
from jtok.studies.fit.results import FitError
from jtok.studies.fit.stats import fit_line

__all__ = [
    "PAPER_BUDGETS", "PAPER_FRONTIERS", "PAPER_LOSS_GAP", "IsoMinimum", "compare_frontiers",
    "comparison_points", "compute_saving", "fit_frontier", "fit_window", "implied_saving",
    "isoflop_analysis", "isoflop_minimum", "loss_gap", "paper_frontier_check", "profile_names",
    "size_axes",
]  # fmt: skip

# Sweep axes that do not define an isoFLOP profile: the size axis it runs along, and seeds
# (repeats of one point, pooled into the quadratic).
_PROFILE_AXES_IGNORED = {"variant", "backbone", "seed"}


def size_axes(runs: list[dict]) -> set[str]:
    """Axes other than ``backbone`` that change the backbone's shape: two runs of one variant
    and budget that differ in that axis alone have different ``backbone`` records (the sweep
    records d and L where no axis is named backbone). The profile runs along them too, so a
    spec whose size axis has another name (``size: {d32: ..., d48: ...}``) is fitted as one
    named ``backbone`` is, instead of as one profile per size."""
    found = set()
    axes = {a for run in runs for a in run.get("labels", {})} - _PROFILE_AXES_IGNORED
    for axis in axes:
        shapes: dict[tuple, set] = defaultdict(set)
        for run in runs:
            labels = run.get("labels", {})
            if axis not in labels:
                continue
            rest = tuple(sorted((a, v) for a, v in labels.items() if a != axis))
            shapes[(run["variant"], run["budget"], rest)].add((labels[axis], run["backbone"]))
        if any(len({b for _, b in pairs}) > 1 for pairs in shapes.values()):
            found.add(axis)
    return found


def profile_names(runs: list[dict]) -> list[str]:
    """Each run's isoFLOP profile name: its variant, plus any other sweep axis on which that
    variant's runs differ (``jtokm[tables=n16]``), so that no quadratic pools settings. The
    size axis (``backbone``, or see `size_axes`) and seeds do not name profiles."""
    ignored = _PROFILE_AXES_IGNORED | size_axes(runs)
    values: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for run in runs:
        for axis, value in run.get("labels", {}).items():
            if axis not in ignored:
                values[run["variant"]][axis].add(value)
    names = []
    for run in runs:
        split = sorted(a for a, v in values[run["variant"]].items() if len(v) > 1)
        extra = ",".join(f"{a}={run.get('labels', {})[a]}" for a in split)
        names.append(f"{run['variant']}[{extra}]" if extra else run["variant"])
    return names


def _size_counts(run: dict) -> tuple[float, float | None]:
    """(N_c with the input embedding and head, N_c without them) of a run; the second is None
    where its config could not be counted. Runs built by hand may carry N_c only."""
    return run.get("N_c_all", run["N_c"]), run.get("N_c_non_embedding")


def _other_counts(members: list[dict], n_opt: float) -> dict:
    """N_opt in both parameter counts: the fitted count's N_opt mapped to the other through
    the group's own sizes (piecewise linear in log-log, exact at every grid size)."""
    x = np.log10([r["N_c"] for r in members])
    out = {}
    for name, index in (("N_opt_all", 0), ("N_opt_non_embedding", 1)):
        counts = [_size_counts(r)[index] for r in members]
        if any(c is None or c <= 0 for c in counts):
            out[name] = None
            continue
        order = np.argsort(x)
        out[name] = float(10 ** np.interp(math.log10(n_opt), x[order], np.log10(counts)[order]))
    return out


def _check_options(window: int | None, noise: float | None, method: str) -> None:
    if window is not None and window < 3:
        raise FitError(f"an isoFLOP fit window needs at least 3 sizes, got {window}")
    if noise is not None and not (math.isfinite(noise) and noise > 0):
        raise FitError(f"the bootstrap noise must be a positive number of nats, got {noise}")
    if method not in BOOTSTRAP_METHODS:
        raise FitError(f"bootstrap method must be one of {', '.join(BOOTSTRAP_METHODS)}, "
                       f"got {method!r}")  # fmt: skip


def isoflop_analysis(
    runs: list[dict], baseline: str, loss_field: str = "final_val_loss", bootstrap: int = 1000,
    seed: int = 0, window: int | None = None, noise: float | None = None,
    include_edge: bool = False, method: str = "case", paired: bool = True,
    noise_source: str = "given",
) -> tuple[dict | None, list[str]]:  # fmt: skip
    """Minima per (profile, budget), frontier per profile, every profile against the
    baseline, with bootstrap percentiles. Returns (section or None, notes).

    A frontier point's compute is the geometric mean of its runs' actual training FLOPs (the
    sweep rounds steps, so they differ slightly from the nominal budget that groups them).
    `window`: fit each parabola to that many sizes around the profile's best run (see
    `fit_window`); None fits all sizes. `include_edge`: keep minima whose best size is at the
    grid's edge in the frontiers. `noise`: one run's loss sd (a measured seed spread, named
    by `noise_source`), the floor of the bootstrap's noise. `method`, `paired`: see
    `jtok.studies.fit.bootstrap`."""
    _check_options(window, noise, method)
    notes: list[str] = []
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    budgeted = [r for r in runs if r["budget"] is not None]
    for run, name in zip(budgeted, profile_names(budgeted), strict=True):
        grouped[(name, run["budget"])].append(run)
    if not grouped:
        return None, ["isoFLOPs: no run has a FLOP budget (sweep with budget: {flops: [...]})"]
    points: dict[tuple, ProfilePoints] = {}
    minima: dict[tuple, IsoMinimum] = {}  # the minima the frontiers go through
    compute: dict[tuple, float] = {}
    rows, edges, unwindowed = [], [], []
    for (variant, budget), members in sorted(grouped.items(), key=lambda kv: kv[0]):
        x = np.log10([r["N_c"] for r in members])
        loss = np.array([r[loss_field] for r in members])
        label = f"isoFLOPs {variant} at C={budget:.3g}"
        n_sizes = len(np.unique(x))
        if n_sizes < 3:
            notes.append(f"{label}: {n_sizes} backbone sizes, a quadratic needs 3")
            continue
        per_size = defaultdict(set)
        for r in members:
            per_size[r["backbone"]].add(r["eta"])
        if any(len(etas) > 1 for etas in per_size.values()):
            notes.append(f"{label}: several eta values at one backbone are pooled")
        fitted = fit_window(x, loss, window)
        if window is not None and window >= n_sizes:
            unwindowed.append(f"C={budget:.3g} ({variant}, {n_sizes} sizes)")
        m = minimum_of_log(x[fitted], loss[fitted])
        edge = best_size_at_edge(x, loss)
        kept = include_edge or not edge
        compute[(variant, budget)] = float(10 ** np.mean(np.log10([r["flops"] for r in members])))
        if kept:
            minima[(variant, budget)] = m
            cases = [(r["backbone"], r.get("seed")) for r, f in zip(members, fitted, strict=True)
                     if f]  # fmt: skip
            points[(variant, budget)] = ProfilePoints(x[fitted], loss[fitted], cases, m)
        if edge:
            edges.append({"variant": variant, "budget": budget, "edge": edge, "included": kept})
            notes.append(f"{label}: lowest loss at the {edge} size of the grid (the optimum may "
                         "lie beyond it); " + ("kept in the frontier (--include-edge-minima)"
                         if kept else "left out of the frontier (--include-edge-minima keeps "
                         "it)"))  # fmt: skip
        # Tokens at the optimum: interpolate the group's own log D vs log N_c relation (the
        # sweep's FLOPs per token include attention and the head, so D is not C / 6N exactly).
        d_line = fit_line(x, np.log10([r["tokens"] for r in members]))
        rows.append({
            "variant": variant, "budget": budget, "compute": compute[(variant, budget)],
            "n_points": len(members), "n_sizes": n_sizes,
            "fit_sizes": len(np.unique(x[fitted])),
            "fit_range": [float(10 ** x[fitted].min()), float(10 ** x[fitted].max())],
            "N_opt": m.n_opt, **_other_counts(members, m.n_opt),
            "L_opt": m.loss_opt, "D_opt": float(10 ** d_line(math.log10(m.n_opt))),
            "in_range": m.in_range, "method": "quadratic" if m.in_range else "best observed",
            "reason": m.reason, "coeffs": list(m.coeffs), "edge": edge, "in_frontier": kept,
            "flops_over_budget": compute[(variant, budget)] / budget,
            "points": [[r["N_c"], r[loss_field]] for r in members],
            "size_counts": [list(_size_counts(r)) for r in members],
            "backbones": [r["backbone"] for r in members],
        })  # fmt: skip
        if not m.in_range:
            notes.append(f"{label}: {m.reason}; used the best observed point")
    if unwindowed:
        notes.append(f"isoFLOPs: --window {window} is no smaller than the profile at "
                     f"{', '.join(unwindowed)}: fitted on every size there")  # fmt: skip
    if not rows:
        return None, notes
    fronts = frontier_lines(minima, compute)
    frontiers = _frontier_section(fronts, minima, compute, {v for v, _ in compute}, notes)
    comparisons = _comparisons(fronts, frontiers, baseline, notes)
    section = {"minima": rows, "frontiers": frontiers, "comparisons": comparisons,
               "edge_minima": edges, "include_edge_minima": include_edge}  # fmt: skip
    if bootstrap > 0 and frontiers:
        boot = bootstrap_frontiers(points, compute, baseline, comparisons, bootstrap, seed,
                                   method, noise, noise_source if noise else None,
                                   paired)  # fmt: skip
        if boot is None:
            notes.append("isoFLOPs bootstrap: every profile has exactly 3 runs, which the "
                         "quadratic fits exactly (no residual to estimate the noise from): no "
                         "confidence intervals; add backbone sizes or seeds, or give the "
                         "noise (--noise)")  # fmt: skip
        else:
            section["bootstrap"] = boot
            for variant, ci in boot["slope_ci"].items():
                frontiers[variant]["slope_ci"] = ci
            for variant, cis in boot["comparison_ci"].items():
                comparisons[variant].update(cis)
            if baseline in frontiers:
                frontiers[baseline]["paper_gap_implied_saving_ci"] = (
                    boot["paper_gap_implied_saving_ci"])  # fmt: skip
    return section, notes


def _frontier_section(fronts: dict, minima: dict, compute: dict, profiles: set,
                      notes: list[str]) -> dict:  # fmt: skip
    for variant in sorted(profiles - set(fronts)):
        notes.append(f"isoFLOPs {variant}: usable minima at fewer than 2 budgets, no frontier "
                     "line")  # fmt: skip
    for variant in sorted(v for v, (line, _) in fronts.items() if line.n == 2):
        notes.append(f"isoFLOPs {variant}: frontier through 2 budgets, R^2 = 1 by construction")
    frontiers = {}
    for variant, (line, _) in fronts.items():
        keys = sorted(k for k in minima if k[0] == variant)
        n_opt = fit_line(np.log10([compute[k] for k in keys]),
                         [math.log10(minima[k].n_opt) for k in keys])  # fmt: skip
        frontiers[variant] = {**asdict(line), "budgets": [k[1] for k in keys],
                              "compute": [compute[k] for k in keys],
                              "fallback_points": sum(not minima[k].in_range for k in keys),
                              "n_opt_exponent": n_opt.slope,
                              # what the paper's 2.2% loss gap would save on this frontier
                              "paper_gap_implied_saving": implied_saving(PAPER_LOSS_GAP,
                                                                         line.slope)}  # fmt: skip
    return frontiers


def _comparisons(fronts: dict, frontiers: dict, baseline: str, notes: list[str]) -> dict:
    comparisons = {}
    if baseline not in fronts:
        if fronts:
            notes.append(f"isoFLOPs: no frontier for baseline {baseline!r}: no comparisons")
        return comparisons
    for variant in sorted(set(fronts) - {baseline}):
        (b_line, b_compute), (t_line, t_compute) = fronts[baseline], fronts[variant]
        points = comparison_points(b_line, t_line, b_compute, t_compute)
        comparisons[variant] = {"points": points, **compare_frontiers(b_line, t_line, points),
                                "fallback_points": frontiers[baseline]["fallback_points"]
                                + frontiers[variant]["fallback_points"]}  # fmt: skip
        if points["extrapolated"]:
            notes.append(f"isoFLOPs {variant} vs {baseline}: the frontiers share no "
                         f"{' or '.join(points['extrapolated'])} range; compared over the "
                         "union (one line extrapolated)")  # fmt: skip
    return comparisons
