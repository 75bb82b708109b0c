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


# ---- seed spread and power -----------------------------------------------------------------

# Two-sided alpha 0.05, power 0.8: a true effect of (z_0.975 + z_0.8) standard errors is
# detected 80% of the time; 1.960 + 0.842 = 2.80.
ALPHA, POWER = 0.05, 0.8
Z_DETECT = 2.8016


def headline_pairs(pairs: list[dict], laws: list[dict], treatment: str) -> list[dict]:
    """The treatment's paired gains at one setting per (backbone, amount): the pairs of an eta
    sweep, which vary eta on purpose, are left out (the paper's "flat across sizes" is at
    one setting per size)."""
    swept = {(f["backbone"], f["amount"]) for f in laws if f["variant"] == treatment}
    return [p for p in pairs
            if p["variant"] == treatment and (p["backbone"], p["amount"]) not in swept]


def pooled_sd(groups: list[list[float]]) -> tuple[float | None, int]:
    """Within-group sd pooled over groups of 2 or more values, and its degrees of freedom."""
    ss = sum(float(((np.asarray(g) - np.mean(g)) ** 2).sum()) for g in groups if len(g) > 1)
    dof = sum(len(g) - 1 for g in groups if len(g) > 1)
    return (math.sqrt(ss / dof) if dof else None), dof


def seed_spread(runs: list[dict], baseline: str, treatment: str,
                loss_field: str = "final_val_loss") -> dict:  # fmt: skip
    """What repeated seeds in the results measure: the sd of one run's loss (runs that
    differ only in their seed, pooled over settings) and the sd of a same-seed difference
    treatment - baseline (in nats and as a relative gain 1 - L_t / L_b). None where no
    setting has two seeds."""
    repeats: dict[tuple, list[float]] = defaultdict(list)
    base_by: dict[tuple, dict] = defaultdict(dict)  # (backbone, amount) -> {seed: loss}
    treat_by: dict[tuple, dict] = defaultdict(dict)  # (backbone, amount, eta) -> {seed: loss}
    for run in runs:
        other = tuple(sorted((k, v) for k, v in run.get("labels", {}).items() if k != "seed"))
        where = (run["backbone"], _amount_key(run))
        repeats[(run["variant"], run["eta"], other, *where)].append(run[loss_field])
        if run["variant"] == baseline:
            base_by[where][run.get("seed")] = run[loss_field]
        elif run["variant"] == treatment:
            treat_by[(*where, run["eta"])][run.get("seed")] = run[loss_field]
    sigma, dof = pooled_sd(list(repeats.values()))
    diffs, gains = [], []
    for (*where, _), treat in treat_by.items():
        base = base_by.get(tuple(where), {})
        shared = [s for s in treat if s in base]
        diffs.append([treat[s] - base[s] for s in shared])
        gains.append([1 - treat[s] / base[s] for s in shared])
    diff_sd, diff_dof = pooled_sd(diffs)
    return {"sigma": sigma, "dof": dof, "diff_sd": diff_sd, "diff_dof": diff_dof,
            "gain_sd": pooled_sd(gains)[0]}  # fmt: skip


def power_analysis(runs: list[dict], pairs: list[dict], laws: list[dict], baseline: str,
                   treatment: str, noise: float | None, loss_field: str = "final_val_loss",
                   ) -> dict:  # fmt: skip
    """The smallest effects the design detects (two-sided alpha 0.05, power 0.8) given one
    run's loss sd: `noise` (a measured seed spread) or, without it, the spread of repeated
    seeds in the results.

    - Mean gain of the treatment over the baseline at matched settings: 2.80 sd_diff /
      sqrt(n), n the (setting, seed) pairs. sd_diff is the measured sd of a same-seed
      difference where the results repeat seeds; otherwise sqrt(2) sigma, the sd of the
      difference of two independent runs, an upper bound where pairs share their data order
      (results/seed-noise: 0.040 nats against sqrt(2) x 0.050 = 0.071). In relative terms it
      is divided by the matched baseline runs' mean loss. This is the noise floor only: the
      t interval of the mean gain also holds the real spread of gains across sizes.
    - Slope of each eta law: SE = sigma / sqrt(sum (log2 eta - mean)^2), detectable
      |slope| 2.80 SE: what its eta values allow, whatever the residuals of the fit."""
    spread = seed_spread(runs, baseline, treatment, loss_field)
    measured = spread["sigma"] if spread["sigma"] else None  # 0: repeats identical, no spread
    sigma = noise if noise is not None else measured
    source = ("--noise" if noise is not None else
              f"spread of repeated seeds ({spread['dof']} dof)" if sigma is not None else None)
    out: dict = {"alpha": ALPHA, "power": POWER, "z": Z_DETECT, "sigma": sigma,
                 "sigma_source": source, "seed_spread": spread, "pairs": None, "eta_laws": []}
    if sigma is None:
        return out
    matched = headline_pairs(pairs, laws, treatment)
    seeds: dict[tuple, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for run in runs:
        seeds[(run["backbone"], amount_label(run))][run["variant"]].add(run.get("seed"))
    n_pairs = sum(max(1, len(seeds[(p["backbone"], p["amount"])][baseline]
                             & seeds[(p["backbone"], p["amount"])][treatment]))
                  for p in matched)  # fmt: skip
    if n_pairs:
        diff_measured = bool(spread["diff_sd"])
        sd_diff = spread["diff_sd"] if diff_measured else math.sqrt(2) * sigma
        base_loss = float(np.mean([p["baseline_loss"] for p in matched]))
        out["pairs"] = {"variant": treatment, "n": n_pairs, "sd_diff": sd_diff,
                        "sd_diff_source": "measured same-seed differences" if diff_measured
                        else "sqrt(2) x sigma (independent runs)", "baseline_loss": base_loss,
                        "mde": Z_DETECT * sd_diff / math.sqrt(n_pairs),
                        "mde_gain": Z_DETECT * sd_diff / math.sqrt(n_pairs) / base_loss}
    for law in laws:
        spread_x = np.log2(law["etas"]) - np.mean(np.log2(law["etas"]))
        se = sigma / math.sqrt(float(spread_x @ spread_x))
        out["eta_laws"].append({"variant": law["variant"], "backbone": law["backbone"],
                                "amount": law["amount"], "n": law["n"], "slope_se": se,
                                "mde_slope": Z_DETECT * se})  # fmt: skip
    return out
