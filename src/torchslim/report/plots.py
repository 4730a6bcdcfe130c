"""The report's pictures, drawn with matplotlib (Agg, no display): the metric against bytes and against latency over
the stages, per-layer bars of weights and channels kept and bits, and weight histograms before and after with the
k-means centroids marked. Each is PNG bytes; a report without the data for a plot simply has no such plot.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torchslim.measure.layers import largest_layers
from torchslim.report.markdown import headline_key, percent

if TYPE_CHECKING:
    from torchslim.core.report import Report

# Per-layer bars show at most this many layers (the largest, in the model's order); the tables have all of them.
MAX_BAR_LAYERS = 40
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _label_points(axis: Any, names: list[str], xs: list[float], ys: list[float]) -> None:
    """Stage names beside their points, staggered so that neighbours with equal values stay readable."""
    for index, (name, x, y) in enumerate(zip(names, xs, ys)):
        axis.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5 + 11 * (index % 3)), fontsize=8)


def tradeoff_plot(report: Report) -> bytes | None:
    """The headline metric against bytes on disk and against measured latency (median, p10-p90 bars), one point per
    stage joined in run order."""
    import matplotlib.pyplot as plt

    stages = [s for s in report.stages if "stored_bytes" in s.metrics]
    key, title = headline_key([s.metrics for s in stages])
    stages = [s for s in stages if isinstance(s.metrics.get(key), (int, float))]
    if len(stages) < 2:
        return None
    timed = [s for s in stages if "latency_median_ms" in s.metrics]
    shares = all(percent(key, s.metrics[key]) for s in stages)  # fractions shown as percentages
    label = f"{title} (%)" if shares else title
    figure, axes = plt.subplots(1, 2 if timed else 1, figsize=(11 if timed else 6, 4), squeeze=False)
    size_axis = axes[0][0]
    xs = [s.metrics["stored_bytes"] / 1024 for s in stages]
    ys = [100 * s.metrics[key] if shares else s.metrics[key] for s in stages]
    size_axis.plot(xs, ys, "-o", color=COLORS[0])
    _label_points(size_axis, [s.name for s in stages], xs, ys)
    size_axis.set_xscale("log")
    size_axis.set_xlabel("bytes on disk (KiB, log scale)")
    size_axis.set_ylabel(label)
    size_axis.set_title(f"{title} against size")
    size_axis.grid(True, alpha=0.3)
    if timed:
        axis = axes[0][1]
        xs = [s.metrics["latency_median_ms"] for s in timed]
        ys = [100 * s.metrics[key] if shares else s.metrics[key] for s in timed]
        low = [x - s.metrics.get("latency_p10_ms", x) for s, x in zip(timed, xs)]
        high = [s.metrics.get("latency_p90_ms", x) - x for s, x in zip(timed, xs)]
        axis.errorbar(xs, ys, xerr=[low, high], fmt="-o", color=COLORS[1], capsize=3)
        _label_points(axis, [s.name for s in timed], xs, ys)
        axis.set_xlabel("latency, batch 1 (ms; median, p10-p90)")
        axis.set_ylabel(label)
        axis.set_title(f"{title} against latency")
        axis.grid(True, alpha=0.3)
    return _png(figure)


def _bar_layers(report: Report) -> list[str]:
    rows = report.stages[0].layers if report.stages else []
    if not all("name" in row and "weights" in row and "kept" in row for row in rows):
        return []  # not per-layer weight rows (e.g. a sensitivity table)
    return largest_layers(rows, MAX_BAR_LAYERS)


def layers_plot(report: Report) -> bytes | None:
    """Per layer and stage: the fraction of weights kept, the fraction of output channels kept, and bits per weight."""
    import matplotlib.pyplot as plt

    names = _bar_layers(report)
    stages = [s for s in report.stages if s.layers and all("kept" in row for row in s.layers)]
    if not names or len(stages) < 1:
        return None
    baseline = {row["name"]: row for row in stages[0].layers}
    panels = [("weights kept", "kept"), ("output channels kept", "out"), ("bits per weight", "bits")]
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.35 * len(names) * max(1, len(stages)) / 2 + 3), 9), sharex=True)
    width = 0.8 / len(stages)
    for axis, (title, field) in zip(axes, panels):
        for index, stage in enumerate(stages):
            rows = {row["name"]: row for row in stage.layers}
            values = []
            for name in names:
                row = rows.get(name)
                if row is None:
                    values.append(0.0)
                elif field == "out":
                    values.append(row["out"] / max(1, baseline[name]["out"]) if name in baseline else 1.0)
                else:
                    values.append(float(row[field]))
            positions = [i + (index - (len(stages) - 1) / 2) * width for i in range(len(names))]
            axis.bar(positions, values, width=width, label=stage.name, color=COLORS[index % len(COLORS)])
        axis.set_title(title, fontsize=10)
        axis.grid(True, axis="y", alpha=0.3)
        if field != "bits":
            axis.set_ylim(0, 1.05)
    axes[0].legend(fontsize=8, ncol=min(6, len(stages)), loc="lower left", bbox_to_anchor=(0, 1.12), frameon=False)
    axes[-1].set_xticks(range(len(names)))
    axes[-1].set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    return _png(figure)


def histogram_plot(report: Report) -> bytes | None:
    """Each histogrammed layer's non-zero weights in the first stage (before) and the last (after), the last stage's
    codebook centroids as vertical lines, and the count of zeros in the legend."""
    import matplotlib.pyplot as plt

    first = next((s for s in report.stages if s.histograms), None)
    last = next((s for s in reversed(report.stages) if s.histograms), None)
    if first is None or last is None:
        return None
    after = {h["layer"]: h for h in last.histograms}
    layers = [h for h in first.histograms if h["counts"]]
    figure, axes = plt.subplots(len(layers), 1, figsize=(8, 2.4 * len(layers)), squeeze=False)
    for axis, before in zip((row[0] for row in axes), layers):
        limit, bins = before["range"], len(before["counts"])
        edges = [-limit + 2 * limit * i / bins for i in range(bins + 1)]
        axis.stairs(before["counts"], edges, fill=True, alpha=0.35, color=COLORS[7], label=f"{first.name} ({before['zeros']:,} zeros)")
        other = after.get(before["layer"])
        if other is not None and last is not first:
            axis.stairs(other["counts"], edges, color=COLORS[0], linewidth=1.4, label=f"{last.name} ({other['zeros']:,} zeros)")
            for index, centroid in enumerate(other.get("centroids") or []):
                axis.axvline(centroid, color=COLORS[3], linewidth=0.7, alpha=0.8, label="centroids" if index == 0 else None)
        axis.set_yscale("symlog")
        axis.set_title(f"{before['layer']}: non-zero weights", fontsize=10)
        axis.legend(fontsize=8)
    axes[-1][0].set_xlabel("weight value")
    figure.tight_layout()
    return _png(figure)


# the sensitivity techniques, in the order they are drawn, with their axis labels
LABELS = {"sparsity": "sparsity of the layer", "bits": "bits per weight", "rank": "rank kept"}


def _draw(axis: Any, stage: Any, technique: str, legend: bool = True) -> None:
    """The metric against the level for each layer, with the baseline dashed."""
    metric = stage.metrics.get("metric", "loss")
    rows = [row for row in stage.layers if row["technique"] == technique]
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    for layer in layers:
        points = sorted((row["level"], row[metric]) for row in rows if row["layer"] == layer)
        axis.plot([p[0] for p in points], [p[1] for p in points], "-o", markersize=3, label=layer)
    axis.axhline(stage.metrics.get(metric, 0.0), color="#888", linestyle="--", linewidth=0.8, label="baseline")
    axis.set_xlabel(LABELS[technique])
    axis.set_ylabel(metric)
    axis.set_title(f"{technique}: one layer at a time", fontsize=10)
    axis.grid(True, alpha=0.3)
    if technique == "bits":
        axis.invert_xaxis()
    if legend and len(layers) <= 12:
        axis.legend(fontsize=7)


def _stage(report: Report) -> Any:
    return next((s for s in report.stages if s.kind == "sensitivity" and s.layers), None)


def sensitivity_plot(report: Report) -> bytes | None:
    """One panel per technique (PNG bytes) for a report with a sensitivity stage, else None."""
    import matplotlib.pyplot as plt

    stage = _stage(report)
    if stage is None:
        return None
    techniques = [t for t in LABELS if any(row["technique"] == t for row in stage.layers)]
    figure, axes = plt.subplots(1, len(techniques), figsize=(5.5 * len(techniques), 4), squeeze=False)
    for axis, technique in zip(axes[0], techniques):
        _draw(axis, stage, technique)
    return _png(figure)


def write_sensitivity_plots(report: Report, folder: str | os.PathLike[str], formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """One figure per technique in ``folder`` as ``sensitivity-<technique>.<format>``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage = _stage(report)
    if stage is None:
        return []
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for technique in LABELS:
        if not any(row["technique"] == technique for row in stage.layers):
            continue
        figure, axis = plt.subplots(figsize=(6, 4))
        _draw(axis, stage, technique)
        for form in formats:
            path = out / f"sensitivity-{technique}.{form}"
            figure.savefig(path, format=form, bbox_inches="tight")
            written.append(path)
        plt.close(figure)
    return written


PLOTS = [
    ("sensitivity", "The task's metric with one layer compressed at a time, per technique and level", sensitivity_plot),
    ("tradeoff", "The headline metric against bytes on disk and against measured latency, stage by stage", tradeoff_plot),
    ("layers", "Per layer: weights kept, output channels kept and bits per weight, stage by stage", layers_plot),
    ("histograms", "Weight histograms before and after (non-zero weights; k-means centroids as red lines)", histogram_plot),
]


def render_plots(report: Report) -> tuple[dict[str, tuple[str, bytes]], str | None]:
    """{name: (caption, PNG bytes)} of every plot the report has data for, and why there are none when matplotlib
    is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        return {}, "plots need matplotlib: pip install 'torchslim[plots]'"
    out = {}
    for name, caption, draw in PLOTS:
        png = draw(report)
        if png:
            out[name] = (caption, png)
    return out, None


__all__ = ["PLOTS", "histogram_plot", "layers_plot", "render_plots", "sensitivity_plot", "tradeoff_plot", "write_sensitivity_plots"]
