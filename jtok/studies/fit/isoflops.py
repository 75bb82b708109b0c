"""isoFLOP analysis: compute-optimal minima, frontiers, and the saving between variants.

Per (profile, budget) a quadratic in log10 N_c gives the compute-optimal (N_opt, L_opt);
per profile the frontier log2 L_opt = m log10 C + k (the paper's axes); between the baseline
and each other profile the compute saving at equal loss and the loss gap at equal compute,
with parametric-bootstrap intervals. A profile is a variant, split by any other sweep axis
its runs differ on (never pooled across, say, table sizes).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from jtok.studies.fit.results import FitError
from jtok.studies.fit.stats import LineFit, fit_line

# Paper figures (METHOD.md): isoFLOP frontiers log2 L = m log10 C + k over budgets 3e18..3e20.
PAPER_FRONTIERS = {"baseline": (-0.2016, 5.1334, 0.9994), "jtokm": (-0.2009, 5.0881, 0.9991)}
PAPER_BUDGETS = (3e18, 3e20)


@dataclass(frozen=True)
class IsoMinimum:
    n_opt: float
    loss_opt: float
    in_range: bool  # False: the quadratic's vertex was not usable; best observed point used
    reason: str  # why not ("" when in range)
    coeffs: tuple[float, float, float]  # loss = c2 x^2 + c1 x + c0, x = log10 N_c


def _minimum_log(x: np.ndarray, loss: np.ndarray) -> IsoMinimum:
    sizes = np.unique(x)
    if len(sizes) < 3:
        raise FitError("an isoFLOP quadratic needs at least 3 backbone sizes")
    centre = x.mean()  # centred for conditioning
    c2, c1, c0 = np.polyfit(x - centre, loss, 2)
    coeffs = (float(c2), float(c1 - 2 * c2 * centre), float(c0 - c1 * centre + c2 * centre**2))
    reason = ""
    if c2 <= 0:
        reason = "parabola opens downward"
    else:
        vertex = centre - c1 / (2 * c2)
        if not sizes[0] <= vertex <= sizes[-1]:
            reason = "vertex outside the fitted sizes"
        else:
            return IsoMinimum(float(10**vertex), float(c0 - c1**2 / (4 * c2)), True, "", coeffs)
    means = np.array([loss[x == s].mean() for s in sizes])
    best = int(np.argmin(means))
    return IsoMinimum(float(10 ** sizes[best]), float(means[best]), False, reason, coeffs)


def isoflop_minimum(n_c, loss) -> IsoMinimum:
    """Compute-optimal size of one isoFLOP profile: the vertex of loss ~ quadratic(log10 N_c)."""
    return _minimum_log(np.log10(np.asarray(n_c, float)), np.asarray(loss, float))


def fit_frontier(budgets, losses) -> LineFit:
    """log2 L_opt = slope * log10 C + intercept."""
    return fit_line(np.log10(np.asarray(budgets, float)), np.log2(np.asarray(losses, float)))


def compute_saving(base: LineFit, treat: LineFit, loss: float) -> float:
    """1 - C_treat(L) / C_base(L): the compute the treatment saves to reach loss L.

    NaN when a frontier does not fall with compute (slope >= 0): no compute reaches L."""
    if base.slope >= 0 or treat.slope >= 0:
        return math.nan
    y = math.log2(loss)
    exponent = (y - treat.intercept) / treat.slope - (y - base.intercept) / base.slope
    with np.errstate(over="ignore"):
        return float(1 - np.power(10.0, exponent))


def loss_gap(base: LineFit, treat: LineFit, compute: float) -> float:
    """1 - L_treat(C) / L_base(C): the relative loss reduction at compute C."""
    x = math.log10(compute)
    return float(1 - 2 ** (treat(x) - base(x)))


def comparison_points(base: LineFit, treat: LineFit, base_budgets, treat_budgets) -> dict:
    """Where the two frontiers are compared (low, geometric mid, high of each range): the
    losses both lines reach over their own budgets, and the budgets both were run at. Where
    the ranges do not overlap, their union is used and `extrapolated` says so."""
    xb, xt = np.log10(base_budgets), np.log10(treat_budgets)
    b_lo, b_hi = sorted(float(base(x)) for x in (xb.min(), xb.max()))
    t_lo, t_hi = sorted(float(treat(x)) for x in (xt.min(), xt.max()))
    y_lo, y_hi = max(b_lo, t_lo), min(b_hi, t_hi)
    x_lo, x_hi = float(max(xb.min(), xt.min())), float(min(xb.max(), xt.max()))
    extrapolated = []
    if y_lo >= y_hi:
        y_lo, y_hi = min(b_lo, t_lo), max(b_hi, t_hi)
        extrapolated.append("loss")
    if x_lo >= x_hi:
        x_lo, x_hi = float(min(xb.min(), xt.min())), float(max(xb.max(), xt.max()))
        extrapolated.append("compute")
    return {"loss": [2**y_lo, 2 ** ((y_lo + y_hi) / 2), 2**y_hi],
            "compute": [10**x_lo, 10 ** ((x_lo + x_hi) / 2), 10**x_hi],
            "extrapolated": extrapolated}  # fmt: skip


def compare_frontiers(base: LineFit, treat: LineFit, points: dict) -> dict:
    """Compute saving at each loss point and loss gap at each compute point (low, mid, high)."""
    return {"compute_saving": [compute_saving(base, treat, loss) for loss in points["loss"]],
            "loss_gap": [loss_gap(base, treat, c) for c in points["compute"]]}  # fmt: skip


def paper_frontier_check() -> dict:
    """Our comparison arithmetic on the paper's two frontier lines (their claim: 35%, 2.2%)."""
    base, treat = (LineFit(m, k, r2, 0, math.nan) for m, k, r2 in PAPER_FRONTIERS.values())
    points = comparison_points(base, treat, PAPER_BUDGETS, PAPER_BUDGETS)
    return {"points": points, **compare_frontiers(base, treat, points)}


# Sweep axes that do not define an isoFLOP profile: the size axis it runs along, and seeds
# (repeats of one point, pooled into the quadratic).
_PROFILE_AXES_IGNORED = {"variant", "backbone", "seed"}


def profile_names(runs: list[dict]) -> list[str]:
    """Each run's isoFLOP profile name: its variant, plus any other sweep axis on which that
    variant's runs differ (``jtokm[tables=n16]``), so that no quadratic pools settings."""
    values: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for run in runs:
        for axis, value in run.get("labels", {}).items():
            if axis not in _PROFILE_AXES_IGNORED:
                values[run["variant"]][axis].add(value)
    names = []
    for run in runs:
        split = sorted(a for a, v in values[run["variant"]].items() if len(v) > 1)
        extra = ",".join(f"{a}={run.get('labels', {})[a]}" for a in split)
        names.append(f"{run['variant']}[{extra}]" if extra else run["variant"])
    return names


def _frontiers(minima: dict[tuple, IsoMinimum], compute: dict[tuple, float]
               ) -> dict[str, tuple[LineFit, list[float]]]:  # fmt: skip
    """Per profile: the line log2 L_opt vs log10 C through its minima, and the C values."""
    per_variant: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, m in minima.items():
        per_variant[key[0]].append((compute[key], m.loss_opt))
    return {v: (fit_frontier(*zip(*pts, strict=True)), [c for c, _ in pts])
            for v, pts in per_variant.items() if len({c for c, _ in pts}) >= 2}  # fmt: skip


def fit_window(x: np.ndarray, loss: np.ndarray, window: int | None) -> np.ndarray:
    """Mask of the runs an isoFLOP parabola is fitted to: all of them, or (window = K) those
    at the K consecutive sizes centred as well as the grid allows on the best observed size.

    Over a wide size range a profile is not a parabola in log N_c (it rises more steeply on
    the small side); fitting near the minimum keeps the vertex from being pulled by the flanks."""
    sizes = np.unique(x)
    if window is None or len(sizes) <= window:
        return np.ones(len(x), bool)
    best = int(np.argmin([loss[x == size].mean() for size in sizes]))
    start = min(max(best - window // 2, 0), len(sizes) - window)
    return np.isin(x, sizes[start : start + window])


def isoflop_analysis(
    runs: list[dict], baseline: str, loss_field: str = "final_val_loss", bootstrap: int = 1000,
    seed: int = 0, window: int | None = None, noise: float | None = None,
) -> tuple[dict | None, list[str]]:  # fmt: skip
    """Minima per (profile, budget), frontier per profile, every profile against the
    baseline, with bootstrap percentiles. Returns (section or None, notes).

    A frontier point's compute is the geometric mean of its runs' actual training FLOPs (the
    sweep rounds steps, so they differ slightly from the nominal budget that groups them).
    `window`: fit each parabola to that many sizes around the profile's best run (see
    `fit_window`); None fits all sizes. `noise`: the bootstrap's per-run loss sd (e.g. a
    measured seed-to-seed spread); None estimates it from the quadratics' residuals."""
    if window is not None and window < 3:
        raise FitError(f"an isoFLOP fit window needs at least 3 sizes, got {window}")
    if noise is not None and not (math.isfinite(noise) and noise > 0):
        raise FitError(f"the bootstrap noise must be a positive number of nats, got {noise}")
    notes: list[str] = []
    grouped: dict[tuple, list[dict]] = defaultdict(list)
    budgeted = [r for r in runs if r["budget"] is not None]
    for run, name in zip(budgeted, profile_names(budgeted), strict=True):
        grouped[(name, run["budget"])].append(run)
    if not grouped:
        return None, ["isoFLOPs: no run has a FLOP budget (sweep with budget: {flops: [...]})"]
    groups: dict[tuple, tuple] = {}
    minima: dict[tuple, IsoMinimum] = {}
    compute: dict[tuple, float] = {}
    rows = []
    for (variant, budget), members in sorted(grouped.items(), key=lambda kv: kv[0]):
        x = np.log10([r["N_c"] for r in members])
        loss = np.array([r[loss_field] for r in members])
        label = f"isoFLOPs {variant} at C={budget:.3g}"
        if len(np.unique(x)) < 3:
            notes.append(f"{label}: {len(np.unique(x))} backbone sizes, a quadratic needs 3")
            continue
        per_size = defaultdict(set)
        for r in members:
            per_size[r["backbone"]].add(r["eta"])
        if any(len(etas) > 1 for etas in per_size.values()):
            notes.append(f"{label}: several eta values at one backbone are pooled")
        fitted = fit_window(x, loss, window)
        groups[(variant, budget)] = (x[fitted], loss[fitted])
        m = minima[(variant, budget)] = _minimum_log(x[fitted], loss[fitted])
        compute[(variant, budget)] = float(10 ** np.mean(np.log10([r["flops"] for r in members])))
        # Tokens at the optimum: interpolate the group's own log D vs log N_c relation (the
        # sweep's FLOPs per token include attention and the head, so D is not C / 6N exactly).
        d_line = fit_line(x, np.log10([r["tokens"] for r in members]))
        rows.append({
            "variant": variant, "budget": budget, "compute": compute[(variant, budget)],
            "n_points": len(members), "n_sizes": len(np.unique(x)),
            "fit_sizes": len(np.unique(x[fitted])),
            "fit_range": [float(10 ** x[fitted].min()), float(10 ** x[fitted].max())],
            "N_opt": m.n_opt,
            "L_opt": m.loss_opt, "D_opt": float(10 ** d_line(math.log10(m.n_opt))),
            "in_range": m.in_range, "method": "quadratic" if m.in_range else "best observed",
            "reason": m.reason, "coeffs": list(m.coeffs),
            "flops_over_budget": compute[(variant, budget)] / budget,
            "points": [[r["N_c"], r[loss_field]] for r in members],
            "backbones": [r["backbone"] for r in members],
        })  # fmt: skip
        if not m.in_range:
            notes.append(f"{label}: {m.reason}; used the best observed point")
    fronts = _frontiers(minima, compute)
    for variant in sorted({v for v, _ in minima} - set(fronts)):
        notes.append(f"isoFLOPs {variant}: minima at one budget only, no frontier line")
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
                              "n_opt_exponent": n_opt.slope}  # fmt: skip
    comparisons = {}
    if baseline in fronts:
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
    elif fronts:
        notes.append(f"isoFLOPs: no frontier for baseline {baseline!r}: no comparisons")
    if not rows:
        return None, notes
    section = {"minima": rows, "frontiers": frontiers, "comparisons": comparisons}
    if bootstrap > 0 and frontiers:
        boot = _bootstrap(groups, minima, compute, fronts, baseline, comparisons, bootstrap,
                          seed, noise)  # fmt: skip
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
    return section, notes


def _bootstrap(groups: dict, minima: dict, compute: dict, fronts: dict, baseline: str,
               comparisons: dict, resamples: int, seed: int, noise: float | None = None
               ) -> dict | None:  # fmt: skip
    """Parametric residual bootstrap: keep each profile's sizes, redraw its losses as its
    fitted quadratic plus Gaussian noise with the residual spread pooled over all profiles
    (or `noise`, when given), and redo minima, lines and comparisons (at the point
    estimate's loss and compute points).

    Resampling runs instead (the nonparametric bootstrap) breaks down at the 3-5 sizes an
    isoFLOP profile has: with 3 every usable resample is the data itself, with 4 there are
    five distinct fits and intervals undercover. None when no profile has a residual
    degree of freedom (all exactly 3 runs) and no `noise` is given."""
    fitted, sse, dof = {}, 0.0, 0
    for key, (x, loss) in groups.items():
        fitted[key] = np.polyval(minima[key].coeffs, x)
        sse += float(((loss - fitted[key]) ** 2).sum())
        dof += len(x) - 3
    if dof == 0 and noise is None:
        return None
    residual_sigma = math.sqrt(sse / dof) if dof else None
    sigma = residual_sigma if noise is None else noise
    rng = np.random.default_rng(seed)
    slopes: dict[str, list[float]] = defaultdict(list)
    stats: dict[str, dict[str, list]] = {v: defaultdict(list) for v in comparisons}
    fallbacks = 0
    for _ in range(resamples):
        drawn = {}
        for key, (x, _) in groups.items():
            drawn[key] = _minimum_log(x, fitted[key] + rng.normal(0.0, sigma, len(x)))
            fallbacks += not drawn[key].in_range
        lines = {v: line for v, (line, _) in _frontiers(drawn, compute).items()}
        for variant in fronts:
            slopes[variant].append(lines[variant].slope)
        for variant, comp in comparisons.items():
            values = compare_frontiers(lines[baseline], lines[variant], comp["points"])
            for name, triple in values.items():
                stats[variant][name].append(triple)

    def ci(values) -> list:
        # nan where a drawn frontier did not fall with compute (no saving defined)
        return np.nanpercentile(np.asarray(values, float), [2.5, 97.5], axis=0).T.tolist()

    return {
        "method": "parametric residual bootstrap", "resamples": resamples, "seed": seed,
        "noise_sigma": sigma, "noise_source": "residuals" if noise is None else "given",
        "residual_sigma": residual_sigma, "residual_dof": dof,
        "fallback_fraction": fallbacks / max(1, resamples * len(groups)),
        "slope_ci": {v: ci(s) for v, s in slopes.items()},
        "comparison_ci": {v: {f"{name}_ci": ci(vals) for name, vals in s.items()}
                          for v, s in stats.items()},
    }  # fmt: skip
