"""The report as one self-contained HTML file (plots embedded as PNG data, inline CSS, no network and no JavaScript),
and the same content as Markdown with its plots as PNG files beside it.

Example:
    >>> from torchslim.core.report import Report
    >>> report = Report(model={"name": "demo"})
    >>> _ = report.add_stage("baseline", metrics={"accuracy": 0.98, "error": 0.02, "stored_bytes": 1000})
    >>> "<h1>torchslim report: demo</h1>" in report_to_html(report)
    True
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

from torchslim.core.files import write_atomic
from torchslim.report.document import build_document
from torchslim.report.markdown import render_markdown
from torchslim.report.plots import render_plots

if TYPE_CHECKING:
    from torchslim.core.report import Report

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #555; font-size: 13px; }
details { margin: .4em 0; } summary { cursor: pointer; }
"""


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_to_html(report: Report, plots: dict[str, tuple[str, bytes]] | None = None, plots_missing: str | None = None) -> str:
    """The report as one HTML page; ``plots`` ({name: (caption, png)}, as ``render_plots`` gives) are embedded."""
    plots = plots or {}
    title, sections = build_document(report, plots, plots_missing)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if block.kind == "text":
                parts.append(f"<p>{html.escape(block.text)}</p>")
            elif block.kind == "list":
                items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
                parts.append(f"<p><b>{html.escape(block.text)}</b></p><ul>{items}</ul>")
            elif block.kind == "pre":
                parts.append(f"<pre>{html.escape(block.text)}</pre>")
            elif block.kind == "table":
                rendered = _table(block.headers, block.rows)
                if block.folded:
                    parts.append(f"<details><summary>{html.escape(block.text)}</summary>{rendered}</details>")
                else:
                    parts.append((f"<p><b>{html.escape(block.text)}</b></p>" if block.text else "") + rendered)
            elif block.kind == "image" and block.text in plots:
                caption, png = plots[block.text]
                data = base64.b64encode(png).decode()
                parts.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
                )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(report: Report, path: str | os.PathLike[str], markdown: bool = True) -> dict[str, Path]:
    """Write ``path`` (.html, self-contained) and, with ``markdown``, ``path`` with suffix .md plus its plots in a
    folder ``<stem>_files/`` beside it. Returns {"html": ..., "markdown": ..., "<plot>": ...} of what was written."""
    path = Path(path)
    plots, missing = render_plots(report)
    write_atomic(path, report_to_html(report, plots, missing).encode())
    written = {"html": path}
    if markdown:
        folder = path.with_name(path.stem + "_files")
        links = {}
        if plots:
            folder.mkdir(parents=True, exist_ok=True)
        for name, (_, png) in plots.items():
            write_atomic(folder / f"{name}.png", png)
            written[name] = folder / f"{name}.png"
            links[name] = f"{folder.name}/{name}.png"
        title, sections = build_document(report, plots, missing)
        markdown_path = path.with_suffix(".md")
        write_atomic(markdown_path, render_markdown(title, sections, links, {name: caption for name, (caption, _) in plots.items()}).encode())
        written["markdown"] = markdown_path
    return written


__all__ = ["report_to_html", "write_report"]
