"""Markdown tables and the cell formatting every report uses (a dash for a missing value)."""

from __future__ import annotations

import math
from typing import Any


def is_finite_number(value: Any) -> bool:
    """A real number (bool excluded) that is neither NaN nor infinite: a value a table or plot can show."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return str(value)


def format_param(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_mean_std(mean: Any, std: Any, digits: int = 4) -> str:
    text = format_number(mean, digits)
    if text == "–" or std is None or (isinstance(std, float) and math.isnan(std)):
        return text  # n = 1: no spread to show
    return f"{text} ± {float(std):.{digits}f}"
