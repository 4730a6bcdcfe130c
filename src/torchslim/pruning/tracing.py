"""Tracing: run the model once on an example input and build its channel graph (see ``pruning.graph``).

The trace runs under a ``TorchFunctionMode`` with forward hooks on leaf modules, so Python control flow in
``forward`` is no obstacle (it runs for real on the example). Leaf modules are those with a channel rule
(``pruning.rules``); inside them the function-level rules stay off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode, model_device
from torchslim.pruning import rules, transformer_rules  # noqa: F401 - transformer_rules registers its rules
from torchslim.pruning.graph import ChannelGraph
from torchslim.tasks.batches import call_model, move_to, run_failure


class _Tracer(TorchFunctionMode):
    def __init__(self, graph: ChannelGraph, rules: Any) -> None:
        super().__init__()
        self.graph, self.rules = graph, rules
        self.depth = 0
        self.where: list[str] = [""]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if self.depth == 0:
            try:
                self.rules.apply_function(self.graph, self.where[-1], func, args, kwargs, output)
            except Exception as error:  # an op the rules misread is named, never fatal
                self.graph.unsupported_op(self.where[-1], f"{getattr(func, '__name__', func)} ({error})", self.rules.tensors_in(args))
        return output


def trace(model: nn.Module, example_input: Any) -> ChannelGraph:
    """Run ``model`` once on ``example_input`` (eval mode, no gradients; every module's own mode restored) and
    collect its channel groups.

    Example:
        >>> import torch, torchslim as ts
        >>> graph = trace(ts.models.create("lenet-300-100"), torch.zeros(1, 1, 28, 28))
        >>> sorted(len(g.producers[0].indices) for g in graph.groups() if g.prunable)[:1]
        [1]
    """
    example_input = move_to(example_input, model_device(model))  # moved once: the traced inputs are these tensors
    graph = ChannelGraph(model)
    tracer = _Tracer(graph, rules)
    is_leaf, rule_for, _tensors = rules.is_leaf, rules.rule_for, rules.tensors_in
    handles = []

    def pre_hook(module: nn.Module, args: tuple) -> None:
        if is_leaf(module):
            tracer.depth += 1
        else:
            tracer.where.append(graph.names.get(id(module), ""))

    ran: set[int] = set()

    def post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        ran.add(id(module))
        if is_leaf(module):
            if tracer.depth == 1:  # the rule runs with recording still off
                name = graph.names.get(id(module), "")
                rule = rule_for(module)
                assert rule is not None
                # inputs given by keyword (``self_attn(hidden_states=...)``) follow the positional ones
                inputs = list(args) + [value for value in kwargs.values() if isinstance(value, torch.Tensor)]
                try:
                    rule(graph, name, module, inputs, output)
                except TorchslimError:
                    raise
                except Exception as error:
                    graph.unsupported_op(name, f"{type(module).__name__} ({error})", _tensors(inputs))
            tracer.depth -= 1
        else:
            tracer.where.pop()

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        for tensor in rules.tensors_in(example_input):
            if tensor.is_floating_point() and tensor.dim() >= 2:
                slots = graph.new_slots(tensor.shape[1])
                graph.block(slots, "model input")
                graph.set_info(tensor, slots, 1)
        with eval_mode(model), torch.no_grad(), tracer:
            output = call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    for tensor in rules.tensors_in(output):
        info = graph.get_info(tensor)
        if info is not None:
            graph.block(info.slots, "model output")
    _block_for_unrun(graph, model, example_input, ran)
    return graph


def _input_width(module: nn.Module) -> int | None:
    """The channels a layer reads: a Linear's in_features, a conv's in_channels, a norm's features."""
    for attribute in ("in_features", "in_channels", "num_features", "num_channels"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    return int(shape[-1]) if isinstance(shape, tuple) and shape else None


def _block_for_unrun(graph: ChannelGraph, model: nn.Module, example: Any, ran: set[int]) -> None:
    """Layers the example never ran in eval mode nor in train mode (a head chosen by a runtime key, a branch the
    example did not take) may read any set of channels as wide as their input: those sets are kept whole and named."""
    unrun = {name: module for name, module in model.named_modules() if id(module) not in ran and any(True for _ in module.parameters(recurse=False))}
    unrun = {name: module for name, module in unrun.items() if _input_width(module) is not None}
    if not unrun:
        return
    trained = _modules_run_in_training(model, example)
    widths = {name: _input_width(module) for name, module in unrun.items() if id(module) not in trained}
    if not widths:
        return
    groups = [g for g in graph.groups() if g.prunable and g.layers]
    sizes: dict[tuple[str, ...], int] = {}
    for g in groups:
        sizes[g.layers] = sizes.get(g.layers, 0) + 1
    for layers, size in sizes.items():
        readers = [name for name, width in widths.items() if width == size]
        if readers:
            reason = (
                f"channels of {'+'.join(layers)}: {', '.join(readers)} never ran on the example (a branch it did not take) and "
                f"take{'s' if len(readers) == 1 else ''} {size} inputs, as many as these channels, so may read them"
            )
            graph.block([g.id for g in groups if g.layers == layers], reason)


def _modules_run_in_training(model: nn.Module, example: Any) -> set[int]:
    """ids of the modules a train-mode pass runs (modes, buffers and the random state put back; a model that fails in
    train mode is the removal check's finding, not the trace's)."""
    ran: set[int] = set()
    run_failure(model, example, train=True, ran=ran)
    return ran
