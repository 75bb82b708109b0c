"""Synthetic study results for the `jtok fit` tests: runs drawn from known laws."""

import json
import math

import numpy as np
from scipy.optimize import minimize_scalar

from jtok.studies.fit import (
    RESULTS_FILE,
)

# Hoffmann et al.'s Chinchilla fit, a realistic scale for the generator.
TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
ETA, GAMMA = 2.0, 0.25  # treatment: N_eff = N_c (1 + eta gamma) = 1.5 N_c
BUDGETS = (1e17, 1e18, 1e19)


def chinchilla(n_c, tokens, eta=0.0, gamma=GAMMA):
    n_eff = np.asarray(n_c, float) * (1 + np.asarray(eta, float) * gamma)
    return TRUE["E"] + TRUE["A"] * n_eff ** -TRUE["alpha"] + TRUE["B"] * np.asarray(
        tokens, float) ** -TRUE["beta"]  # fmt: skip


def true_optimum(compute, eta=0.0):
    """(N_opt, L_opt) of the generator at compute C = 6 N_c D, by a 1-D minimisation."""
    res = minimize_scalar(lambda x: chinchilla(10**x, compute / (6 * 10**x), eta),
                          bounds=(4, 14), method="bounded", options={"xatol": 1e-9})  # fmt: skip
    return 10**res.x, float(res.fun)


def isoflop_runs(noise=0.002, seed=0, sizes=5, spread=0.6, shift=None, shared=0.0):
    """baseline and treatment at each budget; the same backbones for both, spread over
    +-`spread` decades around the baseline's optimum (slightly off-centre, as a real grid is;
    `shift`: budget -> more decades off-centre). `shared`: sd of a noise both variants share
    at a (budget, size), as runs of one seed share their batch order."""
    rng = np.random.default_rng(seed)
    runs = []
    for budget in BUDGETS:
        centre = true_optimum(budget)[0] * 10 ** (0.05 + (shift or {}).get(budget, 0.0))
        for n_c in centre * np.logspace(-spread, spread, sizes):
            common = rng.normal(0, shared) if shared else 0.0
            for variant, eta in (("baseline", 0.0), ("jtokm", ETA)):
                tokens = budget / (6 * n_c)
                loss = float(chinchilla(n_c, tokens, eta) * math.exp(common + rng.normal(0, noise)))
                runs.append({"name": f"{variant}-{n_c:.3g}-{budget:.0e}", "variant": variant,
                             "backbone": f"{n_c:.3g}", "budget": budget, "N_c": int(n_c),
                             "N_c_total": int(n_c), "N_n": int(eta * n_c), "eta": eta,
                             "rho": 0.4 if eta else 0.0, "tokens": int(tokens),
                             "flops": 6 * int(n_c) * int(tokens), "final_val_loss": loss,
                             "best_val_loss": loss, "curve": [[10, int(tokens), loss]],
                             "config": {}})  # fmt: skip
    return runs


def eta_sweep_runs(slope=-0.0118, noise=0.001, seed=0):
    """One backbone at one token count: a baseline and JTok-M at eta 4..128."""
    rng = np.random.default_rng(seed)
    runs = []
    for eta in (0.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0):
        loss = 3.30 if eta == 0 else 3.25 + slope * math.log2(eta) + rng.normal(0, noise)
        runs.append({"name": f"eta{eta:g}", "variant": "jtokm" if eta else "baseline",
                     "backbone": "d128-L4", "budget": None, "N_c": 10**7, "N_c_total": 10**7,
                     "N_n": int(eta * 10**7), "eta": eta, "rho": 0.4, "tokens": 2 * 10**8,
                     "flops": 1.2e16, "final_val_loss": loss, "best_val_loss": loss,
                     "curve": [], "config": {}, "labels": {"eta": str(eta)}})  # fmt: skip
    return runs


def write_results(directory, runs, extra_lines=()):
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in runs] + list(extra_lines)
    (directory / RESULTS_FILE).write_text("\n".join(lines) + "\n")
    return directory


# ---- (1) eta law -------------------------------------------------------------------------
