"""Weight importance criteria: pluggable, registered, pure functions of a weight and its gradient statistics.

Each criterion maps (weight, statistics) to a score of the weight's shape; higher means keep.
``statistics`` holds what gradient-based criteria need, gathered by ``collect_gradient_statistics``:
``squared_gradient`` (sum over batches of g^2) and ``taylor`` (sum over batches of |w * g|).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry
from torchslim.train.modes import model_device, train_mode

Criterion = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
WEIGHT_IMPORTANCE: Registry[Criterion] = Registry("weight importance")
NEEDS_GRADIENTS = {"gradient", "taylor"}


@WEIGHT_IMPORTANCE.register("l1")
def l1(weight: torch.Tensor, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    """|w|: magnitude."""
    return weight.abs()


@WEIGHT_IMPORTANCE.register("l2")
def l2(weight: torch.Tensor, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    """w^2: squared magnitude (same order as |w| per weight; differs once scores are summed over groups)."""
    return weight.pow(2)


@WEIGHT_IMPORTANCE.register("gradient")
def gradient(weight: torch.Tensor, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    """Accumulated squared gradients (a diagonal Fisher estimate) over calibration batches."""
    return _statistic(statistics, "squared_gradient")


@WEIGHT_IMPORTANCE.register("taylor")
def taylor(weight: torch.Tensor, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    """First-order Taylor |w * g|, accumulated over calibration batches."""
    return _statistic(statistics, "taylor")


@WEIGHT_IMPORTANCE.register("random")
def random(weight: torch.Tensor, statistics: dict[str, torch.Tensor]) -> torch.Tensor:
    """Uniform random scores: the baseline every criterion must beat (seeded by the caller)."""
    generator = statistics.get("generator")
    return torch.rand(weight.shape, generator=generator if isinstance(generator, torch.Generator) else None).to(weight.device)


def _statistic(statistics: dict[str, Any], key: str) -> torch.Tensor:
    if key not in statistics:
        raise TorchslimError(f"this criterion needs gradient statistics ('{key}'): pass data and calibration_batches > 0")
    return statistics[key]


def collect_gradient_statistics(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    batches: Iterable,
    count: int,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Sum g^2 and |w * g| for each selected module's weight over ``count`` batches (train mode, no update)."""
    loss = loss or (lambda outputs, targets: F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)))
    device = model_device(model)
    sums = {name: {"squared_gradient": torch.zeros_like(_weight(m)), "taylor": torch.zeros_like(_weight(m))} for name, m in modules}
    seen = 0
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    with train_mode(model):
        for inputs, targets in batches:
            if seen >= count:
                break
            model.zero_grad(set_to_none=True)
            loss(model(inputs.to(device)), targets.to(device)).backward()
            for name, module in modules:
                weight = _weight(module)
                grad = _weight_grad(module)
                if grad is None:
                    continue
                sums[name]["squared_gradient"] += grad.pow(2)
                sums[name]["taylor"] += (weight.detach() * grad).abs()
            seen += 1
    model.zero_grad(set_to_none=True)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(previous[name])
    if seen == 0:
        raise TorchslimError("gradient statistics need at least one calibration batch; the data gave none")
    return sums


def _weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach()


def _weight_grad(module: nn.Module) -> torch.Tensor | None:
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        grad = parametrizations["weight"].original.grad
        mask = getattr(parametrizations["weight"][0], "mask", None)
        return None if grad is None else (grad * mask if mask is not None else grad)
    return module.weight.grad
