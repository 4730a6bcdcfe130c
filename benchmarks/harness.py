"""Benchmark harness: every benchmark writes a JSON result (machine, versions, threads, date, medians, ratios)
to benchmarks/results/<name>.json and its Markdown table into BENCHMARKS.md, between markers of its own.

Each benchmark has a quick mode (minutes, smaller data or fewer epochs; for checking that it runs) and a full mode
(the numbers quoted). CI's test command never runs benchmarks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SHARED_DATA = ROOT.parent / "shared" / "data"


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small, fast run to check the benchmark works")
    parser.add_argument("--threads", type=int, default=2, help="torch thread count (fixed for the whole run)")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA, help="folder with the real data")
    parser.add_argument("--no-write", action="store_true", help="print only; leave results/ and BENCHMARKS.md alone")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    return options


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("onnxruntime", "onnx", "torchao", "torch_pruning", "constriction"):
        try:
            module = __import__(package)
            versions[package] = getattr(module, "__version__", "?")
        except ImportError:
            continue
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "versions": versions,
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write(name: str, title: str, results: dict[str, Any], tables: Sequence[str], options: argparse.Namespace, notes: Sequence[str] = ()) -> None:
    """Save the JSON result and replace this benchmark's section of BENCHMARKS.md."""
    mode = "quick" if options.quick else "full"
    payload = {"benchmark": name, "mode": mode, "machine": machine(), "results": results}
    text = json.dumps(payload, indent=2, default=str)
    print(text if len(text) < 4000 else text[:4000] + "\n...")
    section = [
        f"## {title}",
        "",
        f"`python3 -m benchmarks.{name}` ({mode} mode; {payload['machine']['date']}; "
        f"{payload['machine']['cpu']}, {payload['machine']['threads']} threads; torch {torch.__version__}; "
        f"commit {payload['machine']['commit']})",
        "",
    ]
    for table in tables:
        section += [table, ""]
    section += [f"- {note}" for note in notes]
    block = "\n".join(section).rstrip() + "\n"
    print(block)
    if options.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}{'-quick' if options.quick else ''}.json").write_text(text + "\n")
    if options.quick:
        return  # quick runs check that a benchmark works; BENCHMARKS.md keeps the full numbers
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    current = (
        BENCHMARKS_MD.read_text()
        if BENCHMARKS_MD.exists()
        else "# Benchmarks\n\nFull-mode results, written by the scripts in benchmarks/ (medians of repeated runs).\n"
    )
    replacement = f"{start}\n{block}{end}"
    if start in current:
        current = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: replacement, current, flags=re.S)
    else:
        current = current.rstrip() + "\n\n" + replacement + "\n"
    BENCHMARKS_MD.write_text(current)
