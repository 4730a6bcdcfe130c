"""ONNX export (eval mode, BatchNorm folded into the preceding conv by the exporter) and ONNX Runtime sessions.

A model of one tensor input exports with input ``input`` and a dynamic batch. A model called with keyword inputs (a
Hugging Face transformer: ``{"input_ids": ..., "attention_mask": ...}``) exports with those names as inputs, dynamic
batch and sequence length, and the tensor a task reads from its output (logits, last hidden state) as ``output``.

Example:
    >>> import torchslim as ts, tempfile, os
    >>> path = export_onnx(ts.models.create("lenet-5"), torch.zeros(1, 1, 28, 28), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> run_onnx(onnx_session(path), torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.files import ModelFormat, refuse_overwrite, register_format, write_atomic
from torchslim.core.modes import eval_mode

INPUT_NAME, OUTPUT_NAME = "input", "output"
# keyword inputs that go with a main one (never fed as a model's only input in its place)
SECONDARY_INPUTS = ("attention_mask", "token_type_ids", "position_ids", "head_mask", "past_key_values")


class KeywordInputs(nn.Module):
    """``model(**dict(zip(names, tensors)))`` as a module of positional tensors returning one tensor (for export)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        from torchslim.tasks.batches import output_tensor

        return output_tensor(self.model(**dict(zip(self.names, tensors))))


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
    takes one list of them, in ``Positional`` where it has keyword-only arguments."""
    import inspect

    from torchslim.tasks.batches import takes_one_input

    if inputs > 1 and takes_one_input(model):
        return ViewsAsList(model).eval()
    try:
        keyword_only = any(p.kind == inspect.Parameter.KEYWORD_ONLY for p in inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        keyword_only = False
    return Positional(model).eval() if keyword_only else model


class FlatOutputs(nn.Module):
    """A model whose output is a tuple or list of tensors, or a plain dict of them, as a module returning those tensors
    as a tuple (each its own ONNX output); ``names`` are the dict's keys (None for a sequence)."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model(*tensors)
        return tuple(output[name] for name in self.names) if self.names is not None else tuple(output)


def output_layout(output: Any) -> dict[str, Any] | None:
    """How an exported model's outputs rebuild the model's own: ``{"kind": "tuple" | "list", "count": n}`` for a
    sequence of tensors, ``{"kind": "dict", "names": [...]}`` for a plain dict of tensors; None for one tensor (or any
    other output, of which the tensor a task reads is exported)."""
    if isinstance(output, (tuple, list)) and len(output) > 1 and all(isinstance(t, torch.Tensor) for t in output):
        return {"kind": type(output).__name__, "count": len(output)}
    if type(output) is dict and len(output) > 1 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in output.items()):
        return {"kind": "dict", "names": list(output)}
    return None


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
    ``dynamic_sequence``, every keyword input of the first's length has a dynamic sequence (axis 1); so have token ids
    given positionally (integer inputs of two or more axes, and the inputs of their length) where ``model`` runs on
    them a quarter shorter (a model that flattens a fixed length keeps it)."""
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
    # token ids: keyword inputs of two or more axes, or integer tensors of (batch, length) given positionally (not images)
    lead = next((t for t in tensors if (t.dim() >= 2 if keyed else t.dim() == 2 and not t.is_floating_point())), None) if dynamic_sequence else None
    if lead is None or lead.shape[1] < 2:
        return names, tensors, axes
    shared = [index for index, tensor in enumerate(tensors) if tensor.dim() >= 2 and tensor.shape[1] == lead.shape[1]]
    if not keyed and not _runs_shorter(None if model is None else positional_module(model, len(tensors)), tensors, shared):
        return names, tensors, axes
    for index in shared:
        axes[names[index]].setdefault(1, "sequence")
    return names, tensors, axes


def _runs_shorter(model: nn.Module | None, tensors: tuple, shared: list[int]) -> bool:
    """Whether ``model`` runs on ``tensors`` with axis 1 of those at ``shared`` a quarter shorter (eval mode)."""
    if model is None:
        return False
    length = tensors[shared[0]].shape[1]
    shorter = tuple(t.narrow(1, 0, length - max(1, length // 4)) if index in shared else t for index, t in enumerate(tensors))
    try:
        with eval_mode(model), torch.no_grad():
            model(*shorter)
        return True
    except Exception:  # a model of one fixed length: its sequence stays fixed
        return False


def _export_plan(
    model: nn.Module, example_input: Any, dynamic_batch: bool, dynamic_sequence: bool, dynamic_axes: Mapping[str, Any] | None = None
) -> tuple[nn.Module, tuple, list[str], dict[str, dict[int, str]], dict[str, Any] | None]:
    """What to export: the module, its positional inputs, their names, the dynamic axes and the output layout."""
    names, tensors, axes = input_plan(example_input, dynamic_batch, dynamic_sequence, dynamic_axes, model)
    module = KeywordInputs(model, names).eval() if isinstance(example_input, Mapping) else positional_module(model, len(tensors))
    with torch.no_grad():
        output = module(*tensors)
    layout = output_layout(output)
    if layout is not None:
        module = FlatOutputs(module, layout.get("names"))
    # the outputs' batch axis; their other axes follow the inputs' as the exporter traces them
    for name in output_names(layout):
        axes[name] = {0: "batch"} if dynamic_batch else {}
    first = output_tensor_of(output)
    if any("sequence" in axes.get(n, {}).values() for n in names) and first.dim() >= 3 and tensors[0].dim() >= 2 and first.shape[1] == tensors[0].shape[1]:
        axes[output_names(layout)[0]][1] = "sequence"
    return module, tensors, names, {k: v for k, v in axes.items() if v}, layout


LAYOUT_KEY = "torchslim.outputs"


def set_output_layout(path: str | os.PathLike[str], layout: dict[str, Any]) -> None:
    """Record an output layout in an ONNX file's metadata (``OnnxModule`` rebuilds the model's outputs from it)."""
    import onnx

    proto = onnx.load(str(path))
    copy_output_layout(proto, layout)
    onnx.save(proto, str(path))


def copy_output_layout(proto: Any, layout: dict[str, Any] | None) -> None:
    """Set (or, for None, leave) the output layout entry of an ONNX model proto's metadata."""
    import json

    if layout is None:
        return
    kept = [entry for entry in proto.metadata_props if entry.key != LAYOUT_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key, entry.value = LAYOUT_KEY, json.dumps(layout)


def read_output_layout(session: Any) -> dict[str, Any] | None:
    """The output layout an ONNX Runtime session's model records (None: its first output is the model's output)."""
    import json

    value = session.get_modelmeta().custom_metadata_map.get(LAYOUT_KEY)
    return json.loads(value) if value else None


def output_tensor_of(output: Any) -> torch.Tensor:
    from torchslim.tasks.batches import output_tensor

    return output_tensor(output)


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """A Hugging Face model's attention as plain matmul + softmax while exporting (its fused attention with grouped
    key/value heads has no ONNX conversion), and torch's own ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention``
    off their fused fast path (which eval mode under no_grad turns on, and which has no ONNX conversion); the settings
    are put back after."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None and isinstance(getattr(c, "_attn_implementation", None), str)}
    saved = {key: config._attn_implementation for key, config in configs.items()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        for config in configs.values():
            config._attn_implementation = "eager"
        torch.backends.mha.set_fastpath_enabled(False)
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for key, config in configs.items():
            config._attn_implementation = saved[key]


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike[str],
    opset: int = 17,
    dynamic_batch: bool = True,
    exporter: str = "torchscript",
    dynamic_sequence: bool = True,
    dynamic_axes: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (in eval mode; every submodule's mode is restored) to an ONNX file with a dynamic batch
    dimension, and a dynamic sequence length for keyword inputs and token ids (integer inputs of two or more axes)
    with the inputs of their length.

    ``dynamic_axes``: more axes of any size, per input name (``input``, ``input_1``, ... for positional inputs; the
    keywords for a mapping): ``{"input": {2: "length"}}`` or ``{"input": [2]}`` (a Conv1d over signals of any length).
    A model returning a tuple or list of tensors, or a plain dict of them, gets one ONNX output each (``output``,
    ``output_1``, ... or the dict's keys), recorded in the file's metadata so ``OnnxModule`` returns the same structure.

    ``exporter`` "torchscript" is fast and folds BatchNorm into convolutions; "dynamo" uses torch.export.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    example_input = as_called(model, example_input)
    try:
        with eval_mode(model), torch.no_grad(), warnings.catch_warnings(), _eager_attention(model):
            warnings.simplefilter("ignore")
            module, inputs, names, axes, layout = _export_plan(model, example_input, dynamic_batch, dynamic_sequence, dynamic_axes)
            outputs = output_names(layout)
            if exporter == "torchscript":
                torch.onnx.export(
                    module,
                    inputs,
                    str(temporary),
                    dynamo=False,
                    opset_version=opset,
                    input_names=names,
                    output_names=outputs,
                    do_constant_folding=True,
                    dynamic_axes=axes or None,
                )
            elif exporter == "dynamo":
                dims = {label: torch.export.Dim(label) for entry in axes.values() for label in entry.values()}
                program = torch.onnx.export(
                    module,
                    inputs,
                    dynamo=True,
                    input_names=names,
                    output_names=outputs,
                    dynamic_shapes=tuple({axis: dims[label] for axis, label in axes.get(name, {}).items()} for name in names) if axes else None,
                )
                program.save(str(temporary))
            else:
                raise TorchslimError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
        if layout is not None:
            set_output_layout(temporary, layout)
        os.replace(temporary, path)
    except TorchslimError:
        raise
    except Exception as error:  # the exporter raises many types; name the model and the cause
        raise TorchslimError(f"ONNX export of {type(model).__name__} failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from error
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def constant_lookup(graph: Any) -> Callable[[str], Any]:
    """``value_of(name)``: the array of an initializer or a Constant node's output of the ONNX graph (None for any
    other tensor), each converted once, when first asked for."""
    from onnx import numpy_helper

    tensors = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensors[node.output[0]] = value.t
    arrays: dict[str, Any] = {}

    def value_of(name: str) -> Any:
        if name not in arrays and name in tensors:
            arrays[name] = numpy_helper.to_array(tensors[name])
        return arrays.get(name)

    return value_of


def weight_product(node: Any, value_of: Callable[[str], Any]) -> tuple[Any, str | None] | None:
    """For a MatMul, or a Gemm without transA and with alpha = beta = 1, whose second input is a 2-D constant: (that
    weight as (in, out), the Gemm's bias input or None). None for any other node."""
    from onnx import helper

    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
        return None
    weight = value_of(node.input[1])
    if weight is None or weight.ndim != 2:
        return None
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    return (weight.T if attributes.get("transB", 0) else weight), bias


def replace_graph_nodes(graph: Any, nodes: list[Any]) -> None:
    """Make ``nodes`` the ONNX graph's nodes (in that order) and drop the initializers no node reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def onnx_session(path: str | os.PathLike[str] | bytes, threads: int = 2, spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session (from a file or the model's bytes) with a fixed intra-op thread count (spinning off
    by default, for fair timing)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def as_called(model: nn.Module, example: Any) -> Any:
    """The example as ``model`` is called with it: a mapping of one input its forward takes no keyword for
    (``forward(idx)`` fed ``{"input_ids": ...}``) is that one tensor, given positionally."""
    from torchslim.tasks.batches import keyword_or_positional

    if isinstance(example, Mapping):
        args, _ = keyword_or_positional(model, dict(example))
        if args:
            return args[0]
    return example


def run_onnx(session: Any, inputs: Any) -> torch.Tensor:
    """Run a session on one tensor (its first input), a tuple of tensors (its inputs in order), or a mapping of named
    inputs (those the model has; a missing one is an error that names what the model takes): its first output."""
    return run_onnx_outputs(session, inputs)[0]


def run_onnx_outputs(session: Any, inputs: Any) -> list[torch.Tensor]:
    """Every output of a session run on ``inputs`` (as ``run_onnx`` takes them), in the model's order."""
    wanted = [i.name for i in session.get_inputs()]
    if isinstance(inputs, Mapping) and len(inputs) == 1 and wanted == [INPUT_NAME] and next(iter(inputs)) not in SECONDARY_INPUTS:
        inputs = next(iter(inputs.values()))  # {"input_ids": ids} for a model exported with one positional input
    if isinstance(inputs, Mapping):
        missing = [name for name in wanted if name not in inputs]
        if missing:
            raise TorchslimError(f"the ONNX model takes inputs {', '.join(wanted)}; missing {', '.join(missing)}")
        feed = {name: inputs[name].detach().cpu().numpy() for name in wanted}
    elif isinstance(inputs, (tuple, list)):
        if len(inputs) != len(wanted):
            raise TorchslimError(f"the ONNX model takes {len(wanted)} inputs ({', '.join(wanted)}), got {len(inputs)}")
        feed = {name: tensor.detach().cpu().numpy() for name, tensor in zip(wanted, inputs)}
    else:
        feed = {wanted[0]: inputs.detach().cpu().numpy()}
    try:
        return [torch.from_numpy(array) for array in session.run(None, feed)]
    except Exception as error:
        if "invalid dimensions" not in str(error).lower():
            raise
        # the exported input has fixed axes besides the batch: name them rather than ONNX Runtime's message
        takes = {i.name: tuple(i.shape) for i in session.get_inputs()}
        given = {name: tuple(value.shape) for name, value in feed.items()}
        raise TorchslimError(
            f"the ONNX model takes inputs of shape {takes} (a name: an axis of any size), got {given}: it was exported with an example of "
            "one shape; export with an example of the shape it will run on, or pad inputs to it"
        ) from error


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind an nn.Module interface (for evaluate, the latency harness and ``save``). It
    keeps the model's bytes, so it saves as an ``.onnx`` file wherever the file it came from went."""

    def __init__(self, path: str | os.PathLike[str] | bytes, threads: int = 2, description: str = "ONNX Runtime") -> None:
        super().__init__()
        self.onnx_bytes = path if isinstance(path, bytes) else Path(path).read_bytes()
        self.path = None if isinstance(path, bytes) else str(path)
        self.description = description
        self.session = onnx_session(self.onnx_bytes, threads)
        self.layout = read_output_layout(self.session)

    def forward(self, x: Any = None, *more: Any, **inputs: Any) -> Any:
        """The first output (one tensor), or, for a model exported with several outputs, the model's own structure:
        a tuple / list of tensors or a dict of them."""
        given = inputs if x is None else (x, *more) if more else x
        if self.layout is None:
            return run_onnx(self.session, given)
        outputs = run_onnx_outputs(self.session, given)
        if self.layout["kind"] == "dict":
            return dict(zip(self.layout["names"], outputs))
        return list(outputs) if self.layout["kind"] == "list" else tuple(outputs)

    def save(self, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
        refuse_overwrite(path, overwrite)
        write_atomic(path, self.onnx_bytes)
        return Path(path)


def _save_onnx(model: nn.Module, path: Path, overwrite: bool = True) -> Path:
    if not isinstance(model, OnnxModule):
        raise TorchslimError(
            f"{path}: saving to .onnx takes a model that runs in ONNX Runtime (what quantize returns for an "
            f"int8 method); export a PyTorch model with torchslim.export.export_onnx(model, example_input, path)"
        )
    return model.save(path, overwrite=overwrite)


register_format(ModelFormat(".onnx", save=_save_onnx, load=lambda path, trust_factory=False: OnnxModule(path)))
