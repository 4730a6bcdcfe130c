"""How a model's inputs and outputs become an ONNX graph's: the names and dynamic axes of its inputs (positional
tensors, keyword inputs, token ids of any length, axes the caller names), wrappers that present a model's calling
convention as positional tensors (keyword inputs, one list of views, keyword-only arguments), and the layout of several
outputs (a tuple, list or dict of tensors) recorded in the file's metadata so a loaded model returns them as the model
did."""

from __future__ import annotations

import collections
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode

INPUT_NAME, OUTPUT_NAME = "input", "output"
# keyword inputs that go with a main one (never fed as a model's only input in its place)
SECONDARY_INPUTS = ("attention_mask", "token_type_ids", "position_ids", "head_mask", "past_key_values")


class KeywordInputs(nn.Module):
    """``model(**dict(zip(names, tensors)))`` as a module of positional tensors (for export): the model's output as it
    is where that is a tuple, list or plain dict of tensors (every one exported), else the tensor a task reads."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors: torch.Tensor) -> Any:
        output = self.model(**dict(zip(self.names, tensors)))
        return output if output_layout(output) is not None else output_tensor_of(output)


class MainOutput(nn.Module):
    """A model whose output is neither a tensor nor tuples, lists and dicts of tensors (a Hugging Face ``ModelOutput``,
    a tuple holding None) as a module returning the tensor a task reads: what a trace can return and the check reads."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return output_tensor_of(self.model(*tensors))


class ViewsAsList(nn.Module):
    """A model whose forward takes one list of tensors (its views), as a module of positional tensors (for export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(list(tensors))


class Positional(nn.Module):
    """``model(*tensors)`` behind a forward of positional tensors only: the TorchScript exporter passes a forward's
    keyword-only arguments (``forward(self, x, *, temperature=1.0)``) as positional ones, which fails."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self.model(*tensors)


def positional_module(model: nn.Module, inputs: int) -> nn.Module:
    """``model`` as a module called with ``inputs`` positional tensors: wrapped in ``ViewsAsList`` where its forward
    takes one list of them, in ``Positional`` where it has keyword-only arguments or a number default past them."""
    import inspect

    from torchslim.tasks.batches import forward_parameters, takes_one_input

    if inputs > 1 and takes_one_input(model):
        return ViewsAsList(model).eval()
    parameters = [p for p in forward_parameters(model) or [] if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    keyword_only = any(p.kind == inspect.Parameter.KEYWORD_ONLY for p in parameters)
    # the TorchScript exporter feeds a number default of a parameter past the inputs (scale: float = 1.0) as an input
    # of the graph that the file then asks for: behind Positional the model uses its default
    numbers = any(isinstance(p.default, (int, float)) and not isinstance(p.default, bool) for p in parameters[inputs:])
    return Positional(model).eval() if keyword_only or numbers else model


def sole_input(inputs: Any, wanted: list[str]) -> Any:
    """``inputs`` as a file of one positional input takes them: a mapping of one main input (``{"input_ids": ids}``,
    not a mask) under another name is that tensor; anything else as it is."""
    if isinstance(inputs, Mapping) and len(inputs) == 1 and wanted == [INPUT_NAME] and INPUT_NAME not in inputs and next(iter(inputs)) not in SECONDARY_INPUTS:
        return next(iter(inputs.values()))
    return inputs


class FlatOutputs(nn.Module):
    """A model whose output is a tuple or list of tensors, a plain dict of them, or such containers nested, as a module
    returning those tensors as one flat tuple (each its own ONNX output), in the order ``layout`` records."""

    def __init__(self, model: nn.Module, layout: dict[str, Any]) -> None:
        super().__init__()
        self.model, self.layout = model, layout

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(output_tensors(self.model(*tensors), self.layout))


def output_layout(output: Any) -> dict[str, Any] | None:
    """How an exported model's outputs rebuild the model's own: ``{"kind": "tuple" | "list", "count": n}`` for a
    sequence of tensors, ``{"kind": "dict", "names": [...]}`` for a plain dict of tensors, ``{"kind": "tree", "count":
    n, "tree": ...}`` for plain tuples, lists and dicts nested (``(y, (a, b))``) with tensors only as leaves (one entry
    too: ``{"logits": y}`` comes back as such); None for one tensor (or any other output, of which the tensor a task
    reads is exported)."""
    if type(output) in (tuple, list) and output and all(isinstance(t, torch.Tensor) for t in output):
        return {"kind": type(output).__name__, "count": len(output)}
    if _namedtuple(output) and all(isinstance(t, torch.Tensor) for t in output):  # rebuilt with the same fields
        return {"kind": "namedtuple", "count": len(output), "name": type(output).__name__, "fields": list(output._fields)}
    if type(output) is dict and output and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in output.items()):
        return {"kind": "dict", "names": list(output)}
    tree = _nesting(output)
    if isinstance(tree, dict):
        return {"kind": "tree", "count": len(_leaves(output)), "tree": tree}
    return None


def _namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and bool(value) and isinstance(getattr(type(value), "_fields", None), tuple)


@functools.lru_cache(maxsize=64)
def _namedtuple_class(name: str, fields: tuple[str, ...]) -> type:
    """One class per recorded (name, fields): outputs rebuilt by a file compare and pickle alike across calls."""
    return collections.namedtuple(name, fields)


_LEAF = 0  # a tensor in a recorded nesting; a container is {"tuple" | "list": [...]} or {"dict": {key: ...}}


def _nesting(value: Any) -> Any:
    """The nesting of plain tuples, lists and str-keyed dicts around tensors, as JSON can hold it; None where any entry
    is something else (None, a number, a Hugging Face ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return _LEAF
    if type(value) in (tuple, list) and value:
        parts = [_nesting(v) for v in value]
        return None if any(p is None for p in parts) else {type(value).__name__: parts}
    if type(value) is dict and value and all(isinstance(k, str) for k in value):
        entries = {k: _nesting(v) for k, v in value.items()}
        return None if any(p is None for p in entries.values()) else {"dict": entries}
    return None


def _leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of plain nested tuples, lists and dicts, depth first, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in (value.values() if isinstance(value, dict) else value) for t in _leaves(v)]


def output_tensors(output: Any, layout: dict[str, Any] | None) -> list[torch.Tensor]:
    """The tensors an exported file has for ``output`` of ``layout``, in the file's order."""
    if layout is None:
        return [output_tensor_of(output)]
    if layout["kind"] == "dict":
        return [output[name] for name in layout["names"]]
    return _leaves(output) if layout["kind"] == "tree" else list(output)


def rebuild_outputs(tensors: list[Any], layout: dict[str, Any]) -> Any:
    """The model's output structure of ``layout`` from a file's outputs (in order)."""
    if layout["kind"] == "dict":
        return dict(zip(layout["names"], tensors))
    if layout["kind"] == "tree":
        remaining = iter(tensors)

        def build(tree: Any) -> Any:
            if tree == _LEAF:
                return next(remaining)
            (kind, parts), *_ = tree.items()
            if kind == "dict":
                return {key: build(part) for key, part in parts.items()}
            built = [build(part) for part in parts]
            return built if kind == "list" else tuple(built)

        return build(layout["tree"])
    if layout["kind"] == "namedtuple":
        return _namedtuple_class(layout["name"], tuple(layout["fields"]))(*tensors)
    return list(tensors) if layout["kind"] == "list" else tuple(tensors)


def output_names(layout: dict[str, Any] | None) -> list[str]:
    """The ONNX output names of a layout: ``output`` for one tensor, ``output``, ``output_1``, ... for a sequence, the
    dict's keys for a dict."""
    if layout is None:
        return [OUTPUT_NAME]
    if layout["kind"] == "dict":
        return list(layout["names"])
    return [OUTPUT_NAME] + [f"{OUTPUT_NAME}_{index}" for index in range(1, layout["count"])]


def _input_axes(names: list[str], tensors: tuple, dynamic_batch: bool, dynamic_axes: Mapping[str, Any] | None) -> dict[str, dict[int, str]]:
    """Each input's dynamic axes: the batch (axis 0) and those ``dynamic_axes`` names per input (``{"input": {2:
    "length"}}``, or a list of axes, labelled by input and axis)."""
    unknown = sorted(set(dynamic_axes or {}) - set(names))
    if unknown:
        raise TorchslimError(f"ONNX export: dynamic_axes names inputs {unknown}; the model's inputs are {names}")
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in zip(names, tensors):
        axes[name] = {0: "batch"} if dynamic_batch else {}
        wanted = (dynamic_axes or {}).get(name, {})
        for axis, label in wanted.items() if isinstance(wanted, Mapping) else ((a, f"{name}_axis{a}") for a in wanted):
            if not isinstance(axis, int) or not -tensor.dim() <= axis < tensor.dim():
                raise TorchslimError(f"ONNX export: dynamic_axes[{name!r}] names axis {axis!r}; the input has {tensor.dim()} axes {tuple(tensor.shape)}")
            axes[name][axis % tensor.dim()] = str(label)
    return axes


def input_plan(
    example_input: Any,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
    dynamic_axes: Mapping[str, Any] | None = None,
    model: nn.Module | None = None,
) -> tuple[list[str], tuple, dict[str, dict[int, str]]]:
    """The ONNX inputs of an example: their names, tensors and dynamic axes (by input name, axis: label). With
    ``dynamic_sequence``, sequence-like keyword inputs (ids, masks, (batch, length) samples) and those of their length
    have a dynamic sequence (axis 1), and so have token ids given positionally (integer inputs of two or more axes, and
    the inputs of their length), where ``model`` runs on them a quarter shorter (a Linear over (batch, features) or a
    flatten of a fixed length keeps it; keyword inputs without ``model`` are taken as sequences)."""
    if isinstance(example_input, (tuple, list)) and len(example_input) > 1 and all(isinstance(t, torch.Tensor) for t in example_input):
        # a model of several positional inputs, model(a, b): each its own ONNX input
        names = [INPUT_NAME] + [f"{INPUT_NAME}_{index}" for index in range(1, len(example_input))]
        tensors = tuple(example_input)
    elif not isinstance(example_input, Mapping):
        names, tensors = [INPUT_NAME], (example_input,)
    else:
        names = [k for k, v in example_input.items() if isinstance(v, torch.Tensor)]
        if not names:
            raise TorchslimError("ONNX export: the example input mapping holds no tensors")
        tensors = tuple(example_input[k] for k in names)
    axes = _input_axes(names, tensors, dynamic_batch, dynamic_axes)
    keyed = isinstance(example_input, Mapping)
    # token ids: integer keyword inputs of two or more axes or (batch, length) float ones (audio samples), or integer
    # tensors of (batch, length) given positionally; never images (pixel_values: axis 1 is their channels)
    lead = (
        next((t for n, t in zip(names, tensors) if (_sequence_like(n, t) if keyed else t.dim() == 2 and not t.is_floating_point())), None)
        if dynamic_sequence
        else None
    )
    if lead is None or lead.shape[1] < 2:
        return names, tensors, axes
    shared = [index for index, tensor in enumerate(tensors) if tensor.dim() >= 2 and tensor.shape[1] == lead.shape[1] and tensor.dim() <= 3]
    # a model that runs on the example only (a Linear over (batch, features), a flatten of a fixed length) keeps it;
    # keyword inputs without a model to try are taken as sequences
    runner = None if model is None else KeywordInputs(model, names) if keyed else positional_module(model, len(tensors))
    if (runner is not None or not keyed) and not _runs_shorter(runner, tensors, shared):
        return names, tensors, axes
    for index in shared:
        axes[names[index]].setdefault(1, "sequence")
    return names, tensors, axes


def _sequence_like(name: str, tensor: torch.Tensor) -> bool:
    """A keyword input whose axis 1 is a sequence: integer ids or masks of two or more axes, float (batch, length)
    samples, or (batch, length, width) ``*_embeds``."""
    return tensor.dim() >= 2 and (not tensor.is_floating_point() or tensor.dim() == 2 or (tensor.dim() == 3 and name.endswith("embeds")))


def shorter_lengths(tensor: torch.Tensor, length: int, shorter: int) -> torch.Tensor:
    """Per-example lengths (a 1-D integer input, say ``lengths`` for a packed GRU, none past ``length`` and the longest
    at it) clamped to a sequence cut from ``length`` to ``shorter``; any other tensor as it is."""
    if tensor.dim() == 1 and not tensor.is_floating_point() and tensor.dtype != torch.bool and tensor.numel() and int(tensor.max()) == length:
        return tensor.clamp(max=shorter)
    return tensor


def _runs_shorter(model: nn.Module | None, tensors: tuple, shared: list[int]) -> bool:
    """Whether ``model`` runs on ``tensors`` with axis 1 of those at ``shared`` a quarter shorter (eval mode), the
    per-example lengths among the other inputs cut with them."""
    if model is None:
        return False
    length = tensors[shared[0]].shape[1]
    cut = length - max(1, length // 4)
    shorter = tuple(t.narrow(1, 0, cut) if index in shared else shorter_lengths(t, length, cut) for index, t in enumerate(tensors))
    try:
        with eval_mode(model), torch.no_grad():
            model(*shorter)
        return True
    except Exception:  # a model of one fixed length: its sequence stays fixed
        return False


def export_plan(
    model: nn.Module, example_input: Any, dynamic_batch: bool, dynamic_sequence: bool, dynamic_axes: Mapping[str, Any] | None = None
) -> tuple[nn.Module, tuple, list[str], dict[str, dict[int, str]], dict[str, Any] | None]:
    """What to export: the module, its positional inputs, their names, the dynamic axes and the output layout."""
    names, tensors, axes = input_plan(example_input, dynamic_batch, dynamic_sequence, dynamic_axes, model)
    module = KeywordInputs(model, names).eval() if isinstance(example_input, Mapping) else positional_module(model, len(tensors))
    with torch.no_grad():
        output = module(*tensors)
    layout = output_layout(output)
    if layout is not None:
        module = FlatOutputs(module, layout)
    elif not isinstance(output, torch.Tensor):  # a ModelOutput with a cache object, a tuple holding None: its main tensor
        module = MainOutput(module)
    # the outputs' batch axis; their other axes follow the inputs' as the exporter traces them
    for name in output_names(layout):
        axes[name] = {0: "batch"} if dynamic_batch else {}
    first = output_tensor_of(output)
    if any("sequence" in axes.get(n, {}).values() for n in names) and first.dim() >= 3 and tensors[0].dim() >= 2 and first.shape[1] == tensors[0].shape[1]:
        axes[output_names(layout)[0]][1] = "sequence"
    return module, tensors, names, {k: v for k, v in axes.items() if v}, layout


LAYOUT_KEY = "torchslim.outputs"  # the metadata entry of an ONNX file that records its output layout


def set_output_layout(path: str | os.PathLike[str], layout: dict[str, Any]) -> None:
    """Record an output layout in an ONNX file's metadata (``OnnxModule`` rebuilds the model's outputs from it)."""
    import onnx

    proto = onnx.load(str(path))
    copy_output_layout(proto, layout)
    onnx.save(proto, str(path))


def copy_output_layout(proto: Any, layout: dict[str, Any] | None) -> None:
    """Set (or, for None, leave) the output layout entry of an ONNX model proto's metadata."""

    if layout is None:
        return
    kept = [entry for entry in proto.metadata_props if entry.key != LAYOUT_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = LAYOUT_KEY, json.dumps(layout)


def read_output_layout(session: Any) -> dict[str, Any] | None:
    """The output layout an ONNX Runtime session's model records (None: its first output is the model's output)."""

    value = session.get_modelmeta().custom_metadata_map.get(LAYOUT_KEY)
    return json.loads(value) if value else None


def first_line(error: BaseException) -> str:
    """An error's first line without terminal colour codes (torch.export's messages carry them), or its type's name."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def output_tensor_of(output: Any) -> torch.Tensor:
    from torchslim.tasks.batches import output_tensor

    return output_tensor(output, strict=False)  # what an exporter writes, not what a task scores


def as_called(model: nn.Module, example: Any) -> Any:
    """The example as ``model`` is called with it: a mapping of one input its forward takes no keyword for
    (``forward(idx)`` fed ``{"input_ids": ...}``) is that one tensor, given positionally."""
    from torchslim.tasks.batches import keyword_or_positional

    if isinstance(example, Mapping):
        args, _ = keyword_or_positional(model, dict(example))
        if args:
            return args[0]
    return example
