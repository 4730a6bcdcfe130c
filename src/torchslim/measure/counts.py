"""Counting what a model holds and costs: parameters, non-zeros, MACs (hook-based), and bytes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.modes import eval_mode
from torchslim.core.selector import is_conv1d, module_type_name
from torchslim.measure.weights import effective_weights, iter_logical_weights
from torchslim.tasks.batches import batch_size_of, call_model

MacCounter = Callable[..., int]  # (module, inputs, output) -> MACs of the call
MAC_COUNTERS: dict[type, MacCounter] = {}


def register_mac_counter(module_type: type) -> Callable[[MacCounter], MacCounter]:
    """Register how many multiply-accumulates one forward call of ``module_type`` costs (for the whole batch)."""

    def add(counter: MacCounter) -> MacCounter:
        if module_type in MAC_COUNTERS:
            raise ValueError(f"a MAC counter for {module_type.__name__} is registered twice")
        MAC_COUNTERS[module_type] = counter
        return counter

    return add


@register_mac_counter(nn.Linear)
def _linear(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * module.in_features


def _conv(module: nn.modules.conv._ConvNd, inputs: tuple, output: torch.Tensor) -> int:
    kernel = 1
    for size in module.kernel_size:
        kernel *= size
    return output.numel() * (module.in_channels // module.groups) * kernel


for _conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_mac_counter(_conv_type)(_conv)


def _conv_transpose(module: nn.modules.conv._ConvTransposeNd, inputs: tuple, output: torch.Tensor) -> int:
    kernel = 1
    for size in module.kernel_size:
        kernel *= size
    return inputs[0].numel() * (module.out_channels // module.groups) * kernel


for _transpose_type in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_mac_counter(_transpose_type)(_conv_transpose)


@register_mac_counter(nn.MultiheadAttention)
def _multihead_attention(module: nn.MultiheadAttention, inputs: tuple, output: Any) -> int:
    query, key = inputs[0], inputs[1]
    if not module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    batch, query_length, embed = query.shape[0], query.shape[-2], module.embed_dim
    key_length = key.shape[-2]
    projections = batch * (query_length * embed * embed + 2 * key_length * embed * module.kdim)
    attention = 2 * batch * query_length * key_length * embed  # QK^T and AV over all heads
    return projections + attention + batch * query_length * embed * embed


def _recurrent(module: nn.RNNBase, inputs: tuple, output: Any) -> int:
    """An LSTM / GRU / RNN: every gate's input and hidden products at every step, per layer and direction."""
    x = inputs[0]
    steps = x.data.shape[0] if isinstance(x, nn.utils.rnn.PackedSequence) else x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    hidden, projected = module.hidden_size, getattr(module, "proj_size", 0) or module.hidden_size
    directions = 2 if module.bidirectional else 1
    per_step = 0
    for layer in range(module.num_layers):
        width = module.input_size if layer == 0 else projected * directions
        per_step += gates * hidden * (width + projected) + (hidden * projected if projected != hidden else 0)
    return steps * directions * per_step


for _recurrent_type in (nn.LSTM, nn.GRU, nn.RNN):
    register_mac_counter(_recurrent_type)(_recurrent)


def _attention_method(module: nn.Module, inputs: tuple, output: Any) -> int:
    return inputs[0].shape[0] * module.attention_macs(inputs[0])


def count_parameters(model: nn.Module) -> int:
    """Number of parameters as the forward pass uses them (shared parameters counted once; a quantized layer counts
    the weights it encodes, not its codebook)."""
    return sum(t.numel() for _, t in iter_logical_weights(model))


def count_nonzeros(model: nn.Module) -> int:
    """Number of non-zero parameter values (after pruning masks; quantized weights as decoded)."""
    return int(sum(int(torch.count_nonzero(t)) for _, t in iter_logical_weights(model)))


def dense_bytes(model: nn.Module) -> int:
    """Bytes the parameters and buffers take stored densely at their current dtype."""
    tensors = list(effective_weights(model).values()) + [b for b in model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def fp32_weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's floating-point weights stored densely in fp32 (the baseline size of compression papers)."""
    return sum(t.numel() * 4 for _, t in iter_logical_weights(model) if t.is_floating_point())


def stored_bytes(path: str | os.PathLike[str]) -> int:
    """Size in bytes of a file actually written to disk."""
    return Path(path).stat().st_size


def _counter_for(module: nn.Module) -> MacCounter | None:
    for klass in type(module).__mro__:
        if klass in MAC_COUNTERS:
            return MAC_COUNTERS[klass]
    if callable(getattr(module, "attention_macs", None)):
        return _attention_method
    if is_conv1d(module) and isinstance(getattr(module, "nx", None), int):  # GPT-2's (in, out) Linear
        return _transposed_linear
    return None


def _transposed_linear(module: Any, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel() * int(module.nx)


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor | tuple, per_example: bool = True) -> dict[str, Any]:
    """Multiply-accumulates of one forward pass, by hooks on Linear, Conv, attention and recurrent (LSTM / GRU / RNN) modules.

    Returns {"total": int, "layers": [{"name", "type", "macs"}...]}; per example of the batch by default.
    Modules inside a counted module (an nn.MultiheadAttention's projections) are not counted twice.

    Example:
        >>> count_macs(nn.Linear(784, 300), torch.zeros(1, 784))["total"]
        235200
    """
    batch = batch_size_of(example_input)
    rows: dict[str, int] = {}
    types: dict[str, str] = {}
    handles = []
    sequence_first: set[int] = set()  # the batch sizes torch's sequence-first layers (batch_first=False) saw on their axis 1
    modules = dict(model.named_modules())
    # Modules whose counter covers their children (nn.MultiheadAttention counts its own projections).
    covering = [name for name, module in modules.items() if isinstance(module, nn.MultiheadAttention)]
    for name, module in modules.items():
        counter = _counter_for(module)
        if counter is None or any(name.startswith(prefix + ".") for prefix in covering):
            continue

        def hook(mod, args, output, _name=name, _counter=counter):
            rows[_name] = rows.get(_name, 0) + int(_counter(mod, args, output))
            first = args[0] if args else None
            if isinstance(mod, (nn.RNNBase, nn.MultiheadAttention)) and not mod.batch_first and isinstance(first, torch.Tensor) and first.dim() == 3:
                sequence_first.add(first.shape[1])

        handles.append(module.register_forward_hook(hook))
        types[name] = type(module).__name__
    try:
        with eval_mode(model):
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    # a model fed (sequence, batch, features), as torch's recurrent and attention layers take by default: its
    # example's first axis is the sequence, and those layers say where the batch is
    divisor = (next(iter(sequence_first)) if len(sequence_first) == 1 else batch) if per_example else 1
    layers = [{"name": name, "type": types[name], "macs": macs // divisor} for name, macs in rows.items()]
    return {"total": sum(row["macs"] for row in layers), "layers": layers}


def layer_table(model: nn.Module, example_input: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """One row per module that owns parameters: name, type, parameters, non-zeros, sparsity, MACs."""
    weights = effective_weights(model)
    macs = {row["name"]: row["macs"] for row in count_macs(model, example_input)["layers"]} if example_input is not None else {}
    rows = []
    for name, module in model.named_modules():
        own = {k: v for k, v in weights.items() if k.rsplit(".", 1)[0] == name or (name == "" and "." not in k)}
        if not own:
            continue
        parameters = sum(t.numel() for t in own.values())
        nonzeros = sum(int(torch.count_nonzero(t)) for t in own.values())
        row = {
            "name": name or "(root)",
            "type": module_type_name(module),
            "parameters": parameters,
            "nonzeros": nonzeros,
            "sparsity": round(1 - nonzeros / parameters, 4) if parameters else 0.0,
        }
        if name in macs:
            row["macs"] = macs[name]
        rows.append(row)
    return rows
