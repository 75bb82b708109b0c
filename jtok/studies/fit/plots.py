"""The fit's PNG figures: eta law, isoFLOP profiles, frontiers, parametric law."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jtok.studies.fit.parametric import ParametricFit


def write_plots(result: dict, runs: list[dict], directory: Path) -> list[str]:
    """The figures the data supports; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(name)

    loss_key = result["loss_field"]
    if result["eta_law"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for i, f in enumerate(result["eta_law"]):
            colour = f"C{i}"
            label = f"{f['variant']} {f['backbone']} {f['amount']}"
            ax.plot(f["etas"], f["losses"], "o", color=colour, label=label)
            xs = np.geomspace(min(f["etas"]), max(f["etas"]), 50)
            ax.plot(xs, f["intercept"] + f["slope"] * np.log2(xs), "-", color=colour,
                    label=f"fit: {f['slope']:+.4f} per doubling, R² {f['r2']:.3f}")  # fmt: skip
            if f["baseline_loss"] is not None:
                ax.axhline(f["baseline_loss"], color=colour, ls="--", lw=1,
                           label=f"baseline {f['backbone']}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set(xlabel="eta = N_n / N_c", ylabel="validation loss", title="loss vs eta")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "fit_eta.png")
    iso = result["isoflops"]
    if iso:
        fig, ax = plt.subplots(figsize=(7, 4.6))
        budgets = sorted({m["budget"] for m in iso["minima"]})
        variants = sorted({m["variant"] for m in iso["minima"]})
        styles = ["-", "--", ":", "-."]
        for m in iso["minima"]:
            colour = f"C{budgets.index(m['budget']) % 10}"
            style = styles[variants.index(m["variant"]) % len(styles)]
            ns, ls = zip(*m["points"], strict=True)
            ax.plot(ns, ls, "o" if style == "-" else "s", color=colour, ms=4, mfc="none")
            x = np.linspace(*np.log10(m["fit_range"]), 60)
            c2, c1, c0 = m["coeffs"]
            ax.plot(10**x, c2 * x**2 + c1 * x + c0, style, color=colour,
                    label=f"{m['variant']} C={m['budget']:.2g}")  # fmt: skip
            # hollow: a minimum at the grid's edge, left out of the frontier
            ax.plot(m["N_opt"], m["L_opt"], "*" if m["in_range"] else "X", color=colour, ms=12,
                    mec="black", mfc=colour if m.get("in_frontier", True) else "none")
        ax.set_xscale("log")
        ax.set(xlabel="N_c (active backbone parameters)", ylabel="validation loss",
               title="isoFLOP profiles (star: minimum; X: best observed, vertex unusable;\n"
                     "hollow: at the grid's edge, not in the frontier)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "fit_isoflops.png")
        if iso["frontiers"]:
            fig, ax = plt.subplots(figsize=(6.5, 4.2))
            for i, (variant, f) in enumerate(iso["frontiers"].items()):
                pts = [(m["compute"], m["L_opt"]) for m in iso["minima"]
                       if m["variant"] == variant and m.get("in_frontier", True)]
                cs, ls = zip(*pts, strict=True)
                ax.plot(np.log10(cs), np.log2(ls), "o", color=f"C{i}")
                x = np.linspace(min(np.log10(cs)), max(np.log10(cs)), 20)
                ax.plot(x, f["intercept"] + f["slope"] * x, "-", color=f"C{i}",
                        label=f"{variant}: {f['slope']:.4f} log10 C + {f['intercept']:.4f}")
            ax.set(xlabel="log10 C (FLOPs)", ylabel="log2 L_opt", title="compute-optimal frontier")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, "fit_frontier.png")
    par = result["parametric"]
    if par:
        fig, ax = plt.subplots(figsize=(5.2, 5))
        chosen = [r for r in runs if r["variant"] in par["variants"]]
        observed = np.array([r[loss_key] for r in chosen])
        for name, p in (("plain", par["plain"]), ("N_eff", par.get("effective"))):
            if p:
                fit = ParametricFit(**p)
                pred = fit.predict([r["N_c"] for r in chosen], [r["tokens"] for r in chosen],
                                   [r["eta"] for r in chosen])  # fmt: skip
                ax.plot(observed, pred, "o", ms=4, alpha=0.7,
                        label=f"{name} (RMSE log {p['rmse_log']:.4f})")  # fmt: skip
        lo, hi = observed.min(), observed.max()
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set(xlabel="observed loss", ylabel="predicted loss", title="parametric law")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "fit_parametric.png")
    return written
