"""Evaluation of a classifier (or a character model) over a dataset split or any iterable of batches."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.train.modes import eval_mode, model_device


def _batches(data: Any, split: str, batch_size: int, limit: int | None, block_size: int = 64) -> Iterable:
    if hasattr(data, "loader") and hasattr(data, "train"):
        return data.loader(split, batch_size=batch_size, shuffle=False, limit=limit, augment=False)
    if hasattr(data, "loader") and hasattr(data, "train_ids"):
        return data.loader(split, batch_size=batch_size, block_size=block_size, batches=limit or 10**9)
    return data


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Any,
    split: str = "test",
    batch_size: int = 1000,
    limit: int | None = None,
) -> dict[str, float]:
    """Accuracy, error, mean cross-entropy and example count of ``model`` on a split (or a loader of batches).

    For sequence outputs (B, T, V) it also gives bits per character. The model's train/eval mode is restored.

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> metrics = evaluate(ts.models.create("lenet-300-100", in_features=64), data)
        >>> 0.0 <= metrics["accuracy"] <= 1.0
        True
    """
    device = model_device(model)
    correct, count, loss_sum, sequence = 0, 0, 0.0, False
    with eval_mode(model):
        for inputs, targets in _batches(data, split, batch_size, limit, getattr(model, "block_size", 64)):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            if outputs.dim() == 3:  # (B, T, V) language model
                sequence = True
                outputs, targets = outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
            loss_sum += F.cross_entropy(outputs.float(), targets, reduction="sum").item()
            correct += (outputs.argmax(dim=-1) == targets).sum().item()
            count += targets.numel()
    if count == 0:
        raise ValueError("evaluate got no examples (an empty split or loader)")
    loss = loss_sum / count
    metrics = {"accuracy": correct / count, "error": 1 - correct / count, "loss": loss, "examples": count}
    metrics["errors"] = count - correct
    if sequence:
        metrics["bits_per_character"] = loss / math.log(2)
    return metrics
