"""Evaluation of a model on data by its task (accuracy for classification, perplexity for language modeling,
cosine similarity to the original for unlabeled data, or a user's own metric)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from torchslim.core.checks import check_model
from torchslim.data.sources import DataSource, as_source
from torchslim.tasks.base import Task, resolve_task
from torchslim.tasks.batches import batch_size_of


def _examples(batches: Iterator[Any], limit: int | None) -> Iterator[Any]:
    """Batches until ``limit`` examples have been given (all when None)."""
    seen = 0
    for batch in batches:
        if limit is not None and seen >= limit:
            return
        yield batch
        seen += batch_size_of(batch)


def evaluate_source(
    model: nn.Module, source: DataSource, task: Task, limit: int | None = None, batch_size: int | None = None, split: str = "eval"
) -> dict[str, float]:
    """``task``'s metrics of ``model`` over the ``split`` of ``source`` (the evaluation split by default; at most
    about ``limit`` examples, in order)."""
    return task.evaluate(model, _examples(source.batches(split, batch_size=batch_size, shuffle=False), limit))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    task: str | Task | None = None,
    split: str = "eval",
    batch_size: int | None = None,
    limit: int | None = None,
    reference: nn.Module | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``data`` (anything ``torchslim.data.as_source`` takes) by its ``task`` (chosen from
    the data when not named; a one-shot generator of batches is read once, into memory).
    ``split`` is "eval" (or "test") or "train"; ``limit`` caps the examples used.
    Every submodule's train/eval mode is restored.

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> metrics = evaluate(ts.models.create("lenet-300-100", in_features=64), data)
        >>> 0.0 <= metrics["accuracy"] <= 1.0
        True
    """
    check_model(model, "evaluate")
    if isinstance(data, Iterator) and not isinstance(data, torch.Tensor):
        data = list(_examples(data, limit))  # a one-shot generator of batches: read once (up to ``limit``); other verbs need more passes
    source = as_source(data, model)
    resolved = resolve_task(task, source, reference)
    name = "eval" if split in ("eval", "test") else split
    return resolved.evaluate(model, _examples(source.batches(name, batch_size=batch_size, shuffle=False), limit))


__all__ = ["evaluate", "evaluate_source"]
