"""Helpers that leave a model's train/eval mode as they found it, and find its device."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then restore each one's own mode."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def train_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in train mode for the block, then restore each submodule's own mode."""
    modes = {module: module.training for module in model.modules()}
    model.train()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training
