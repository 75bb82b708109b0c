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
Writes summary.json beside results.jsonl and prints the figures.

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
    (HERE / "summary.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
