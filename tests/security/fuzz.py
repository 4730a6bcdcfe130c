"""Fuzzing torchslim's readers: bounded mutations (``mutations.py``) of a real .tslim file and a real model file,
each read back as a user would (``ts.load``, then a forward pass of what loaded; ``inspect_tslim`` for .tslim).
Every outcome must be a model that runs or torchslim's own error; anything else (a raw Python or PyTorch error, a
case running past its time limit) is a finding. Peak memory is reported so a caller can bound it.

The suite runs a few thousand cases (``test_fuzz.py``); before a release run many more:

    python -m tests.security.fuzz --cases 200000 --seed 1

which prints a JSON summary (outcome counts, findings with their traceback, seconds, peak memory).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import torchslim as ts
from torchslim.codec.reader import inspect_tslim
from torchslim.io.modelfile import _digest

from .mutations import mutate_model_file, mutate_tslim

CASE_SECONDS = 10


class Hang(Exception):
    """A case ran past CASE_SECONDS."""


def _alarm(signum: int, frame: Any) -> None:
    raise Hang(f"a case ran past {CASE_SECONDS} s")


def peak_mib() -> float:
    """This process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def base_files(folder: Path) -> dict[str, bytes]:
    """A real pruned, k-means-quantized MLP as .tslim and as a model file (both loadable without trust)."""
    torch.manual_seed(0)
    model = ts.models.create("mlp", in_features=16, hidden=(24,), num_classes=4)
    model = ts.make_permanent(ts.prune(model, {"sparsity": 0.7}).model)
    model = ts.quantize(model, {"weights": {"scheme": "kmeans", "bits": 3}}).model
    files = {}
    for suffix in (".tslim", ".safetensors"):
        path = folder / f"base{suffix}"
        ts.save(model, path)
        files[suffix] = path.read_bytes()
    return files


def read_back(path: Path) -> str:
    """Read ``path`` as a user would: 'loaded' (and the model ran), or 'refused' (torchslim's error)."""
    try:
        model = ts.load(path)
        if path.suffix == ".tslim":
            inspect_tslim(path)
        with torch.no_grad():
            output = model(torch.zeros(2, 16))
        if tuple(output.shape) != (2, 4):
            raise AssertionError(f"a loaded model gives output {tuple(output.shape)}, not (2, 4)")
        return "loaded"
    except ts.TorchslimError:
        return "refused"


def fuzz(cases: int, seed: int, folder: Path, kinds: tuple[str, ...] = (".tslim", ".safetensors")) -> dict[str, Any]:
    """Run ``cases`` mutations of each kind; the summary holds outcome counts and findings."""
    base = base_files(folder)
    generator = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    findings: list[dict[str, str]] = []
    setup_peak = peak_mib()
    started = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for index in range(cases):
            for suffix in kinds:
                data = mutate_tslim(base[suffix], generator) if suffix == ".tslim" else mutate_model_file(base[suffix], generator, _digest)
                path = folder / f"case{suffix}"
                path.write_bytes(data)
                signal.alarm(CASE_SECONDS)
                try:
                    outcome = read_back(path)
                except BaseException as error:  # the finding: anything but torchslim's error (or a hang)
                    if isinstance(error, KeyboardInterrupt):
                        raise
                    outcome = type(error).__name__
                    if len(findings) < 20:
                        kept = folder / f"finding-{len(findings)}{suffix}"
                        kept.write_bytes(data)
                        findings.append({"case": f"{index}{suffix}", "file": str(kept), "error": "".join(traceback.format_exception(error))[-1500:]})
                finally:
                    signal.alarm(0)
                outcomes[f"{suffix} {outcome}"] += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    return {
        "cases": cases,
        "seed": seed,
        "outcomes": dict(sorted(outcomes.items())),
        "findings": findings,
        "seconds": round(time.perf_counter() - started, 1),
        "setup_peak_mib": round(setup_peak, 1),
        "peak_mib": round(peak_mib(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="mutations of each file kind")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--kind", choices=["tslim", "model", "both"], default="both")
    parser.add_argument("--keep", help="folder for the files of findings (default: a temporary folder)")
    arguments = parser.parse_args(argv)
    kinds = {"tslim": (".tslim",), "model": (".safetensors",), "both": (".tslim", ".safetensors")}[arguments.kind]
    torch.set_num_threads(1)
    if arguments.keep:
        Path(arguments.keep).mkdir(parents=True, exist_ok=True)
        summary = fuzz(arguments.cases, arguments.seed, Path(arguments.keep), kinds)
    else:
        with tempfile.TemporaryDirectory() as folder:
            summary = fuzz(arguments.cases, arguments.seed, Path(folder), kinds)
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
