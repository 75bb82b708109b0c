"""Bootstrap intervals for isoFLOP frontiers and the comparisons between them.

Each resample redoes the minima, frontier lines and comparisons (at the point estimate's
loss and compute points) on redrawn data. Two ways to redraw it:

- "case" (the default): within each budget, redraw the grid's cases, a case being one
  (backbone, seed) point, with replacement; each profile refits its quadratic to its runs at
  the drawn cases, each run taken as its fitted value plus its own residual scaled by
  sqrt(n / (n - 3)) (the degrees-of-freedom correction: a 3-coefficient fit to n runs
  leaves residuals smaller than the noise). This covers model misfit: where a profile is
  not a parabola in log N_c, which sizes happen to define the parabola moves its vertex,
  and the resamples move it as far as the misfit does, while each residual keeps the size it
  belongs to. A parametric bootstrap takes the fitted parabola as the truth and redraws
  independent noise around it, so its interval is about noise only, however large the
  residuals. On synthetic grids (tests/test_fit.py) the case intervals cover the truth at
  about the nominal rate with 4-6 sizes, also where the profile is far from a parabola; without
  the correction they undercover at 4 sizes.
- "parametric": each profile's fitted quadratic plus Gaussian noise (the method of the
  fits committed before fit-v2; kept for comparison).

The noise floor (`seed_sigma`, a measured sd of one run's loss: `--noise`, or the spread of
repeated seeds in the results): the resampled noise is never smaller than the seed spread.
The case bootstrap adds Gaussian noise of sd sqrt(seed_sigma^2 - residual_sigma^2) where the
pooled residual sd is below it (a fit tighter than the seed spread under-represents the noise
of a repeat; with exactly 3 sizes it is the only noise); the parametric one draws at
max(residual_sigma, seed_sigma). Before fit-v2, `--noise` replaced the residual sd.

Pairing (`paired`, the default): profiles at the same (budget, backbone, seed) share the
case's draw. In a sweep the seed sets the initialisation and the batch order, so a baseline
and a treatment run at one case saw the same data, and both misfit a parabola alike at the
same size; independent draws would count that shared part twice and widen the interval of
their difference. In the case bootstrap the profiles draw the same cases, so each run's own
residual carries the real correlation into every resample. Added Gaussian noise is split into
a part shared at a case and an independent part, with the shared share of its variance the
correlation of the profiles' residuals at shared cases (`residual_correlation`), so pairing
never assumes more correlation than the data show. `paired=False` draws every profile on its
own (the comparison the tests make).

A resample in which a profile's drawn cases hold fewer than 3 sizes is drawn again (the
quadratic needs 3). Reported: the share of resampled minima that fell back to a grid point
(vertex unusable) and the share of resamples in which any did.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from jtok.studies.fit.frontier import (
    PAPER_LOSS_GAP,
    IsoMinimum,
    compare_frontiers,
    frontier_lines,
    implied_saving,
    minimum_of_log,
)
from jtok.studies.fit.results import FitError

BOOTSTRAP_METHODS = ("case", "parametric")
_MAX_REDRAWS = 1000  # per budget and resample; a profile with >= 3 sizes meets it far sooner


@dataclass(frozen=True)
class ProfilePoints:
    """The runs one (profile, budget) quadratic is fitted to."""

    x: np.ndarray  # log10 N_c
    loss: np.ndarray
    cases: list[tuple]  # (backbone, seed) of each run: what paired profiles share
    minimum: IsoMinimum  # the point estimate's fit


def pooled_residual_sigma(groups: dict[tuple, ProfilePoints]) -> tuple[float | None, int]:
    """The quadratics' residual sd pooled over profiles (None without a degree of freedom)."""
    sse, dof = 0.0, 0
    for g in groups.values():
        sse += float(((g.loss - np.polyval(g.minimum.coeffs, g.x)) ** 2).sum())
        dof += len(g.x) - 3
    return (math.sqrt(sse / dof) if dof else None), dof


def residual_correlation(groups: dict[tuple, ProfilePoints]) -> float | None:
    """How much of the misfit and noise profiles share at a case: the correlation of the
    quadratics' residuals of two profiles at the same (budget, backbone, seed), pooled over
    every such pair, clipped to [0, 1]. None where no two profiles share a case."""
    residuals: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (profile, budget), g in groups.items():
        r = g.loss - np.polyval(g.minimum.coeffs, g.x)
        for case, value in zip(g.cases, r, strict=True):
            residuals[(budget, case)][profile].append(float(value))
    cross = left = right = 0.0
    pairs = 0
    for per_profile in residuals.values():
        means = [float(np.mean(v)) for _, v in sorted(per_profile.items())]
        for i in range(len(means)):
            for j in range(i + 1, len(means)):
                cross += means[i] * means[j]
                left += means[i] ** 2
                right += means[j] ** 2
                pairs += 1
    if not pairs or left == 0 or right == 0:
        return None
    return float(min(1.0, max(0.0, cross / math.sqrt(left * right))))


class _Resampler:
    """Draws one resample of every profile's (x, loss) at a time; see the module doc.

    `noise_sd`: the Gaussian noise added to each drawn run; `shared`: the share of its
    variance that profiles at the same drawn case have in common (0: independent)."""

    def __init__(self, groups: dict[tuple, ProfilePoints], method: str, paired: bool,
                 noise_sd: float, shared: float, rng: np.random.Generator) -> None:  # fmt: skip
        self.groups, self.method, self.paired, self.rng = groups, method, paired, rng
        self.shared_sd = noise_sd * math.sqrt(shared)
        self.own_sd = noise_sd * math.sqrt(1 - shared)
        self.by_budget: dict[float, list[tuple]] = defaultdict(list)
        for key in groups:
            self.by_budget[key[1]].append(key)
        # Cases of a budget: the union over its profiles, in a fixed order (reproducible).
        self.cases = {b: sorted({c for k in keys for c in groups[k].cases}, key=repr)
                      for b, keys in self.by_budget.items()}  # fmt: skip
        self.runs_at = {k: _index_by_case(g.cases) for k, g in groups.items()}
        # What a drawn run contributes before the added noise: the fitted quadratic alone
        # (parametric), or the fit plus the run's residual scaled by sqrt(n / (n - 3)), the
        # degrees-of-freedom correction (a 3-coefficient fit leaves residuals smaller than
        # the noise; resampled as they are, intervals of 4-5 size grids undercover).
        self.base = {}
        for k, g in groups.items():
            fitted = np.polyval(g.minimum.coeffs, g.x)
            scale = 0.0 if method == "parametric" else math.sqrt(len(g.x) / max(len(g.x) - 3, 1))
            self.base[k] = fitted + (g.loss - fitted) * scale

    def draw(self) -> dict[tuple, tuple[np.ndarray, np.ndarray]]:
        if self.method == "parametric" and not self.paired:
            # Profile by profile, in the order of the fits committed before fit-v2 (their
            # intervals reproduce with --include-edge-minima --bootstrap-method parametric
            # --no-paired).
            return {k: (g.x, self.base[k] + self.rng.normal(0.0, self.own_sd, len(g.x)))
                    for k, g in self.groups.items()}  # fmt: skip
        drawn = {}
        for budget, keys in self.by_budget.items():
            if not self.paired:
                for key in keys:
                    drawn.update(self._draw_budget([key], self.groups[key].cases))
            else:
                drawn.update(self._draw_budget(keys, self.cases[budget]))
        return drawn

    def _draw_budget(self, keys: list[tuple], cases: list) -> dict:
        unique = list(dict.fromkeys(cases))
        for _ in range(_MAX_REDRAWS):
            if self.method == "parametric":  # every case once: the grid as it is
                picks = unique
            else:
                picks = [unique[i] for i in self.rng.integers(0, len(unique), len(unique))]
            common = self.rng.normal(0.0, 1.0, len(picks)) * self.shared_sd
            out = {}
            for key in keys:
                g, at = self.groups[key], self.runs_at[key]
                rows = [(i, slot) for slot, case in enumerate(picks) for i in at.get(case, ())]
                index = np.array([i for i, _ in rows], int)
                if len(np.unique(g.x[index])) < 3:
                    break
                slots = [slot for _, slot in rows]
                noise = common[slots] + self.rng.normal(0.0, 1.0, len(rows)) * self.own_sd
                out[key] = (g.x[index], self.base[key][index] + noise)
            else:
                return out
        raise FitError(f"bootstrap: no resample of {keys} with 3 sizes in {_MAX_REDRAWS} draws")


def _index_by_case(cases: list[tuple]) -> dict[tuple, list[int]]:
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, case in enumerate(cases):
        index[case].append(i)
    return index


def bootstrap_frontiers(
    groups: dict[tuple, ProfilePoints], compute: dict[tuple, float], baseline: str,
    comparisons: dict, resamples: int, seed: int, method: str = "case",
    seed_sigma: float | None = None, seed_sigma_source: str | None = None, paired: bool = True,
) -> dict | None:  # fmt: skip
    """Percentile intervals (95%) of frontier slopes and comparisons; see the module doc.

    `groups`: the (profile, budget) fits that make the frontiers. None when the data leave
    no noise to draw: every profile fitted exactly (3 sizes) and no `seed_sigma`."""
    if method not in BOOTSTRAP_METHODS:
        raise FitError(f"bootstrap method must be one of {BOOTSTRAP_METHODS}, got {method!r}")
    residual_sigma, dof = pooled_residual_sigma(groups)
    if residual_sigma is None and seed_sigma is None:
        return None
    floor = seed_sigma or 0.0
    resid = residual_sigma or 0.0
    noise_sigma = max(resid, floor)
    # The case bootstrap carries the residuals itself; only the shortfall is added.
    added = noise_sigma if method == "parametric" else math.sqrt(max(floor**2 - resid**2, 0.0))
    shared = (residual_correlation(groups) or 0.0) if paired else 0.0
    rng = np.random.default_rng(seed)
    resampler = _Resampler(groups, method, paired, added, shared, rng)
    profiles = sorted({key[0] for key in groups})
    slopes: dict[str, list[float]] = defaultdict(list)
    stats: dict[str, dict[str, list]] = {v: defaultdict(list) for v in comparisons}
    paper_gap: list[float] = []
    fallbacks = resamples_with_fallback = 0
    for _ in range(resamples):
        drawn = {key: minimum_of_log(x, loss) for key, (x, loss) in resampler.draw().items()}
        fell_back = sum(not m.in_range for m in drawn.values())
        fallbacks += fell_back
        resamples_with_fallback += fell_back > 0
        lines = {p: line for p, (line, _) in frontier_lines(drawn, compute).items()}
        for profile in profiles:
            if profile in lines:
                slopes[profile].append(lines[profile].slope)
        if baseline in lines:
            paper_gap.append(implied_saving(PAPER_LOSS_GAP, lines[baseline].slope))
        for variant, comp in comparisons.items():
            values = compare_frontiers(lines[baseline], lines[variant], comp["points"])
            for name, value in values.items():
                stats[variant][name].append(value)

    def ci(values) -> list:
        # nan where a drawn frontier did not fall with compute (no saving defined)
        return np.nanpercentile(np.asarray(values, float), [2.5, 97.5], axis=0).T.tolist()

    source = ("residuals" if resid >= floor else seed_sigma_source or "given")
    return {
        "method": {"case": "paired case bootstrap" if paired else "case bootstrap",
                   "parametric": "paired parametric bootstrap" if paired
                   else "parametric residual bootstrap"}[method],
        "kind": method, "paired": paired, "resamples": resamples, "seed": seed,
        "noise_sigma": noise_sigma, "noise_source": source, "added_noise_sigma": added,
        "shared_noise_fraction": shared,
        "seed_sigma": seed_sigma, "seed_sigma_source": seed_sigma_source,
        "residual_sigma": residual_sigma, "residual_dof": dof,
        "fallback_fraction": fallbacks / max(1, resamples * len(groups)),
        "resamples_with_fallback": resamples_with_fallback / max(1, resamples),
        "slope_ci": {p: ci(s) for p, s in slopes.items()},
        "paper_gap_implied_saving_ci": ci(paper_gap) if paper_gap else None,
        "comparison_ci": {v: {f"{name}_ci": ci(vals) for name, vals in s.items()}
                          for v, s in stats.items()},
    }  # fmt: skip
