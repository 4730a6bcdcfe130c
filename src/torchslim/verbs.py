"""The public verbs: each takes a model and returns a Result (a new model and a Report) or metrics."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from torchslim.core.environment import environment
from torchslim.core.report import Report, Result, Stage
from torchslim.measure.counts import count_nonzeros, count_parameters
from torchslim.train.evaluate import evaluate as _evaluate
from torchslim.train.fit import TrainConfig, fit


def train(
    model: nn.Module,
    data: Any,
    config: TrainConfig | Mapping[str, Any] | None = None,
    inplace: bool = False,
    progress: bool | None = None,
) -> Result:
    """Train a copy of ``model`` (the original stays as it was unless ``inplace=True``) and report the result.

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> result = ts.train(ts.models.create_for("lenet-300-100", data), data, {"epochs": 1})
        >>> result.report.stages[0].name
        'train'
    """
    config = TrainConfig.coerce(config)
    trained = model if inplace else copy.deepcopy(model)
    history = fit(trained, data, config, progress=progress)
    metrics = dict(history.final)
    metrics.update(parameters=count_parameters(trained), nonzeros=count_nonzeros(trained), train_seconds=history.seconds)
    stage = Stage(name="train", kind="train", metrics=metrics, config=config.to_dict())
    stage.layers = []
    stage.notes = [f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}" + (
        f", test error {100 * row['test_error']:.2f}%" if "test_error" in row else "") for row in history.epochs]
    report = Report.for_model(model, [stage])
    report.environment = environment()
    return Result(model=trained, report=report)


def evaluate(model: nn.Module, data: Any, split: str = "test", batch_size: int = 1000, limit: int | None = None) -> dict[str, float]:
    """Accuracy, error, loss and example count of ``model`` on a dataset split (mode restored afterwards)."""
    return _evaluate(model, data, split=split, batch_size=batch_size, limit=limit)


def save(model: nn.Module, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Save a model as safetensors weights with its JSON architecture spec (see io.modelfile)."""
    from torchslim.io.modelfile import save_model

    return save_model(model, path, overwrite=overwrite)


def load(path: str | os.PathLike[str], trust_factory: bool = False) -> nn.Module:
    """Load a model saved by ``save`` (.safetensors) or a compressed ``.tslim`` file (no unpickling; import-path
    architectures need ``trust_factory``)."""
    from torchslim.codec.tslim import is_tslim, load_tslim
    from torchslim.io.modelfile import load_model

    if is_tslim(path):
        return load_tslim(path, trust_factory=trust_factory)
    return load_model(path, trust_factory=trust_factory)


def compress(model: nn.Module, recipe: Any, data: Any, **options: Any):
    """Run a recipe of compression stages (a built-in name such as ``deep-compression``, a YAML path, a mapping or a
    Recipe) on a copy of ``model``; see ``torchslim.pipeline.compress`` for the options. ``result.save("x.tslim")``
    writes the compressed file."""
    from torchslim.pipeline.runner import compress as run

    return run(model, recipe, data, **options)


def quantize(model: nn.Module, config: Any = None, inplace: bool = False) -> Result:
    """Weight-only quantization of Linear/Conv2d layers (uniform, k-means, power-of-two, binary, ternary, fp16/bf16),
    with per-layer schemes; see ``torchslim.quantization.WeightOnlyConfig``.

    Example:
        >>> import torchslim as ts
        >>> result = quantize(ts.models.create("lenet-300-100"), {"weights": {"scheme": "uniform", "bits": 8}})
        >>> result.report.stages[0].metrics["compression"] > 3.9
        True
    """
    from torchslim.quantization.weight_only import quantize_weights

    return quantize_weights(model, config or {}, inplace=inplace)
