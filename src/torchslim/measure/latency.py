"""Latency harness: warm-up, many timed runs, min/median/p90 and spread, a fixed thread count, chosen batch sizes,
and pluggable backends. Timings on shared machines stall in steps of several milliseconds at random, so every
result reports its spread and flags a bimodal distribution instead of hiding it in a mean."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from torchslim.core.modes import eval_mode, model_device
from torchslim.core.registry import Registry
from torchslim.tasks.batches import call_model, move_to, repeat_example

Runner = Callable[[torch.Tensor], Any]
# A backend turns (model, example input) into a callable that runs one batch.
BACKENDS: Registry[Callable[[nn.Module, torch.Tensor], Runner]] = Registry("latency backend")


def _device_runner(model: nn.Module, callable_model: Any) -> Runner:
    """A runner of ``callable_model`` on ``model``'s device: each input is copied there once (the copy is not part
    of what is timed after the first call), and a CUDA call is waited for before it counts as done."""
    device = model_device(model)
    placed: dict[int, tuple[Any, Any]] = {}

    def run(x: Any) -> Any:
        if device.type == "cpu":
            inputs = x
        else:
            if id(x) not in placed:
                placed.clear()
                placed[id(x)] = (x, move_to(x, device))
            inputs = placed[id(x)][1]
        with torch.inference_mode():
            output = call_model(callable_model, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return output

    return run


@BACKENDS.register("eager")
def eager_backend(model: nn.Module, example: torch.Tensor) -> Runner:
    """Plain PyTorch, eval mode, under inference_mode, on the model's device."""
    return _device_runner(model, model)


@BACKENDS.register("compile")
def compile_backend(model: nn.Module, example: torch.Tensor) -> Runner:
    """torch.compile (inductor) of the model in eval mode, on the model's device."""
    return _device_runner(model, torch.compile(model))


@BACKENDS.register("onnxruntime")
def onnxruntime_backend(model: nn.Module, example: Any) -> Runner:
    """The model exported to ONNX (fp32) and run by ONNX Runtime on the CPU, spinning off, threads as torch's. Every
    input is exported and fed as the eager backend passes it: one tensor, a tuple of positional tensors, or a mapping
    of keyword tensors (by name)."""
    import tempfile
    from pathlib import Path

    from torchslim.export.onnx import as_called, export_onnx, onnx_feed, onnx_session

    with tempfile.TemporaryDirectory(prefix="torchslim-onnx-") as folder:  # the session holds the model once built
        session = onnx_session(export_onnx(model, example, Path(folder) / "model.onnx"), threads=torch.get_num_threads())
    names = [i.name for i in session.get_inputs()]
    fed: dict[int, tuple[Any, dict[str, Any]]] = {}

    def run(x: Any) -> Any:
        if id(x) not in fed:  # the feed of an input is built once (as the eager backend places it once)
            fed.clear()
            fed[id(x)] = (x, onnx_feed(names, as_called(model, x)))
        return session.run(None, fed[id(x)][1])

    return run


@dataclasses.dataclass
class LatencyResult:
    """Timings of one (backend, batch size) in milliseconds, with their spread and a bimodality flag."""

    backend: str
    batch_size: int
    threads: int
    runs: int
    min_ms: float
    median_ms: float
    p90_ms: float
    mean_ms: float
    stdev_ms: float
    spread: float  # (p90 - min) / median
    bimodal: bool
    slow_fraction: float
    fast_median_ms: float
    samples_ms: list[float] = dataclasses.field(repr=False, default_factory=list)

    @property
    def per_example_ms(self) -> float:
        return self.median_ms / self.batch_size

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not samples:
            data.pop("samples_ms")
        return data


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Linear-interpolated percentile of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    position = fraction * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def detect_bimodal(samples_ms: Sequence[float], min_gap_ms: float = 0.5, min_fraction: float = 0.05) -> tuple[bool, float, float]:
    """Find a fast cluster and a slow cluster separated by a clear gap.

    Sorted timings are split at their widest gap; the split counts as bimodal when both sides hold at least
    ``min_fraction`` of the runs and the gap is wider than ``min_gap_ms`` and four times the fast cluster's own
    10-90% range. Returns (bimodal, fraction of runs in the slow cluster, median of the fast cluster).
    """
    values = sorted(samples_ms)
    count = len(values)
    if count < 10:
        return False, 0.0, statistics.median(values) if values else float("nan")
    smallest = max(3, int(min_fraction * count))
    best_gap, best_index = 0.0, -1
    for i in range(smallest - 1, count - smallest):
        gap = values[i + 1] - values[i]
        if gap > best_gap:
            best_gap, best_index = gap, i
    if best_index < 0:
        return False, 0.0, statistics.median(values)
    fast = values[: best_index + 1]
    fast_range = percentile(fast, 0.9) - percentile(fast, 0.1)
    if best_gap > min_gap_ms and best_gap > 4 * fast_range:
        return True, (count - len(fast)) / count, statistics.median(fast)
    return False, 0.0, statistics.median(values)


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[int]:
    """Run the block with torch's intra-op thread count fixed, then restore it."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def time_runner(run: Runner, example: torch.Tensor, warmup: int, runs: int, min_seconds: float = 0.0) -> list[float]:
    """Milliseconds of each of ``runs`` calls after ``warmup`` untimed ones (more runs until ``min_seconds``)."""
    for _ in range(warmup):
        run(example)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < runs or (time.perf_counter() - started) < min_seconds:
        begin = time.perf_counter()
        run(example)
        samples.append((time.perf_counter() - begin) * 1000.0)
        if len(samples) >= 100 * max(1, runs):
            break
    return samples


def summarize(backend: str, batch_size: int, threads: int, samples: list[float]) -> LatencyResult:
    values = sorted(samples)
    median = statistics.median(values)
    bimodal, slow_fraction, fast_median = detect_bimodal(values)
    return LatencyResult(
        backend=backend,
        batch_size=batch_size,
        threads=threads,
        runs=len(values),
        min_ms=values[0],
        median_ms=median,
        p90_ms=percentile(values, 0.9),
        mean_ms=statistics.fmean(values),
        stdev_ms=statistics.stdev(values) if len(values) > 1 else 0.0,
        spread=(percentile(values, 0.9) - values[0]) / median if median > 0 else 0.0,
        bimodal=bimodal,
        slow_fraction=slow_fraction,
        fast_median_ms=fast_median,
        samples_ms=samples,
    )


def measure_latency(
    model: nn.Module | Runner,
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1,),
    backend: str | Callable[[nn.Module, torch.Tensor], Runner] = "eager",
    warmup: int = 10,
    runs: int = 50,
    threads: int | None = 2,
    min_seconds: float = 0.0,
) -> list[LatencyResult]:
    """Time ``model`` on batches built from ``example_input`` (its first example repeated to each batch size).

    ``backend`` is a registered name (``eager``, ``compile``, ``onnxruntime`` once export is installed) or a
    callable ``(model, example) -> run(x)``; a plain callable ``model`` is timed as it is. The model's train/eval
    mode is restored afterwards.

    Example:
        >>> results = measure_latency(nn.Linear(8, 8), torch.zeros(1, 8), batch_sizes=(1, 4), runs=20)
        >>> [r.batch_size for r in results]
        [1, 4]
    """
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
    make = BACKENDS.get(backend) if isinstance(backend, str) else backend
    results = []
    with thread_count(threads) as used, contextlib.ExitStack() as stack:
        if isinstance(model, nn.Module):
            stack.enter_context(eval_mode(model))
        for batch_size in batch_sizes:
            batch = repeat_example(example_input, batch_size)
            run = make(model, batch) if isinstance(model, nn.Module) else model
            samples = time_runner(run, batch, warmup, runs, min_seconds)
            results.append(summarize(name, batch_size, used, samples))
    return results


def interleaved_latency(
    models: Mapping[str, nn.Module | Runner],
    example_input: Any,
    batch_sizes: Sequence[int] = (1,),
    rounds: int = 5,
    runs: int = 30,
    warmup: int = 5,
    backend: str | Callable[[nn.Module, Any], Runner] = "eager",
    threads: int | None = 2,
    min_seconds: float = 0.0,
) -> dict[str, dict[int, list[list[float]]]]:
    """Timings of several models measured side by side: ``rounds`` interleaved rounds in which every model is timed
    at every batch size (``runs`` calls each, more until ``min_seconds``: a model of a fraction of a millisecond
    timed for a few milliseconds is at the mercy of each thread wake-up). Returns {name: {batch size: one list of
    milliseconds per round}}.
    Drift on a shared machine hits every model alike, so their ratios hold. Each model's runner (an exported ONNX
    session, a compiled graph) is built once."""
    make = BACKENDS.get(backend) if isinstance(backend, str) else backend
    samples: dict[str, dict[int, list[list[float]]]] = {name: {size: [] for size in batch_sizes} for name in models}
    with contextlib.ExitStack() as stack:  # every model in eval mode while timed; each submodule's own mode restored
        for model in models.values():
            if isinstance(model, nn.Module):
                stack.enter_context(eval_mode(model))
        runners = {name: make(model, example_input) if isinstance(model, nn.Module) else model for name, model in models.items()}
        for _ in range(rounds):
            for name, runner in runners.items():
                timed = measure_latency(runner, example_input, batch_sizes=batch_sizes, runs=runs, warmup=warmup, threads=threads, min_seconds=min_seconds)
                for result in timed:
                    samples[name][result.batch_size].append(result.samples_ms)
    return samples


def compare_latency(
    models: Mapping[str, nn.Module | Runner], example_input: Any, batch_sizes: Sequence[int] = (1,), **timing: Any
) -> dict[str, dict[int, float]]:
    """Median latency (ms) of several models measured side by side (``interleaved_latency``, whose ``rounds``,
    ``runs``, ``warmup``, ``backend``, ``threads`` and ``min_seconds`` it takes): each model's per-round medians
    reduced to their median.

    Example:
        >>> medians = compare_latency({"a": nn.Linear(8, 8), "b": nn.Linear(8, 4)}, torch.zeros(1, 8), rounds=2, runs=5)
        >>> sorted(medians), sorted(medians["a"])
        (['a', 'b'], [1])
    """
    samples = interleaved_latency(models, example_input, batch_sizes, **timing)
    return {
        name: {size: statistics.median(statistics.median(values) for values in per_round) for size, per_round in per_size.items()}
        for name, per_size in samples.items()
    }
