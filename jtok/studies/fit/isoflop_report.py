"""The isoFLOPs section of REPORT_fit.md: minima (edge flags, both parameter counts), every
run's loss, frontiers, comparisons with the savings a loss gap implies, and how the
bootstrap drew its intervals. Reads the JSON-ready result of `run_fit`; computes nothing."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from jtok.studies.fit.frontier import PAPER_LOSS_GAP
from jtok.studies.fit.markdown import ci, pct, table

PARAM_WORDS = {"all": "all backbone parameters (input embedding and head included)",
               "non-embedding": "backbone parameters without the input embedding and head"}


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _minima_table(minima: list[dict], params: str) -> list[str]:
    other = "N_opt_non_embedding" if params == "all" else "N_opt_all"
    other_name = "N_opt non-emb." if params == "all" else "N_opt all"
    rows = [[m["variant"], f"{m['budget']:.3g}", m["n_points"],
             f"{m['n_sizes']} ({m['fit_sizes']})", f"{m['N_opt']:.4g}", _count(m.get(other)),
             f"{m['D_opt']:.4g}", f"{m['L_opt']:.4f}",
             m["method"] + (f" ({m['reason']})" if m["reason"] else ""),
             (f"at {m['edge']} size; " if m["edge"] else "")
             + ("yes" if m["in_frontier"] else "**left out**"),
             f"{m['flops_over_budget']:.3f}"] for m in minima]  # fmt: skip
    return table(["variant", "budget C", "runs", "sizes (fitted)", "N_opt", other_name, "D_opt",
                  "L_opt", "method", "in frontier", "C spent / C"], rows)


def _profile_table(minima: list[dict]) -> list[str]:
    """Every isoFLOP run's loss, one row per (budget, backbone) and one column per profile,
    the lowest of each profile at each budget in bold: the table a reader checks a frontier
    against. Seeds or repeats at one backbone are averaged (their count shown). N_c is given
    with and without the input embedding and head (the smallest of the profiles')."""
    profiles = list(dict.fromkeys(m["variant"] for m in minima))
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    size: dict[tuple, list] = {}
    for m in minima:
        counts = m.get("size_counts") or [[n, None] for n, _ in m["points"]]
        for backbone, (_, loss), (n_all, n_ne) in zip(m["backbones"], m["points"], counts,
                                                      strict=True):  # fmt: skip
            key = (m["budget"], backbone)
            cells[key][m["variant"]].append(loss)
            if key not in size or n_all < size[key][0]:
                size[key] = [n_all, n_ne]
    best = {}
    for (budget, _), per_profile in cells.items():
        for profile, losses in per_profile.items():
            mean = float(np.mean(losses))
            best[(budget, profile)] = min(mean, best.get((budget, profile), mean))
    rows = []
    for key in sorted(cells, key=lambda k: (k[0], size[k][0])):
        row = [f"{key[0]:.3g}", key[1], _count(size[key][0]), _count(size[key][1])]
        for profile in profiles:
            losses = cells[key].get(profile)
            if not losses:
                row.append("")
                continue
            mean = float(np.mean(losses))
            text = f"{mean:.4f}" + (f" (x{len(losses)})" if len(losses) > 1 else "")
            row.append(f"**{text}**" if mean == best[(key[0], profile)] else text)
        rows.append(row)
    return ["Loss per run (bold: the lowest of each profile at each budget; N_c with and "
            "without the input embedding and head):", "",
            *table(["budget C", "backbone", "N_c", "N_c non-emb.", *profiles], rows)]  # fmt: skip


def _edge_lines(iso: dict) -> list[str]:
    edges = iso.get("edge_minima", [])
    if not edges:
        return ["No isoFLOP minimum is at the edge of its grid.", ""]
    listed = ", ".join(f"{e['variant']} at C={e['budget']:.3g} ({e['edge']} size)"
                       for e in edges)  # fmt: skip
    return [f"Minima at the edge of their grid (the lowest loss at the smallest or largest "
            f"size, so the optimum may lie beyond the grid): {listed}. "
            + ("Kept in the frontiers (`--include-edge-minima`)." if iso["include_edge_minima"]
               else "Left out of the frontiers (`--include-edge-minima` keeps them)."),
            ""]  # fmt: skip


def _comparison_lines(variant: str, c: dict, baseline: str, base_front: dict | None
                      ) -> list[str]:  # fmt: skip
    saving_ci = c.get("compute_saving_ci") or [None] * 3
    gap_ci = c.get("loss_gap_ci") or [None] * 3
    rows = [[f"compute saving at L = {loss:.4f}", pct(s) + ci(interval)]
            for loss, s, interval in zip(c["points"]["loss"], c["compute_saving"], saving_ci,
                                         strict=True)]  # fmt: skip
    rows += [[f"loss gap at C = {comp:.3g}", pct(g) + ci(interval)]
             for comp, g, interval in zip(c["points"]["compute"], c["loss_gap"], gap_ci,
                                          strict=True)]  # fmt: skip
    if base_front is not None:
        slope = f"{base_front['slope']:.4f}"
        rows.append([f"saving implied by the mid loss gap at the baseline's slope m = {slope}",
                     pct(c.get("implied_saving")) + ci(c.get("implied_saving_ci"))])
        rows.append([f"saving implied by the paper's {pct(PAPER_LOSS_GAP)} gap at m = {slope}",
                     pct(base_front.get("paper_gap_implied_saving"))
                     + ci(base_front.get("paper_gap_implied_saving_ci"))])  # fmt: skip
    if c.get("fallback_points"):
        rows.append(["frontier points taken from a best observed run (biased up)",
                     str(c["fallback_points"])])  # fmt: skip
    return [f"{variant} vs {baseline} (1 - C_{variant}/C_base at equal loss; "
            f"1 - L_{variant}/L_base at equal compute; low, mid, high):", "",
            *table(["quantity", "value"], rows)]  # fmt: skip


def bootstrap_line(b: dict) -> str:
    residual = ("none" if b["residual_sigma"] is None
                else f"{b['residual_sigma']:.4f} on {b['residual_dof']} degrees of freedom")
    floor = ("no seed spread given" if b["seed_sigma"] is None
             else f"seed spread {b['seed_sigma']:.4f} ({b['seed_sigma_source']})")  # fmt: skip
    what = {"case": "within each budget the (backbone, seed) cases redrawn with replacement "
                    "and each profile refitted to its runs at them (fitted value plus its "
                    "residual x sqrt(n / (n - 3))), so that the intervals also cover the "
                    "quadratic's misfit",
            "parametric": "each profile's fitted quadratic plus Gaussian noise"}[b["kind"]]
    pairing = ("profiles share each case's draw (runs at one budget, backbone and seed saw "
               f"the same batches); {pct(b['shared_noise_fraction'])} of the variance of any "
               "added noise is shared, the correlation of their residuals at shared cases"
               if b["paired"] else "every profile drawn on its own")  # fmt: skip
    return (f"Bootstrap: {b['resamples']} resamples, {b['method']}: {what}; {pairing}. Noise: "
            f"residual spread {residual}, floored at the {floor}: resamples carry "
            f"{b['noise_sigma']:.4f} nats ({b['added_noise_sigma']:.4f} of it added as Gaussian "
            f"noise). Seed {b['seed']}. {pct(b['fallback_fraction'])} of resampled minima "
            f"fell back to the best observed grid point; {pct(b['resamples_with_fallback'])} "
            "of resamples had at least one such point.")  # fmt: skip


def isoflop_section(result: dict) -> list[str]:
    iso = result["isoflops"]
    if not iso:
        return []
    params = result.get("params", "all")
    window = result.get("isoflop_window")
    fitted_to = (f" (fitted to the {window} sizes around each profile's best run)"
                 if window else "")  # fmt: skip
    lines = ["## isoFLOPs", "", f"Per (variant, budget): loss ~ quadratic in log10 N_c"
             f"{fitted_to}, N_c counting {PARAM_WORDS[params]} (`--params {params}`); its "
             "vertex is the compute-optimal point unless it opens downward or falls outside "
             "the fitted sizes (then the best observed point, marked).", "",
             *_minima_table(iso["minima"], params), *_edge_lines(iso),
             *_profile_table(iso["minima"])]  # fmt: skip
    if iso["frontiers"]:
        lines += ["Frontiers log2 L_opt = m log10 C + k (N_opt ∝ C^a):", "",
                  *table(["variant", "m", "k", "R²", "budgets", "a"],
                         [[v, f"{f['slope']:.4f}{ci(f.get('slope_ci'), percent=False)}",
                           f"{f['intercept']:.4f}", f"{f['r2']:.4f}", f["n"],
                           f"{f['n_opt_exponent']:.3f}"]
                          for v, f in iso["frontiers"].items()])]  # fmt: skip
    base_front = iso["frontiers"].get(result["baseline"])
    for variant, c in iso["comparisons"].items():
        lines += _comparison_lines(variant, c, result["baseline"], base_front)
    if iso["comparisons"]:
        lines += ["With an irreducible loss the true frontier bends (log L_opt is not linear "
                  "in log C) and the lines are chords of it, so part of any spread between "
                  "the low and high ends comes from that bend; the mid value is the one "
                  "to quote. The implied savings treat the two frontiers as parallel at the "
                  "baseline's slope: saving = 1 - 10^(-log2(1 - gap) / m), so one loss gap "
                  "means a larger saving on a shallower frontier.", ""]  # fmt: skip
    if "bootstrap" in iso:
        lines += [bootstrap_line(iso["bootstrap"]), ""]
    return lines
