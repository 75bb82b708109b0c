"""Seed noise at the second pass's settings, read from the studies that repeat seeds there
(results/gain-vs-size and results/eta-power: L = 4 backbones d64-d160, V = 2048, docs-en,
calibrated settings, seeds s0 and s1 at every setting they both ran).

For each study and overall:
- the sd of one run's final loss over seeds, pooled over the settings with two or more seeds,
  separately for the baseline and for JTok-M (every pool size), and both together;
- an F test of the two variances (is a JTok-M run noisier than a baseline run?);
- the sd of a same-seed difference JTok-M - baseline, pooled over settings (the noise of the
  paired comparisons these studies make; a JTok-M setting with no baseline of the same labels
  in its study is left out).
Writes second_pass.json beside this file and prints the figures.

    python3 results/seed-noise/second_pass.py
"""

import json
from collections import defaultdict
from pathlib import Path

from scipy import stats

from jtok.studies.fit import load_results
from jtok.studies.fit.stats import pooled_sd

HERE = Path(__file__).parent
STUDIES = ("gain-vs-size", "eta-power")


def setting_key(run: dict) -> tuple:
    """What a run's setting is, its seed left out: its study, variant and every other label
    (the study too, so two studies' runs with the same labels never merge when pooled)."""
    return (run["study"], *sorted((k, v) for k, v in run["labels"].items() if k != "seed"))


def spread(runs: list[dict]) -> dict:
    repeats: dict[tuple, dict[str, float]] = defaultdict(dict)
    for run in runs:
        repeats[setting_key(run)][run["labels"]["seed"]] = run["final_val_loss"]
    kinds: dict[str, list[list[float]]] = {"baseline": [], "jtokm": []}
    for key, by_seed in repeats.items():
        kind = "baseline" if dict(key[1:])["variant"] == "baseline" else "jtokm"
        kinds[kind].append(list(by_seed.values()))
    out: dict = {}
    for kind, groups in kinds.items():
        sd, dof = pooled_sd(groups)
        out[kind] = {"sd": sd, "dof": dof}
    sd, dof = pooled_sd(kinds["baseline"] + kinds["jtokm"])
    out["all"] = {"sd": sd, "dof": dof}
    b, j = out["baseline"], out["jtokm"]
    if b["dof"] and j["dof"] and b["sd"]:
        ratio = (j["sd"] / b["sd"]) ** 2
        out["variance_ratio_jtokm_to_baseline"] = ratio
        out["f_test_p_two_sided"] = float(
            min(1.0, 2 * min(stats.f.sf(ratio, j["dof"], b["dof"]),
                             stats.f.cdf(ratio, j["dof"], b["dof"])))  # fmt: skip
        )
    # Same-seed differences: each JTok-M setting against the baseline of its backbone.
    diffs: list[list[float]] = []
    for key, by_seed in repeats.items():
        labels = dict(key[1:])
        if labels["variant"] == "baseline":
            continue
        base_key = (key[0], *sorted({**labels, "variant": "baseline"}.items()))
        base = repeats.get(base_key, {})
        diffs.append([by_seed[s] - base[s] for s in by_seed if s in base])
    sd, dof = pooled_sd(diffs)
    out["same_seed_difference"] = {"sd": sd, "dof": dof}
    return out


def main() -> None:
    per_study = {name: [{**run, "study": name} for run in load_results(HERE.parent / name)]
                 for name in STUDIES}  # fmt: skip
    summary = {name: spread(runs) for name, runs in per_study.items()}
    summary["pooled"] = spread([run for runs in per_study.values() for run in runs])
    (HERE / "second_pass.json").write_text(json.dumps(summary, indent=2) + "\n")
    for name, s in summary.items():
        parts = [f"{k} sd {s[k]['sd']:.4f} ({s[k]['dof']} dof)"
                 for k in ("baseline", "jtokm", "all", "same_seed_difference")
                 if s[k]["sd"] is not None]  # fmt: skip
        test = ""
        if "f_test_p_two_sided" in s:
            ratio = s["variance_ratio_jtokm_to_baseline"]
            test = (f"; variance ratio JTok-M / baseline {ratio:.1f}, "
                    f"F test p = {s['f_test_p_two_sided']:.3f}")  # fmt: skip
        print(f"{name}: " + ", ".join(parts) + test)


if __name__ == "__main__":
    main()
