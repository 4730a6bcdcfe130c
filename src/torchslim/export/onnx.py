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
from torchslim.export.signature import (
    INPUT_NAME,
    OUTPUT_NAME,
    KeywordInputs,
    MainOutput,
    Positional,
    ViewsAsList,
    as_called,
    export_plan,
    first_line,
    input_plan,
    output_layout,
    output_names,
    positional_module,
    read_output_layout,
    rebuild_outputs,
    set_output_layout,
    sole_input,
)

# the tracer's warnings that a value computed from the inputs became a constant of the file: control flow on values
# (``if x.sum() > 0``) or a number read from a tensor, which other inputs may need otherwise
TRACER_MESSAGES = ("Converting a tensor to a Python", "Iterating over a tensor")


class OnnxExporterError(TorchslimError):
    """torch's ONNX exporter itself failed on the model (an operator it has no conversion for, a forward it cannot
    call): nothing was written."""


@contextlib.contextmanager
def tracer_warnings(found: list[warnings.WarningMessage]) -> Iterator[None]:
    """Warnings off while exporting, except the tracer's ``TRACER_MESSAGES`` about the model's own code (not torch's),
    which are collected in ``found``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.filterwarnings("always", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"torch\.(?!jit)")
        try:
            yield
        finally:
            found.extend(w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and str(w.message).startswith(TRACER_MESSAGES))


@contextlib.contextmanager
def _graph_log_off() -> Iterator[None]:
    """torch's TorchScript exporter turns its graph log on whatever ``verbose`` says (it tests the flag's getter, not
    its value) and so prints the whole graph to stderr when a conversion fails: the log stays off while exporting."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils
    except ImportError:  # another torch: its own logging
        yield
        return
    original = getattr(utils, "setup_onnx_logging", None)
    if original is None:
        yield
        return

    @contextlib.contextmanager
    def quiet(verbose: bool) -> Iterator[None]:
        torch._C._jit_set_onnx_log_enabled(bool(verbose))
        try:
            yield
        finally:
            torch._C._jit_set_onnx_log_enabled(False)

    utils.setup_onnx_logging = quiet
    try:
        yield
    finally:
        utils.setup_onnx_logging = original


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
    warned: list[warnings.WarningMessage] | None = None,
) -> Path:
    """Write ``model`` (in eval mode; every submodule's mode is restored) to an ONNX file with a dynamic batch
    dimension, and a dynamic sequence length for keyword inputs and token ids (integer inputs of two or more axes)
    with the inputs of their length.

    ``dynamic_axes``: more axes of any size, per input name (``input``, ``input_1``, ... for positional inputs; the
    keywords for a mapping): ``{"input": {2: "length"}}`` or ``{"input": [2]}`` (a Conv1d over signals of any length).
    A model returning a tuple or list of tensors, or a plain dict of them, gets one ONNX output each (``output``,
    ``output_1``, ... or the dict's keys), recorded in the file's metadata so ``OnnxModule`` returns the same structure.

    ``exporter`` "torchscript" is fast and folds BatchNorm into convolutions; "dynamo" uses torch.export. A failure of
    the exporter itself raises ``OnnxExporterError``. Warnings are off while exporting; the tracer's warnings that a
    value computed from the inputs became a constant of the file (control flow on values) go to ``warned``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    example_input = as_called(model, example_input)
    found: list[warnings.WarningMessage] = [] if warned is None else warned
    try:
        with eval_mode(model), torch.no_grad(), tracer_warnings(found), _eager_attention(model), _graph_log_off():
            module, inputs, names, axes, layout = export_plan(model, example_input, dynamic_batch, dynamic_sequence, dynamic_axes)
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
                    verbose=False,
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
        raise OnnxExporterError(f"ONNX export of {type(model).__name__} failed: {first_line(error)}") from error
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
    # the optimizer fuses an int8 DequantizeLinear + MatMul into MatMulNBits at accuracy level 4 (int8 activations)
    # unless told: level 0 keeps the float arithmetic the file was checked with
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: Any) -> torch.Tensor:
    """Run a session on one tensor (its first input), a tuple of tensors (its inputs in order), or a mapping of named
    inputs (those the model has; a missing one is an error that names what the model takes): its first output."""
    return run_onnx_outputs(session, inputs)[0]


def run_onnx_outputs(session: Any, inputs: Any) -> list[torch.Tensor]:
    """Every output of a session run on ``inputs`` (as ``run_onnx`` takes them), in the model's order."""
    feed = onnx_feed([i.name for i in session.get_inputs()], inputs)
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


def onnx_feed(wanted: list[str], inputs: Any) -> dict[str, Any]:
    """The ONNX Runtime feed (name: array) for a session of inputs ``wanted``: one tensor, a tuple or list of
    positional tensors (in order), or a mapping by name (every input the file takes, and no other)."""
    inputs = sole_input(inputs, wanted)  # {"input_ids": ids} for a model exported with one positional input
    if isinstance(inputs, Mapping):
        missing = [name for name in wanted if name not in inputs]
        if missing:
            raise TorchslimError(f"the ONNX model takes inputs {', '.join(wanted)}; missing {', '.join(missing)}")
        # a value that is no tensor (a collate function's ids, lengths as a list) was left out of the file when it
        # was exported; an extra tensor would change nothing in the file while the PyTorch model reads it
        extra = [name for name in inputs if name not in wanted and isinstance(inputs[name], torch.Tensor)]
        if extra:
            raise TorchslimError(
                f"the ONNX model takes inputs {', '.join(wanted)}, not {', '.join(extra)}: it was exported or quantized with an example "
                "without them; give that example every input the model will be called with"
            )
        feed = {name: inputs[name].detach().cpu().numpy() for name in wanted}
    elif isinstance(inputs, (tuple, list)):
        if len(inputs) != len(wanted):
            raise TorchslimError(f"the ONNX model takes {len(wanted)} inputs ({', '.join(wanted)}), the example has {len(inputs)}")
        feed = {name: tensor.detach().cpu().numpy() for name, tensor in zip(wanted, inputs)}
    else:
        feed = {wanted[0]: inputs.detach().cpu().numpy()}
    return feed


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

    def forward(self, *args: Any, **inputs: Any) -> Any:
        """Run on positional inputs (in the file's order; one tensor, tuple or mapping as ``run_onnx`` takes it),
        inputs by name, or both: the first output (one tensor), or, for a model exported with several outputs, the
        model's own structure (a tuple / list of tensors, a dict of them, or those nested)."""
        given = self._given(args, inputs)
        if self.layout is None:
            return run_onnx(self.session, given)
        return rebuild_outputs(run_onnx_outputs(self.session, given), self.layout)

    def _given(self, args: tuple, inputs: dict[str, Any]) -> Any:
        if not inputs:
            if not args:
                raise TorchslimError(f"the ONNX model takes inputs {', '.join(i.name for i in self.session.get_inputs())}; it was called with none")
            return args[0] if len(args) == 1 else args
        if not args:
            return inputs
        wanted = [i.name for i in self.session.get_inputs()]
        if len(args) > len(wanted):
            raise TorchslimError(f"the ONNX model takes {len(wanted)} inputs ({', '.join(wanted)}), got {len(args)} positional and {', '.join(inputs)} by name")
        positional = dict(zip(wanted, args))
        twice = [name for name in positional if name in inputs]
        if twice:
            raise TorchslimError(f"the ONNX model got {', '.join(twice)} both by position and by name")
        return {**positional, **inputs}

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


__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "KeywordInputs",
    "MainOutput",
    "OnnxExporterError",
    "OnnxModule",
    "Positional",
    "ViewsAsList",
    "as_called",
    "constant_lookup",
    "export_onnx",
    "input_plan",
    "onnx_session",
    "output_layout",
    "positional_module",
    "replace_graph_nodes",
    "run_onnx",
    "run_onnx_outputs",
    "sole_input",
    "tracer_warnings",
    "weight_product",
]
