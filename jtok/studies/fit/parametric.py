"""The parametric law L(N, D) = E + A / N^alpha + B / D^beta, plain and with N_eff.

Fitted by a Huber loss on log residuals; the N_eff variant has N = N_c (1 + eta gamma), so
gamma measures how much a token parameter is worth in backbone parameters.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from jtok.studies.fit.results import FitError

HUBER_DELTA = 1e-3


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A / N_eff^alpha + B / D^beta, N_eff = N_c (1 + eta gamma)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    gamma: float | None  # None: the plain law (N_eff = N_c)
    objective: float  # sum over runs of Huber(delta) of log L_pred - log L_obs, at the optimum
    rmse_log: float
    n: int
    starts: int  # optimiser starts polished (the best points of a grid)
    at_bound: tuple[str, ...] = ()  # parameters the optimum pinned to a bound of the search

    def predict(self, n_c, tokens, eta=None) -> np.ndarray:
        n_eff = np.asarray(n_c, float)
        if self.gamma is not None and eta is not None:
            n_eff = n_eff * (1 + np.asarray(eta, float) * self.gamma)
        return self.E + self.A * n_eff**-self.alpha + self.B * np.asarray(tokens, float)**-self.beta


# theta = (log E, log A, alpha, log B, beta[, gamma]); logs keep E, A, B positive.
_BOUNDS = [(-20.0, 5.0), (-30.0, 80.0), (1e-3, 3.0), (-30.0, 80.0), (1e-3, 3.0), (0.0, 1e3)]
_NAMES = ("E", "A", "alpha", "B", "beta", "gamma")


def _pinned(theta) -> tuple[str, ...]:
    """Names of the parameters sitting on a bound of the search: there the data did not
    pin the value (E at its floor, 2e-9, means no irreducible loss could be told apart).
    gamma = 0 is left out: that bound is the model's (a token parameter is worth no
    backbone parameter, i.e. no gain measured), and `jtok fit` reports gamma as it is."""
    pinned = []
    for name, value, (low, high) in zip(_NAMES, theta, _BOUNDS, strict=False):
        at_low = abs(value - low) <= 1e-6 * (1.0 + abs(value))
        at_high = abs(value - high) <= 1e-6 * (1.0 + abs(value))
        if at_high or (at_low and name != "gamma"):
            pinned.append(name)
    return tuple(pinned)


def _objective(theta, log_n, log_d, eta, log_obs, delta):
    """Huber of log residuals and its gradient, scaled by 1/delta^2 so that the optimiser's
    absolute tolerances see values of order one."""
    log_e, log_a, alpha, log_b, beta = theta[:5]
    log_neff = log_n if eta is None else log_n + np.log1p(eta * theta[5])
    e, ta, tb = math.exp(log_e), np.exp(log_a - alpha * log_neff), np.exp(log_b - beta * log_d)
    pred = e + ta + tb
    r = np.log(pred) - log_obs
    value = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    jac = [np.full_like(pred, e), ta, -ta * log_neff, tb, -tb * log_d]
    if eta is not None:
        jac.append(-alpha * ta * eta / (1 + eta * theta[5]))
    weight = np.clip(r, -delta, delta) / pred
    return value / delta**2, np.array([j @ weight for j in jac]) / delta**2


def _grid_starts(log_n, log_d, loss, eta, keep: int) -> list[np.ndarray]:
    """The best `keep` points of a grid over (E, alpha, beta[, gamma]); A and B, which enter
    linearly, are solved for each by least squares on relative residuals."""
    exponents = (0.1, 0.2, 0.3, 0.45, 0.7, 1.0)
    gammas = (0.0,) if eta is None else (0.0, 0.1, 0.5, 2.0)
    scored = []
    for frac, alpha, beta, gamma in itertools.product((0.0, 0.3, 0.6, 0.8, 0.9), exponents,
                                                      exponents, gammas):  # fmt: skip
        e = max(frac, 1e-3) * loss.min()
        log_neff = log_n if eta is None else log_n + np.log1p(eta * gamma)
        cols = np.stack([np.exp(-alpha * log_neff), np.exp(-beta * log_d)], 1) / loss[:, None]
        scale = cols.max(0)
        coef = np.linalg.lstsq(cols / scale, 1 - e / loss, rcond=None)[0] / scale
        coef = np.maximum(coef, 1e-12)
        theta = np.array([math.log(e), math.log(coef[0]), alpha, math.log(coef[1]), beta]
                         + ([gamma] if eta is not None else []))  # fmt: skip
        theta = np.clip(theta, *np.array(_BOUNDS[: len(theta)]).T)
        value = _objective(theta, log_n, log_d, eta, np.log(loss), HUBER_DELTA)[0]
        scored.append((value, theta))
    scored.sort(key=lambda item: item[0])
    return [theta for _, theta in scored[:keep]]


def fit_parametric(
    n_c, tokens, loss, eta=None, *, delta: float = HUBER_DELTA, polish: int = 8,
    init: ParametricFit | None = None,
) -> ParametricFit:  # fmt: skip
    """Fit the law by SLSQP from the best grid points (and `init`, if given). With `eta`,
    also fit gamma >= 0 in N_eff = N_c (1 + eta gamma)."""
    from scipy.optimize import minimize

    log_n, log_d = np.log(np.asarray(n_c, float)), np.log(np.asarray(tokens, float))
    loss = np.asarray(loss, float)
    eta = None if eta is None else np.asarray(eta, float)
    n_params = 5 if eta is None else 6
    if len(loss) < n_params + 1:
        raise FitError(f"the parametric law needs more than {n_params} runs, got {len(loss)}")
    starts = _grid_starts(log_n, log_d, loss, eta, polish)
    if init is not None:
        base = [math.log(init.E), math.log(init.A), init.alpha, math.log(init.B), init.beta]
        starts += [np.array(base + [g] if eta is not None else base) for g in (0.0, 0.3, 1.0)]
    best = None
    for start in starts:
        # SLSQP, not L-BFGS-B: scipy's L-BFGS-B calls multithreaded BLAS on 6-vectors, and
        # with OpenBLAS threads competing against training processes each step took
        # milliseconds (60x slower here); both reach the same optimum on these fits.
        res = minimize(_objective, start, args=(log_n, log_d, eta, np.log(loss), delta),
                       jac=True, method="SLSQP", bounds=_BOUNDS[:n_params],
                       options={"maxiter": 1000, "ftol": 1e-12})  # fmt: skip
        if best is None or res.fun < best.fun:
            best = res
    t = best.x
    fit = ParametricFit(math.exp(t[0]), math.exp(t[1]), float(t[2]), math.exp(t[3]), float(t[4]),
                        None if eta is None else float(t[5]), float(best.fun) * delta**2,
                        0.0, len(loss), len(starts), _pinned(t))  # fmt: skip
    residual = np.log(fit.predict(np.exp(log_n), np.exp(log_d), eta)) - np.log(loss)
    return ParametricFit(**{**asdict(fit), "rmse_log": float(np.sqrt(np.mean(residual**2)))})


def parametric_analysis(
    runs: list[dict], baseline: str, treatment: str, loss_field: str = "final_val_loss",
) -> tuple[dict | None, list[str]]:  # fmt: skip
    """The plain law on baseline + treatment runs, then with gamma (needs eta = 0 and > 0)."""
    chosen = [r for r in runs if r["variant"] in (baseline, treatment)]
    n_c = [r["N_c"] for r in chosen]
    tokens = [r["tokens"] for r in chosen]
    if len(chosen) < 6 or len(set(n_c)) < 3 or len(set(tokens)) < 3:
        return None, [f"parametric: {len(chosen)} runs of {baseline}/{treatment} with "
                      f"{len(set(n_c))} sizes and {len(set(tokens))} token counts; "
                      "needs >= 6 runs, 3 sizes, 3 token counts"]  # fmt: skip
    loss = [r[loss_field] for r in chosen]
    # eta relative to the N_c fitted, so that N_eff = N_c + gamma N_n in either count (with
    # `--params all` this is the recorded eta, N_n / N_c; without the embedding and head,
    # gamma is what a token parameter is worth in non-embedding backbone parameters).
    eta = np.array([r["N_n"] / r["N_c"] for r in chosen])
    plain = fit_parametric(n_c, tokens, loss)
    fitted = [name for name in (baseline, treatment) if any(r["variant"] == name for r in chosen)]
    section: dict[str, Any] = {"runs": len(chosen), "variants": fitted,
                               "delta": HUBER_DELTA, "plain": asdict(plain)}  # fmt: skip
    notes = _bound_notes("plain", plain)
    if not (np.any(eta == 0) and np.any(eta > 0) and len(chosen) >= 7):
        return section, [*notes, "parametric: gamma needs runs with eta = 0 and eta > 0; "
                         "plain law only"]  # fmt: skip
    effective = fit_parametric(n_c, tokens, loss, eta, init=plain)
    notes += _bound_notes("with N_eff", effective)
    section["effective"] = asdict(effective)
    section["objective_improvement"] = plain.objective - effective.objective
    section["relative_improvement"] = (1 - effective.objective / plain.objective
                                       if plain.objective > 0 else 0.0)  # fmt: skip
    return section, notes


def _bound_notes(which: str, fit: ParametricFit) -> list[str]:
    if not fit.at_bound:
        return []
    values = ", ".join(f"{name} = {getattr(fit, name):.3g}" for name in fit.at_bound)
    return [f"parametric ({which}): {values} at the bound of the search: the runs do not pin "
            "it, so read the law as a description of these runs, not an extrapolation"]
