"""Render a Report as Markdown: one row per stage, then per-layer tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchslim.core.report import RENDERERS, Report

# Columns of the per-stage table, in order; a column shows only when some stage has it.
STAGE_COLUMNS = [
    ("accuracy", "accuracy"),
    ("error", "test error"),
    ("parameters", "params"),
    ("nonzeros", "non-zeros"),
    ("macs", "MACs"),
    ("dense_bytes", "dense bytes"),
    ("stored_bytes", "bytes on disk"),
    ("compression", "vs dense"),
    ("latency_median_ms", "latency median (ms)"),
    ("latency_p90_ms", "p90 (ms)"),
]


def format_bytes(count: float) -> str:
    """Human-readable bytes: 1070000 -> '1.02 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def format_value(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key in ("accuracy", "error") and isinstance(value, float):
        return f"{100 * value:.2f}%"
    if key == "compression" and isinstance(value, (int, float)):
        return f"{value:.1f}x"
    if key.endswith("bytes") and isinstance(value, (int, float)):
        return format_bytes(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats show 4 significant digits, everything else as ``str`` gives it.

    Example:
        >>> print(table(["model", "error"], [["lenet", 0.016349]]))
        | model | error |
        |---|---|
        | lenet | 0.01635 |
    """

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def report_to_markdown(report: Report) -> str:
    """The per-stage table, then each stage's notes and per-layer rows."""
    name = report.model.get("name", "model")
    parts = [f"# torchslim report: {name}", ""]
    columns = [(key, title) for key, title in STAGE_COLUMNS if any(key in s.metrics for s in report.stages)]
    rows = [[stage.name, stage.execution] + [format_value(key, stage.metrics.get(key)) for key, _ in columns] for stage in report.stages]
    parts.append(table(["stage", "execution"] + [title for _, title in columns], rows))
    for stage in report.stages:
        if stage.notes:
            parts += ["", f"## {stage.name}: notes", ""] + [f"- {note}" for note in stage.notes]
        if stage.layers:
            keys = list(dict.fromkeys(key for row in stage.layers for key in row))
            parts += ["", f"## {stage.name}: layers", ""]
            parts.append(table(keys, [[format_value(k, row.get(k)) for k in keys] for row in stage.layers]))
    return "\n".join(parts) + "\n"


RENDERERS["markdown"] = report_to_markdown
