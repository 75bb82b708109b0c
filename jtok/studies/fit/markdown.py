"""Markdown pieces of the fit's reports: percentages, intervals, tables (None shows "n/a")."""

from __future__ import annotations


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def ci(pair: list | None, percent: bool = True) -> str:
    """" [95% CI lo, hi]", or "" without an interval."""
    if not pair:
        return ""
    fmt = pct if percent else num
    return f" [95% CI {fmt(pair[0])}, {fmt(pair[1])}]"


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]  # fmt: skip
