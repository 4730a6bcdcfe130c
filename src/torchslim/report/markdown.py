"""Markdown: formatting of numbers and bytes, tables, and a report document rendered as Markdown."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


# The one number a person looks at first, in order of preference: test error for classification, else the task's metric.
HEADLINES = [("error", "test error"), ("perplexity", "perplexity"), ("cosine", "cosine"), ("loss", "loss"), ("accuracy", "accuracy")]


def headline_key(metrics: Sequence[dict[str, Any]]) -> tuple[str, str]:
    """(metric key, column title) of the headline metric the given stages' metrics share: a user's own task's metric
    (``task_metric``, which ``measure_stage`` records: perplexity for a language model, though its stages hold a token
    error too), else the first of ``HEADLINES`` they hold."""
    titles = dict(HEADLINES)
    classification = any("error" in m and "accuracy" in m for m in metrics)  # the error rate is the headline, titled as such
    for m in metrics:
        own = m.get("task_metric")
        if isinstance(own, str) and not (own == "accuracy" and classification) and any(isinstance(n.get(own), (int, float)) for n in metrics):
            return own, titles.get(own, own) if classification or own != "error" else own
    for key, title in HEADLINES:
        if any(key in m for m in metrics):
            return key, title
    return "loss", "loss"


def format_bytes(count: float) -> str:
    """Human-readable bytes: 1070000 -> '1.02 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    return f"{count:.2f} GiB"


def percent(key: str, value: Any) -> bool:
    """Whether a metric reads as a percentage: an accuracy or error that is a fraction in [0, 1]; a user's own metric
    of that name with other values (a mean absolute "error" of 5.05) is shown as it is."""
    return key in ("accuracy", "error") and isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def format_value(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if percent(key, value) and isinstance(value, float):
        return f"{100 * value:.2f}%"
    if key == "compression" and isinstance(value, (int, float)):
        return f"{value:.1f}x"
    if key.endswith("bytes") and isinstance(value, (int, float)):
        return format_bytes(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) >= 1 else f"{value:.4g}"  # a small metric (an mse of 0.0012) keeps its digits
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


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Any], images: dict[str, str] | None = None, captions: dict[str, str] | None = None) -> str:
    """A document (``report.document``) as Markdown; ``images`` maps a plot's name to the relative path of its PNG."""
    images, captions = images or {}, captions or {}
    parts = [f"# {title}"]
    for section in sections:
        parts += ["", f"## {section.title}"]
        for block in section.blocks:
            parts.append("")
            if block.kind == "text":
                parts.append(block.text)
            elif block.kind == "list":
                parts += [f"{block.text}:", ""] + [f"- {item}" for item in block.items]
            elif block.kind == "pre":
                parts.append("```\n" + block.text.rstrip("\n") + "\n```")
            elif block.kind == "table":
                if block.text:
                    parts += [f"**{block.text}**", ""]
                parts.append(table([_escape(h) for h in block.headers], [[_escape(str(c)) for c in row] for row in block.rows]))
            elif block.kind == "image" and block.text in images:
                parts.append(f"![{captions.get(block.text, block.text)}]({images[block.text]})")
    return "\n".join(parts) + "\n"
