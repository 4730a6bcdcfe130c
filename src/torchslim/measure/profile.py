"""``profile``: every size and cost measure of a model in one Report stage."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.environment import environment
from torchslim.core.files import save_model_file
from torchslim.core.report import Report, Result, Stage
from torchslim.measure.counts import count_macs, count_nonzeros, count_parameters, dense_bytes, layer_table, stored_bytes
from torchslim.measure.latency import measure_latency
from torchslim.tasks.batches import first_examples


def measure_model(
    model: nn.Module, example_input: Any, engine: nn.Module | None = None, latency: bool = True, threads: int | None = 2, runs: int = 30, warmup: int = 5
) -> dict[str, Any]:
    """Parameters and non-zeros (as the forward pass uses them), MACs of one example, and, with ``latency``, the
    median eager batch-1 latency of ``engine`` (what runs; default the model itself)."""
    metrics: dict[str, Any] = {
        "parameters": count_parameters(model),
        "nonzeros": count_nonzeros(model),
        "macs": int(count_macs(model, first_examples(example_input, 1))["total"]),
    }
    if latency:
        result = measure_latency(engine if engine is not None else model, example_input, batch_sizes=(1,), runs=runs, warmup=warmup, threads=threads)[0]
        metrics["latency_median_ms"] = result.median_ms
    return metrics


def profile(
    model: nn.Module,
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1,),
    backends: Sequence[str] = ("eager",),
    runs: int = 50,
    threads: int | None = 2,
    stage_name: str = "profile",
    file_bytes: bool = True,
) -> Result:
    """Parameters, non-zeros, MACs, dense bytes, bytes of the saved model file, latency and per-layer rows.

    Example:
        >>> import torchslim as ts
        >>> result = profile(ts.models.create("lenet-300-100"), torch.zeros(1, 1, 28, 28), runs=10)
        >>> result.report.stages[0].metrics["parameters"]
        266610
    """
    metrics = measure_model(model, example_input, latency=False)
    metrics["dense_bytes"] = dense_bytes(model)
    notes = []
    if file_bytes:
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = save_model_file(model, Path(folder) / "model.safetensors")
                metrics["stored_bytes"] = stored_bytes(path)
            except Exception as error:  # report, never fail a profile on the file size
                notes.append(f"stored bytes not measured: {error}")
    latency = []
    for backend in backends:
        for result in measure_latency(model, example_input, batch_sizes=batch_sizes, backend=backend, runs=runs, threads=threads):
            latency.append(result.to_dict())
            if result.bimodal:
                notes.append(
                    f"{backend} batch {result.batch_size}: bimodal timings ({100 * result.slow_fraction:.0f}% of runs "
                    f"in a slow cluster; fast median {result.fast_median_ms:.3f} ms)"
                )
    if latency:
        metrics["latency_median_ms"] = latency[0]["median_ms"]
        metrics["latency_p90_ms"] = latency[0]["p90_ms"]
    metrics["latency"] = latency
    stage = Stage(name=stage_name, kind="profile", metrics=metrics, layers=layer_table(model, first_examples(example_input, 1)), notes=notes)
    report = Report.for_model(model, [stage])
    report.environment = environment()
    return Result(model=model, report=report)
