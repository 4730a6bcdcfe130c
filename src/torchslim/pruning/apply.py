"""Applying masks to modules (a parametrization that multiplies the weight by its mask) and making them permanent.

While a mask is attached, the forward pass sees ``weight * mask``: pruned weights are exactly zero whatever the
optimizer does to the stored original (momentum, weight decay), and their gradients are zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.core.selector import weight_of
from torchslim.core.ties import retie, tied_groups


class WeightMask(nn.Module):
    """Parametrization: weight -> weight * mask (mask is a buffer, saved and moved with the module)."""

    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def get_mask(module: nn.Module) -> torch.Tensor | None:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or "weight" not in parametrizations:
        return None
    for parametrization in parametrizations["weight"]:
        if isinstance(parametrization, WeightMask):
            return parametrization.mask
    return None


@torch.no_grad()
def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Attach (or replace) the module's weight mask; the stored original is zeroed where pruned as well."""
    weight = weight_of(module)
    mask = mask.to(device=weight.device, dtype=torch.bool)
    if mask.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not fit weight {tuple(weight.shape)}")
    existing = get_mask(module)
    if existing is not None:
        existing.copy_(mask)
        module.parametrizations["weight"].original.mul_(mask)
        return
    module.weight.mul_(mask)
    parametrize.register_parametrization(module, "weight", WeightMask(mask), unsafe=True)


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every mask parametrization, leaving plain weights with exact zeros where pruned (in place); tied weights
    stay tied."""
    return _fold(model, lambda module: ["weight"] if get_mask(module) is not None else [], "make_permanent")


def fold_parametrizations(model: nn.Module) -> nn.Module:
    """Every parametrization (masks, weight_norm, spectral_norm, a user's own) replaced by the plain tensor it computes
    now, in place: what an exporter can follow. Call it in eval mode (spectral_norm then uses its stored vectors
    instead of a power iteration); tied weights stay tied. Not under no_grad: torch would register the weight of a
    parametrization of several originals (weight_norm's) as a buffer."""
    return _fold(model, lambda module: list(getattr(module, "parametrizations", None) or {}), "fold_parametrizations")


def _fold(model: nn.Module, names: Callable[[nn.Module], list[str]], where: str) -> nn.Module:
    ties = tied_groups(model)
    for module in list(model.modules()):
        folded = names(module)
        if folded:
            # a deep copy shares the parametrized class with its original, and removal edits that class: give this
            # module a class of its own first, so removing here cannot break the original
            shared = type(module)
            module.__class__ = type(shared.__name__, shared.__bases__, dict(shared.__dict__))
            for name in folded:
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    retie(model, ties, where)
    return model


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """{module name: mask} of every masked module."""
    return {name: mask for name, module in model.named_modules() if (mask := get_mask(module)) is not None}


HELD_SHARE = 0.5  # a trainable weight at least this share exact zeros, with no mask, is taken for a pruned one


def unheld_zeros(model: nn.Module) -> dict[str, float]:
    """{layer name: share of zeros} of the Linear / Conv layers whose trainable weight is mostly exact zeros and holds
    no mask: a pruned model whose masks were folded (``ts.compress``'s result), which training would regrow."""
    found = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and isinstance(weight, nn.Parameter) and weight.requires_grad:
            share = 1 - int(torch.count_nonzero(weight.detach())) / weight.numel() if weight.numel() else 0.0
            if share >= HELD_SHARE:
                found[name] = share
    return found


def hold_zeros(model: nn.Module) -> list[str]:
    """Attach a mask of its non-zeros to every layer ``unheld_zeros`` finds (in place), so that training keeps its
    pruned weights at zero; returns their names. ``make_permanent`` folds the masks again."""
    names = list(unheld_zeros(model))
    modules = dict(model.named_modules())
    for name in names:
        set_mask(modules[name], weight_of(modules[name]).detach() != 0)
    return names
