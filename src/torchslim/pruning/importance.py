"""Importance criteria: how much each weight (unstructured pruning) or each group of coupled channels (structured
pruning) matters. Higher means keep. Both kinds live in registries whose entries say what a criterion needs:
nothing but the weights, activations over calibration batches (outputs, or for ``INPUT_NORMS`` the norms of the inputs
that the layers reading a group see), or gradients of the task's loss.

Weight criteria map (weight, statistics) to a score of the weight's shape; ``statistics`` holds, for gradient
criteria, ``squared_gradient`` (sum over batches of g^2) and ``taylor`` (sum of |w * g|). Group criteria map
(model, group, statistics) to one number; activation statistics are per module and output channel. Any callable
``criterion(model, group) -> float`` is accepted as a group criterion too (as Torch-Pruning accepts any).

Example:
    >>> import torch
    >>> WEIGHT_IMPORTANCE.get("l1").score(torch.tensor([-2.0, 1.0]), {}).tolist()
    [2.0, 1.0]
    >>> sorted(name for name in GROUP_IMPORTANCE if GROUP_IMPORTANCE.get(name).needs)
    ['apoz', 'mean_activation', 'taylor', 'wanda']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode, model_device, train_mode
from torchslim.core.registry import Registry
from torchslim.core.selector import is_conv1d
from torchslim.pruning.apply import get_mask
from torchslim.pruning.graph import Group, ParamSlice
from torchslim.tasks.batches import forward_batches, model_inputs, move_to

# what a criterion needs besides the weights
GRADIENTS, ACTIVATIONS, INPUT_NORMS = "gradients", "activations", "input norms"


@dataclasses.dataclass(frozen=True)
class Criterion:
    """A registered importance criterion: its scoring function and what it needs (None, "activations" or "gradients")."""

    score: Callable[..., Any]
    needs: str | None = None


WEIGHT_IMPORTANCE: Registry[Criterion] = Registry("weight importance")
GROUP_IMPORTANCE: Registry[Criterion] = Registry("group importance")


def weight_criterion(name: str, needs: str | None = None) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register a per-weight criterion ``score(weight, statistics) -> scores of the weight's shape``."""

    def add(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        WEIGHT_IMPORTANCE.register(name, (function.__doc__ or "").strip())(Criterion(function, needs))
        return function

    return add


def group_criterion(name: str, needs: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a group criterion ``score(model, group, statistics) -> float`` (None: leave the group alone)."""

    def add(function: Callable[..., Any]) -> Callable[..., Any]:
        GROUP_IMPORTANCE.register(name, (function.__doc__ or "").strip())(Criterion(function, needs))
        return function

    return add


# -- per weight ------------------------------------------------------------------------------------------------------


@weight_criterion("l1")
def l1(weight: torch.Tensor, statistics: dict[str, Any]) -> torch.Tensor:
    """|w|: magnitude."""
    return weight.abs()


@weight_criterion("l2")
def l2(weight: torch.Tensor, statistics: dict[str, Any]) -> torch.Tensor:
    """w^2: squared magnitude (same order as |w| per weight; differs once scores are summed over groups)."""
    return weight.pow(2)


@weight_criterion("gradient", needs=GRADIENTS)
def gradient(weight: torch.Tensor, statistics: dict[str, Any]) -> torch.Tensor:
    """Accumulated squared gradients (a diagonal Fisher estimate) over calibration batches."""
    return _statistic(statistics, "squared_gradient")


@weight_criterion("taylor", needs=GRADIENTS)
def taylor(weight: torch.Tensor, statistics: dict[str, Any]) -> torch.Tensor:
    """First-order Taylor |w * g|, accumulated over calibration batches."""
    return _statistic(statistics, "taylor")


@weight_criterion("random")
def random(weight: torch.Tensor, statistics: dict[str, Any]) -> torch.Tensor:
    """Uniform random scores: the baseline every criterion must beat (seeded by the caller)."""
    generator = statistics.get("generator")
    return torch.rand(weight.shape, generator=generator if isinstance(generator, torch.Generator) else None).to(weight.device)


@weight_criterion("wanda", needs=ACTIVATIONS)
def wanda(weight: torch.Tensor, statistics: dict[str, Any]) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |w_ij| x ||x_j||_2, each weight's magnitude times the norm of the input it reads over
    the calibration tokens (compare within rows: scope "row")."""
    norms = _statistic(statistics, "input_norm").to(weight.device)
    if statistics.get("transposed"):  # GPT-2's Conv1D stores (in, out)
        return weight.abs() * norms.reshape(-1, 1)
    return weight.abs() * norms.reshape(1, -1, *([1] * (weight.dim() - 2)))


def _statistic(statistics: dict[str, Any], key: str) -> torch.Tensor:
    if key not in statistics:
        raise TorchslimError(f"this criterion needs calibration statistics ('{key}'): pass data and calibration_batches > 0")
    return statistics[key]


def parametrized_weight(module: nn.Module) -> nn.Parameter:
    """The parameter a module's weight is computed from (the stored original under a pruning mask)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and "weight" in parametrizations:
        return parametrizations["weight"].original
    weight = module.weight
    assert isinstance(weight, nn.Parameter), f"{type(module).__name__}.weight is not a parameter"
    return weight


def collect_gradient_statistics(
    model: nn.Module, modules: list[tuple[str, nn.Module]], batches: Iterable, count: int, loss: Callable[[nn.Module, Any], torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """Sum g^2 and |w * g| of each selected module's weight over ``count`` batches of ``loss(model, batch)`` (train
    mode, no update; gradients of masked weights are zero)."""
    sums = {name: {"squared_gradient": torch.zeros_like(m.weight.detach()), "taylor": torch.zeros_like(m.weight.detach())} for name, m in modules}
    seen = 0
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        with train_mode(model):
            for batch in batches:
                if seen >= count:
                    break
                model.zero_grad(set_to_none=True)
                loss(model, batch).backward()
                for name, module in modules:
                    grad = parametrized_weight(module).grad
                    if grad is None:
                        continue
                    mask = get_mask(module)
                    grad = grad * mask if mask is not None else grad
                    sums[name]["squared_gradient"] += grad.pow(2)
                    sums[name]["taylor"] += (module.weight.detach() * grad).abs()
                seen += 1
    finally:
        model.zero_grad(set_to_none=True)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(previous[name])
    if seen == 0:
        raise TorchslimError("gradient statistics need at least one calibration batch; the data gave none")
    return sums


def collect_input_norms(model: nn.Module, modules: list[tuple[str, nn.Module]], batches: Iterable, count: int) -> dict[str, dict[str, Any]]:
    """||x_j||_2 over every calibration token of each selected layer's input features (eval mode, no gradients): the
    activation statistic of Wanda, and how often each layer was called. Convolution inputs count every spatial
    position as a token."""
    sums = {name: torch.zeros(_input_features(name, module), dtype=torch.float64) for name, module in modules}
    calls = dict.fromkeys(sums, 0)

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            calls[name] += 1
            x = inputs[0].detach()
            x = x.movedim(1, -1) if isinstance(module, nn.Conv2d) else x
            sums[name] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0).cpu()

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in modules]
    try:
        seen = forward_batches(model, batches, count)
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise TorchslimError("activation statistics need at least one calibration batch; the data gave none")
    transposed = {name: is_conv1d(module) for name, module in modules}
    # a layer never called (its weight read directly by its parent, as nn.MultiheadAttention reads out_proj's) has no
    # inputs to weigh its columns by: "calls" 0 tells the caller
    return {name: {"input_norm": total.sqrt().float(), "transposed": transposed[name], "calls": calls[name]} for name, total in sums.items()}


def _input_features(name: str, module: nn.Module) -> int:
    """The input features an activation criterion scores a layer's weight columns by."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if is_conv1d(module):
        return int(module.weight.shape[0])
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return module.in_channels
    raise TorchslimError(
        f"{name}: activation-weighted importance takes Linear, Conv1D and ungrouped Conv2d layers, not {type(module).__name__}; "
        f"select those layers (layers: {{types: [Linear]}}) or leave this one out (layers: {{exclude: [{name}]}})"
    )


# -- per group -------------------------------------------------------------------------------------------------------


def slice_values(model: nn.Module, piece: ParamSlice) -> torch.Tensor:
    """The entries of a tensor a group owns."""
    tensor = getattr(model.get_submodule(piece.module), piece.name).detach()
    return tensor.index_select(piece.dim, torch.tensor(piece.indices, device=tensor.device))


def group_norm(model: nn.Module, pieces: list[ParamSlice], p: int) -> float:
    """The group's L1 norm (p=1) or L2 norm (p=2) over its weights: the per-weight criteria l1 / l2 summed."""
    criterion = WEIGHT_IMPORTANCE.get("l1" if p == 1 else "l2").score
    total = sum(float(criterion(slice_values(model, piece), {}).sum()) for piece in pieces if piece.name == "weight")
    return total if p == 1 else total**0.5


def _norm_pieces(group: Group) -> list[ParamSlice]:
    return group.producers or group.members


@group_criterion("l1")
def group_l1(model: nn.Module, group: Group, statistics: dict[str, Any]) -> float:
    """L1 norm of the group's filters / neurons (Li et al. 2017)."""
    return group_norm(model, _norm_pieces(group), 1)


@group_criterion("l2")
def group_l2(model: nn.Module, group: Group, statistics: dict[str, Any]) -> float:
    """L2 norm of the group's filters / neurons."""
    return group_norm(model, _norm_pieces(group), 2)


def _batchnorm_scales(model: nn.Module, group: Group) -> list[ParamSlice]:
    return [p for p in group.members if p.name == "weight" and isinstance(model.get_submodule(p.module), nn.modules.batchnorm._BatchNorm)]


@group_criterion("bn_scale")
def bn_scale(model: nn.Module, group: Group, statistics: dict[str, Any]) -> float | None:
    """|gamma| of the BatchNorm after the channels (Network Slimming); groups without one are left alone."""
    gammas = _batchnorm_scales(model, group)
    return sum(float(slice_values(model, p).abs().sum()) for p in gammas) if gammas else None


def activation_sites(model: nn.Module, group: Group) -> list[ParamSlice]:
    """Where a group's activations are measured: its BatchNorm outputs, else its producers' outputs."""
    return _batchnorm_scales(model, group) or [p for p in group.producers if p.name == "weight"]


def _activation_score(statistics: dict[str, Any], model: nn.Module, group: Group, key: str) -> float | None:
    values = [float(statistics[p.module][key][p.indices].mean()) for p in activation_sites(model, group) if p.module in statistics]
    return sum(values) / len(values) if values else None


@group_criterion("mean_activation", needs=ACTIVATIONS)
def mean_activation(model: nn.Module, group: Group, statistics: dict[str, Any]) -> float | None:
    """Mean activation after ReLU over calibration batches."""
    return _activation_score(statistics, model, group, "mean_activation")


@group_criterion("apoz", needs=ACTIVATIONS)
def apoz(model: nn.Module, group: Group, statistics: dict[str, Any]) -> float | None:
    """1 - average percentage of zeros after ReLU (Hu et al. 2016)."""
    value = _activation_score(statistics, model, group, "apoz")
    return None if value is None else 1.0 - value


@group_criterion("taylor", needs=GRADIENTS)
def group_taylor(model: nn.Module, group: Group, statistics: dict[str, Any]) -> float | None:
    """|activation x gradient of the task's loss| (Molchanov et al. 2017)."""
    return _activation_score(statistics, model, group, "taylor")


def reads_inputs(module: nn.Module) -> bool:
    """Whether ``collect_input_norms`` can measure this layer's input features."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def reader_contribution(model: nn.Module, pieces: list[ParamSlice], statistics: dict[str, Any]) -> float | None:
    """sum over the reading columns W[:, j] of ||W[:, j]||_2 x ||x_j||_2 (x_j: input feature j over the calibration
    tokens): for a Linear reader, exactly the norm of what feature j adds to its output over those tokens. None when
    no reader was measured."""
    total, found = 0.0, False
    for piece in pieces:
        entry = statistics.get(piece.module)
        if piece.name != "weight" or not isinstance(entry, dict) or "input_norm" not in entry:
            continue
        columns = slice_values(model, piece).movedim(piece.dim, 0).reshape(len(piece.indices), -1).float()
        total += float((columns.norm(dim=1) * entry["input_norm"][piece.indices].to(columns.device)).sum())
        found = True
    return total if found else None


@group_criterion("wanda", needs=INPUT_NORMS)
def group_wanda(model: nn.Module, group: Group, statistics: dict[str, Any]) -> float | None:
    """What removing the channels takes out of the layers that read them: ||W[:, j]|| x ||x_j|| summed over the
    readers' columns (Wanda's |w| x ||x|| for whole input channels). For a gated MLP (SwiGLU) neuron this is its
    down-projection column times the gated activation that feeds it, which weight norms of gate/up rows miss.
    Groups no measured layer reads are left alone."""
    return reader_contribution(model, group.consumers, statistics)


@group_criterion("random")
def group_random(model: nn.Module, group: Group, statistics: dict[str, Any]) -> float:
    """Uniform random scores (seeded): the baseline."""
    return float(torch.rand(1, generator=statistics["generator"]))


def _channel_axis(module: nn.Module, output: torch.Tensor) -> int:
    convolutional = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    return 1 if isinstance(module, convolutional) and output.dim() > 2 else output.dim() - 1


def activation_statistics(
    model: nn.Module, modules: set[str], batches: Iterable, count: int, loss: Callable[[nn.Module, Any], torch.Tensor] | None
) -> dict[str, dict[str, torch.Tensor]]:
    """Per module and output channel: mean activation after ReLU, APoZ, and (with ``loss``) |a * dL/da| averaged
    over ``count`` batches, in eval mode (every submodule's mode restored)."""
    stats: dict[str, dict[str, Any]] = {}
    captured: dict[str, tuple[torch.Tensor, list[int]]] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            axis = _channel_axis(module, output)
            dims = [d for d in range(output.dim()) if d != axis]
            active = F.relu(output.detach().float())
            entry = stats.setdefault(name, {"mean_activation": 0.0, "apoz": 0.0, "taylor": 0.0, "batches": 0})
            entry["mean_activation"] = entry["mean_activation"] + active.mean(dim=dims)
            entry["apoz"] = entry["apoz"] + (active == 0).float().mean(dim=dims)
            entry["batches"] += 1
            if loss is not None and output.requires_grad:
                output.retain_grad()
                captured[name] = (output, dims)

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name in modules]
    try:
        with eval_mode(model):
            for index, batch in enumerate(batches):
                if index >= count:
                    break
                captured.clear()
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    if loss is None:
                        with torch.no_grad():
                            args, kwargs = model_inputs(move_to(batch, model_device(model)), model)
                            model(*args, **kwargs)
                        continue
                    loss(model, batch).backward()
                for name, (output, dims) in captured.items():
                    if output.grad is not None:
                        product = (output.detach() * output.grad).float()
                        spatial = [d for d in dims if d != 0]
                        contribution = product.mean(dim=spatial).abs().mean(dim=0) if spatial else product.abs().mean(dim=0)
                        stats[name]["taylor"] = stats[name]["taylor"] + contribution
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    if not stats:
        raise TorchslimError("calibration got no batches: the calibration data is empty")
    return {name: {key: value / entry["batches"] for key, value in entry.items() if key != "batches"} for name, entry in stats.items()}


__all__ = [
    "ACTIVATIONS",
    "GRADIENTS",
    "GROUP_IMPORTANCE",
    "INPUT_NORMS",
    "WEIGHT_IMPORTANCE",
    "Criterion",
    "activation_sites",
    "activation_statistics",
    "collect_gradient_statistics",
    "collect_input_norms",
    "group_criterion",
    "group_norm",
    "parametrized_weight",
    "reader_contribution",
    "reads_inputs",
    "slice_values",
    "weight_criterion",
]
