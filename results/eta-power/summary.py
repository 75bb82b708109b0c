"""Claim (a) with power (results/eta-power): the slope of JTok-M's loss per doubling of eta,
from paired seeds, against the paper's -0.0118.

Each pool size is its own variant here (ne8 ... ne64), which `jtok fit` keeps apart (its eta
law needs three eta values within one variant), so this script fits the law itself:
- y = L(pool, seed) - L(baseline, seed): the same-seed baseline removes what a seed does to
  every variant alike (initial backbone, data order), so the line's noise is the noise of a
  paired difference, not of one run;
- x = log2 eta; ordinary least squares over every (pool, seed) point; the slope's SE from
  the residuals (n - 2 degrees of freedom), a 95% t interval, R^2;
- the same fit on the raw losses, for comparison;
- whether the law holds: the slope's interval excludes zero and the residual sd is no larger
  than the paired seed sd (the within-pool spread of the paired differences), i.e. the line
  leaves no curvature the seeds cannot explain.
- each pool's relative gain over the same-seed baseline, with a paired t interval over the
  seeds that ran both (the baseline ran at seeds 0-1 first, at seeds 2-9 from 2026-12-03);
- the within-seed fit, the estimate the target is judged on once seeds beyond s1 are in:
  loss = a_seed + slope * log2 eta over every pool run, a seed's own level removed by
  centring its runs (the baseline is not needed, so the added seeds run only the extreme
  pools, n_e 8 and 64, which carry the most information about the slope per run); the
  slope's SE with n - seeds - 1 degrees of freedom; and a lack-of-fit F test of the line
  against one free level per pool (the middle pools' levels are pinned by seeds 0 and 1
  alone): the law "holds" if the slope's interval excludes zero and the test does not
  reject the line (p > 0.05). With about 7 error degrees of freedom that is an absence of
  evidence against the line, not proof of it; the report says so.
Writes summary.json and within_seed.png (each run's loss minus its seed's mean, against log2
eta, with the within-seed line and the paper's slope) beside results.jsonl, and prints the
figures.

    python3 results/eta-power/summary.py
"""

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from jtok.studies.fit import load_results
from jtok.studies.fit.stats import fit_line, pooled_sd

HERE = Path(__file__).parent
PAPER_SLOPE = -0.0118  # loss per doubling of eta (METHOD.md)
TARGET_SE = 0.006  # issue 15: the slope resolved to this standard error


def interval(line) -> list[float] | None:
    if math.isnan(line.slope_se):
        return None
    half = float(stats.t.ppf(0.975, line.n - 2)) * line.slope_se
    return [line.slope - half, line.slope + half]


def centred_within_seeds(points: list[tuple[str, int, float, float]]):
    """(log2 eta, loss) of each run minus its seed's means: centring within a seed removes
    the seed's level, which is what the within-seed fit and its plot work on."""
    seed_of = np.asarray([s for _, s, _, _ in points])
    x = np.log2([e for _, _, e, _ in points])
    y = np.asarray([loss for _, _, _, loss in points])
    for seed in set(seed_of.tolist()):
        at = seed_of == seed
        x[at] -= x[at].mean()
        y[at] -= y[at].mean()
    return x, y


def within_seed_fit(points: list[tuple[str, int, float, float]]) -> dict | None:
    """The slope of loss on log2 eta with a free level per seed, and the line's lack of fit
    against a free level per pool (a two-way additive model: seed + pool)."""
    seeds = sorted({s for _, s, _, _ in points})
    pools = sorted({v for v, _, _, _ in points})
    y = np.asarray([loss for _, _, _, loss in points])
    seed_of = np.asarray([seeds.index(s) for _, s, _, _ in points])
    xc, yc = centred_within_seeds(points)
    sxx = float(xc @ xc)
    dof = len(points) - len(seeds) - 1
    if sxx == 0 or dof < 1:
        return None
    slope = float(xc @ yc) / sxx
    rss_line = float(((yc - slope * xc) ** 2).sum())
    se = math.sqrt(rss_line / dof / sxx)
    half = float(stats.t.ppf(0.975, dof)) * se
    out = {"slope": slope, "slope_se": se, "ci95": [slope - half, slope + half], "n": len(points),
           "seeds": len(seeds), "dof": dof, "residual_sd": math.sqrt(rss_line / dof),
           "r2_within": 1.0 - rss_line / float(yc @ yc) if float(yc @ yc) > 0 else 1.0}
    # Lack of fit: the additive model seed + pool (one level per pool) against the line.
    design = np.zeros((len(points), len(seeds) + len(pools) - 1))
    for row, (variant, _, _, _) in enumerate(points):
        design[row, seed_of[row]] = 1.0
        if pools.index(variant) > 0:
            design[row, len(seeds) + pools.index(variant) - 1] = 1.0
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    rss_full = float(((y - design @ coef) ** 2).sum())
    rank = int(np.linalg.matrix_rank(design))
    dof_full = len(points) - rank
    extra = rank - (len(seeds) + 1)  # the pools' free levels beyond the line's slope
    if dof_full > 0 and extra > 0 and rss_full > 0:
        f = ((rss_line - rss_full) / extra) / (rss_full / dof_full)
        out["lack_of_fit"] = {"F": f, "df": [extra, int(dof_full)],
                              "p": float(stats.f.sf(f, extra, dof_full))}  # fmt: skip
    else:
        out["lack_of_fit"] = None
    lof = out["lack_of_fit"]
    out["target_met"] = se <= TARGET_SE
    out["law_holds"] = (None if lof is None else
                        bool((slope + half < 0 or slope - half > 0) and lof["p"] > 0.05))
    return out


def main() -> None:
    runs = load_results(HERE)  # the validated reader of `jtok fit`
    base = {run["seed"]: run["final_val_loss"] for run in runs if run["eta"] == 0}
    points = [(run["variant"], run["seed"], run["eta"], run["final_val_loss"])
              for run in runs if run["eta"] > 0]  # fmt: skip
    paired = [(v, s, eta, loss - base[s]) for v, s, eta, loss in points if s in base]
    out: dict = {"paper_slope": PAPER_SLOPE, "target_se": TARGET_SE,
                 "points": [{"variant": v, "seed": s, "eta": e, "loss_minus_baseline": d}
                            for v, s, e, d in paired]}  # fmt: skip
    by_pool: dict[str, list[float]] = defaultdict(list)
    for variant, _, _, diff in paired:
        by_pool[variant].append(diff)
    seed_sd, dof = pooled_sd(list(by_pool.values()))
    out["paired_seed_sd"], out["paired_seed_dof"] = seed_sd, dof
    etas = {e for _, _, e, _ in paired}
    if len(etas) < 2:
        print(f"{len(paired)} paired points at {len(etas)} eta value(s): no line yet")
    else:
        for key, rows in (("paired", paired), ("raw", points)):
            x, y = np.log2([r[2] for r in rows]), np.asarray([r[3] for r in rows])
            line = fit_line(x, y)
            residual_sd = (math.sqrt(float(((y - line(x)) ** 2).sum()) / (line.n - 2))
                           if line.n > 2 else None)  # fmt: skip
            out[key] = {"slope": line.slope, "slope_se": None if math.isnan(line.slope_se)
                        else line.slope_se, "ci95": interval(line), "r2": line.r2,
                        "n": line.n, "residual_sd": residual_sd}  # fmt: skip
        fit = out["paired"]
        ci = fit["ci95"]
        fit["law_holds"] = (None if ci is None or seed_sd is None or fit["residual_sd"] is None
                            else bool((ci[1] < 0 or ci[0] > 0)
                                      and fit["residual_sd"] <= seed_sd))  # fmt: skip
        fit["target_met"] = None if fit["slope_se"] is None else fit["slope_se"] <= TARGET_SE
        for key in ("paired", "raw"):
            f = out[key]
            se = "-" if f["slope_se"] is None else f"{f['slope_se']:.4f}"
            shown = "-" if f["ci95"] is None else f"[{f['ci95'][0]:+.4f}, {f['ci95'][1]:+.4f}]"
            print(f"{key:6s} slope {f['slope']:+.4f} nats per doubling of eta (SE {se}, 95% CI "
                  f"{shown}), R^2 {f['r2']:.3f}, {f['n']} points")  # fmt: skip
        shown_sd = "-" if seed_sd is None else f"{seed_sd:.4f}"
        print(f"paper {PAPER_SLOPE:+.4f}; target SE <= {TARGET_SE}: {fit['target_met']}; "
              f"paired seed sd {shown_sd} ({dof} dof); law holds: {fit['law_holds']}")
    out["gains"] = pool_gains(points, base)
    for variant, g in out["gains"].items():
        shown = ("-" if g["ci95"] is None
                 else f"[{100 * g['ci95'][0]:+.2f}%, {100 * g['ci95'][1]:+.2f}%]")  # fmt: skip
        print(f"gain of {variant} over the same-seed baseline: mean {100 * g['mean']:+.2f}% "
              f"(95% CI {shown}, {g['seeds']} seeds; better at {g['better']})")  # fmt: skip
    within = within_seed_fit(points) if len({e for _, _, e, _ in points}) >= 2 else None
    out["within_seed"] = within
    if within is not None:
        lof = within["lack_of_fit"]
        lof_text = "-" if lof is None else (f"F {lof['F']:.2f} on {lof['df'][0]}, "
                                            f"{lof['df'][1]} df, p {lof['p']:.3f}")  # fmt: skip
        print(f"within-seed slope {within['slope']:+.4f} (SE {within['slope_se']:.4f}, 95% CI "
              f"[{within['ci95'][0]:+.4f}, {within['ci95'][1]:+.4f}], {within['seeds']} seeds, "
              f"{within['n']} runs); lack of fit: {lof_text}; target met: "
              f"{within['target_met']}; law holds: {within['law_holds']}")  # fmt: skip
    (HERE / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
    if within is not None:
        plot_within_seed(points, within)


def pool_gains(points: list[tuple[str, int, float, float]], base: dict[int, float]) -> dict:
    """Per pool: the relative gain 1 - L(pool) / L(baseline) at each seed that ran both, its
    mean and a paired t interval over seeds (the seed moves both runs' data order and
    initial backbone, so the pairs share that noise)."""
    by_pool: dict[str, list[float]] = defaultdict(list)
    eta_of = {}
    for variant, seed, eta, loss in points:
        eta_of[variant] = eta
        if seed in base:
            by_pool[variant].append(1.0 - loss / base[seed])
    out = {}
    for variant, gains in sorted(by_pool.items(), key=lambda kv: eta_of[kv[0]]):
        n = len(gains)
        mean = float(np.mean(gains))
        ci = None
        if n >= 2:
            half = float(stats.t.ppf(0.975, n - 1)) * float(np.std(gains, ddof=1)) / math.sqrt(n)
            ci = [mean - half, mean + half]
        out[variant] = {"mean": mean, "ci95": ci, "seeds": n, "gains": gains,
                        "better": f"{sum(g > 0 for g in gains)} of {n}"}  # fmt: skip
    return out


def plot_within_seed(points: list[tuple[str, int, float, float]], within: dict) -> None:
    """Each run's loss minus its seed's mean against log2 eta: the data the slope is fitted
    on, with the fitted line and a line of the paper's slope through the same centre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = centred_within_seeds(points)
    x_abs = np.log2([e for _, _, e, _ in points])
    shift = float(x_abs.mean())  # the axis shows absolute log2 eta
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(xs + shift, ys, s=18, alpha=0.7, label="runs (seed mean removed)")
    grid = np.linspace(min(x_abs), max(x_abs), 20)
    ci = within["ci95"]
    ax.plot(grid, within["slope"] * (grid - shift), color="C1",
            label=f"fit {within['slope']:+.4f}/doubling [{ci[0]:+.4f}, {ci[1]:+.4f}]")
    ax.plot(grid, PAPER_SLOPE * (grid - shift), color="C2", linestyle="--",
            label=f"paper {PAPER_SLOPE:+.4f}/doubling")
    ax.set_xlabel("log2 eta (N_n / N_c)")
    ax.set_ylabel("final val loss minus the seed's mean (nats)")
    ax.set_title(f"eta-power: JTok-M d128-L4, {within['n']} runs, {within['seeds']} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "within_seed.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
