"""Print a Report's per-stage table on the terminal: a few well-named columns that fit 100 columns (the rest is in
the HTML / Markdown report)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from torchslim.report.markdown import format_bytes, headline_key, percent

if TYPE_CHECKING:
    from torchslim.core.report import Report

WIDTH = 100


def compact(count: float) -> str:
    """A count in at most 6 characters: 266200 -> '266.2k', 1600000 -> '1.60M'."""
    for limit, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= limit:
            value = count / limit
            return f"{value:.2f}{suffix}" if value < 100 else f"{value:.0f}{suffix}"
    return f"{count:.0f}"


def stage_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the console table: stage, the task's headline metric, non-zeros, MACs executed, bytes,
    the ratio against dense, and latency (median, p10-p90) where measured."""
    key, title = headline_key([stage.metrics for stage in report.stages])
    headers = ["stage", title, "non-zeros", "MACs", "bytes", "vs dense"]
    timed = any("latency_median_ms" in stage.metrics for stage in report.stages)
    if timed:
        headers += ["ms", "p10-p90 ms"]
    rows = []
    for stage in report.stages:
        m: dict[str, Any] = stage.metrics
        value = m.get(key)
        shown = "-" if value is None else f"{100 * value:.2f}%" if percent(key, value) else f"{value:.4g}"
        row = [
            stage.name,
            shown,
            compact(m["nonzeros"]) if "nonzeros" in m else "-",
            compact(m["macs"]) if "macs" in m else "-",
            format_bytes(m["stored_bytes"]) if "stored_bytes" in m else "-",
            f"{m['compression']:.1f}x" if "compression" in m else "-",
        ]
        if timed:
            median = m.get("latency_median_ms")
            row.append("-" if median is None else f"{median:.3f}")
            low, high = m.get("latency_p10_ms"), m.get("latency_p90_ms")
            row.append(f"{low:.3f}-{high:.3f}" if low is not None and high is not None else "-")
        rows.append(row)
    return headers, rows


def print_report(report: Report, console: Console | None = None) -> None:
    """The per-stage table (at most 100 columns wide), then warnings that matter (bimodal timings, skipped layers)."""
    console = console or Console(width=None if sys.stdout.isatty() else WIDTH)
    headers, rows = stage_rows(report)
    table = Table(title=f"torchslim: {report.model.get('name', 'model')}", box=box.SIMPLE_HEAD, pad_edge=False)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index == 0 else "right", overflow="fold", max_width=28 if index == 0 else None)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for stage in report.stages:
        for note in stage.notes:
            if "bimodal" in note or "skipped" in note:
                console.print(f"[yellow]{stage.name}: {note}[/yellow]")
