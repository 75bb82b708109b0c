"""Table-LR grid of results/table-lr-narrow: final validation loss per (variant, backbone) and
each JTok-M variant's gain over the baseline at the same backbone (1 - L / L_baseline), rows in
order of table LR. Writes summary.json beside results.jsonl and prints a markdown table.

    python3 results/table-lr-narrow/summary.py
"""

import json
from pathlib import Path

from jtok.fit import load_results

HERE = Path(__file__).parent


def main() -> None:
    runs = load_results(HERE)  # the validated reader of `jtok fit`
    loss: dict[str, dict[str, float]] = {}
    table_lr: dict[str, float] = {}
    for r in runs:
        loss.setdefault(r["variant"], {})[r["backbone"]] = r["final_val_loss"]
        # The baseline has no tables: its row goes first.
        has_tables = r["N_n"] > 0
        table_lr[r["variant"]] = r["config"]["train"]["table_lr_mult"] if has_tables else 0.0
    backbones = sorted({b for by_backbone in loss.values() for b in by_backbone},
                       key=lambda name: int(name[1:].split("-")[0]))  # fmt: skip
    base = loss["baseline"]
    summary = {
        variant: {b: {"loss": by_backbone[b],
                      "gain_pct": 100 * (1 - by_backbone[b] / base[b]) if b in base else None}
                  for b in backbones if b in by_backbone}
        for variant, by_backbone in sorted(loss.items(), key=lambda item: table_lr[item[0]])
    }  # fmt: skip
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
