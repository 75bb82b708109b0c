"""Table-LR grid of results/table-lr-narrow: final validation loss per (variant, backbone) and
each JTok-M variant's gain over the baseline at the same backbone (1 - L / L_baseline), rows in
order of table LR. Writes summary.json beside results.jsonl and prints a markdown table.

    python3 results/table-lr-narrow/summary.py
"""

import json
from pathlib import Path

from jtok.studies.fit import load_results, paired_gains

HERE = Path(__file__).parent


def main() -> None:
    runs = load_results(HERE)  # the validated reader of `jtok fit`
    pairs = paired_gains(runs, "baseline")
    # The baseline has no tables: table LR 0 puts its row first.
    table_lr = {r["variant"]: r["config"]["train"]["table_lr_mult"] if r["N_n"] > 0 else 0.0
                for r in runs}  # fmt: skip
    summary: dict[str, dict[str, dict]] = {"baseline": {}}
    for p in pairs:
        summary["baseline"][p["backbone"]] = {"loss": p["baseline_loss"], "gain_pct": 0.0}
        summary.setdefault(p["variant"], {})[p["backbone"]] = {
            "loss": p["loss"], "gain_pct": 100 * p["relative_gain"]}
    summary = dict(sorted(summary.items(), key=lambda item: table_lr[item[0]]))
    backbones = sorted(summary["baseline"], key=lambda name: int(name[1:].split("-")[0]))
    (HERE / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| variant | table LR | " + " | ".join(backbones) + " |")
    print("|---|---|" + "---|" * len(backbones))
    for variant, cells in summary.items():
        row = [f"{cells[b]['loss']:.4f} ({cells[b]['gain_pct']:+.1f}%)" if b in cells else ""
               for b in backbones]  # fmt: skip
        multiplier = f"x{table_lr[variant]:g}" if table_lr[variant] else "-"
        print(f"| {variant} | {multiplier} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
