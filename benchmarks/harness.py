"""Benchmark harness: every benchmark writes a JSON result (machine, versions, threads, date, medians, ratios)
to benchmarks/results/<name>.json and its Markdown table into BENCHMARKS.md, between markers of its own.

Each benchmark has a quick mode (minutes, smaller data or fewer epochs; for checking that it runs) and a full mode
(the numbers quoted). CI's test command never runs benchmarks.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchslim.core.environment import environment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SHARED_DATA = ROOT.parent / "shared" / "data"


def only_rows(known: Sequence[str]) -> list[str]:
    """The rows named by ``--only "A,B"`` (or one row whose name holds commas), taken out of the command line before
    ``arguments`` reads it: a benchmark runs those again and keeps every other row from its last saved results.
    Unknown names stop the run."""
    if "--only" not in sys.argv:
        return []
    index = sys.argv.index("--only")
    given = sys.argv[index + 1].strip()
    only = [given] if given in known else [name.strip() for name in given.split(",") if name.strip()]  # one row, or several
    del sys.argv[index : index + 2]
    unknown = [name for name in only if name not in known]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; rows: {list(known)}")
    return only


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
    """The library's environment (CPU model, core and thread counts, package versions, date) and the git commit, in
    the layout every result file has used (``cpu``, ``cores``, ``threads``, ``versions``, ``commit``, ``date``)."""
    facts = environment()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": facts["cpu"],
        "cores": facts["cpus"],
        "threads": facts["threads"],
        "versions": facts["versions"],
        "commit": commit,
        "date": facts["date"],
    }


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
