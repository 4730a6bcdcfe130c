"""Per-input-channel scaling for AWQ and SmoothQuant: y = x W^T = (x / s) (W diag(s))^T. The layers of a block are
grouped by the tensor they read (q, k and v read one normalized hidden state); a group's scale is folded into the
normalization that produced that tensor where nothing else reads it (checked: the block's output must not move),
and otherwise kept on each layer as an input scale it multiplies its input by.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from torchslim.core.selector import is_conv1d
from torchslim.llm.blocks import BlockInput, block_layers, block_output, forward_inputs, sequential
from torchslim.pruning.importance import parametrized_weight


@dataclasses.dataclass
class InputGroup:
    """Layers of a block that read the same tensor, the module that made it (if one did), and whether a layer
    outside the group reads it too."""

    layers: dict[str, nn.Module]
    producer: nn.Module | None
    shared_with_others: bool


def _is_norm(module: nn.Module, width: int) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.shape[0] == width


def input_groups(block: nn.Module, sample: BlockInput, selected: dict[str, nn.Module]) -> list[InputGroup]:
    """Group the ``selected`` layers of ``block`` (name within the block -> layer) by the tensor they read, from one
    run of the block on ``sample``."""
    readers: dict[int, list[str]] = {}
    producers: dict[int, nn.Module] = {}
    keep: list[torch.Tensor] = []  # holds the tensors alive, so their ids stay unique during the run
    linear_names = {module: name for name, module in block.named_modules() if isinstance(module, nn.Linear) or is_conv1d(module)}

    def read(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            keep.append(args[0])
            readers.setdefault(id(args[0]), []).append(linear_names[module])

    def made(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            keep.append(output)
            producers.setdefault(id(output), module)

    handles = [m.register_forward_pre_hook(read) for m in linear_names]
    handles += [m.register_forward_hook(made) for m in block.modules() if m not in linear_names and m is not block]
    try:
        with torch.no_grad():
            args, kwargs = sample
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups = []
    for tensor_id, names in readers.items():
        chosen = {name: selected[name] for name in dict.fromkeys(names) if name in selected}
        if chosen:
            groups.append(InputGroup(chosen, producers.get(tensor_id), any(name not in selected for name in names)))
    return groups


def oriented_weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) float weight (GPT-2's Conv1D stores it transposed): a copy, never the layer's own storage (a fold
    that is refused puts the weight back from it)."""
    weight = layer.weight.detach().to(torch.float32, copy=True)
    return weight.t() if is_conv1d(layer) else weight


def _set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    target = parametrized_weight(layer)  # a masked layer: the mask applies to what is written
    target.data.copy_((weight.t() if is_conv1d(layer) else weight).to(target.dtype))


@torch.no_grad()
def fold_scale(block: nn.Module, group: InputGroup, scale: torch.Tensor, check: list[BlockInput]) -> bool:
    """Fold ``scale`` into the group's producing normalization (its weight and bias divided by it, the layers'
    weights multiplied by it), when nothing else reads the normalized tensor and the block's outputs on ``check``
    stay the same; True when folded, else everything is left as it was."""
    width = scale.shape[0]
    producer = group.producer
    if producer is None or group.shared_with_others or not _is_norm(producer, width):
        return False
    before = [block_output(block(*args, **kwargs)).clone() for args, kwargs in check]
    norm_weight: Any = producer.weight
    norm_bias: Any = getattr(producer, "bias", None)
    saved = (norm_weight.detach().clone(), norm_bias.detach().clone() if isinstance(norm_bias, torch.Tensor) else None)
    weights = {name: oriented_weight(layer) for name, layer in group.layers.items()}
    norm_weight.data.div_(scale.to(norm_weight.dtype))
    if isinstance(norm_bias, torch.Tensor):
        norm_bias.data.div_(scale.to(norm_bias.dtype))
    for name, layer in group.layers.items():
        _set_weight(layer, weights[name] * scale)
    after = [block_output(block(*args, **kwargs)) for args, kwargs in check]
    if all(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-6) for a, b in zip(after, before)):
        return True
    norm_weight.data.copy_(saved[0])
    if saved[1] is not None:
        norm_bias.data.copy_(saved[1])
    for name, layer in group.layers.items():
        _set_weight(layer, weights[name])
    return False


def smoothing_scales(block: nn.Module, inputs: list, layers: dict[str, nn.Module], alpha: float) -> list[tuple[Any, torch.Tensor, dict[str, torch.Tensor]]]:
    """SmoothQuant's per-input-channel scales s = max|x|^alpha / max|w|^(1-alpha) for each group of ``layers`` that
    reads one input in ``block`` (activation maxima over ``inputs``): (group, scale, the layers' weights)."""
    maxima = {local: torch.zeros(oriented_weight(layer).shape[1], device=oriented_weight(layer).device) for local, layer in layers.items()}
    forward_inputs(block, inputs, layers, lambda local, x: maxima.__setitem__(local, torch.maximum(maxima[local], x.abs().amax(0).float())))
    found = []
    for group in input_groups(block, inputs[0], layers):
        weights = {name: oriented_weight(layer) for name, layer in group.layers.items()}
        w_max = torch.cat(list(weights.values())).abs().amax(0).clamp(min=1e-5)
        scale = (maxima[next(iter(group.layers))].clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        found.append((group, scale, weights))
    return found


def smooth_float(model: nn.Module, batches: Any, alpha: float) -> nn.Module:
    """SmoothQuant's migration alone, in float (in place): each group's scales folded into the normalization before
    it where the block's outputs stay the same (groups that cannot fold are left as they are). The model computes the
    same function; its activations have smaller outliers, for engines that quantize activations per tensor."""
    planned = {module for module in model.modules() if isinstance(module, nn.Linear) or is_conv1d(module)}

    def smooth_block(block_name: str, block: nn.Module, inputs: list) -> None:
        for group, scale, _ in smoothing_scales(block, inputs, block_layers(block, planned), alpha):
            fold_scale(block, group, scale, inputs[:2])

    with torch.no_grad():
        sequential(model, batches, smooth_block)
    return model


__all__ = ["InputGroup", "fold_scale", "input_groups", "oriented_weight", "smooth_float", "smoothing_scales"]
