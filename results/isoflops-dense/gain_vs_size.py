"""Does the gain of JTok / JTok-M over the baseline depend on the backbone's width or on the
run's length in steps? The two vary together across an isoFLOP grid (a wider model takes fewer
steps of the same budget) but not in lockstep (three budgets), so a least-squares fit of

    gain (%) = a + b log2(d_model) + c log2(steps)

over the matched (size, budget) settings separates them, for every variant against the
baseline (gain = 1 - L / L_baseline, final validation loss). Reads results.jsonl, writes
gain_vs_size.json beside it and prints it.

    python3 results/isoflops-dense/gain_vs_size.py [DIR]
"""

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from jtok.studies.fit import amount_label, load_results, paired_gains


def regress(runs: list[dict], variant: str) -> dict | None:
    rows, gains = [], []
    for pair in paired_gains(runs, "baseline"):  # seeds averaged, as in `jtok fit`
        if pair["variant"] != variant or not pair["amount"].startswith("C="):
            continue
        run = next(r for r in runs
                   if r["variant"] == variant and r["backbone"] == pair["backbone"]
                   and amount_label(r) == pair["amount"])  # fmt: skip
        steps = run["curve"][-1][0]  # the last curve point is the final step
        rows.append([1.0, np.log2(run["config"]["model"]["d_model"]), np.log2(steps)])
        gains.append(100 * pair["relative_gain"])
    if len(rows) < 4:
        return None
    x, y = np.array(rows), np.array(gains)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    dof = len(y) - x.shape[1]
    sigma2 = float(((y - x @ coef) ** 2).sum()) / dof
    se = np.sqrt(np.diag(sigma2 * np.linalg.inv(x.T @ x)))
    half = stats.t.ppf(0.975, dof) * se
    return {
        "settings": len(y),
        "per_doubling_of_width_pct": float(coef[1]),
        "per_doubling_of_width_ci95": [float(coef[1] - half[1]), float(coef[1] + half[1])],
        "per_doubling_of_steps_pct": float(coef[2]),
        "per_doubling_of_steps_ci95": [float(coef[2] - half[2]), float(coef[2] + half[2])],
        "correlation_log_width_log_steps": float(np.corrcoef(x[:, 1], x[:, 2])[0, 1]),
    }  # fmt: skip


def main() -> None:
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    runs = load_results(directory)
    variants = sorted({r["variant"] for r in runs} - {"baseline"})
    result = {v: regress(runs, v) for v in variants}
    (directory / "gain_vs_size.json").write_text(json.dumps(result, indent=2) + "\n")
    for variant, r in result.items():
        if r is None:
            print(f"{variant}: fewer than 4 matched settings")
            continue
        w, s = r["per_doubling_of_width_ci95"], r["per_doubling_of_steps_ci95"]
        print(f"{variant} ({r['settings']} settings): gain {r['per_doubling_of_width_pct']:+.2f}% "
              f"per doubling of d_model [95% CI {w[0]:+.2f}, {w[1]:+.2f}], "
              f"{r['per_doubling_of_steps_pct']:+.2f}% per doubling of steps "
              f"[95% CI {s[0]:+.2f}, {s[1]:+.2f}]")  # fmt: skip


if __name__ == "__main__":
    main()
