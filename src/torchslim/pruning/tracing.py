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
        name_of = graph.names.get(id(module), "")
        graph.calls[name_of] = graph.calls.get(name_of, 0) + 1
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


def _block_for_unrun(graph: ChannelGraph, model: nn.Module, example: Any, ran: set[int]) -> None:
    """A layer of one entry of an ``nn.ModuleDict`` / ``nn.ModuleList`` that the example ran in neither eval nor train
    mode, while the same layer of another entry ran (a head or an expert chosen at run time), reads what that sibling
    read: the channels the sibling consumes from outside its own branch (the same entry of any container: an expert's
    up and down projections in two lists) are kept whole and named. Layers whose weights
    their parent reads directly (``nn.MultiheadAttention``'s out_proj) or that nothing calls are not such a branch."""
    containers = {name: module for name, module in model.named_modules() if name and isinstance(module, (nn.ModuleDict, nn.ModuleList))}
    modules = dict(model.named_modules())
    branches = []  # (unrun layer, its container, its entry, the path inside the entry)
    for name, module in modules.items():
        if id(module) in ran or not any(True for _ in module.parameters(recurse=False)):
            continue
        container = max((c for c in containers if name.startswith(c + ".")), key=len, default=None)
        if container is not None:
            entry, _, rest = name[len(container) + 1 :].partition(".")
            branches.append((name, container, entry, rest))
    if not branches:
        return
    trained = _modules_run_in_training(model, example)
    groups = [g for g in graph.groups() if g.prunable and g.layers]
    for name, container, entry, rest in branches:
        if id(modules[name]) in trained:
            continue
        for other, _ in containers[container].named_children():
            sibling = f"{container}.{other}" + (f".{rest}" if rest else "")
            if other == entry or sibling not in modules or id(modules[sibling]) not in ran:
                continue

            def own(layer: str, index: str = other) -> bool:  # a layer of the sibling's own branch (entry ``index`` of any container)
                return any(layer == f"{c}.{index}" or layer.startswith(f"{c}.{index}.") for c in containers)

            read = [g for g in groups if any(c.module == sibling for c in g.consumers) and not all(own(layer) for layer in g.layers)]
            for layers in {g.layers for g in read}:
                reason = f"channels of {'+'.join(layers)}: {name} did not run on the example, and {sibling}, run in its place, reads them"
                graph.block([g.id for g in read if g.layers == layers], reason)
            # what the entry that ran writes out of its branch, the entry that did not run writes at full width
            written = [g for g in groups if any(own(p.module) for p in g.producers) and any(not own(c.module) for c in g.consumers)]
            for layers in {g.layers for g in written}:
                reason = (
                    f"channels of {'+'.join(layers)}: {container}.{entry} did not run on the example, and writes where {container}.{other}, "
                    "run in its place, does"
                )
                graph.block([g.id for g in written if g.layers == layers], reason)
            break


def _modules_run_in_training(model: nn.Module, example: Any) -> set[int]:
    """ids of the modules a train-mode pass runs (modes, buffers and the random state put back; a model that fails in
    train mode is the removal check's finding, not the trace's)."""
    ran: set[int] = set()
    run_failure(model, example, train=True, ran=ran)
    return ran
