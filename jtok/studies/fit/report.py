"""The fit's texts: REPORT_fit.md, the claims table against the paper, the summary lines.

Everything here reads the finished, JSON-ready result of `run_fit` and computes nothing
beyond picking the figures to show.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from jtok.studies.fit.isoflops import PAPER_FRONTIERS
from jtok.studies.fit.stats import paired_summary

# The paper's figures (METHOD.md) that the claims table sets ours against.
PAPER_CLAIMS = {"compute_saving": 0.35, "loss_gap": 0.022, "eta_slope": -0.0118,
                "eta_r2": 0.996, "relative_gain": (0.025, 0.03)}  # fmt: skip


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _ci(pair: list | None, pct: bool = True) -> str:
    if not pair:
        return ""
    return (f" [95% CI {_pct(pair[0])}, {_pct(pair[1])}]" if pct
            else f" [95% CI {pair[0]:.4f}, {pair[1]:.4f}]")  # fmt: skip


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]  # fmt: skip


def _headline(result: dict) -> dict:
    """The treatment's figures the paper makes claims about (None where not fitted)."""
    treat, iso = result["treatment"], result["isoflops"] or {}
    laws = [f for f in result["eta_law"] if f["variant"] == treat]
    # The paper's "flat across backbone sizes" is at one setting per size: leave out the
    # pairs of an eta sweep, which vary eta on purpose.
    swept = {(f["backbone"], f["amount"]) for f in laws}
    matched = [p for p in result["paired_gains"]
               if p["variant"] == treat and (p["backbone"], p["amount"]) not in swept]  # fmt: skip
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
                     f"{_pct(PAPER_CLAIMS['compute_saving'])} (their lines, our arithmetic: "
                     f"{_pct(paper['compute_saving'][1])})",
                     _pct(comp["compute_saving"][1]) + _ci(mid_ci["compute_saving"])])
        rows.append(["loss gap at equal compute (mid of budgets)",
                     _pct(PAPER_CLAIMS["loss_gap"]),
                     _pct(comp["loss_gap"][1]) + _ci(mid_ci["loss_gap"])])  # fmt: skip
    for name, paper_name in ((base, "baseline"), (treat, "jtokm")):
        if name in fronts:
            f, (m, k, r2) = fronts[name], PAPER_FRONTIERS[paper_name]
            rows.append([f"frontier {name}: log2 L = m log10 C + k",
                         f"{paper_name}: m {m}, k {k}, R² {r2}",
                         f"m {f['slope']:.4f}{_ci(f.get('slope_ci'), pct=False)}, "
                         f"k {f['intercept']:.4f}, R² {f['r2']:.4f}"])  # fmt: skip
    if h["eta_law"]:
        e = h["eta_law"]
        rows.append([f"eta law ({treat}, {e['backbone']}): loss per doubling of eta",
                     f"{PAPER_CLAIMS['eta_slope']} (R² {PAPER_CLAIMS['eta_r2']})",
                     f"{e['slope']:.4f} ± {e['slope_se']:.4f} (R² {e['r2']:.3f}, {e['n']} pts)"])
    if h["gains"]:
        lo, hi, g = *PAPER_CLAIMS["relative_gain"], h["gain_summary"]
        rows.append([f"relative loss gain of {treat} over {base} at equal backbone and budget",
                     f"{_pct(lo)} to {_pct(hi)}, flat across sizes",
                     f"{_pct(h['gains'][0])} to {_pct(h['gains'][1])}; mean "
                     f"{_pct(g['mean_gain'])}{_ci(g['mean_gain_ci'])}, better in {g['wins']} of "
                     f"{g['pairs']}"])  # fmt: skip
    return [dict(zip(("claim", "paper", "ours"), row, strict=True)) for row in rows]


def _profile_table(minima: list[dict]) -> list[str]:
    """Every isoFLOP run's loss, one row per (budget, backbone) and one column per profile,
    the lowest of each profile at each budget in bold: the table a reader checks a frontier
    against. Seeds or repeats at one backbone are averaged (their count shown)."""
    profiles = list(dict.fromkeys(m["variant"] for m in minima))
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    size: dict[tuple, float] = {}
    for m in minima:
        for backbone, (n_c, loss) in zip(m["backbones"], m["points"], strict=True):
            cells[(m["budget"], backbone)][m["variant"]].append(loss)
            size[(m["budget"], backbone)] = min(n_c, size.get((m["budget"], backbone), n_c))
    best = {}
    for (budget, _), per_profile in cells.items():
        for profile, losses in per_profile.items():
            mean = float(np.mean(losses))
            best[(budget, profile)] = min(mean, best.get((budget, profile), mean))
    rows = []
    for key in sorted(cells, key=lambda k: (k[0], size[k])):
        row = [f"{key[0]:.3g}", key[1], f"{size[key]:.3g}"]
        for profile in profiles:
            losses = cells[key].get(profile)
            if not losses:
                row.append("")
                continue
            mean = float(np.mean(losses))
            text = f"{mean:.4f}" + (f" (x{len(losses)})" if len(losses) > 1 else "")
            row.append(f"**{text}**" if mean == best[(key[0], profile)] else text)
        rows.append(row)
    return ["Loss per run (bold: the lowest of each profile at each budget):", "",
            *_table(["budget C", "backbone", "N_c", *profiles], rows)]  # fmt: skip


def format_report(result: dict) -> str:
    lines = ["# Scaling-law fit", "",
             f"Source: `{result['source']}`; {result['runs']} runs "
             f"({', '.join(f'{v}: {n}' for v, n in result['variants'].items())}); "
             f"loss = `{result['loss_field']}` (nats). Baseline `{result['baseline']}`, "
             f"treatment `{result['treatment']}`."
             + (" Only these variants (`--variants`)." if result["variant_filter"] else ""), "",
             "Absolute losses depend on data and tokenizer; the paper's figures compare through "
             "slopes and relative numbers.", ""]  # fmt: skip
    if result["claims"]:
        lines += ["## Claims: paper — ours", "",
                  *_table(["claim", "paper", "ours"], [list(c.values()) for c in result["claims"]])]
    if result["eta_law"]:
        lines += ["## Loss vs token parameters at a fixed backbone", "",
                  "loss = a + b log2(eta) (b = change per doubling; the same b fits log2 N_n).",
                  "", *_table(["variant", "backbone", "amount", "n", "b per doubling", "a",
                               "R²", "baseline loss", "gain at max eta"],
                              [[f["variant"], f["backbone"], f["amount"], f["n"],
                                f"{f['slope']:.4f} ± {f['slope_se']:.4f}", f"{f['intercept']:.4f}",
                                f"{f['r2']:.4f}",
                                _num(f["baseline_loss"]),
                                _pct(f["relative_gain_at_max_eta"])]
                               for f in result["eta_law"]])]  # fmt: skip
    if result["paired_gains"]:
        lines += ["## Same backbone and amount: gain over the baseline", "",
                  *_table(["variant", "backbone", "amount", "eta", "baseline loss", "loss", "gain"],
                          [[p["variant"], p["backbone"], p["amount"], f"{p['eta']:.2f}",
                            f"{p['baseline_loss']:.4f}", f"{p['loss']:.4f}",
                            _pct(p["relative_gain"])]
                           for p in result["paired_gains"]])]  # fmt: skip
        lines += ["Over all matched settings (mean with a 95% t interval, treating the settings "
                  "as independent draws; sign test on the wins):", "",
                  *_table(["variant", "settings", "wins", "mean gain", "sd", "sign test p"],
                          [[v, s["pairs"], s["wins"], _pct(s["mean_gain"]) + _ci(s["mean_gain_ci"]),
                            _pct(s["sd"]), "n/a" if s["sign_test_p"] is None
                            else f"{s['sign_test_p']:.3f}"]
                           for v, s in result["paired_summary"].items()])]  # fmt: skip
    iso = result["isoflops"]
    if iso:
        window = result.get("isoflop_window")
        fitted_to = (f" (fitted to the {window} sizes around each profile's best run)"
                     if window else "")  # fmt: skip
        lines += ["## isoFLOPs", "", f"Per (variant, budget): loss ~ quadratic in log10 N_c"
                  f"{fitted_to}; its vertex is the compute-optimal point unless it opens "
                  "downward or falls outside the fitted sizes (then the best observed point, "
                  "marked).", "",
                  *_table(["variant", "budget C", "runs", "sizes (fitted)", "N_opt", "D_opt",
                           "L_opt", "method", "C spent / C"],
                          [[m["variant"], f"{m['budget']:.3g}", m["n_points"],
                            f"{m['n_sizes']} ({m['fit_sizes']})",
                            f"{m['N_opt']:.4g}", f"{m['D_opt']:.4g}", f"{m['L_opt']:.4f}",
                            m["method"] + (f" ({m['reason']})" if m["reason"] else ""),
                            f"{m['flops_over_budget']:.3f}"] for m in iso["minima"]])]  # fmt: skip
        lines += _profile_table(iso["minima"])
        if iso["frontiers"]:
            lines += ["Frontiers log2 L_opt = m log10 C + k (N_opt ∝ C^a):", "",
                      *_table(["variant", "m", "k", "R²", "budgets", "a"],
                              [[v, f"{f['slope']:.4f}{_ci(f.get('slope_ci'), pct=False)}",
                                f"{f['intercept']:.4f}", f"{f['r2']:.4f}", f["n"],
                                f"{f['n_opt_exponent']:.3f}"]
                               for v, f in iso["frontiers"].items()])]  # fmt: skip
        for variant, c in iso["comparisons"].items():
            saving_ci = c.get("compute_saving_ci") or [None] * 3
            gap_ci = c.get("loss_gap_ci") or [None] * 3
            rows = [[f"compute saving at L = {loss:.4f}", _pct(s) + _ci(ci)]
                    for loss, s, ci in zip(c["points"]["loss"], c["compute_saving"], saving_ci,
                                           strict=True)]  # fmt: skip
            rows += [[f"loss gap at C = {comp:.3g}", _pct(g) + _ci(ci)]
                     for comp, g, ci in zip(c["points"]["compute"], c["loss_gap"], gap_ci,
                                            strict=True)]  # fmt: skip
            if c.get("fallback_points"):
                rows.append(["frontier points taken from a best observed run (biased up)",
                             str(c["fallback_points"])])  # fmt: skip
            lines += [f"{variant} vs {result['baseline']} (1 - C_{variant}/C_base at equal loss; "
                      f"1 - L_{variant}/L_base at equal compute; low, mid, high):", "",
                      *_table(["quantity", "value"], rows)]  # fmt: skip
        if iso["comparisons"]:
            lines += ["With an irreducible loss the true frontier bends (log L_opt is not linear "
                      "in log C) and the lines are chords of it, so part of any spread between "
                      "the low and high ends comes from that bend; the mid value is the one "
                      "to quote.", ""]  # fmt: skip
        if "bootstrap" in iso:
            b = iso["bootstrap"]
            residual = ("none" if b["residual_sigma"] is None
                        else f"{b['residual_sigma']:.4f} on {b['residual_dof']} degrees of "
                             "freedom")  # fmt: skip
            source = ("the pooled residual spread" if b["noise_source"] == "residuals"
                      else "the given noise")  # fmt: skip
            lines += [f"Bootstrap: {b['resamples']} parametric resamples (each profile's "
                      f"fitted quadratic plus Gaussian noise of {source}, sigma "
                      f"{b['noise_sigma']:.4f}; residual spread {residual}), seed {b['seed']}; "
                      f"{_pct(b['fallback_fraction'])} of resampled minima fell back to the "
                      "best observed point.", ""]  # fmt: skip
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
                  *_table(["law", "E", "A", "alpha", "B", "beta", "gamma", "objective",
                           "RMSE log"], rows)]  # fmt: skip
        if "effective" in par:
            lines += [f"Adding gamma lowers the objective by {_pct(par['relative_improvement'])}.",
                      ""]
    lines += ["## Paper's frontier lines, our arithmetic", "",
              "Evaluated at the low, geometric-mid and high end of the loss range both lines "
              "reach over 3e18..3e20: compute saving " + ", ".join(
                  _pct(s) for s in result["paper_check"]["compute_saving"])
              + "; loss gap " + ", ".join(_pct(g) for g in result["paper_check"]["loss_gap"])
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
                     f"loss {_pct(c['compute_saving'][1])}{_ci(saving_ci)} (paper 35%); loss gap "
                     f"at equal compute {_pct(c['loss_gap'][1])}{_ci(gap_ci)} (paper 2.2%)")
    par = result["parametric"]
    if par:
        p = par.get("effective") or par["plain"]
        lines.append(f"parametric: E={p['E']:.3f} A={p['A']:.3g} alpha={p['alpha']:.3f} "
                     f"B={p['B']:.3g} beta={p['beta']:.3f}"
                     + (f" gamma={p['gamma']:.3f} (objective -{_pct(par['relative_improvement'])})"
                        if p["gamma"] is not None else ""))  # fmt: skip
    lines += [f"note: {n}" for n in result["notes"]]
    out_dir = Path(result["output"])
    lines.append(f"wrote {', '.join(str(out_dir / f) for f in result['files'])}")
    return "\n".join(lines)
