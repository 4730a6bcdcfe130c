"""Helpers shared by benchmarks: the trained MNIST baselines (trained once, then reused from results/)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import torchslim as ts
from benchmarks.harness import RESULTS

BASELINE_TRAINING = {
    "lenet-300-100": {"epochs": 20, "optimizer": "sgd", "lr": 0.05, "batch_size": 64, "weight_decay": 1e-4},
    "lenet-5": {"epochs": 12, "optimizer": "sgd", "lr": 0.02, "batch_size": 64, "weight_decay": 5e-4, "warmup_epochs": 0.5, "grad_clip": 5.0},
    "resnet20": {"epochs": 3, "optimizer": "sgd", "lr": 0.05, "batch_size": 128, "weight_decay": 1e-4, "warmup_epochs": 0.2},
}


def load_mnist(root: Path, quick: bool):
    data = ts.data.load("mnist", root=root / "mnist", download=False)
    return data.subset(train=6000, test=2000) if quick else data


def trained_baseline(name: str, data, quick: bool) -> nn.Module:
    """The trained model saved by benchmarks.baseline, or a freshly trained one (one epoch in quick mode)."""
    path = RESULTS / f"{name}-mnist.safetensors"
    if path.exists() and not quick:
        return ts.load(path)
    torch.manual_seed(0)
    config = dict(BASELINE_TRAINING[name], eval_every_epoch=False)
    if quick:
        config["epochs"] = 1
    model = ts.train(ts.models.create_for(name, data), data, config, progress=False).model
    if not quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        ts.save(model, path)
    return model


def pareto_axis(axis, series: dict[str, list[tuple[float, float]]], dense_error: float, xlabel: str, title: str) -> None:
    """One panel of a Pareto plot: test error (%) against a cost, one line per allocation, the dense error dotted."""
    for (allocation, points), style in zip(series.items(), ("-o", "--s", "-.^")):
        points = sorted(points)
        axis.plot([p[0] for p in points], [p[1] for p in points], style, label=allocation)
    axis.axhline(100 * dense_error, color="#888", linestyle=":", label="dense")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("test error (%)")
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend()


def each_model(run, data, quick: bool, names: tuple[str, ...] = ("lenet-300-100", "lenet-5")) -> tuple[dict, list[list[str]]]:
    """``run(name, data, quick) -> (results, rows)`` for each model: the results by model and all rows."""
    results, rows = {}, []
    for name in names:
        results[name], part = run(name, data, quick)
        rows += part
    return results, rows


def save_figure(figure, name: str) -> None:
    """Write a matplotlib figure to benchmarks/results/<name> and close it."""
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    figure.savefig(RESULTS / name, dpi=110, bbox_inches="tight")
    plt.close(figure)
