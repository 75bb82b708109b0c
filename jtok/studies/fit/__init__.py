"""`jtok fit`: scaling-law analysis of a sweep directory (METHOD.md, "Scaling law").

Reads DIR/results.jsonl (one finished run per line, written by `jtok sweep`) and fits what
the runs support:

1. eta law: loss = a + b log2(eta) for one variant at one backbone and training amount;
   b is the loss change per doubling of token parameters.
2. isoFLOPs: per (profile, budget) a quadratic in log10 N_c gives the compute-optimal
   (N_opt, L_opt); per profile the frontier log2 L_opt = m log10 C + k (the paper's axes)
   through the minima that are not at the edge of their grid; between baseline and each
   other profile the compute saving at equal loss, the loss gap at equal compute and the
   saving that gap implies at the baseline's slope, with bootstrap intervals (by default a
   paired case bootstrap, which also covers the quadratic's misfit). A profile is a variant,
   split by any other sweep axis its runs differ on (never pooled across, say, table sizes).
   N_c counts the input embedding and head or not (`params`).
3. parametric: L(N, D) = E + A / N^alpha + B / D^beta by a Huber loss on log residuals, and
   with N_eff = N_c (1 + eta gamma).
4. power: the smallest mean gain and eta-law slope the design detects at a measured seed
   spread, and the compute saving its isoFLOP intervals resolve.

Writes DIR/fit.json, DIR/REPORT_fit.md and figures. Each fit is also a plain function of
arrays, usable without a sweep.

One module per concern, imported one way (each only from those above it): `results`
(loading and validating results.jsonl, both parameter counts), `stats` (lines, the eta law,
paired gains, seed spread and power), `frontier` (one profile's minimum, frontier lines,
savings and gaps), `bootstrap`, `isoflops` (the analysis of a sweep's runs), `parametric`,
`markdown`, `isoflop_report` and `report` (markdown and summary text), `plots` (PNG
figures), `analysis` (`run_fit`: the whole analysis and its files). The command line lives
in `jtok.cli.studies`. Every public name is re-exported here.
"""

from jtok.studies.fit.analysis import FIT_JSON, REPORT_FILE, run_fit
from jtok.studies.fit.bootstrap import BOOTSTRAP_METHODS, bootstrap_frontiers, residual_correlation
from jtok.studies.fit.frontier import (
    PAPER_BUDGETS,
    PAPER_FRONTIERS,
    PAPER_LOSS_GAP,
    IsoMinimum,
    best_size_at_edge,
    compare_frontiers,
    comparison_points,
    compute_saving,
    fit_frontier,
    fit_window,
    implied_saving,
    isoflop_minimum,
    loss_gap,
    paper_frontier_check,
)
from jtok.studies.fit.isoflops import isoflop_analysis, profile_names, size_axes
from jtok.studies.fit.parametric import (
    HUBER_DELTA,
    ParametricFit,
    fit_parametric,
    parametric_analysis,
)
from jtok.studies.fit.plots import write_plots
from jtok.studies.fit.report import (
    PAPER_CLAIMS,
    format_report,
    format_summary,
    paper_claims,
    power_line,
)
from jtok.studies.fit.results import (
    LOSS_FIELDS,
    PARAM_COUNTS,
    RESULT_FIELDS,
    RESULTS_FILE,
    FitError,
    embedding_and_head,
    load_results,
)
from jtok.studies.fit.stats import (
    Z_DETECT,
    EtaLawFit,
    LineFit,
    amount_label,
    eta_laws,
    fit_eta_law,
    fit_line,
    paired_gains,
    paired_summary,
    power_analysis,
    seed_spread,
    t_interval,
)

__all__ = [
    "BOOTSTRAP_METHODS", "FIT_JSON", "HUBER_DELTA", "LOSS_FIELDS", "PAPER_BUDGETS",
    "PAPER_CLAIMS", "PAPER_FRONTIERS", "PAPER_LOSS_GAP", "PARAM_COUNTS", "REPORT_FILE",
    "RESULTS_FILE", "RESULT_FIELDS", "Z_DETECT", "EtaLawFit", "FitError", "IsoMinimum",
    "LineFit", "ParametricFit", "amount_label", "best_size_at_edge", "bootstrap_frontiers",
    "compare_frontiers", "comparison_points", "compute_saving", "embedding_and_head",
    "eta_laws", "fit_eta_law", "fit_frontier", "fit_line", "fit_parametric", "fit_window",
    "format_report", "format_summary", "implied_saving", "isoflop_analysis",
    "isoflop_minimum", "load_results", "loss_gap", "paired_gains", "paired_summary",
    "paper_claims", "paper_frontier_check", "parametric_analysis", "power_analysis",
    "power_line", "profile_names", "residual_correlation", "run_fit", "seed_spread", "size_axes",
    "t_interval", "write_plots",
]  # fmt: skip
