"""Sparsity regularization during training: L1, L2, group lasso, and L0 through hard-concrete gates (Louizos et
al. 2018), each with a way to turn what it learned into pruning masks.

Use a regularizer as a ``fit`` callback: it adds ``strength * penalty`` to the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.core.errors import TorchslimError
from torchslim.core.selector import LayerSelector, select_modules, weight_of
from torchslim.pruning.apply import set_mask
from torchslim.pruning.masks import global_masks, keep_a_floor
from torchslim.train.fit import Callback, TrainState


def group_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output row / filter: (out, ...) -> (out,)."""
    return weight.reshape(weight.shape[0], -1).norm(dim=1)


class SparsityRegularizer(Callback):
    """Adds ``strength`` x penalty over the selected layers' weights: ``l1`` sum|w|, ``l2`` sum w^2, ``group_lasso``
    sum over output neurons / filters of sqrt(group size) * ||w_g||_2."""

    KINDS = ("l1", "l2", "group_lasso")

    def __init__(self, model: nn.Module, kind: str = "l1", strength: float = 1e-5, layers: LayerSelector | dict | None = None) -> None:
        if kind not in self.KINDS:
            raise TorchslimError(f"unknown regularizer {kind!r}; valid: {', '.join(self.KINDS)}")
        if strength < 0:
            raise TorchslimError(f"strength must be >= 0, got {strength}")
        self.kind, self.strength = kind, strength
        self.modules = select_modules(model, layers)

    def penalty(self) -> torch.Tensor:
        total = None
        for _, module in self.modules:
            weight = weight_of(module)
            if self.kind == "l1":
                term = weight.abs().sum()
            elif self.kind == "l2":
                term = weight.pow(2).sum()
            else:
                group_size = weight[0].numel()
                term = math.sqrt(group_size) * group_norms(weight).sum()
            total = term if total is None else total + term
        assert total is not None
        return total

    def extra_loss(self, state: TrainState) -> torch.Tensor:
        return self.strength * self.penalty()

    @torch.no_grad()
    def to_masks(self, sparsity: float | None = None, threshold: float | None = None) -> dict[str, torch.Tensor]:
        """Masks from what was learned: weights (l1/l2) or whole rows (group lasso) whose magnitude is below
        ``threshold``, or the lowest ``sparsity`` fraction across the selected layers. Attaches them and returns them."""
        if (sparsity is None) == (threshold is None):
            raise TorchslimError("give exactly one of sparsity or threshold")
        masks = {}
        if self.kind == "group_lasso":
            norms = {name: group_norms(module.weight.detach()) / math.sqrt(module.weight[0].numel()) for name, module in self.modules}
            if threshold is not None:
                keep = {name: n > threshold for name, n in norms.items()}
            else:
                assert sparsity is not None
                keep = global_masks(norms, sparsity)
                keep_a_floor(keep, norms)  # no layer emptied by the one threshold
            for name, module in self.modules:
                weight = weight_of(module)
                shape = (-1,) + (1,) * (weight.dim() - 1)
                masks[name] = keep[name].view(shape).expand_as(weight).clone()
        else:
            magnitudes = {name: module.weight.detach().abs() for name, module in self.modules}
            if threshold is not None:
                masks = {n: m > threshold for n, m in magnitudes.items()}
            else:
                assert sparsity is not None
                masks = global_masks(magnitudes, sparsity)
                keep_a_floor(masks, magnitudes)
        for name, module in self.modules:
            set_mask(module, masks[name])
        return masks


class HardConcreteGate(nn.Module):
    """Parametrization weight -> weight * z with z from a hard-concrete distribution over learned log_alpha.

    In training z is sampled (reparametrized); in eval it is the deterministic gate. ``granularity`` "weight" gives
    a gate per weight, "neuron" one per output row / filter.
    """

    beta, gamma, zeta = 2.0 / 3.0, -0.1, 1.1

    def __init__(self, weight: torch.Tensor, granularity: str = "weight", initial_keep: float = 0.9) -> None:
        super().__init__()
        shape = weight.shape if granularity == "weight" else (weight.shape[0],) + (1,) * (weight.dim() - 1)
        initial = math.log(1 - initial_keep) - math.log(initial_keep)
        self.log_alpha = nn.Parameter(torch.full(shape, -initial, device=weight.device, dtype=weight.dtype))

    def gate(self) -> torch.Tensor:
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + self.log_alpha) / self.beta)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        """Probability each gate is non-zero, summed: the differentiable L0 norm."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta)).sum()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate()


class L0Regularizer(Callback):
    """L0 regularization with hard-concrete gates: attach gates, train with ``strength`` x expected L0 (per weight
    gated, normalized by the gate count), then ``to_masks`` turns the deterministic gates into masks."""

    def __init__(
        self, model: nn.Module, strength: float = 1e-2, layers: LayerSelector | dict | None = None, granularity: str = "weight", initial_keep: float = 0.9
    ) -> None:
        if granularity not in ("weight", "neuron"):
            raise TorchslimError(f"granularity must be 'weight' or 'neuron', got {granularity!r}")
        self.strength = strength
        self.modules = select_modules(model, layers)
        self.gates: dict[str, HardConcreteGate] = {}
        for name, module in self.modules:
            gate = HardConcreteGate(module.weight.detach(), granularity, initial_keep)
            parametrize.register_parametrization(module, "weight", gate, unsafe=True)
            self.gates[name] = gate
        self.count = sum(g.log_alpha.numel() for g in self.gates.values())

    def expected_l0(self) -> torch.Tensor:
        return sum(g.expected_l0() for g in self.gates.values())  # type: ignore[return-value]

    def extra_loss(self, state: TrainState) -> torch.Tensor:
        return self.strength * self.expected_l0() / self.count

    @torch.no_grad()
    def to_masks(self) -> dict[str, torch.Tensor]:
        """Fold the deterministic gates into the weights, remove the gates and attach masks where a gate is zero."""
        masks = {}
        for name, module in self.modules:
            gate = self.gates[name]
            gate.eval()
            value = gate.gate()
            original = module.parametrizations["weight"].original.detach().clone()
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            weight = weight_of(module)
            weight.copy_(original * value)
            masks[name] = (value > 0).expand_as(weight).clone()
            set_mask(module, masks[name])
        return masks
