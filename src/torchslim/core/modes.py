"""Helpers that leave a model's train/eval mode as they found it, and find its device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def model_precision(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 for a model with none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    modes = {module: module.training for module in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for module, previous in modes.items():
            module.training = previous


def eval_mode(model: nn.Module):  # a context manager
    """Put every submodule in eval mode for the block, then restore each one's own mode."""
    return _mode(model, False)


def train_mode(model: nn.Module):  # a context manager
    """Put the model in train mode for the block, then restore each submodule's own mode."""
    return _mode(model, True)
