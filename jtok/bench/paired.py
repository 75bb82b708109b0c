"""Paired ratios of interleaved timings: the figures of merit of jtok's benchmarks.

Each repetition times every configuration once, so a configuration's time divided by the
baseline's in the same repetition cancels what the machine did during that repetition
(another tenant, a frequency change). The median of those ratios is the figure; its
quartiles say how far one repetition strays, which on a shared machine is the honest
uncertainty of the figure (the spread of two medians would need many more repetitions).
"""

from __future__ import annotations

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


def quartile_text(pair: Sequence[float]) -> str:
    low, high = pair
    return f"({low:.2f}-{high:.2f})"
