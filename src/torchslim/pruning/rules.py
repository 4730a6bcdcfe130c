"""The rules of channel tracing (see ``pruning.graph``): what each leaf module and each torch function does to the
channel slots of the tensors it reads and writes. Leaf rules are registered by module type (``leaf_rule``), by a
predicate on the module (Hugging Face style self-attention), or declared by the module itself as a
``channel_rule(graph, name, inputs, output)`` method; a function the rules do not know blocks the slots it touches
and is named."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.pruning.graph import ChannelGraph

# leaf-module rules: (graph, module name, module, input tensors, output) -> None; registered by type
LEAF_RULES: dict[type, Callable[..., None]] = {}


# rules chosen by a predicate on the module (e.g. any Hugging Face style self-attention), tried after LEAF_RULES
PREDICATE_RULES: list[tuple[Callable[[nn.Module], bool], Callable[..., None]]] = []


def leaf_rule(*types: type) -> Callable:
    def register(function: Callable) -> Callable:
        for klass in types:
            LEAF_RULES[klass] = function
        return function

    return register


PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.Mish,
    nn.Softplus,
)


# -- leaf modules ----------------------------------------------------------------------------------------------------


@leaf_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    info = graph.get_info(inputs[0])
    if info is not None and info.axis != 1:
        graph.unsupported_op(name, f"{type(module).__name__} on a tensor whose channels are not on axis 1", inputs[:1])
        info = None
    if module.groups == 1:
        graph.consume(name, info, 1)
        graph.produce(name, module, output, module.out_channels, 1)
    elif module.groups == module.in_channels == module.out_channels:  # depthwise: channels pass through
        if info is None:
            graph.produce(name, module, output, module.out_channels, 1)
            return
        for index, slot in enumerate(info.slots):
            graph.param(slot, "member", name, "weight", 0, index)
            if module.bias is not None:
                graph.param(slot, "member", name, "bias", 0, index)
        graph.set_info(output, info.slots, 1)
    else:
        graph.unsupported_op(name, f"grouped {type(module).__name__} (groups={module.groups})", inputs[:1])
        slots = graph.new_slots(module.out_channels)
        graph.block(slots, f"{name}: grouped {type(module).__name__} (groups={module.groups})")
        graph.set_info(output, slots, 1)


@leaf_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """A transposed convolution's weight is (in, out / groups, k...): it reads along dim 0 and produces along dim 1."""
    info = graph.get_info(inputs[0])
    if module.groups != 1 or (info is not None and info.axis != 1):
        graph.unsupported_op(name, f"{type(module).__name__} (groups={module.groups})", inputs[:1])
        graph.block(graph.produce(name, module, output, module.out_channels, 1, weight_dim=1), f"{name}: grouped {type(module).__name__}")
        return
    graph.consume(name, info, 0)
    graph.produce(name, module, output, module.out_channels, 1, weight_dim=1)


def dense_layer(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any, outputs: int, weight_out_dim: int) -> None:
    """A layer that maps the last axis to ``outputs`` features (a Linear; GPT-2's Conv1D stores its weight transposed)."""
    info = graph.get_info(inputs[0])
    if info is not None and info.axis != inputs[0].dim() - 1:
        if not all(graph.blocked.get(slot) == "model input" for slot in info.slots):  # a model input's axes were a guess
            graph.unsupported_op(name, f"{type(module).__name__} over a tensor whose channels are not on the last axis", inputs[:1])
        info = None
    graph.consume(name, info, 1 - weight_out_dim)
    graph.produce(name, module, output, outputs, -1, weight_dim=weight_out_dim)


@leaf_rule(nn.Linear)
def _linear(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    dense_layer(graph, name, module, inputs, output, module.out_features, 0)


@leaf_rule(nn.Embedding)
def _embedding(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    graph.produce(name, module, output, module.embedding_dim, -1, weight_dim=1, bias=False)


@leaf_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batchnorm(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    info = graph.get_info(inputs[0])
    if info is None:
        return
    for index, slot in enumerate(info.slots):
        for parameter in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, parameter, None) is not None:
                graph.param(slot, "member", name, parameter, 0, index)
    graph.set_info(output, info.slots, 1)


@leaf_rule(nn.PReLU)
def _prelu(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """PReLU with one slope per channel (``num_parameters=C``): its slope goes with its channel, as a BatchNorm's
    entries do; with one slope, a pass-through."""
    info = graph.get_info(inputs[0])
    if info is None:
        return
    if module.num_parameters > 1:
        if info.axis != 1:
            graph.unsupported_op(name, "PReLU with a slope per channel over a tensor whose channels are not on axis 1", inputs[:1])
            return
        for index, slot in enumerate(info.slots):
            graph.param(slot, "member", name, "weight", 0, index)
    graph.set_info(output, info.slots, info.axis)


@leaf_rule(nn.GroupNorm)
def _groupnorm(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    """GroupNorm normalizes each group of channels over itself: a whole group can go (the others' statistics do not
    change), part of one cannot. The channels of a group are joined into one set, removed together."""
    info = graph.get_info(inputs[0])
    if info is None:
        return
    if info.axis != 1:
        graph.unsupported_op(name, "GroupNorm over a tensor whose channels are not on axis 1", inputs[:1])
        return
    if module.num_groups == 1 or not module.affine:
        why = "one group normalizes over every channel" if module.num_groups == 1 else "without affine parameters its width is not recorded"
        graph.block(info.slots, f"{name}: GroupNorm ({why})")
    size = module.num_channels // module.num_groups
    for index, slot in enumerate(info.slots):
        if index % size:
            graph.uf.union(info.slots[index - index % size], slot)
        for parameter in ("weight", "bias"):
            if getattr(module, parameter, None) is not None:
                graph.param(slot, "member", name, parameter, 0, index)
    graph.set_info(output, info.slots, 1)


@leaf_rule(nn.LayerNorm)
def _layernorm(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    info = graph.get_info(inputs[0])
    if info is None:
        return
    if len(module.normalized_shape) != 1 or info.axis != inputs[0].dim() - 1:
        graph.unsupported_op(name, f"LayerNorm over {tuple(module.normalized_shape)}", inputs[:1])
        return
    for index, slot in enumerate(info.slots):
        for parameter in ("weight", "bias"):
            if getattr(module, parameter, None) is not None:
                graph.param(slot, "member", name, parameter, 0, index)
    graph.set_info(output, info.slots, info.axis)


def _pass_module(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    info = graph.get_info(inputs[0]) if inputs else None
    if info is not None and isinstance(output, torch.Tensor) and output.dim() == inputs[0].dim() and output.shape[info.axis] == inputs[0].shape[info.axis]:
        graph.set_info(output, info.slots, info.axis)
    elif info is not None:
        graph.unsupported_op(name, f"{type(module).__name__} changes the channel axis", inputs[:1])


for _klass in PASS_MODULES:
    LEAF_RULES[_klass] = _pass_module


@leaf_rule(nn.Flatten)
def _flatten_module(graph: ChannelGraph, name: str, module: Any, inputs: list[Any], output: Any) -> None:
    _flatten(graph, name, inputs[0], output, module.start_dim, module.end_dim)


# -- functions -------------------------------------------------------------------------------------------------------


def _flatten(graph: ChannelGraph, where: str, tensor: Any, output: Any, start: int, end: int) -> None:
    info = graph.get_info(tensor)
    if info is None:
        return
    start, end = start % tensor.dim(), end % tensor.dim()
    if info.axis < start:
        graph.set_info(output, info.slots, info.axis)
    elif info.axis == start:
        block = math.prod(tensor.shape[start + 1 : end + 1])
        graph.set_info(output, [slot for slot in info.slots for _ in range(block)], start)
    elif info.axis > end:
        graph.set_info(output, info.slots, info.axis - (end - start))
    else:
        graph.unsupported_op(where, "flatten of dimensions before the channel axis", [tensor])


ELEMENTWISE = {
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.Tensor.add,
    torch.Tensor.sub,
    torch.Tensor.mul,
    torch.Tensor.div,
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.Tensor.__iadd__,
    torch.Tensor.__sub__,
    torch.Tensor.__rsub__,
    torch.Tensor.__isub__,
    torch.Tensor.__mul__,
    torch.Tensor.__rmul__,
    torch.Tensor.__imul__,
    torch.Tensor.__truediv__,
    torch.Tensor.__itruediv__,
    torch.Tensor.add_,
    torch.Tensor.mul_,
}
UNARY = {
    F.relu,
    torch.relu,
    torch.Tensor.relu,
    F.relu_,
    torch.relu_,
    torch.Tensor.relu_,
    F.gelu,
    F.silu,
    F.relu6,
    F.hardswish,
    F.leaky_relu,
    F.elu,
    torch.sigmoid,
    torch.Tensor.sigmoid,
    torch.tanh,
    torch.Tensor.tanh,
    F.sigmoid,
    F.tanh,
    F.dropout,
    F.dropout2d,
    torch.Tensor.contiguous,
    torch.Tensor.clone,
    torch.clone,
    torch.Tensor.float,
    torch.Tensor.to,
    torch.Tensor.type_as,
    torch.Tensor.detach,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.max_pool1d,
    F.avg_pool1d,
    F.interpolate,
    F.mish,
    F.softplus,
    torch.Tensor.abs,
    torch.abs,
    torch.Tensor.neg,
    torch.neg,
    torch.Tensor.__neg__,
    torch.Tensor.sqrt,
    torch.Tensor.exp,
    torch.exp,
}
POWERS = {torch.pow, torch.Tensor.pow, torch.Tensor.__pow__}
REDUCTIONS = {torch.mean, torch.Tensor.mean, torch.sum, torch.Tensor.sum, torch.amax, torch.Tensor.amax}
IGNORED = {
    torch.Tensor.size,
    torch.Tensor.dim,
    torch.Tensor.__len__,
    torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
    torch.Tensor.device.__get__,
    torch.Tensor.__format__,
    torch.Tensor.__bool__,
    torch.Tensor.item,
    torch.Tensor.numel,
    torch.Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    torch.Tensor.is_floating_point,
}


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


def _elementwise(graph: ChannelGraph, where: str, name: str, args: tuple, output: Any) -> None:
    infos = [(a, graph.get_info(a)) for a in args if isinstance(a, torch.Tensor)]
    carried = [(a, i) for a, i in infos if i is not None]
    if not carried:
        return
    first, first_info = carried[0]
    out_axis_from_end, result = first.dim() - first_info.axis, first_info.slots
    # channels of different layers added (a residual stream); x + f(x) with f elementwise (a GELU's tanh form) joins none
    distinct = any(graph.uf.find(a) != graph.uf.find(b) for _, info in carried[1:] for a, b in zip(result, info.slots))
    for tensor, info in carried:
        from_end = tensor.dim() - info.axis
        if tensor.shape[info.axis] != output.shape[output.dim() - from_end]:
            graph.unsupported_op(where, f"{name} broadcasting over channels", [t for t, _ in carried])
            return
        if from_end != out_axis_from_end:
            graph.unsupported_op(where, f"{name} of tensors with channels on different axes", [t for t, _ in carried])
            return
        for a, b in zip(result, info.slots):
            graph.uf.union(a, b)
    if distinct and not any(word in name for word in ("mul", "div")):  # a residual add, not a gate (SwiGLU)
        graph.joined.update(result)
    for tensor, known in infos:  # a plain tensor (not a traced activation) of full channel size would need slicing too
        if known is None and tensor.dim() >= out_axis_from_end and tensor.shape[tensor.dim() - out_axis_from_end] > 1:
            graph.unsupported_op(where, f"{name} with a constant tensor over the channels", [t for t, _ in carried])
            return
    graph.set_info(output, result, output.dim() - out_axis_from_end)


def apply_function(graph: ChannelGraph, where: str, func: Any, args: tuple, kwargs: dict, output: Any) -> None:
    if func in IGNORED or (not isinstance(output, torch.Tensor) and not isinstance(output, (tuple, list))):
        return
    inputs = tensors_in(args) + tensors_in(kwargs)
    if not any(graph.get_info(t) is not None for t in inputs):
        return
    name = getattr(func, "__name__", str(func))
    first = args[0] if args else None
    info = graph.get_info(first)
    if func in ELEMENTWISE:
        _elementwise(graph, where, name, args, output)
        return
    scalar_power = func in POWERS and len(args) > 1 and isinstance(args[1], (int, float))
    if scalar_power and info is not None and isinstance(output, torch.Tensor) and output.shape == first.shape:
        graph.set_info(output, info.slots, info.axis)  # x ** 3 (a tanh-approximated GELU): each channel on its own
        return
    if (
        func in UNARY
        and info is not None
        and isinstance(output, torch.Tensor)
        and output.dim() == first.dim()
        and output.shape[info.axis] == first.shape[info.axis]
    ):
        graph.set_info(output, info.slots, info.axis)
        return
    if func in (torch.flatten, torch.Tensor.flatten) and info is not None:
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        _flatten(graph, where, first, output, start, end)
        return
    if func in (torch.Tensor.view, torch.Tensor.reshape, torch.reshape) and info is not None:
        shape_in, shape_out = tuple(first.shape), tuple(output.shape)
        if shape_out[: info.axis] == shape_in[: info.axis] and len(shape_out) == info.axis + 1:
            _flatten(graph, where, first, output, info.axis, -1)
            return
        if shape_out[: info.axis + 1] == shape_in[: info.axis + 1]:
            graph.set_info(output, info.slots, info.axis)
            return
    if func in REDUCTIONS and info is not None:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        if dims is not None:
            dims = [d % first.dim() for d in ((dims,) if isinstance(dims, int) else dims)]
            if info.axis not in dims:
                axis = info.axis if keepdim else info.axis - sum(d < info.axis for d in dims)
                graph.set_info(output, info.slots, axis)
                return
    if func is torch.Tensor.__getitem__ and info is not None:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if all(isinstance(i, slice) for i in index) and Ellipsis not in index and (len(index) <= info.axis or index[info.axis] == slice(None)):
            graph.set_info(output, info.slots, info.axis)
            return
    if func in (torch.cat, torch.concat):
        tensors = list(args[0])
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        infos = [graph.get_info(t) for t in tensors]
        if all(i is not None for i in infos) and len({i.axis for i in infos}) == 1:
            axis = infos[0].axis
            if dim % output.dim() == axis:
                graph.set_info(output, [s for i in infos for s in i.slots], axis)
                return
            for other in infos[1:]:
                for a, b in zip(infos[0].slots, other.slots):
                    graph.uf.union(a, b)
            graph.joined.update(infos[0].slots)
            graph.set_info(output, infos[0].slots, axis)
            return
    if func is F.pad and info is not None:
        pad = list(args[1] if len(args) > 1 else kwargs["pad"])
        axis_from_end = first.dim() - 1 - info.axis
        if len(pad) <= 2 * axis_from_end or not any(pad[2 * axis_from_end : 2 * axis_from_end + 2]):
            graph.set_info(output, info.slots, info.axis)
            return
        # padding the channel axis by a fixed amount (a lambda's option-A shortcut) cannot follow a change in the
        # channel count: the channels it touches stay (torchslim's PadShortcut module records its own positions)
        graph.unsupported_op(where, "pad of the channel axis by a fixed amount", inputs)
        graph.set_info(output, graph.new_slots(output.shape[info.axis]), info.axis)
        graph.block(graph.get_info(output).slots, f"{where or 'model'}: pad of the channel axis by a fixed amount")
        return
    if func in (torch.Tensor.transpose, torch.transpose) and info is not None:
        a, b = (args[1] % first.dim(), args[2] % first.dim())
        axis = b if info.axis == a else a if info.axis == b else info.axis
        graph.set_info(output, info.slots, axis)
        return
    graph.unsupported_op(where, name, inputs)


def rule_for(module: nn.Module) -> Callable[..., None] | None:
    """The channel rule of a leaf module (its own ``channel_rule`` first), or None for a module traced inside."""
    own = getattr(module, "channel_rule", None)
    if callable(own):
        return lambda graph, name, _module, inputs, output: own(graph, name, inputs, output)
    for klass in type(module).__mro__:
        if klass in LEAF_RULES:
            return LEAF_RULES[klass]
    for predicate, rule in PREDICATE_RULES:
        if predicate(module):
            return rule
    return None


def is_leaf(module: nn.Module) -> bool:
    return rule_for(module) is not None
