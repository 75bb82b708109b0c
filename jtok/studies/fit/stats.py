"""Straight-line fits and the statistics of paired runs: the eta law, paired gains.

The eta law is loss = a + b log2(eta) for one variant at one backbone and training amount;
b is the loss change per doubling of token parameters. A paired gain is 1 - L / L_baseline
between runs at the same backbone and training amount.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from jtok.studies.fit.results import FitError


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
