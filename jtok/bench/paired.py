"""Paired ratios of interleaved timings: the figures of merit of jtok's benchmarks.

Each repetition times every configuration once, so a configuration's time divided by the
baseline's in the same repetition cancels what the machine did during that repetition
(another tenant, a frequency change). The median of those ratios is the figure; its
quartiles say how far one repetition strays; `median_interval` says how well the
repetitions pin the median itself (a distribution-free interval: a target such as "at most
1.03x" is resolved only when the whole interval lies on one side of it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def paired_ratios(times: Sequence[float], baseline: Sequence[float]) -> list[float]:
    return [t / b for t, b in zip(times, baseline, strict=True)]


def ratio_summary(times: Sequence[float], baseline: Sequence[float]) -> tuple[float, list[float]]:
    """(median ratio, [first quartile, third quartile]) of the paired ratios."""
    ratios = paired_ratios(times, baseline)
    if len(ratios) < 2:
        return ratios[0], [ratios[0], ratios[0]]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), [q1, q3]


def ratio_interval(times: Sequence[float], baseline: Sequence[float]) -> dict:
    """The median paired ratio's interval as the benchmark JSON's fields: ``ratio_ci``, a 95%
    interval where there are at least 6 repetitions, else the whole range, and
    ``ratio_ci_coverage``, what it covers."""
    low, high, coverage = median_interval(paired_ratios(times, baseline))
    return {"ratio_ci": [low, high], "ratio_ci_coverage": coverage}


def quartile_text(pair: Sequence[float]) -> str:
    low, high = pair
    return f"({low:.2f}-{high:.2f})"


def median_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, coverage): a distribution-free confidence interval for the median.

    The j-th smallest of n independent draws lies below the median with probability
    P(Binomial(n, 1/2) >= j), so [x_(j), x_(n+1-j)] covers the median with probability
    1 - 2 P(Binomial(n, 1/2) < j). j is the largest order whose coverage is still at least
    `level`; with too few values for that (n < 6 at 95%) the interval is the whole range and
    `coverage` says what it achieves."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one value")

    def coverage(j: int) -> float:  # 1 - 2 P(Bin(n, 1/2) <= j - 1)
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return ordered[j - 1], ordered[n - j], coverage(j)


def interval_text(interval: Sequence[float], coverage: float) -> str:
    """"[low, high]", followed by its coverage where that is below 95% (few repetitions)."""
    text = f"[{interval[0]:.3f}, {interval[1]:.3f}]"
    return text if coverage >= 0.95 else f"{text} {100 * coverage:.0f}%"
