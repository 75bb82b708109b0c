"""The pieces of an isoFLOP analysis, as plain functions of arrays: one profile's minimum,
a frontier line through minima, and what two frontier lines imply (compute saving at equal
loss, loss gap at equal compute, and the saving a loss gap implies at a given slope).

Axes are the paper's: a frontier is log2 L_opt = m log10 C + k.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from jtok.studies.fit.results import FitError
from jtok.studies.fit.stats import LineFit, fit_line

# Paper figures (METHOD.md): isoFLOP frontiers log2 L = m log10 C + k over budgets 3e18..3e20.
PAPER_FRONTIERS = {"baseline": (-0.2016, 5.1334, 0.9994), "jtokm": (-0.2009, 5.0881, 0.9991)}
PAPER_BUDGETS = (3e18, 3e20)
PAPER_LOSS_GAP = 0.022


@dataclass(frozen=True)
class IsoMinimum:
    n_opt: float
    loss_opt: float
    in_range: bool  # False: the quadratic's vertex was not usable; best observed point used
    reason: str  # why not ("" when in range)
    coeffs: tuple[float, float, float]  # loss = c2 x^2 + c1 x + c0, x = log10 N_c


def minimum_of_log(x: np.ndarray, loss: np.ndarray) -> IsoMinimum:
    """`isoflop_minimum` on x = log10 N_c."""
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
    return minimum_of_log(np.log10(np.asarray(n_c, float)), np.asarray(loss, float))


def best_size_at_edge(x: np.ndarray, loss: np.ndarray) -> str:
    """"smallest" or "largest" when the profile's lowest mean loss is at that end of its
    sizes, else "". Such a minimum is bounded on one side only: the true optimum may lie
    beyond the grid, and neither a vertex nor the best run locates it."""
    sizes = np.unique(x)
    best = int(np.argmin([loss[x == size].mean() for size in sizes]))
    return "smallest" if best == 0 else "largest" if best == len(sizes) - 1 else ""


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


def fit_frontier(budgets, losses) -> LineFit:
    """log2 L_opt = slope * log10 C + intercept."""
    return fit_line(np.log10(np.asarray(budgets, float)), np.log2(np.asarray(losses, float)))


def frontier_lines(minima: dict[tuple, IsoMinimum], compute: dict[tuple, float]
                   ) -> dict[str, tuple[LineFit, list[float]]]:  # fmt: skip
    """Per profile (key[0] of `minima`): the line log2 L_opt vs log10 C through its minima,
    and the C values; only profiles with minima at 2 or more budgets get a line."""
    per_profile: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, m in minima.items():
        per_profile[key[0]].append((compute[key], m.loss_opt))
    return {p: (fit_frontier(*zip(*pts, strict=True)), [c for c, _ in pts])
            for p, pts in per_profile.items() if len({c for c, _ in pts}) >= 2}  # fmt: skip


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


def implied_saving(gap: float, slope: float) -> float:
    """The compute saving at equal loss that a loss gap at equal compute implies when the
    treatment's frontier is the baseline's shifted parallel (both with `slope`).

    Derivation, on the axes log2 L = m log10 C + k. A parallel treatment line has intercept
    k_t with log2(L_t / L_b) = k_t - k_b at every C, and L_t / L_b = 1 - gap, so
    k_t - k_b = log2(1 - gap). At equal loss, m log10 C_t + k_t = m log10 C_b + k_b, so
    log10(C_t / C_b) = (k_b - k_t) / m = -log2(1 - gap) / m, and
        saving = 1 - C_t / C_b = 1 - 10 ** (-log2(1 - gap) / m).
    In natural axes (L ∝ C^a, a = m log10 2 = m ln 2 / ln 10) the same reads
    saving = 1 - (1 - gap) ** (-1 / a) = 1 - exp(-ln(1 - gap) / a). A shallower frontier
    (m nearer 0) turns one loss gap into a larger saving: the paper's 2.2% gives 30.7% at its
    slope -0.2016 and 21.7% at -0.302. NaN for a slope >= 0 or a gap >= 1."""
    if not (slope < 0 and gap < 1):
        return math.nan
    with np.errstate(over="ignore"):
        return float(1 - np.power(10.0, -math.log2(1 - gap) / slope))


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
    """Compute saving at each loss point and loss gap at each compute point (low, mid, high),
    and the saving the mid loss gap implies at the baseline's slope (`implied_saving`)."""
    gaps = [loss_gap(base, treat, c) for c in points["compute"]]
    return {"compute_saving": [compute_saving(base, treat, loss) for loss in points["loss"]],
            "loss_gap": gaps, "implied_saving": implied_saving(gaps[1], base.slope)}  # fmt: skip


def paper_frontier_check() -> dict:
    """Our comparison arithmetic on the paper's two frontier lines (their claim: 35%, 2.2%),
    and what their 2.2% implies at their baseline slope."""
    base, treat = (LineFit(m, k, r2, 0, math.nan) for m, k, r2 in PAPER_FRONTIERS.values())
    points = comparison_points(base, treat, PAPER_BUDGETS, PAPER_BUDGETS)
    return {"points": points, **compare_frontiers(base, treat, points),
            "stated_gap_implied_saving": implied_saving(PAPER_LOSS_GAP, base.slope)}  # fmt: skip
