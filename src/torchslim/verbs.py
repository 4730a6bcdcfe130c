"""The public verbs that are not a technique of their own: train, save and load (``evaluate`` is
``torchslim.train.evaluate``). Each takes a
model and returns a ``Result`` (a new model and a ``Report``) or metrics."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.core.checks import check_model, unwrapped, user_hooks
from torchslim.core.copying import copy_model
from torchslim.core.environment import environment
from torchslim.core.files import load_model_file, save_model_file
from torchslim.core.report import Report, Result, Stage
from torchslim.core.spec import set_spec, spec_of
from torchslim.data.sources import as_source
from torchslim.measure.counts import count_nonzeros, count_parameters
from torchslim.tasks.base import Task
from torchslim.train.fit import TrainConfig, fit


def train(
    model: nn.Module,
    data: Any,
    config: TrainConfig | Mapping[str, Any] | None = None,
    task: str | Task | None = None,
    inplace: bool = False,
    progress: bool | str | None = None,
) -> Result:
    """Train a copy of ``model`` (the original stays as it was unless ``inplace=True``) on ``data`` (anything
    ``torchslim.data.as_source`` takes) by its ``task``, and report the result.

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> result = ts.train(ts.models.create_for("lenet-300-100", data), data, {"epochs": 1}, progress=False)
        >>> result.report.stages[0].name
        'train'
    """
    asked_batch = isinstance(config, Mapping) and "batch_size" in config
    config = TrainConfig.coerce(config)
    check_model(model, "train", float32=True, copies=not inplace)
    trained = model if inplace else copy_model(model)
    source = as_source(data, trained)
    history = fit(trained, source, config, task=task, progress=progress)
    metrics = dict(history.final)
    metrics.update(parameters=count_parameters(trained), nonzeros=count_nonzeros(trained), train_seconds=history.seconds)
    # without evaluation data apart, the "test_" metrics are the training data's: said so, not called test
    where = "test" if source.separate_eval else "on the training data,"
    if not source.separate_eval:
        metrics["evaluated_on"] = "training data"
    stage = Stage(name="train", kind="train", metrics=metrics, config=config.to_dict())
    stage.notes = [
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}"
        + "".join(f", {where} {key[5:]} {value:.4g}" for key, value in row.items() if key in ("test_accuracy", "test_perplexity", "test_cosine"))
        for row in history.epochs
    ] + [note for note in source.notes if note.startswith("no separate evaluation data")]
    if asked_batch and source.fixed_batches:
        stage.notes.append(f"batch_size {config.batch_size} left unused: the batches are the data's own (a DataLoader's batch size is its own)")
    report = Report.for_model(model, [stage])
    report.environment = environment()
    return Result(model=trained, report=report)


def save(model: nn.Module, path: str | os.PathLike[str], overwrite: bool = True, factory: str | None = None, kwargs: dict[str, Any] | None = None) -> Path:
    """Save a model in the format its suffix names: ``.safetensors`` (weights and a JSON architecture spec, no
    pickle), ``.tslim`` (the compressed file), or ``.onnx`` (a model that runs in ONNX Runtime).

    Any model a verb returned saves, a user's own class included: the file records how to rebuild it (its class's
    import path and the constructor arguments its attributes hold, checked by rebuilding it) and every structural
    change torchslim made; ``factory="package.module:build"`` with ``kwargs`` names the builder where the class
    cannot tell. Hugging Face models record their class and config. Loading an import path needs ``trust_factory``.
    """
    model = unwrapped(model)  # a compiled or DataParallel model: the module it holds
    hooks = user_hooks(model)
    if hooks:
        warnings.warn(
            f"ts.save({str(path)!r}): the file stores weights and the architecture, not forward hooks; the loaded model runs without "
            f"{'; '.join(hooks[:4])}{f' and {len(hooks) - 4} more' if len(hooks) > 4 else ''} (unless its constructor registers them)",
            stacklevel=2,
        )
    if factory is not None:
        set_spec(model, {"factory": factory, "kwargs": dict(kwargs or {}), "transforms": spec_of(model).get("transforms", []), "inferred": True})
    return save_model_file(model, path, overwrite=overwrite)


def load(path: str | os.PathLike[str], trust_factory: bool | str = False) -> nn.Module:
    """Load a model saved by ``save`` (no unpickling). An architecture given as an import path runs code, so it needs
    ``trust_factory``: True, or the exact ``package.module:callable`` you expect the file to name."""
    return load_model_file(path, trust_factory=trust_factory)
