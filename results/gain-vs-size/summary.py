"""Gain across sizes (results/gain-vs-size): the paired relative gain of JTok-M over the
baseline per backbone, with 95% t intervals, and its trend against log2 N_c.

Per size and seed, gain = 1 - L_jtokm / L_baseline (same seed: same initial backbone and
data order). A size's interval uses the sd of the per-seed gains pooled over all sizes
with two or more seeds (degrees of freedom: the sum of seeds - 1), since two seeds alone
give one degree of freedom. The trend is the least-squares slope of the per-size mean
gain against log2 N_c, both without and with the embedding and head, with the SE that the
pooled seed sd implies (sd / sqrt(seeds) / sqrt(sum of squared deviations of log2 N_c)).
Writes summary.json beside results.jsonl and prints a markdown table.

    python3 results/gain-vs-size/summary.py
"""

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from jtok.studies.fit import load_results
from jtok.studies.fit.stats import pooled_sd

HERE = Path(__file__).parent


def main() -> None:
    runs = load_results(HERE)  # the validated reader of `jtok fit`
    loss: dict[tuple[str, str, str], float] = {}
    size: dict[str, tuple[int, int | None]] = {}
    for run in runs:
        loss[(run["backbone"], run["seed"], run["variant"])] = run["final_val_loss"]
        if run["variant"] == "baseline":
            size[run["backbone"]] = (run["N_c_all"], run["N_c_non_embedding"])
    gains: dict[str, list[float]] = defaultdict(list)
    for (backbone, seed, variant), value in sorted(loss.items()):
        base = loss.get((backbone, seed, "baseline"))
        if variant != "baseline" and base is not None:
            gains[backbone].append(1 - value / base)
    backbones = sorted(gains, key=lambda name: size[name][0])
    # Within-size spread of the per-seed gains, pooled over sizes.
    sd, dof = pooled_sd(list(gains.values()))
    t95 = float(stats.t.ppf(0.975, dof)) if dof else None
    rows = []
    for name in backbones:
        mean = float(np.mean(gains[name]))
        half = t95 * sd / math.sqrt(len(gains[name])) if sd is not None else None
        rows.append({"backbone": name, "N_c": size[name][0], "N_c_non_embedding": size[name][1],
                     "seeds": len(gains[name]), "gains": gains[name], "mean_gain": mean,
                     "ci95": None if half is None else [mean - half, mean + half]})
    trends = {}
    for key in ("N_c_non_embedding", "N_c"):
        x = np.log2([r[key] for r in rows if r[key]])
        y = np.asarray([r["mean_gain"] for r in rows if r[key]])
        if len(x) < 2:
            continue
        slope = float(np.polyfit(x, y, 1)[0])
        seeds = min(r["seeds"] for r in rows)
        spread = float(((x - x.mean()) ** 2).sum())
        se = sd / math.sqrt(seeds) / math.sqrt(spread) if sd is not None else None
        trends[key] = {"slope_per_doubling": slope, "slope_se": se, "sizes": len(x)}
    summary = {"sizes": rows, "pooled_gain_sd": sd, "dof": dof, "trend": trends}
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| size | N_c non-embedding | N_c | seeds | gain per seed | mean gain | 95% CI |")
    print("|---|---:|---:|---:|---|---:|---|")
    for r in rows:
        low, high = r["ci95"] or (None, None)
        ci = "-" if low is None else f"[{100 * low:+.2f}%, {100 * high:+.2f}%]"
        per_seed = ", ".join(f"{100 * g:+.2f}%" for g in r["gains"])
        print(f"| {r['backbone']} | {r['N_c_non_embedding']:,} | {r['N_c']:,} | {r['seeds']} | "
              f"{per_seed} | {100 * r['mean_gain']:+.2f}% | {ci} |")
    shown_sd = "-" if sd is None else f"{100 * sd:.2f}%"
    print(f"\npooled sd of a seed's gain: {shown_sd} ({dof} degrees of freedom)")
    for key, t in trends.items():
        se = "-" if t["slope_se"] is None else f"{100 * t['slope_se']:.2f}"
        print(f"trend vs log2 {key}: {100 * t['slope_per_doubling']:+.2f} points of gain per "
              f"doubling (SE {se}; {t['sizes']} sizes)")


if __name__ == "__main__":
    main()
