"""Seed spread of results/seed-noise: per variant the mean, standard deviation and range of
the final validation loss over seeds, and the per-seed JTok-M - baseline difference (the same
seed gives both the same batches) with a 95% t interval on its mean. Writes summary.json
beside results.jsonl and prints it.

    python3 results/seed-noise/summary.py
"""

import json
import statistics
from pathlib import Path

from jtok.studies.fit import load_results, t_interval

HERE = Path(__file__).parent


def main() -> None:
    runs = load_results(HERE)  # the validated reader of `jtok fit`
    by_variant: dict[str, dict[str, float]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], {})[r["labels"]["seed"]] = r["final_val_loss"]
    summary = {}
    for variant, losses in sorted(by_variant.items()):
        values = list(losses.values())
        summary[variant] = {
            "seeds": len(values), "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "losses": losses,
        }  # fmt: skip
    base, treat = by_variant.get("baseline", {}), by_variant.get("jtokm", {})
    shared = sorted(set(base) & set(treat))
    if shared:
        diffs = [treat[s] - base[s] for s in shared]
        gains = [1 - treat[s] / base[s] for s in shared]
        summary["paired"] = {
            "seeds": shared, "jtokm_minus_baseline": diffs,
            "mean": statistics.mean(diffs),
            "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
            "mean_ci95": t_interval(diffs),
            "relative_gains": gains,
            "relative_gain_mean": statistics.mean(gains),
            "relative_gain_ci95": t_interval(gains),
        }  # fmt: skip
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for variant, s in summary.items():
        sd = "n/a" if s["sd"] is None else f"{s['sd']:.4f}"
        if variant == "paired":
            gain, ci = 100 * s["relative_gain_mean"], s["relative_gain_ci95"]
            ci_text = "" if ci is None else f" [95% CI {100 * ci[0]:.2f}%, {100 * ci[1]:.2f}%]"
            print(f"jtokm - baseline, same seed: mean {s['mean']:+.4f}, sd {sd} over "
                  f"{len(s['seeds'])} seeds; mean gain {gain:.2f}%{ci_text}")  # fmt: skip
        else:
            print(f"{variant}: mean {s['mean']:.4f}, sd {sd}, range {s['min']:.4f}-{s['max']:.4f} "
                  f"over {s['seeds']} seeds")  # fmt: skip


if __name__ == "__main__":
    main()
