"""`jtok fit`: scaling-law analysis of a sweep directory (METHOD.md, "Scaling law").

Reads DIR/results.jsonl (one finished run per line, written by `jtok sweep`) and fits what
the runs support:

1. eta law: loss = a + b log2(eta) for one variant at one backbone and training amount;
   b is the loss change per doubling of token parameters.
2. isoFLOPs: per (profile, budget) a quadratic in log10 N_c gives the compute-optimal
   (N_opt, L_opt); per profile the frontier log2 L_opt = m log10 C + k (the paper's axes);
   between baseline and each other profile the compute saving at equal loss and the loss gap
   at equal compute, with parametric-bootstrap intervals. A profile is a variant, split by
   any other sweep axis its runs differ on (never pooled across, say, table sizes).
3. parametric: L(N, D) = E + A / N^alpha + B / D^beta by a Huber loss on log residuals, and
   with N_eff = N_c (1 + eta gamma).

Writes DIR/fit.json, DIR/REPORT_fit.md and figures. Each fit is also a plain function of
arrays, usable without a sweep.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jtok.errors import JTokError

RESULTS_FILE = "results.jsonl"
FIT_JSON = "fit.json"
REPORT_FILE = "REPORT_fit.md"
LOSS_FIELDS = ("final_val_loss", "best_val_loss")
HUBER_DELTA = 1e-3

# Paper figures (METHOD.md): isoFLOP frontiers log2 L = m log10 C + k over budgets 3e18..3e20.
PAPER_FRONTIERS = {"baseline": (-0.2016, 5.1334, 0.9994), "jtokm": (-0.2009, 5.0881, 0.9991)}
PAPER_BUDGETS = (3e18, 3e20)
PAPER_CLAIMS = {"compute_saving": 0.35, "loss_gap": 0.022, "eta_slope": -0.0118,
                "eta_r2": 0.996, "relative_gain": (0.025, 0.03)}  # fmt: skip

# Field -> kind. "num?" also takes null; a loss may be NaN (a diverged run, dropped later).
RESULT_FIELDS = {
    "name": "str", "variant": "str", "backbone": "str", "budget": "num?", "N_c": "int",
    "N_c_total": "int", "N_n": "int", "eta": "num", "rho": "num", "tokens": "int",
    "flops": "num", "final_val_loss": "num", "best_val_loss": "num", "curve": "curve",
    "config": "dict",
}  # fmt: skip
_POSITIVE = {"N_c", "N_c_total", "tokens", "flops", "budget"}
_NON_NEGATIVE = {"N_n", "eta", "rho"}


class FitError(JTokError):
    """A mistake in the inputs of `jtok fit` (missing directory, bad results, too few runs)."""


# ---- loading -----------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_value(key: str, value: Any, kind: str) -> Any:
    """The normalised value, or raise ValueError with what is wrong."""
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty string")
        return value
    if kind in ("dict", "curve"):
        if kind == "dict" and not isinstance(value, dict):
            raise ValueError("must be an object")
        if kind == "curve" and not (isinstance(value, list) and all(
                isinstance(p, list) and len(p) == 3 and all(map(_is_number, p)) for p in value)):
            raise ValueError("must be a list of [step, tokens, val_loss]")  # fmt: skip
        return value
    if value is None and kind == "num?":
        return None
    if not _is_number(value):
        raise ValueError("must be a number" + (" or null" if kind == "num?" else ""))
    if kind == "int":
        if not float(value).is_integer():
            raise ValueError("must be an integer")
        value = int(value)
    else:
        value = float(value)
    if key in _POSITIVE and not value > 0 or key in _NON_NEGATIVE and not value >= 0:
        raise ValueError("must be " + ("positive" if key in _POSITIVE else "non-negative"))
    return value


def load_results(path: str | Path) -> list[dict]:
    """Runs of DIR/results.jsonl (or of a results file), validated; unknown fields dropped."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FitError(f"{file}: no such file" + (" (run `jtok sweep` first)" if
                                                   path.is_dir() else ""))  # fmt: skip
    runs = []
    for lineno, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FitError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise FitError(f"{where}: expected a JSON object")
        run = {}
        for key, kind in RESULT_FIELDS.items():
            if key not in record:
                raise FitError(f"{where}: missing field {key!r}")
            try:
                run[key] = _field_value(key, record[key], kind)
            except ValueError as err:
                raise FitError(f"{where}: field {key!r} {err}") from None
        labels = record.get("labels", {})  # optional: a sweep's axis labels split profiles
        if not isinstance(labels, dict):
            raise FitError(f"{where}: field 'labels' must be an object")
        run["labels"] = {str(k): str(v) for k, v in labels.items()}
        runs.append(run)
    if not runs:
        raise FitError(f"{file}: holds no results")
    return runs


# ---- straight lines and the eta law ------------------------------------------------------


@dataclass(frozen=True)
class LineFit:
    """Ordinary least squares y = intercept + slope * x."""

    slope: float
    intercept: float
    r2: float
    n: int
    slope_se: float  # NaN below 3 points

    def __call__(self, x):
        return self.intercept + self.slope * np.asarray(x, float)


def fit_line(x, y) -> LineFit:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise FitError("a line needs at least 2 distinct x values")
    dx, dy = x - x.mean(), y - y.mean()
    sxx = float(dx @ dx)
    slope = float(dx @ dy) / sxx
    intercept = float(y.mean() - slope * x.mean())
    sse = float(((y - intercept - slope * x) ** 2).sum())
    sst = float(dy @ dy)
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    se = math.sqrt(sse / (len(x) - 2) / sxx) if len(x) > 2 else math.nan
    return LineFit(slope, intercept, r2, len(x), se)


@dataclass(frozen=True)
class EtaLawFit:
    """loss = intercept + slope * log2(eta); also loss = nn_intercept + slope * log2(N_n)."""

    slope: float  # loss change per doubling of token parameters
    slope_se: float
    intercept: float
    r2: float
    n: int
    nn_intercept: float | None  # None without N_n; at one backbone N_n = eta N_c: same slope
    nn_slope: float | None


def fit_eta_law(eta, loss, n_n=None) -> EtaLawFit:
    eta = np.asarray(eta, float)
    if np.any(eta <= 0):
        raise FitError("the eta law needs eta > 0 (log2 of eta)")
    line = fit_line(np.log2(eta), loss)
    nn = fit_line(np.log2(np.asarray(n_n, float)), loss) if n_n is not None else None
    return EtaLawFit(line.slope, line.slope_se, line.intercept, line.r2, line.n,
                     None if nn is None else nn.intercept, None if nn is None else nn.slope)


def _amount_key(run: dict) -> tuple:
    # Runs at one FLOP budget get slightly different token counts per variant (JTok-M adds a
    # few FLOPs per token), so a budget, when set, is what makes runs comparable.
    return ("C", run["budget"]) if run["budget"] is not None else ("D", run["tokens"])


def _amount_label(key: tuple) -> str:
    return f"{key[0]}={key[1]:.3g}"


def amount_label(run: dict) -> str:
    """The "amount" a paired gain or eta law names for this run ("C=2e+12", "D=3e+06")."""
    return _amount_label(_amount_key(run))


def eta_laws(runs: list[dict], baseline: str, loss_field: str = "final_val_loss") -> list[dict]:
    """One eta law per (variant, backbone, training amount) holding >= 3 distinct eta > 0."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    reference: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        where = (run["backbone"], _amount_key(run))
        if run["variant"] == baseline or run["eta"] == 0:
            reference[where].append(run[loss_field])
        else:
            groups[(run["variant"], *where)].append(run)
    fits = []
    for (variant, backbone, amount), members in sorted(groups.items(), key=lambda kv: kv[0]):
        if len({r["eta"] for r in members}) < 3:
            continue
        members.sort(key=lambda r: r["eta"])
        etas = [r["eta"] for r in members]
        losses = [r[loss_field] for r in members]
        law = fit_eta_law(etas, losses, [r["N_n"] for r in members])
        base = reference.get((backbone, amount))
        base_loss = float(np.mean(base)) if base else None
        fits.append({
            "variant": variant, "backbone": backbone, "amount": _amount_label(amount),
            **asdict(law), "etas": etas, "losses": losses, "baseline_loss": base_loss,
            "relative_gain_at_max_eta": 1 - losses[-1] / base_loss if base_loss else None,
        })  # fmt: skip
    return fits


def paired_gains(runs: list[dict], baseline: str, loss_field: str = "final_val_loss") -> list:
    """1 - L / L_baseline for every (variant, eta) run set with a baseline at the same
    backbone and training amount (the paper: 2.5-3% for JTok-M, flat across sizes)."""
    base: dict[tuple, list[float]] = defaultdict(list)
    other: dict[tuple, list[float]] = defaultdict(list)
    for run in runs:
        where = (run["backbone"], _amount_key(run))
        if run["variant"] == baseline:
            base[where].append(run[loss_field])
        elif run["eta"] > 0:
            other[(run["variant"], run["eta"], *where)].append(run[loss_field])
    pairs = []
    for (variant, eta, backbone, amount), losses in sorted(other.items()):
        if (backbone, amount) in base:
            ref, loss = float(np.mean(base[(backbone, amount)])), float(np.mean(losses))
            pairs.append({"variant": variant, "backbone": backbone, "amount": _amount_label(amount),
                          "eta": eta, "baseline_loss": ref, "loss": loss,
                          "relative_gain": 1 - loss / ref})  # fmt: skip
    return pairs


def t_interval(values) -> list[float] | None:
    """95% Student t interval on the mean of `values` (None below two values)."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.975, n - 1)) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return [mean - half, mean + half]


def paired_summary(pairs: list[dict]) -> dict[str, dict]:
    """Per variant, over its matched (backbone, amount) settings: how many it wins, the mean
    relative gain with a 95% t interval, and a two-sided sign-test p-value.

    Treats the settings as independent draws of one gain, which a sweep over sizes and budgets
    only approximates; where single-seed runs are noisy this is the honest headline next to
    any one pair."""
    from scipy import stats

    per_variant: dict[str, list[float]] = defaultdict(list)
    for pair in pairs:
        per_variant[pair["variant"]].append(pair["relative_gain"])
    summary = {}
    for variant, gains in sorted(per_variant.items()):
        n, wins = len(gains), sum(g > 0 for g in gains)
        mean = float(np.mean(gains))
        sd = float(np.std(gains, ddof=1)) if n > 1 else None
        decided = sum(g != 0 for g in gains)
        sign_p = float(stats.binomtest(wins, decided, 0.5).pvalue) if decided else None
        summary[variant] = {"pairs": n, "wins": wins, "mean_gain": mean, "sd": sd,
                            "mean_gain_ci": t_interval(gains), "sign_test_p": sign_p}  # fmt: skip
    return summary


# ---- isoFLOPs ----------------------------------------------------------------------------


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


# ---- parametric law ----------------------------------------------------------------------


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A / N_eff^alpha + B / D^beta, N_eff = N_c (1 + eta gamma)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    gamma: float | None  # None: the plain law (N_eff = N_c)
    objective: float  # sum over runs of Huber(delta) of log L_pred - log L_obs, at the optimum
    rmse_log: float
    n: int
    starts: int  # optimiser starts polished (the best points of a grid)

    def predict(self, n_c, tokens, eta=None) -> np.ndarray:
        n_eff = np.asarray(n_c, float)
        if self.gamma is not None and eta is not None:
            n_eff = n_eff * (1 + np.asarray(eta, float) * self.gamma)
        return self.E + self.A * n_eff**-self.alpha + self.B * np.asarray(tokens, float)**-self.beta


# theta = (log E, log A, alpha, log B, beta[, gamma]); logs keep E, A, B positive.
_BOUNDS = [(-20.0, 5.0), (-30.0, 80.0), (1e-3, 3.0), (-30.0, 80.0), (1e-3, 3.0), (0.0, 1e3)]


def _objective(theta, log_n, log_d, eta, log_obs, delta):
    """Huber of log residuals and its gradient, scaled by 1/delta^2 so that the optimiser's
    absolute tolerances see values of order one."""
    log_e, log_a, alpha, log_b, beta = theta[:5]
    log_neff = log_n if eta is None else log_n + np.log1p(eta * theta[5])
    e, ta, tb = math.exp(log_e), np.exp(log_a - alpha * log_neff), np.exp(log_b - beta * log_d)
    pred = e + ta + tb
    r = np.log(pred) - log_obs
    value = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    jac = [np.full_like(pred, e), ta, -ta * log_neff, tb, -tb * log_d]
    if eta is not None:
        jac.append(-alpha * ta * eta / (1 + eta * theta[5]))
    weight = np.clip(r, -delta, delta) / pred
    return value / delta**2, np.array([j @ weight for j in jac]) / delta**2


def _grid_starts(log_n, log_d, loss, eta, keep: int) -> list[np.ndarray]:
    """The best `keep` points of a grid over (E, alpha, beta[, gamma]); A and B, which enter
    linearly, are solved for each by least squares on relative residuals."""
    exponents = (0.1, 0.2, 0.3, 0.45, 0.7, 1.0)
    gammas = (0.0,) if eta is None else (0.0, 0.1, 0.5, 2.0)
    scored = []
    for frac, alpha, beta, gamma in itertools.product((0.0, 0.3, 0.6, 0.8, 0.9), exponents,
                                                      exponents, gammas):  # fmt: skip
        e = max(frac, 1e-3) * loss.min()
        log_neff = log_n if eta is None else log_n + np.log1p(eta * gamma)
        cols = np.stack([np.exp(-alpha * log_neff), np.exp(-beta * log_d)], 1) / loss[:, None]
        scale = cols.max(0)
        coef = np.linalg.lstsq(cols / scale, 1 - e / loss, rcond=None)[0] / scale
        coef = np.maximum(coef, 1e-12)
        theta = np.array([math.log(e), math.log(coef[0]), alpha, math.log(coef[1]), beta]
                         + ([gamma] if eta is not None else []))  # fmt: skip
        theta = np.clip(theta, *np.array(_BOUNDS[: len(theta)]).T)
        value = _objective(theta, log_n, log_d, eta, np.log(loss), HUBER_DELTA)[0]
        scored.append((value, theta))
    scored.sort(key=lambda item: item[0])
    return [theta for _, theta in scored[:keep]]


def fit_parametric(
    n_c, tokens, loss, eta=None, *, delta: float = HUBER_DELTA, polish: int = 8,
    init: ParametricFit | None = None,
) -> ParametricFit:  # fmt: skip
    """Fit the law by SLSQP from the best grid points (and `init`, if given). With `eta`,
    also fit gamma >= 0 in N_eff = N_c (1 + eta gamma)."""
    from scipy.optimize import minimize

    log_n, log_d = np.log(np.asarray(n_c, float)), np.log(np.asarray(tokens, float))
    loss = np.asarray(loss, float)
    eta = None if eta is None else np.asarray(eta, float)
    n_params = 5 if eta is None else 6
    if len(loss) < n_params + 1:
        raise FitError(f"the parametric law needs more than {n_params} runs, got {len(loss)}")
    starts = _grid_starts(log_n, log_d, loss, eta, polish)
    if init is not None:
        base = [math.log(init.E), math.log(init.A), init.alpha, math.log(init.B), init.beta]
        starts += [np.array(base + [g] if eta is not None else base) for g in (0.0, 0.3, 1.0)]
    best = None
    for start in starts:
        # SLSQP, not L-BFGS-B: scipy's L-BFGS-B calls multithreaded BLAS on 6-vectors, and
        # with OpenBLAS threads competing against training processes each step took
        # milliseconds (60x slower here); both reach the same optimum on these fits.
        res = minimize(_objective, start, args=(log_n, log_d, eta, np.log(loss), delta),
                       jac=True, method="SLSQP", bounds=_BOUNDS[:n_params],
                       options={"maxiter": 1000, "ftol": 1e-12})  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    t = best.x
    fit = ParametricFit(math.exp(t[0]), math.exp(t[1]), float(t[2]), math.exp(t[3]), float(t[4]),
                        None if eta is None else float(t[5]), float(best.fun) * delta**2,
                        0.0, len(loss), len(starts))  # fmt: skip
    residual = np.log(fit.predict(np.exp(log_n), np.exp(log_d), eta)) - np.log(loss)
    return ParametricFit(**{**asdict(fit), "rmse_log": float(np.sqrt(np.mean(residual**2)))})


def parametric_analysis(
    runs: list[dict], baseline: str, treatment: str, loss_field: str = "final_val_loss",
) -> tuple[dict | None, list[str]]:  # fmt: skip
    """The plain law on baseline + treatment runs, then with gamma (needs eta = 0 and > 0)."""
    chosen = [r for r in runs if r["variant"] in (baseline, treatment)]
    n_c = [r["N_c"] for r in chosen]
    tokens = [r["tokens"] for r in chosen]
    if len(chosen) < 6 or len(set(n_c)) < 3 or len(set(tokens)) < 3:
        return None, [f"parametric: {len(chosen)} runs of {baseline}/{treatment} with "
                      f"{len(set(n_c))} sizes and {len(set(tokens))} token counts; "
                      "needs >= 6 runs, 3 sizes, 3 token counts"]  # fmt: skip
    loss = [r[loss_field] for r in chosen]
    eta = np.array([r["eta"] for r in chosen])
    plain = fit_parametric(n_c, tokens, loss)
    section: dict[str, Any] = {"runs": len(chosen), "variants": [baseline, treatment],
                               "delta": HUBER_DELTA, "plain": asdict(plain)}  # fmt: skip
    if not (np.any(eta == 0) and np.any(eta > 0) and len(chosen) >= 7):
        return section, ["parametric: gamma needs runs with eta = 0 and eta > 0; plain law only"]
    effective = fit_parametric(n_c, tokens, loss, eta, init=plain)
    section["effective"] = asdict(effective)
    section["objective_improvement"] = plain.objective - effective.objective
    section["relative_improvement"] = (1 - effective.objective / plain.objective
                                       if plain.objective > 0 else 0.0)  # fmt: skip
    return section, []


# ---- the whole analysis ------------------------------------------------------------------


def _usable_runs(runs: list[dict], loss_field: str, notes: list[str]) -> list[dict]:
    latest = {r["name"]: r for r in runs}  # a re-run appends its name again: the last wins
    if len(latest) < len(runs):
        notes.append(f"{len(runs) - len(latest)} repeated run names: kept the last record")
    bad = [r["name"] for r in latest.values() if not math.isfinite(r[loss_field])]
    if bad:
        notes.append(f"left out {len(bad)} run(s) with a non-finite {loss_field}: "
                     + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))  # fmt: skip
    return [r for r in latest.values() if math.isfinite(r[loss_field])]


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


def run_fit(directory: str | Path, *, baseline: str = "baseline", treatment: str = "jtokm",
            bootstrap: int = 1000, seed: int = 0, plots: bool = True,
            loss_field: str = "final_val_loss", window: int | None = None,
            noise: float | None = None, out: str | Path | None = None,
            variants: list[str] | None = None) -> dict:  # fmt: skip
    """Every fit the sweep in `directory` supports; writes fit.json, REPORT_fit.md, PNGs
    there, or into `out` (a variant of the analysis kept beside the main one). `variants`
    restricts the fit to those variant labels: a grid that grows by a variant keeps its
    earlier analysis, whose pooled residual spread would otherwise change."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FitError(f"{directory}: no such directory")
    out_dir = directory if out is None else Path(out)
    if out_dir.resolve() != directory.resolve() and (out_dir / RESULTS_FILE).exists():
        raise FitError(f"{out_dir} holds another sweep's {RESULTS_FILE}: writing its fit files "
                       "there would replace that sweep's; choose another folder")  # fmt: skip
    if loss_field not in LOSS_FIELDS:
        raise FitError(f"loss field must be one of {LOSS_FIELDS}, got {loss_field!r}")
    if bootstrap < 0:
        raise FitError(f"bootstrap resamples must be >= 0, got {bootstrap}")
    notes: list[str] = []
    runs = _usable_runs(load_results(directory), loss_field, notes)
    if variants is not None:
        present = {run["variant"] for run in runs}
        unknown = [name for name in variants if name not in present]
        if unknown:
            raise FitError(f"--variants {','.join(unknown)}: no such variant in {directory} "
                           f"(variants: {', '.join(sorted(present))})")  # fmt: skip
        runs = [run for run in runs if run["variant"] in variants]
    counts: dict[str, int] = defaultdict(int)
    for run in runs:
        counts[run["variant"]] += 1
    for role, name in (("baseline", baseline), ("treatment", treatment)):
        if name not in counts:
            notes.append(f"{role} {name!r} has no runs (variants: {', '.join(sorted(counts))})")
    laws = eta_laws(runs, baseline, loss_field)
    if not laws:
        notes.append("eta law: no (variant, backbone, amount) with 3 or more eta > 0 values")
    iso, iso_notes = isoflop_analysis(runs, baseline, loss_field, bootstrap, seed, window, noise)
    parametric, par_notes = parametric_analysis(runs, baseline, treatment, loss_field)
    notes += iso_notes + par_notes
    pairs = paired_gains(runs, baseline, loss_field)
    if not (laws or iso or parametric):
        raise FitError(f"{directory}: too few runs for any fit ({len(runs)} usable): "
                       + "; ".join(notes))  # fmt: skip
    result = {
        "source": str(directory / RESULTS_FILE), "output": str(out_dir),
        "loss_field": loss_field,
        "baseline": baseline, "treatment": treatment, "runs": len(runs),
        "variants": dict(sorted(counts.items())), "variant_filter": variants,
        "isoflop_window": window, "eta_law": laws,
        "paired_gains": pairs, "paired_summary": paired_summary(pairs), "isoflops": iso,
        "parametric": parametric, "paper_check": paper_frontier_check(), "notes": notes,
    }  # fmt: skip
    result["files"] = [FIT_JSON, REPORT_FILE]
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        result["files"] += write_plots(result, runs, out_dir)
    result = _jsonable(result)
    result["claims"] = paper_claims(result)
    (out_dir / REPORT_FILE).write_text(format_report(result))
    (out_dir / FIT_JSON).write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---- report ------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _ci(pair: list | None, pct: bool = True) -> str:
    if not pair:
        return ""
    return (f" [95% CI {_pct(pair[0])}, {_pct(pair[1])}]" if pct
            else f" [95% CI {pair[0]:.4f}, {pair[1]:.4f}]")  # fmt: skip


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]  # fmt: skip


def _headline(result: dict) -> dict:
    """The treatment's figures the paper makes claims about (None where not fitted)."""
    treat, iso = result["treatment"], result["isoflops"] or {}
    laws = [f for f in result["eta_law"] if f["variant"] == treat]
    # The paper's "flat across backbone sizes" is at one setting per size: leave out the
    # pairs of an eta sweep, which vary eta on purpose.
    swept = {(f["backbone"], f["amount"]) for f in laws}
    matched = [p for p in result["paired_gains"]
               if p["variant"] == treat and (p["backbone"], p["amount"]) not in swept]  # fmt: skip
    gains = [p["relative_gain"] for p in matched]
    return {
        "gain_summary": paired_summary(matched).get(treat),
        "comparison": iso.get("comparisons", {}).get(treat),
        "frontiers": iso.get("frontiers", {}),
        "eta_law": max(laws, key=lambda f: f["n"]) if laws else None,
        "gains": (min(gains), max(gains)) if gains else None,
    }


def paper_claims(result: dict) -> list[dict]:
    """Each paper claim the data can speak to: {"claim", "paper", "ours"} (ours with its CI)."""
    h, paper = _headline(result), result["paper_check"]
    base, treat = result["baseline"], result["treatment"]
    comp, fronts = h["comparison"], h["frontiers"]
    rows = []
    if comp:
        mid_ci = {k: (comp.get(f"{k}_ci") or [None] * 3)[1] for k in ("compute_saving", "loss_gap")}
        rows.append(["compute saving at equal loss (mid of loss range)",
                     f"{_pct(PAPER_CLAIMS['compute_saving'])} (their lines, our arithmetic: "
                     f"{_pct(paper['compute_saving'][1])})",
                     _pct(comp["compute_saving"][1]) + _ci(mid_ci["compute_saving"])])
        rows.append(["loss gap at equal compute (mid of budgets)",
                     _pct(PAPER_CLAIMS["loss_gap"]),
                     _pct(comp["loss_gap"][1]) + _ci(mid_ci["loss_gap"])])  # fmt: skip
    for name, paper_name in ((base, "baseline"), (treat, "jtokm")):
        if name in fronts:
            f, (m, k, r2) = fronts[name], PAPER_FRONTIERS[paper_name]
            rows.append([f"frontier {name}: log2 L = m log10 C + k",
                         f"{paper_name}: m {m}, k {k}, R² {r2}",
                         f"m {f['slope']:.4f}{_ci(f.get('slope_ci'), pct=False)}, "
                         f"k {f['intercept']:.4f}, R² {f['r2']:.4f}"])  # fmt: skip
    if h["eta_law"]:
        e = h["eta_law"]
        rows.append([f"eta law ({treat}, {e['backbone']}): loss per doubling of eta",
                     f"{PAPER_CLAIMS['eta_slope']} (R² {PAPER_CLAIMS['eta_r2']})",
                     f"{e['slope']:.4f} ± {e['slope_se']:.4f} (R² {e['r2']:.3f}, {e['n']} pts)"])
    if h["gains"]:
        lo, hi, g = *PAPER_CLAIMS["relative_gain"], h["gain_summary"]
        rows.append([f"relative loss gain of {treat} over {base} at equal backbone and budget",
                     f"{_pct(lo)} to {_pct(hi)}, flat across sizes",
                     f"{_pct(h['gains'][0])} to {_pct(h['gains'][1])}; mean "
                     f"{_pct(g['mean_gain'])}{_ci(g['mean_gain_ci'])}, better in {g['wins']} of "
                     f"{g['pairs']}"])  # fmt: skip
    return [dict(zip(("claim", "paper", "ours"), row, strict=True)) for row in rows]


def _profile_table(minima: list[dict]) -> list[str]:
    """Every isoFLOP run's loss, one row per (budget, backbone) and one column per profile,
    the lowest of each profile at each budget in bold: the table a reader checks a frontier
    against. Seeds or repeats at one backbone are averaged (their count shown)."""
    profiles = list(dict.fromkeys(m["variant"] for m in minima))
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    size: dict[tuple, float] = {}
    for m in minima:
        for backbone, (n_c, loss) in zip(m["backbones"], m["points"], strict=True):
            cells[(m["budget"], backbone)][m["variant"]].append(loss)
            size[(m["budget"], backbone)] = min(n_c, size.get((m["budget"], backbone), n_c))
    best = {}
    for (budget, _), per_profile in cells.items():
        for profile, losses in per_profile.items():
            mean = float(np.mean(losses))
            best[(budget, profile)] = min(mean, best.get((budget, profile), mean))
    rows = []
    for key in sorted(cells, key=lambda k: (k[0], size[k])):
        row = [f"{key[0]:.3g}", key[1], f"{size[key]:.3g}"]
        for profile in profiles:
            losses = cells[key].get(profile)
            if not losses:
                row.append("")
                continue
            mean = float(np.mean(losses))
            text = f"{mean:.4f}" + (f" (x{len(losses)})" if len(losses) > 1 else "")
            row.append(f"**{text}**" if mean == best[(key[0], profile)] else text)
        rows.append(row)
    return ["Loss per run (bold: the lowest of each profile at each budget):", "",
            *_table(["budget C", "backbone", "N_c", *profiles], rows)]  # fmt: skip


def format_report(result: dict) -> str:
    lines = ["# Scaling-law fit", "",
             f"Source: `{result['source']}`; {result['runs']} runs "
             f"({', '.join(f'{v}: {n}' for v, n in result['variants'].items())}); "
             f"loss = `{result['loss_field']}` (nats). Baseline `{result['baseline']}`, "
             f"treatment `{result['treatment']}`."
             + (" Only these variants (`--variants`)." if result["variant_filter"] else ""), "",
             "Absolute losses depend on data and tokenizer; the paper's figures compare through "
             "slopes and relative numbers.", ""]  # fmt: skip
    if result["claims"]:
        lines += ["## Claims: paper — ours", "",
                  *_table(["claim", "paper", "ours"], [list(c.values()) for c in result["claims"]])]
    if result["eta_law"]:
        lines += ["## Loss vs token parameters at a fixed backbone", "",
                  "loss = a + b log2(eta) (b = change per doubling; the same b fits log2 N_n).",
                  "", *_table(["variant", "backbone", "amount", "n", "b per doubling", "a",
                               "R²", "baseline loss", "gain at max eta"],
                              [[f["variant"], f["backbone"], f["amount"], f["n"],
                                f"{f['slope']:.4f} ± {f['slope_se']:.4f}", f"{f['intercept']:.4f}",
                                f"{f['r2']:.4f}",
                                _num(f["baseline_loss"]),
                                _pct(f["relative_gain_at_max_eta"])]
                               for f in result["eta_law"]])]  # fmt: skip
    if result["paired_gains"]:
        lines += ["## Same backbone and amount: gain over the baseline", "",
                  *_table(["variant", "backbone", "amount", "eta", "baseline loss", "loss", "gain"],
                          [[p["variant"], p["backbone"], p["amount"], f"{p['eta']:.2f}",
                            f"{p['baseline_loss']:.4f}", f"{p['loss']:.4f}",
                            _pct(p["relative_gain"])]
                           for p in result["paired_gains"]])]  # fmt: skip
        lines += ["Over all matched settings (mean with a 95% t interval, treating the settings "
                  "as independent draws; sign test on the wins):", "",
                  *_table(["variant", "settings", "wins", "mean gain", "sd", "sign test p"],
                          [[v, s["pairs"], s["wins"], _pct(s["mean_gain"]) + _ci(s["mean_gain_ci"]),
                            _pct(s["sd"]), "n/a" if s["sign_test_p"] is None
                            else f"{s['sign_test_p']:.3f}"]
                           for v, s in result["paired_summary"].items()])]  # fmt: skip
    iso = result["isoflops"]
    if iso:
        window = result.get("isoflop_window")
        fitted_to = (f" (fitted to the {window} sizes around each profile's best run)"
                     if window else "")  # fmt: skip
        lines += ["## isoFLOPs", "", f"Per (variant, budget): loss ~ quadratic in log10 N_c"
                  f"{fitted_to}; its vertex is the compute-optimal point unless it opens "
                  "downward or falls outside the fitted sizes (then the best observed point, "
                  "marked).", "",
                  *_table(["variant", "budget C", "runs", "sizes (fitted)", "N_opt", "D_opt",
                           "L_opt", "method", "C spent / C"],
                          [[m["variant"], f"{m['budget']:.3g}", m["n_points"],
                            f"{m['n_sizes']} ({m['fit_sizes']})",
                            f"{m['N_opt']:.4g}", f"{m['D_opt']:.4g}", f"{m['L_opt']:.4f}",
                            m["method"] + (f" ({m['reason']})" if m["reason"] else ""),
                            f"{m['flops_over_budget']:.3f}"] for m in iso["minima"]])]  # fmt: skip
        lines += _profile_table(iso["minima"])
        if iso["frontiers"]:
            lines += ["Frontiers log2 L_opt = m log10 C + k (N_opt ∝ C^a):", "",
                      *_table(["variant", "m", "k", "R²", "budgets", "a"],
                              [[v, f"{f['slope']:.4f}{_ci(f.get('slope_ci'), pct=False)}",
                                f"{f['intercept']:.4f}", f"{f['r2']:.4f}", f["n"],
                                f"{f['n_opt_exponent']:.3f}"]
                               for v, f in iso["frontiers"].items()])]  # fmt: skip
        for variant, c in iso["comparisons"].items():
            saving_ci = c.get("compute_saving_ci") or [None] * 3
            gap_ci = c.get("loss_gap_ci") or [None] * 3
            rows = [[f"compute saving at L = {loss:.4f}", _pct(s) + _ci(ci)]
                    for loss, s, ci in zip(c["points"]["loss"], c["compute_saving"], saving_ci,
                                           strict=True)]  # fmt: skip
            rows += [[f"loss gap at C = {comp:.3g}", _pct(g) + _ci(ci)]
                     for comp, g, ci in zip(c["points"]["compute"], c["loss_gap"], gap_ci,
                                            strict=True)]  # fmt: skip
            if c.get("fallback_points"):
                rows.append(["frontier points taken from a best observed run (biased up)",
                             str(c["fallback_points"])])  # fmt: skip
            lines += [f"{variant} vs {result['baseline']} (1 - C_{variant}/C_base at equal loss; "
                      f"1 - L_{variant}/L_base at equal compute; low, mid, high):", "",
                      *_table(["quantity", "value"], rows)]  # fmt: skip
        if iso["comparisons"]:
            lines += ["With an irreducible loss the true frontier bends (log L_opt is not linear "
                      "in log C) and the lines are chords of it, so part of any spread between "
                      "the low and high ends comes from that bend; the mid value is the one "
                      "to quote.", ""]  # fmt: skip
        if "bootstrap" in iso:
            b = iso["bootstrap"]
            residual = ("none" if b["residual_sigma"] is None
                        else f"{b['residual_sigma']:.4f} on {b['residual_dof']} degrees of "
                             "freedom")  # fmt: skip
            source = ("the pooled residual spread" if b["noise_source"] == "residuals"
                      else "the given noise")  # fmt: skip
            lines += [f"Bootstrap: {b['resamples']} parametric resamples (each profile's "
                      f"fitted quadratic plus Gaussian noise of {source}, sigma "
                      f"{b['noise_sigma']:.4f}; residual spread {residual}), seed {b['seed']}; "
                      f"{_pct(b['fallback_fraction'])} of resampled minima fell back to the "
                      "best observed point.", ""]  # fmt: skip
    par = result["parametric"]
    if par:
        rows = [[name, f"{p['E']:.4f}", f"{p['A']:.4g}", f"{p['alpha']:.4f}", f"{p['B']:.4g}",
                 f"{p['beta']:.4f}", "—" if p["gamma"] is None else f"{p['gamma']:.4f}",
                 f"{p['objective']:.3e}", f"{p['rmse_log']:.4f}"]
                for name, p in (("plain", par["plain"]), ("N_eff", par.get("effective")))
                if p]  # fmt: skip
        lines += ["## Parametric law", "",
                  f"L = E + A / N^alpha + B / D^beta on {par['runs']} runs of "
                  f"{' + '.join(par['variants'])}, Huber (delta {par['delta']}) on log residuals; "
                  "N_eff variant: N = N_c (1 + eta gamma).", "",
                  *_table(["law", "E", "A", "alpha", "B", "beta", "gamma", "objective",
                           "RMSE log"], rows)]  # fmt: skip
        if "effective" in par:
            lines += [f"Adding gamma lowers the objective by {_pct(par['relative_improvement'])}.",
                      ""]
    lines += ["## Paper's frontier lines, our arithmetic", "",
              "Evaluated at the low, geometric-mid and high end of the loss range both lines "
              "reach over 3e18..3e20: compute saving " + ", ".join(
                  _pct(s) for s in result["paper_check"]["compute_saving"])
              + "; loss gap " + ", ".join(_pct(g) for g in result["paper_check"]["loss_gap"])
              + " (the paper states 35% and 2.2%).", ""]  # fmt: skip
    if result["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in result["notes"]), ""]
    if len(result["files"]) > 2:
        lines += ["## Figures", "", *(f"![{f}]({f})" for f in result["files"][2:]), ""]
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    h = _headline(result)
    lines = []
    if h["eta_law"]:
        e = h["eta_law"]
        lines.append(f"eta law ({e['variant']}, {e['backbone']}): {e['slope']:+.4f} loss per "
                     f"doubling of eta, R^2 {e['r2']:.3f} ({e['n']} points)")  # fmt: skip
    for variant, f in h["frontiers"].items():
        lines.append(f"frontier {variant}: log2 L = {f['slope']:.4f} log10 C + "
                     f"{f['intercept']:.4f} (R^2 {f['r2']:.4f}, {f['n']} budgets)")  # fmt: skip
    if h["comparison"]:
        c = h["comparison"]
        saving_ci = (c.get("compute_saving_ci") or [None] * 3)[1]
        gap_ci = (c.get("loss_gap_ci") or [None] * 3)[1]
        lines.append(f"{result['treatment']} vs {result['baseline']}: compute saving at equal "
                     f"loss {_pct(c['compute_saving'][1])}{_ci(saving_ci)} (paper 35%); loss gap "
                     f"at equal compute {_pct(c['loss_gap'][1])}{_ci(gap_ci)} (paper 2.2%)")
    par = result["parametric"]
    if par:
        p = par.get("effective") or par["plain"]
        lines.append(f"parametric: E={p['E']:.3f} A={p['A']:.3g} alpha={p['alpha']:.3f} "
                     f"B={p['B']:.3g} beta={p['beta']:.3f}"
                     + (f" gamma={p['gamma']:.3f} (objective -{_pct(par['relative_improvement'])})"
                        if p["gamma"] is not None else ""))  # fmt: skip
    lines += [f"note: {n}" for n in result["notes"]]
    out_dir = Path(result["output"])
    lines.append(f"wrote {', '.join(str(out_dir / f) for f in result['files'])}")
    return "\n".join(lines)


# ---- figures -----------------------------------------------------------------------------


def write_plots(result: dict, runs: list[dict], directory: Path) -> list[str]:
    """The figures the data supports; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(name)

    loss_key = result["loss_field"]
    if result["eta_law"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, f in enumerate(result["eta_law"]):
            colour = f"C{i}"
            label = f"{f['variant']} {f['backbone']} {f['amount']}"
            ax.plot(f["etas"], f["losses"], "o", color=colour, label=label)
            xs = np.geomspace(min(f["etas"]), max(f["etas"]), 50)
            ax.plot(xs, f["intercept"] + f["slope"] * np.log2(xs), "-", color=colour,
                    label=f"fit: {f['slope']:+.4f} per doubling, R² {f['r2']:.3f}")  # fmt: skip
            if f["baseline_loss"] is not None:
                ax.axhline(f["baseline_loss"], color=colour, ls="--", lw=1,
                           label=f"baseline {f['backbone']}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set(xlabel="eta = N_n / N_c", ylabel="validation loss", title="loss vs eta")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "fit_eta.png")
    iso = result["isoflops"]
    if iso:
        fig, ax = plt.subplots(figsize=(7, 4.6))
        budgets = sorted({m["budget"] for m in iso["minima"]})
        variants = sorted({m["variant"] for m in iso["minima"]})
        styles = ["-", "--", ":", "-."]
        for m in iso["minima"]:
            colour = f"C{budgets.index(m['budget']) % 10}"
            style = styles[variants.index(m["variant"]) % len(styles)]
            ns, ls = zip(*m["points"], strict=True)
            ax.plot(ns, ls, "o" if style == "-" else "s", color=colour, ms=4, mfc="none")
            x = np.linspace(*np.log10(m["fit_range"]), 60)
            c2, c1, c0 = m["coeffs"]
            ax.plot(10**x, c2 * x**2 + c1 * x + c0, style, color=colour,
                    label=f"{m['variant']} C={m['budget']:.2g}")  # fmt: skip
            ax.plot(m["N_opt"], m["L_opt"], "*" if m["in_range"] else "X", color=colour, ms=12,
                    mec="black")  # fmt: skip
        ax.set_xscale("log")
        ax.set(xlabel="N_c (active backbone parameters)", ylabel="validation loss",
               title="isoFLOP profiles (star: minimum; X: best observed, vertex unusable)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "fit_isoflops.png")
        if iso["frontiers"]:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for i, (variant, f) in enumerate(iso["frontiers"].items()):
                pts = [(m["compute"], m["L_opt"]) for m in iso["minima"] if m["variant"] == variant]
                cs, ls = zip(*pts, strict=True)
                ax.plot(np.log10(cs), np.log2(ls), "o", color=f"C{i}")
                x = np.linspace(min(np.log10(cs)), max(np.log10(cs)), 20)
                ax.plot(x, f["intercept"] + f["slope"] * x, "-", color=f"C{i}",
                        label=f"{variant}: {f['slope']:.4f} log10 C + {f['intercept']:.4f}")
            ax.set(xlabel="log10 C (FLOPs)", ylabel="log2 L_opt", title="compute-optimal frontier")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, "fit_frontier.png")
    par = result["parametric"]
    if par:
        fig, ax = plt.subplots(figsize=(5.2, 5))
        chosen = [r for r in runs if r["variant"] in par["variants"]]
        observed = np.array([r[loss_key] for r in chosen])
        for name, p in (("plain", par["plain"]), ("N_eff", par.get("effective"))):
            if p:
                fit = ParametricFit(**p)
                pred = fit.predict([r["N_c"] for r in chosen], [r["tokens"] for r in chosen],
                                   [r["eta"] for r in chosen])  # fmt: skip
                ax.plot(observed, pred, "o", ms=4, alpha=0.7,
                        label=f"{name} (RMSE log {p['rmse_log']:.4f})")  # fmt: skip
        lo, hi = observed.min(), observed.max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="observed loss", ylabel="predicted loss", title="parametric law")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "fit_parametric.png")
    return written


# ---- command line ------------------------------------------------------------------------


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="sweep directory (results.jsonl)")
    parser.add_argument("--json", action="store_true", help="print fit.json as one JSON object")
    parser.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                        help="write fit_*.png figures (default: on)")  # fmt: skip
    parser.add_argument("--baseline", default="baseline", metavar="NAME",
                        help="variant label of the baseline (default: baseline)")  # fmt: skip
    parser.add_argument("--treatment", default="jtokm", metavar="NAME",
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
                        help="per-run loss sd (nats) for the bootstrap, e.g. a measured seed "
                             "spread (default: the quadratics' residual spread)")  # fmt: skip
    parser.add_argument("--variants", type=_variant_list, default=None, metavar="A,B,...",
                        help="fit only these variants, comma-separated (default: all)")


def _variant_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated variant names")
    return names


def cmd_fit(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise FitError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    result = run_fit(args.dir, baseline=args.baseline, treatment=args.treatment,
                     bootstrap=args.bootstrap, seed=args.seed, plots=args.plots,
                     loss_field=args.loss, window=args.window, noise=args.noise,
                     out=args.out, variants=args.variants)  # fmt: skip
    print(json.dumps(result) if args.json else format_summary(result))
    return 0
