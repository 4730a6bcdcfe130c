"""Renderers of a Report: Markdown tables (and, later, HTML with plots)."""

from torchslim.report.markdown import format_bytes, report_to_markdown, table

__all__ = ["format_bytes", "report_to_markdown", "table"]
