"""What a full report says, independent of its format: sections of tables, text, preformatted text and pictures.
``report.html`` and ``report.markdown`` render the same document, so the HTML file and the Markdown file never
disagree.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torchslim.core.report import RENDERERS
from torchslim.report.markdown import STAGE_COLUMNS, format_bytes, format_value, headline_key, render_markdown

if TYPE_CHECKING:
    from torchslim.core.report import Report, Stage


@dataclasses.dataclass
class Block:
    """One piece of a section: ``text`` (a paragraph), ``list`` (items), ``pre`` (preformatted), ``table`` (headers,
    rows; ``folded`` tables are collapsed in HTML) or ``image`` (a plot name and its caption)."""

    kind: str
    text: str = ""
    items: list[str] = dataclasses.field(default_factory=list)
    headers: list[str] = dataclasses.field(default_factory=list)
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    folded: bool = False


@dataclasses.dataclass
class Section:
    title: str
    blocks: list[Block] = dataclasses.field(default_factory=list)


LAYER_COLUMNS = [
    ("name", "layer"),
    ("type", "type"),
    ("out", "out"),
    ("in", "in"),
    ("weights", "weights"),
    ("nonzeros", "non-zeros"),
    ("kept", "kept"),
    ("bits", "bits"),
    ("macs", "MACs"),
    ("sparse_macs", "MACs of non-zeros"),
]


def _stage_table(report: Report) -> Block:
    key, title = headline_key([s.metrics for s in report.stages])
    columns = [(key, title)] + [(k, t) for k, t in STAGE_COLUMNS if k not in (key, "latency_median_ms", "latency_p90_ms", "dense_bytes")]
    columns = [(k, t) for k, t in columns if any(k in s.metrics for s in report.stages)]
    sparse = any("sparse_macs" in s.metrics for s in report.stages)
    timed = any("latency_median_ms" in s.metrics for s in report.stages)
    headers = ["stage", "executed as"] + [t for _, t in columns]
    headers += ["MACs of non-zeros"] if sparse else []
    headers += ["latency median (ms)", "p10-p90 (ms)"] if timed else []
    headers += ["stage time (s)"]
    rows = []
    for stage in report.stages:
        m = stage.metrics
        row = [stage.name, stage.execution] + [format_value(k, m.get(k)) for k, _ in columns]
        if sparse:
            row.append(format_value("sparse_macs", m.get("sparse_macs", m.get("macs"))))
        if timed:
            row.append(format_value("latency", m.get("latency_median_ms")))
            low, high = m.get("latency_p10_ms"), m.get("latency_p90_ms")
            row.append(f"{low:.3f}-{high:.3f}" if low is not None and high is not None else "-")
        row.append(format_value("seconds", m.get("seconds")))
        rows.append(row)
    return Block("table", headers=headers, rows=rows)


def _summary(report: Report) -> list[Block]:
    blocks = []
    first, last = (report.stages[0], report.stages[-1]) if report.stages else (None, None)
    lines = []
    if report.recipe:
        lines.append(f"Recipe {report.recipe.get('name')}: {' -> '.join(next(iter(s)) for s in report.recipe.get('stages', []))}.")
    if first is not None and last is not None and first is not last:
        key, title = headline_key([first.metrics, last.metrics])
        if key in first.metrics and key in last.metrics:
            lines.append(f"{title}: {format_value(key, first.metrics[key])} -> {format_value(key, last.metrics[key])}.")
        if "stored_bytes" in first.metrics and "stored_bytes" in last.metrics:
            lines.append(
                f"Bytes: {format_bytes(first.metrics['stored_bytes'])} -> {format_bytes(last.metrics['stored_bytes'])} "
                f"({first.metrics['stored_bytes'] / last.metrics['stored_bytes']:.1f}x smaller; {last.metrics.get('bytes_as', '')})."
            )
        if first.metrics.get("latency_median_ms") and last.metrics.get("latency_median_ms"):
            ratio = first.metrics["latency_median_ms"] / last.metrics["latency_median_ms"]
            lines.append(
                f"Latency, batch 1: {first.metrics['latency_median_ms']:.3f} ms -> {last.metrics['latency_median_ms']:.3f} ms "
                f"({ratio:.2f}x {'faster' if ratio >= 1 else 'the speed'})."
            )
    if lines:
        blocks.append(Block("text", text=" ".join(lines)))
    if any("latency_runs" in s.metrics for s in report.stages):
        runs = max(s.metrics.get("latency_runs", 0) for s in report.stages)
        threads = report.environment.get("threads")
        blocks.append(
            Block(
                "text",
                text=f"Latencies are comparable: every stage's model was timed at the end of the run in interleaved rounds "
                f"(batch 1, {runs} runs each{f', {threads} threads' if threads else ''}, same load), not as each stage finished.",
            )
        )
    if any("sparse_macs" in s.metrics for s in report.stages):
        blocks.append(
            Block(
                "text",
                text="MACs are what executes (a masked or dense layer multiplies its zeros too); 'MACs of non-zeros' is what a sparse kernel would need.",
            )
        )
    return blocks


def _layer_tables(stage: Stage) -> Block:
    keys = [(k, t) for k, t in LAYER_COLUMNS if any(k in row for row in stage.layers)]
    if not any(k == "name" for k, _ in keys):  # rows of another shape (e.g. sensitivity): their own columns
        keys = [(k, k.replace("_", " ")) for k in dict.fromkeys(k for row in stage.layers for k in row)]
    rows = [[_layer_cell(k, row.get(k)) for k, _ in keys] for row in stage.layers]
    return Block("table", text=f"{stage.name}: {len(stage.layers)} layers", headers=[t for _, t in keys], rows=rows, folded=True)


def _layer_cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "kept":
        return f"{100 * value:.1f}%"
    return format_value(key, value)


def _tslim_table(info: dict[str, Any]) -> list[Block]:
    rows = []
    for row in info.get("tensors", []):
        streams = "; ".join(
            f"{s['role']} {s['coder']}: {s['bytes']:,}" + (f" / {s['entropy_bytes']:,.0f}" if "entropy_bytes" in s else "") for s in row["streams"]
        )
        shape = "x".join(str(d) for d in row["shape"]) or "scalar"
        rows.append([row["name"], shape, row["encoding"], f"{row['bytes']:,}", f"{8 * row['bytes'] / max(1, row['elements']):.2f}", streams])
    text = f"{info.get('file', 'the file')}: {info.get('bytes', 0):,} bytes, of which the header is {info.get('header_bytes', 0):,}."
    return [
        Block("text", text=text + " Each stream: coder, bytes, and its order-0 entropy bound (the least an order-0 coder could reach)."),
        Block("table", headers=["tensor", "shape", "encoding", "bytes", "bits / element", "streams (coder: bytes / entropy bound)"], rows=rows),
    ]


def _allocation(plan: dict[str, Any]) -> list[Block]:
    if "measure" in plan:
        return _speed_allocation(plan)
    kind = "one (sparsity, bits) pair for every layer" if plan.get("uniform") else "per-layer sparsity or rank, and bits, from sensitivity curves"
    rounds = [[str(r["round"]), f"{r['predicted_bytes']:,}", f"{r['measured_bytes']:,}", "yes" if r["met"] else "no"] for r in plan.get("rounds", [])]
    layers = [
        [
            row["layer"],
            f"{row['weights']:,}",
            f"{row['sparsity']:.2f}",
            str(row["rank"]) if row.get("rank") else "full",
            "float" if row["bits"] >= 32 else str(row["bits"]),
            f"{row['predicted_bytes']:,}",
            f"{row['predicted_loss_rise']:.4f}",
        ]
        for row in plan.get("layers", [])
    ]
    return [
        Block("text", text=f"Budget: {plan.get('target_size', 0):,} bytes on disk; {kind}."),
        Block("table", headers=["round", "predicted bytes", "measured bytes", "met"], rows=rounds),
        Block("table", headers=["layer", "weights", "sparsity", "rank", "bits", "predicted bytes", "predicted loss rise"], rows=layers),
    ]


def _speed_allocation(plan: dict[str, Any]) -> list[Block]:
    """A MACs or latency budget's allocation (``compression.speed_budget``): each channel set's ratio."""
    kind = "one ratio for every set of channels" if plan.get("uniform") else "per-set ratios from measured sensitivity and cost"
    unit = plan.get("unit", plan["measure"])
    rounds = [
        [str(r["round"]), f"{r['predicted']:.3f}", f"{r['ratio']:.3f}", f"{r['measured']:,.4g} {unit}", "yes" if r["met"] else "no"]
        for r in plan.get("rounds", [])
    ]
    sets = [
        [
            row["set"],
            str(row["channels"]),
            f"gone with {row['removed_with']}" if row.get("removed_with") else f"{row['ratio']:.3f}",
            f"{row['predicted_factor']:.3f}",
            f"{row['predicted_loss_rise']:.4f}",
        ]
        for row in plan.get("sets", [])
    ]
    factorized = [
        [
            row["layer"],
            str(row["rank"]) if row["rank"] else "left whole",
            str(row["rank_measured"]),
            f"{row['predicted_factor']:.3f}",
            f"{row['predicted_loss_rise']:.4f}",
        ]
        for row in plan.get("factorized", [])
    ]
    blocks = [
        Block("text", text=f"Budget: {plan['target']:g} of the dense model's {plan['measure']} ({plan['dense']:,.4g} {unit}); {kind}."),
        Block("table", headers=["round", "predicted fraction", "measured fraction", "measured", "met"], rows=rounds),
        Block("table", headers=["channel set", "channels", "ratio removed", "predicted factor (alone)", "predicted loss rise"], rows=sets),
    ]
    if factorized:
        headers = ["layer factorized (SVD)", "rank", "rank as measured (whole layer)", "predicted factor (alone)", "predicted loss rise"]
        blocks.append(Block("table", headers=headers, rows=factorized))
    removable = [
        [
            row["block"],
            "removed" if row["removed"] else "kept" if row["offered"] else "kept (not offered)",
            # a report from before the removal order measured each block alone only
            f"{row['loss_rise_alone'] if 'loss_rise_alone' in row else row['predicted_loss_rise']:.4f}",
            str(row["order"]) if row.get("order") else "-",
            f"{row['predicted_factor']:.3f}" if row.get("order") else "-",
            f"{row['predicted_loss_rise']:.4f}" if row.get("order") else "-",
        ]
        for row in plan.get("blocks", [])
    ]
    if removable:
        headers = ["block", "", "loss rise (removed alone)", "removal order", "measured factor (with those before it)", "loss rise (with those before it)"]
        blocks.append(Block("table", headers=headers, rows=removable))
    return blocks


def _environment(report: Report) -> Block:
    env = report.environment
    rows = [[key, str(env[key])] for key in ("cpu", "machine", "cpus", "threads", "python", "torch", "date") if key in env]
    rows += [[name, version] for name, version in sorted((env.get("versions") or {}).items())]
    return Block("table", headers=["", ""], rows=rows)


def build_document(report: Report, plots: dict[str, tuple[str, bytes]] | None = None, plots_missing: str | None = None) -> tuple[str, list[Section]]:
    """The report's title and sections. ``plots`` ({name: (caption, png)}) are placed where they belong."""
    plots = plots or {}

    def image(name: str) -> list[Block]:
        return [Block("image", text=name)] if name in plots else []

    title = f"torchslim report: {report.model.get('name', 'model')}"
    sections = [Section("Summary", _summary(report) + [_stage_table(report)] + image("tradeoff"))]
    if plots_missing:
        sections[0].blocks.append(Block("text", text=plots_missing))
    if any(stage.layers for stage in report.stages):
        sections.append(Section("Layers", image("layers") + [_layer_tables(stage) for stage in report.stages if stage.layers]))
    if "histograms" in plots:
        sections.append(Section("Weights", image("histograms")))
    if "sensitivity" in plots:
        sections.append(Section("Sensitivity", image("sensitivity")))
    notes = [Block("list", text=stage.name, items=list(stage.notes)) for stage in report.stages if stage.notes]
    if notes:
        sections.append(Section("Notes", notes))
    if "allocation" in report.artifacts:
        sections.append(Section("Allocation to the budget", _allocation(report.artifacts["allocation"])))
    if "tslim" in report.artifacts:
        sections.append(Section("The compressed file", _tslim_table(report.artifacts["tslim"])))
    if report.recipe:
        import yaml

        sections.append(Section("The recipe as run", [Block("pre", text=yaml.safe_dump(report.recipe, sort_keys=False))]))
    if report.environment:
        sections.append(Section("Machine and versions", [_environment(report)]))
    return title, sections


def report_to_markdown(report: Report) -> str:
    """The whole report as Markdown (stage table, per-layer tables, notes, the file's streams, the recipe, the
    machine), without pictures; ``report.html.write_report`` writes it with its plots."""
    return render_markdown(*build_document(report))


RENDERERS["markdown"] = report_to_markdown

__all__ = ["Block", "Section", "build_document", "report_to_markdown"]
