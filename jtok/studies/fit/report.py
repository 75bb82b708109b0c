"""The fit's texts: REPORT_fit.md, the claims table against the paper, the summary lines.

Everything here reads the finished, JSON-ready result of `run_fit` and computes nothing
beyond picking the figures to show.
"""

from __future__ import annotations

from pathlib import Path

from jtok.studies.fit.frontier import PAPER_FRONTIERS, PAPER_LOSS_GAP
from jtok.studies.fit.isoflop_report import PARAM_WORDS, isoflop_section
from jtok.studies.fit.markdown import ci, num, pct, table
from jtok.studies.fit.stats import headline_pairs, paired_summary

# The paper's figures (METHOD.md) that the claims table sets ours against.
PAPER_CLAIMS = {"compute_saving": 0.35, "loss_gap": 0.022, "eta_slope": -0.0118,
                "eta_r2": 0.996, "relative_gain": (0.025, 0.03)}  # fmt: skip


def _headline(result: dict) -> dict:
    """The treatment's figures the paper makes claims about (None where not fitted)."""
    treat, iso = result["treatment"], result["isoflops"] or {}
    laws = [f for f in result["eta_law"] if f["variant"] == treat]
    matched = headline_pairs(result["paired_gains"], result["eta_law"], treat)
    gains = [p["relative_gain"] for p in matched]
    return {
        "gain_summary": paired_summary(matched).get(treat),
        "comparison": iso.get("comparisons", {}).get(treat),
        "frontiers": iso.get("frontiers", {}),
        "eta_law": max(laws, key=lambda f: f["n"]) if laws else None,
        "gains": (min(gains), max(gains)) if gains else None,
    }


def paper_claims(result: dict) -> list[dict]:
    """Each paper claim the data can speak to: {"claim", "paper", "ours"} (ours with its CI)."""
    h, paper = _headline(result), result["paper_check"]
    base, treat = result["baseline"], result["treatment"]
    comp, fronts = h["comparison"], h["frontiers"]
    rows = []
    if comp:
        mid_ci = {k: (comp.get(f"{k}_ci") or [None] * 3)[1] for k in ("compute_saving", "loss_gap")}
        rows.append(["compute saving at equal loss (mid of loss range)",
                     f"{pct(PAPER_CLAIMS['compute_saving'])} (their lines, our arithmetic: "
                     f"{pct(paper['compute_saving'][1])})",
                     pct(comp["compute_saving"][1]) + ci(mid_ci["compute_saving"])])
        if base in fronts:
            rows.append(_implied_saving_row(comp, fronts[base], paper))
        rows.append(["loss gap at equal compute (mid of budgets)",
                     pct(PAPER_CLAIMS["loss_gap"]),
                     pct(comp["loss_gap"][1]) + ci(mid_ci["loss_gap"])])  # fmt: skip
    for name, paper_name in ((base, "baseline"), (treat, "jtokm")):
        if name in fronts:
            f, (m, k, r2) = fronts[name], PAPER_FRONTIERS[paper_name]
            rows.append([f"frontier {name}: log2 L = m log10 C + k",
                         f"{paper_name}: m {m}, k {k}, R² {r2}",
                         f"m {f['slope']:.4f}{ci(f.get('slope_ci'), percent=False)}, "
                         f"k {f['intercept']:.4f}, R² {f['r2']:.4f}"])  # fmt: skip
    if h["eta_law"]:
        e = h["eta_law"]
        rows.append([f"eta law ({treat}, {e['backbone']}): loss per doubling of eta",
                     f"{PAPER_CLAIMS['eta_slope']} (R² {PAPER_CLAIMS['eta_r2']})",
                     f"{e['slope']:.4f} ± {e['slope_se']:.4f} (R² {e['r2']:.3f}, {e['n']} pts)"])
    if h["gains"]:
        lo, hi, g = *PAPER_CLAIMS["relative_gain"], h["gain_summary"]
        rows.append([f"relative loss gain of {treat} over {base} at equal backbone and budget",
                     f"{pct(lo)} to {pct(hi)}, flat across sizes",
                     f"{pct(h['gains'][0])} to {pct(h['gains'][1])}; mean "
                     f"{pct(g['mean_gain'])}{ci(g['mean_gain_ci'])}, better in {g['wins']} of "
                     f"{g['pairs']}"])  # fmt: skip
    return [dict(zip(("claim", "paper", "ours"), row, strict=True)) for row in rows]


def _implied_saving_row(comp: dict, base_front: dict, paper: dict) -> list[str]:
    """The saving a loss gap implies at a frontier's slope, for our gap and the paper's: ties
    the paper's 2.2% to a slope, which ours does not share (`frontier.implied_saving`)."""
    m = PAPER_FRONTIERS["baseline"][0]
    return ["compute saving implied by the loss gap at the baseline frontier's slope "
            "(parallel lines: 1 - 10^(-log2(1 - gap) / m))",
            f"{pct(PAPER_LOSS_GAP)} at m {m}: {pct(paper['stated_gap_implied_saving'])} "
            f"(stated: {pct(PAPER_CLAIMS['compute_saving'])})",
            f"our gap {pct(comp['loss_gap'][1])} at our m {base_front['slope']:.3f}: "
            f"{pct(comp['implied_saving'])}{ci(comp.get('implied_saving_ci'))}; the paper's "
            f"{pct(PAPER_LOSS_GAP)} at our m: {pct(base_front['paper_gap_implied_saving'])}"
            f"{ci(base_front.get('paper_gap_implied_saving_ci'))}"]  # fmt: skip


def power_line(result: dict) -> str:
    """The smallest effects the design detects (`stats.power_analysis`), in one paragraph."""
    power, treat, base = result["power"], result["treatment"], result["baseline"]
    parts = []
    if power["sigma"] is None:
        head = ("Power (two-sided alpha 0.05, power 0.8): no seed spread is known (one seed per "
                "setting and no `--noise SIGMA`), so no smallest detectable gain or slope; give "
                "`--noise`, a measured sd of one run's loss")  # fmt: skip
    else:
        head = (f"Power (two-sided alpha 0.05, power 0.8; one run's loss sd "
                f"{power['sigma']:.4f} nats, {power['sigma_source']}). Smallest detectable")
        pairs = power["pairs"]
        if pairs:
            parts.append(f"mean gain of {treat} over {base} at matched settings "
                         f"{pct(pairs['mde_gain'])} ({pairs['mde']:.4f} nats; {pairs['n']} "
                         f"pairs, sd of a paired difference {pairs['sd_diff']:.4f} nats from "
                         f"{pairs['sd_diff_source']}; 2.80 sd / sqrt(n))")  # fmt: skip
        for law in power["eta_laws"]:
            parts.append(f"eta-law slope ({law['variant']}, {law['backbone']}, {law['amount']}, "
                         f"{law['n']} points) {law['mde_slope']:.4f} per doubling (2.80 SE, SE "
                         f"{law['slope_se']:.4f} = sigma / sqrt(sum (log2 eta - mean)^2))")
    if power.get("saving"):
        parts.append(f"compute saving of {treat} at equal loss ±{pct(power['saving']['mde'])} "
                     "(2.80 / 1.96 x the half-width of its bootstrap interval)")  # fmt: skip
    if power["sigma"] is None:
        return head + ("; the compute saving resolved: " + parts[0] if parts else "") + "."
    return head + (": " + "; ".join(parts) if parts else ": nothing to compare") + "."


def format_report(result: dict) -> str:
    lines = ["# Scaling-law fit", "",
             f"Source: `{result['source']}`; {result['runs']} runs "
             f"({', '.join(f'{v}: {n}' for v, n in result['variants'].items())}); "
             f"loss = `{result['loss_field']}` (nats). Baseline `{result['baseline']}`, "
             f"treatment `{result['treatment']}`."
             + (" Only these variants (`--variants`)." if result["variant_filter"] else ""), "",
             f"N_c counts {PARAM_WORDS[result.get('params', 'all')]} (`--params "
             f"{result.get('params', 'all')}`). Absolute losses depend on data and tokenizer; "
             "the paper's figures compare through slopes and relative numbers.", "",
             power_line(result), ""]  # fmt: skip
    if result["claims"]:
        lines += ["## Claims: paper — ours", "",
                  *table(["claim", "paper", "ours"], [list(c.values()) for c in result["claims"]])]
    if result["eta_law"]:
        lines += ["## Loss vs token parameters at a fixed backbone", "",
                  "loss = a + b log2(eta) (b = change per doubling; the same b fits log2 N_n).",
                  "", *table(["variant", "backbone", "amount", "n", "b per doubling", "a",
                               "R²", "baseline loss", "gain at max eta"],
                              [[f["variant"], f["backbone"], f["amount"], f["n"],
                                f"{f['slope']:.4f} ± {f['slope_se']:.4f}", f"{f['intercept']:.4f}",
                                f"{f['r2']:.4f}",
                                num(f["baseline_loss"]),
                                pct(f["relative_gain_at_max_eta"])]
                               for f in result["eta_law"]])]  # fmt: skip
    if result["paired_gains"]:
        lines += ["## Same backbone and amount: gain over the baseline", "",
                  *table(["variant", "backbone", "amount", "eta", "baseline loss", "loss", "gain"],
                          [[p["variant"], p["backbone"], p["amount"], f"{p['eta']:.2f}",
                            f"{p['baseline_loss']:.4f}", f"{p['loss']:.4f}",
                            pct(p["relative_gain"])]
                           for p in result["paired_gains"]])]  # fmt: skip
        lines += ["Over all matched settings (mean with a 95% t interval, treating the settings "
                  "as independent draws; sign test on the wins):", "",
                  *table(["variant", "settings", "wins", "mean gain", "sd", "sign test p"],
                          [[v, s["pairs"], s["wins"], pct(s["mean_gain"]) + ci(s["mean_gain_ci"]),
                            pct(s["sd"]), "n/a" if s["sign_test_p"] is None
                            else f"{s['sign_test_p']:.3f}"]
                           for v, s in result["paired_summary"].items()])]  # fmt: skip
    lines += isoflop_section(result)
    par = result["parametric"]
    if par:
        rows = [[name, f"{p['E']:.4f}", f"{p['A']:.4g}", f"{p['alpha']:.4f}", f"{p['B']:.4g}",
                 f"{p['beta']:.4f}", "—" if p["gamma"] is None else f"{p['gamma']:.4f}",
                 f"{p['objective']:.3e}", f"{p['rmse_log']:.4f}"]
                for name, p in (("plain", par["plain"]), ("N_eff", par.get("effective")))
                if p]  # fmt: skip
        lines += ["## Parametric law", "",
                  f"L = E + A / N^alpha + B / D^beta on {par['runs']} runs of "
                  f"{' + '.join(par['variants'])}, Huber (delta {par['delta']}) on log residuals; "
                  "N_eff variant: N = N_c (1 + eta gamma).", "",
                  *table(["law", "E", "A", "alpha", "B", "beta", "gamma", "objective",
                           "RMSE log"], rows)]  # fmt: skip
        if "effective" in par:
            lines += [f"Adding gamma lowers the objective by {pct(par['relative_improvement'])}.",
                      ""]
    lines += ["## Paper's frontier lines, our arithmetic", "",
              "Evaluated at the low, geometric-mid and high end of the loss range both lines "
              "reach over 3e18..3e20: compute saving " + ", ".join(
                  pct(s) for s in result["paper_check"]["compute_saving"])
              + "; loss gap " + ", ".join(pct(g) for g in result["paper_check"]["loss_gap"])
              + " (the paper states 35% and 2.2%).", ""]  # fmt: skip
    if result["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in result["notes"]), ""]
    if len(result["files"]) > 2:
        lines += ["## Figures", "", *(f"![{f}]({f})" for f in result["files"][2:]), ""]
    return "\n".join(lines)


def format_summary(result: dict) -> str:
    h = _headline(result)
    lines = []
    if h["eta_law"]:
        e = h["eta_law"]
        lines.append(f"eta law ({e['variant']}, {e['backbone']}): {e['slope']:+.4f} loss per "
                     f"doubling of eta, R^2 {e['r2']:.3f} ({e['n']} points)")  # fmt: skip
    for variant, f in h["frontiers"].items():
        lines.append(f"frontier {variant}: log2 L = {f['slope']:.4f} log10 C + "
                     f"{f['intercept']:.4f} (R^2 {f['r2']:.4f}, {f['n']} budgets)")  # fmt: skip
    if h["comparison"]:
        c = h["comparison"]
        saving_ci = (c.get("compute_saving_ci") or [None] * 3)[1]
        gap_ci = (c.get("loss_gap_ci") or [None] * 3)[1]
        lines.append(f"{result['treatment']} vs {result['baseline']}: compute saving at equal "
                     f"loss {pct(c['compute_saving'][1])}{ci(saving_ci)} (paper 35%); loss gap "
                     f"at equal compute {pct(c['loss_gap'][1])}{ci(gap_ci)} (paper 2.2%)")
        base_front = h["frontiers"].get(result["baseline"])
        if base_front:
            lines.append(f"implied by the loss gap at our baseline slope "
                         f"{base_front['slope']:.4f}: saving {pct(c['implied_saving'])}"
                         f"{ci(c.get('implied_saving_ci'))}; "
                         f"the paper's 2.2% there: {pct(base_front['paper_gap_implied_saving'])} "
                         f"(at the paper's slope: "
                         f"{pct(result['paper_check']['stated_gap_implied_saving'])})")
    edges = (result["isoflops"] or {}).get("edge_minima", [])
    if edges:
        kept = result["isoflops"]["include_edge_minima"]
        lines.append(f"{len(edges)} isoFLOP minima at the grid's edge, "
                     + ("kept: " if kept else "left out of the frontiers: ")
                     + ", ".join(f"{e['variant']} C={e['budget']:.3g}" for e in edges))
    lines.append(power_line(result))
    par = result["parametric"]
    if par:
        p = par.get("effective") or par["plain"]
        lines.append(f"parametric: E={p['E']:.3f} A={p['A']:.3g} alpha={p['alpha']:.3f} "
                     f"B={p['B']:.3g} beta={p['beta']:.3f}"
                     + (f" gamma={p['gamma']:.3f} (objective {_change(par)})"
                        if p["gamma"] is not None else ""))  # fmt: skip
    lines += [f"note: {n}" for n in result["notes"]]
    out_dir = Path(result["output"])
    lines.append(f"wrote {', '.join(str(out_dir / f) for f in result['files'])}")
    return "\n".join(lines)


def _change(par: dict) -> str:
    """The objective's relative change from adding gamma, signed ("-3.2%"; "+0.0%", never
    "--0.0%" when the improvement is a negative zero)."""
    value = par.get("relative_improvement")
    return "n/a" if value is None else f"{-100 * value + 0.0:+.1f}%"
