"""Baseline training on full MNIST: LeNet-300-100 (target <= 1.8% test error) and LeNet-5 (target <= 0.9%),
the Deep Compression baselines being 1.64% and 0.80%. Also profiles both trained models.

Full mode trains on all 60,000 images; quick mode on 6,000 for one epoch. The trained models are saved under
benchmarks/results/ for the compression benchmarks to start from."""

from __future__ import annotations

import time

import torch

import torchslim as ts
from benchmarks.common import BASELINE_TRAINING
from benchmarks.harness import RESULTS, arguments, write
from torchslim.report import markdown

# model: (target error, training config)
RECIPES = {"lenet-300-100": (0.018, BASELINE_TRAINING["lenet-300-100"]), "lenet-5": (0.009, BASELINE_TRAINING["lenet-5"])}


def main() -> None:
    options = arguments(__doc__)
    data = ts.data.load("mnist", root=options.data_root / "mnist", download=False)
    if options.quick:
        data = data.subset(train=6000, test=2000)
    rows, results = [], {}
    for name, (target, config) in RECIPES.items():
        if options.quick:
            config = {**config, "epochs": 1}
        torch.manual_seed(0)
        model = ts.models.create(name)
        started = time.perf_counter()
        trained = ts.train(model, data, {**config, "eval_every_epoch": False}, progress=False)
        seconds = time.perf_counter() - started
        metrics = trained.report.stages[0].metrics
        profiled = ts.profile(trained.model, data.example_input(1), batch_sizes=(1, 64), runs=100).report.stages[0].metrics
        latency = {row["batch_size"]: row for row in profiled["latency"]}
        results[name] = {
            "test_error": metrics["error"],
            "test_errors": metrics["errors"],
            "target_error": target,
            "meets_target": metrics["error"] <= target,
            "train_seconds": seconds,
            "config": config,
            "parameters": profiled["parameters"],
            "macs": profiled["macs"],
            "stored_bytes": profiled["stored_bytes"],
            "latency_ms": {str(b): {k: latency[b][k] for k in ("median_ms", "min_ms", "p90_ms", "bimodal")} for b in latency},
        }
        if not options.quick and not options.no_write:
            RESULTS.mkdir(parents=True, exist_ok=True)
            ts.save(trained.model, RESULTS / f"{name}-mnist.safetensors")
        rows.append(
            [
                name,
                f"{100 * metrics['error']:.2f}%",
                f"{100 * target:.2f}%",
                "yes" if metrics["error"] <= target else "NO",
                f"{profiled['parameters']:,}",
                f"{profiled['macs']:,}",
                f"{profiled['stored_bytes']:,}",
                f"{latency[1]['median_ms']:.3f}",
                f"{latency[64]['median_ms']:.3f}",
                f"{seconds:.0f}",
            ]
        )
    table = markdown.table(["model", "test error", "target", "met", "params", "MACs", "file bytes", "latency b1 (ms)", "latency b64 (ms)", "train s"], rows)
    write(
        "baseline",
        "Baseline training on full MNIST",
        results,
        [table],
        options,
        notes=["Deep Compression's baselines: LeNet-300-100 1.64%, LeNet-5 0.80%.", "Latency: eager PyTorch, median of 100 runs after warm-up."],
    )


if __name__ == "__main__":
    main()
