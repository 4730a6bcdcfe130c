"""Renderers of a Report: Markdown tables (and, later, HTML with plots)."""

from torchslim.report.document import report_to_markdown
from torchslim.report.markdown import format_bytes, table

__all__ = ["format_bytes", "report_to_markdown", "table"]
