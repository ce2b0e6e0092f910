"""Metrics as plain-text tables: one row a metric, or one row a POPE split with the means below."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The per-split columns of the POPE metrics table (`score_pope`'s figures).
POPE_TABLE_COLUMNS = ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with a header rule; floats get 4 decimals."""
    cells = [[str(h) for h in header]] + [[_format_value(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        ).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def format_metrics(metrics: Mapping[str, Any], title: str | None = None) -> str:
    """Metrics as a small table: one row a metric, or one row a split for several POPE splits (with the means)."""
    if "splits" in metrics and isinstance(metrics["splits"], Mapping):
        rows: list[list[Any]] = [
            [split] + [split_metrics.get(column, "") for column in POPE_TABLE_COLUMNS]
            for split, split_metrics in metrics["splits"].items()
        ]
        rows.append(["mean", metrics.get("mean_accuracy", ""), "", "", metrics.get("mean_f1", ""), "", ""])
        table = format_table(("split",) + POPE_TABLE_COLUMNS, rows)
    else:
        table = format_table(("metric", "value"), [[name, value] for name, value in metrics.items()])
    return f"{title}\n{table}" if title else table
