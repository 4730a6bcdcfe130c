"""Print a Report's per-stage table on the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from torchslim.report.markdown import STAGE_COLUMNS, format_value

if TYPE_CHECKING:
    from torchslim.core.report import Report


def print_report(report: Report, console: Console | None = None) -> None:
    import sys

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    columns = [(key, title) for key, title in STAGE_COLUMNS if any(key in s.metrics for s in report.stages)]
    table = Table(title=f"torchslim: {report.model.get('name', 'model')}")
    table.add_column("stage")
    table.add_column("execution")
    for _, title in columns:
        table.add_column(title, justify="right")
    for stage in report.stages:
        table.add_row(stage.name, stage.execution, *[format_value(key, stage.metrics.get(key)) for key, _ in columns])
    console.print(table)
    for stage in report.stages:
        for note in stage.notes:
            if "bimodal" in note or "skipped" in note:
                console.print(f"[yellow]{stage.name}: {note}[/yellow]")
