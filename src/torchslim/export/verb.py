"""``ts.export(model, format, example_input, path)``: a dense, pruned, factorized or quantized model written as
ONNX, a torch.export program (``.pt2``) or TorchScript, then loaded back from the file and checked against the
PyTorch model at two batch sizes (the batch dimension is dynamic unless ``dynamic_batch=False``).

- ``onnx``: the file ONNX Runtime runs (``export_onnx``); an int8 ONNX Runtime engine (what ``quantize`` returns for
  the static int8 methods) is written as it is. Weight-only layers keep their codes where ONNX Runtime can run them:
  int8 per channel behind a DequantizeLinear, other uniform codes of at most 8 bits as MatMulNBits (its int4 / int8 kernels)
  and, for an embedding, as GatherBlockQuantized (a tied LM head and its embedding read one copy of the codes). A weight the
  exporter writes twice, as itself and transposed (an embedding tied to the LM head), is stored once.
- ``pt2``: ``torch.export.export`` with a dynamic batch, saved with ``torch.export.save``; reload with
  ``torch.export.load(path).module()``.
- ``torchscript``: ``torch.jit.trace``, saved with ``torch.jit.save``; reload with ``torch.jit.load``. Tracing
  records the path the example took: a model whose control flow depends on values exports wrongly, which the check
  catches.

Pruning masks are made permanent in the exported copy (the caller's model is not changed). The result's model is
the one loaded from the file; its report holds the file's bytes and the largest difference from PyTorch per batch
size. A difference over the tolerance removes the file and raises: no broken file is handed back.

Example:
    >>> import torch, torchslim as ts, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> result = export(ts.models.create("lenet-5"), "pt2", torch.zeros(1, 1, 28, 28), os.path.join(folder, "lenet5.pt2"))
    >>> result.model(torch.zeros(5, 1, 28, 28)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.files import refuse_overwrite
from torchslim.core.modes import eval_mode, model_device
from torchslim.core.report import Report, Result, Stage
from torchslim.export.onnx import KeywordInputs, OnnxModule, constant_lookup, export_onnx, replace_graph_nodes, weight_product
from torchslim.tasks.batches import call_model, output_tensor, repeat_example

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # ONNX Runtime's MatMulNBits: as written, float32, float16, bfloat16, int8 activations
APPROXIMATE_LEVELS = (2, 3, 4)  # the arithmetic differs from PyTorch's: the check bounds the relative error


def _reference(model: nn.Module, example: Any, set_eval: bool = True, decoded: bool = False) -> torch.Tensor:
    """The model's output on ``example`` (in eval mode unless ``set_eval`` is False: a loaded program has no modes;
    ``decoded``: weight-only layers without their integer kernels, as an ONNX file computes)."""
    from torchslim.quantization.modules import decoded_weights

    with eval_mode(model) if set_eval else contextlib.nullcontext(), torch.no_grad(), decoded_weights() if decoded else contextlib.nullcontext():
        return output_tensor(call_model(model, example)).detach().float().cpu()


def _prepared(model: nn.Module, form: str) -> nn.Module:
    """An eval-mode copy with pruning masks folded into plain weights (what every exporter can follow); for ONNX,
    weight-only quantized layers become the float layers they compute (ONNX has no bit unpacking of uint8 codes)."""
    from torchslim.core.selector import set_module
    from torchslim.pruning.apply import make_permanent, masks_of
    from torchslim.quantization.modules import float_equivalent

    prepared = copy.deepcopy(model)
    if masks_of(prepared):
        make_permanent(prepared)
    if form == "onnx":
        for name, module in list(prepared.named_modules()):
            plain = float_equivalent(module)
            if plain is not None:
                set_module(prepared, name, plain)
    return prepared.eval()


def _batch_shapes(args: tuple) -> tuple:
    """torch.export's dynamic_shapes: dimension 0 of every tensor input is the batch."""
    batch = torch.export.Dim.DYNAMIC  # whatever range the model allows (a CUDA convolution caps it at 65535)
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def _write(model: nn.Module, form: str, example: Any, path: Path, dynamic_batch: bool, accuracy_level: int = 0) -> tuple[nn.Module, int]:
    """Write ``model`` to ``path`` in ``form``: (the module loaded back from the file, how many MatMulNBits it has)."""
    import onnx

    if isinstance(model, OnnxModule):
        if form != "onnx":
            raise TorchslimError(f"export: {type(model).__name__} runs in ONNX Runtime (an int8 engine); it exports as onnx only, not {form}")
        proto = onnx.load_from_string(model.onnx_bytes)
        products = _accuracy_level(proto, accuracy_level)
        if products and accuracy_level:
            onnx.save(proto, str(path))
        else:
            model.save(path)
        return OnnxModule(path), products
    prepared = _prepared(model, form)
    if form == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(prepared, example, path, dynamic_batch=dynamic_batch)
        proto = onnx.load(str(path))  # the weight passes edit one loaded copy; the file is written once, if changed
        edits = _int8_weights(proto, _int8_layers(model)) + _block_nodes(proto, _block_layers(model)) + _tied_transposes(proto)
        products = _accuracy_level(proto, accuracy_level)
        if edits or (products and accuracy_level):
            onnx.save(proto, str(path))
        return OnnxModule(path), products
    # a batch of two: exporters specialize a batch dimension of 1
    traced = repeat_example(example, 2) if dynamic_batch else example
    names: list[str] = []
    if isinstance(traced, Mapping):  # keyword inputs (a Hugging Face model): positional tensors, one output tensor
        names = [key for key, value in traced.items() if isinstance(value, torch.Tensor)]
        prepared = KeywordInputs(prepared, names).eval()
        traced = tuple(traced[key] for key in names)
    args = traced if isinstance(traced, tuple) else (traced,)
    loaded: nn.Module
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if form == "pt2":
            shapes: Any = _batch_shapes(args) if dynamic_batch else None
            if names and shapes is not None:  # KeywordInputs.forward(*tensors): one entry for the variadic argument
                shapes = (shapes,)
            program = torch.export.export(prepared, args, dynamic_shapes=shapes)
            torch.export.save(program, str(path))
            loaded = torch.export.load(str(path)).module()
        else:
            torch.jit.save(torch.jit.trace(prepared, args, strict=False, check_trace=False), str(path))
            loaded = torch.jit.load(str(path), map_location=model_device(prepared))
    return (_ByName(loaded, names) if names else loaded), 0


def _accuracy_level(model: Any, level: int) -> int:
    """Set ONNX Runtime's ``accuracy_level`` on every MatMulNBits of ``model`` (0 leaves them as written); returns how
    many the file has."""
    from onnx import helper

    products = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    for node in products if level else ():
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
    return len(products)


class _ByName(nn.Module):
    """A loaded program of positional tensors called with the model's keyword inputs (in the exported order)."""

    def __init__(self, program: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.program, self.names = program, list(names)

    def forward(self, *args: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        return self.program(*args, *(inputs[name] for name in self.names if name in inputs))


def _int8_channel(module: Any) -> bool:
    """Whether a uniform weight-only layer is symmetric int8 per output channel: the form an ONNX file keeps as int8
    codes behind a standard DequantizeLinear (every other uniform form goes to MatMulNBits / GatherBlockQuantized)."""
    spec = module.scheme.uniform_spec()
    return module.bits == 8 and spec.symmetric and spec.granularity == "channel" and getattr(module, "input_scale", None) is None


def _int8_layers(model: nn.Module) -> list[tuple[Any, Any]]:
    """(int8 codes, per-output-channel scales) as NumPy arrays of every weight-only layer stored as symmetric int8 per
    channel: the weights an ONNX file can keep as int8 behind a DequantizeLinear."""
    from torchslim.quantization.modules import QuantizedWeight

    found = []
    for module in model.modules():
        if not isinstance(module, QuantizedWeight) or module.scheme.scheme != "uniform" or not _int8_channel(module):
            continue
        codes = (module.codes().to(torch.int64).reshape(module.shape) + module.scheme.uniform_spec().code_range[0]).to(torch.int8)
        found.append((codes.cpu().numpy(), module.scale.detach().float().reshape(-1).cpu().numpy()))
    return found


def _int8_weights(model: Any, layers: list[tuple[Any, Any]]) -> int:
    """Replace each float weight of the ONNX ``model`` that is exactly an int8 layer's decoded weight (codes x scale,
    as the exporter wrote it, or transposed for a MatMul) by the int8 codes behind a DequantizeLinear: the same values,
    a quarter of the bytes. Weights changed by the export (BatchNorm folded into them) stay float. Returns how many."""
    if not layers:
        return 0
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    candidates = [(codes, scale, codes.astype(np.float32) * scale.reshape((-1,) + (1,) * (codes.ndim - 1))) for codes, scale in layers]
    graph = model.graph
    replaced = []
    for initializer in list(graph.initializer):
        if initializer.data_type != onnx.TensorProto.FLOAT or len(initializer.dims) < 2:
            continue
        value = numpy_helper.to_array(initializer)
        for codes, scale, decoded in candidates:
            axis = 0 if value.shape == decoded.shape and np.array_equal(value, decoded) else None
            if axis is None and codes.ndim == 2 and value.shape == decoded.T.shape and np.array_equal(value, decoded.T):
                axis, codes = 1, codes.T
            if axis is None:
                continue
            name = initializer.name
            graph.initializer.remove(initializer)
            graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(codes), f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_scale")])
            replaced.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name], name=f"{name}_dequantize", axis=axis))
            break
    for node in reversed(replaced):
        graph.node.insert(0, node)
    return len(replaced)


@dataclasses.dataclass
class _BlockLayer:
    """A weight-only layer in MatMulNBits' form: codes (out, in) in 0..2^bits - 1 (``bits`` 4, holding codes of at
    most 4 bits, or 8, holding 5 to 8), a scale and an integer zero point per block of ``block`` inputs (out, blocks),
    and the weight they decode to (for matching the file)."""

    codes: Any
    scale: Any
    zero_point: Any
    block: int
    decoded: Any
    bits: int


def _block_layers(model: nn.Module) -> list[_BlockLayer]:
    """Every 2-D uniform weight-only layer of at most 8 bits whose codes ONNX Runtime's MatMulNBits can hold: per
    group (a power of two >= 16, a ragged last group padded), per channel or per tensor (one scale repeated over
    blocks of 32). Symmetric int8 per channel is left to ``_int8_weights`` (standard operators)."""
    from torchslim.quantization.modules import QuantizedWeight

    found = []
    for module in model.modules():
        if not isinstance(module, QuantizedWeight) or module.scheme.scheme != "uniform" or module.bits is None or module.bits > 8 or len(module.shape) != 2:
            continue
        if _int8_channel(module):
            continue
        spec = module.scheme.uniform_spec()
        bits = 4 if module.bits <= 4 else 8
        out_features, width = module.shape
        block = spec.group_size if spec.granularity == "group" else 32
        if block < 16 or block & (block - 1):
            continue
        blocks = -(-width // block)
        scale = module.scale.detach().float().reshape(out_features, -1).expand(out_features, blocks)
        zero_point = (module.zero_point.reshape(out_features, -1) - spec.code_range[0]).expand(out_features, blocks)
        if int(zero_point.min()) < 0 or int(zero_point.max()) >= 2**bits:
            continue
        codes = module.codes().reshape(module.shape)
        decoded = module.weight().detach().float().cpu().numpy()
        found.append(_BlockLayer(codes.cpu().numpy(), scale.cpu().numpy(), zero_point.to(torch.uint8).cpu().numpy(), block, decoded, bits))
    return found


def _packed(values: Any, bits: int) -> Any:
    """Values of ``bits`` (4 or 8) along the last axis, as bytes: 4-bit values in pairs, the first in the low half
    (padded with 0)."""
    import numpy as np

    if bits == 8:
        return values.astype(np.uint8)
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), dtype=values.dtype)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


class _BlockStore:
    """The packed codes, block scales and zero points of each layer, written into the ONNX graph once (in
    MatMulNBits' layout) however many nodes read them: a tied embedding and LM head share one copy."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.names: dict[int, tuple[str, str, str]] = {}

    def tensors(self, layer: _BlockLayer, prefix: str) -> tuple[str, str, str]:
        """(codes (out, blocks, bytes per block), scales (out x blocks), zero points (out x bytes of a row's blocks))
        names."""
        import numpy as np
        from onnx import numpy_helper

        if id(layer) not in self.names:
            out_features, width = layer.codes.shape
            blocks = layer.scale.shape[1]
            padded = np.zeros((out_features, blocks * layer.block), dtype=np.uint8)
            padded[:, :width] = layer.codes
            names = (f"{prefix}_codes", f"{prefix}_scales", f"{prefix}_zero_points")
            values = (
                _packed(padded, layer.bits).reshape(out_features, blocks, layer.block * layer.bits // 8),
                np.ascontiguousarray(layer.scale, dtype=np.float32).reshape(-1),
                _packed(layer.zero_point, layer.bits).reshape(-1),
            )
            self.graph.initializer.extend(numpy_helper.from_array(value, name) for value, name in zip(values, names))
            self.names[id(layer)] = names
        return self.names[id(layer)]


def _block_nodes(model: Any, layers: list[_BlockLayer]) -> int:
    """Replace each node of the ONNX ``model`` that reads exactly a block layer's decoded weight by ONNX Runtime's
    block-quantized operator on the packed codes (two 4-bit codes or one 8-bit code per byte), the block scales and
    zero points: a MatMul (or Gemm with a transposed weight) by MatMulNBits, an embedding's Gather by
    GatherBlockQuantized. The same values (the engine decodes the codes exactly as PyTorch does), an eighth (a quarter)
    of the float bytes, run by ONNX Runtime's n-bit kernels. Returns how many nodes were replaced."""
    if not layers:
        return 0
    import numpy as np
    from onnx import helper

    graph = model.graph
    value_of = constant_lookup(graph)
    store = _BlockStore(graph)
    by_start: dict[tuple, list[_BlockLayer]] = {}  # a few leading values pick the candidates compared in full
    for candidate in layers:
        by_start.setdefault((candidate.decoded.shape, candidate.decoded[0, :16].tobytes()), []).append(candidate)

    def layer_of(weight: Any) -> _BlockLayer | None:
        candidates = by_start.get((weight.shape, np.ascontiguousarray(weight[0, :16]).tobytes()), [])
        return next((candidate for candidate in candidates if np.array_equal(candidate.decoded, weight)), None)

    rebuilt, replaced = [], 0
    for node in graph.node:
        product = weight_product(node, value_of)
        table = _gathered_table(node, value_of) if product is None else None
        layer = layer_of(product[0].T) if product is not None else layer_of(table) if table is not None else None
        if layer is None:
            rebuilt.append(node)
            continue
        prefix = f"{node.name or node.input[0 if product is None else 1]}_int{layer.bits}"
        tensors = store.tensors(layer, prefix)
        if product is not None:
            rebuilt.extend(_matmul_nbits(node, product[1], layer, tensors, prefix))
        else:
            rebuilt.extend(_gather_block_quantized(graph, node, layer, tensors, prefix))
        replaced += 1
    if replaced:
        replace_graph_nodes(graph, rebuilt)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return replaced


def _matmul_nbits(node: Any, bias: str | None, layer: _BlockLayer, tensors: tuple[str, str, str], prefix: str) -> list[Any]:
    """The MatMulNBits (and the bias Add of a Gemm) that compute ``node``'s product from the stored codes."""
    from onnx import helper

    out_features, width = layer.codes.shape
    output = f"{prefix}_product" if bias else node.output[0]
    nodes = [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], *tensors],
            [output],
            name=prefix,
            domain="com.microsoft",
            K=width,
            N=out_features,
            bits=layer.bits,
            block_size=layer.block,
        )
    ]
    if bias:
        nodes.append(helper.make_node("Add", [output, bias], [node.output[0]], name=f"{prefix}_bias"))
    return nodes


def _gather_block_quantized(graph: Any, node: Any, layer: _BlockLayer, tensors: tuple[str, str, str], prefix: str) -> list[Any]:
    """The GatherBlockQuantized that does ``node``'s lookup from the stored codes: the tensors reshaped to one row per
    table row, as the operator reads them (ONNX Runtime folds the Reshapes at load), and a ragged end sliced off."""
    import numpy as np
    from onnx import helper, numpy_helper

    out_features, width = layer.codes.shape
    blocks = layer.scale.shape[1]
    per_byte = 8 // layer.bits
    columns = (blocks * layer.block // per_byte, blocks, -(-blocks // per_byte))  # codes, scales, zero points
    nodes, rows = [], []
    for name, count in zip(tensors, columns):
        graph.initializer.append(numpy_helper.from_array(np.array([out_features, count], dtype=np.int64), f"{name}_{prefix}_shape"))
        nodes.append(helper.make_node("Reshape", [name, f"{name}_{prefix}_shape"], [f"{name}_{prefix}_rows"], name=f"{name}_{prefix}_rows"))
        rows.append(f"{name}_{prefix}_rows")
    ragged = blocks * layer.block != width
    output = f"{prefix}_padded" if ragged else node.output[0]
    nodes.append(
        helper.make_node(
            "GatherBlockQuantized",
            [rows[0], node.input[1], rows[1], rows[2]],
            [output],
            name=prefix,
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=layer.block,
            bits=layer.bits,
        )
    )
    if ragged:
        ends = {"starts": 0, "ends": width, "axes": -1}
        graph.initializer.extend(numpy_helper.from_array(np.array([v], dtype=np.int64), f"{prefix}_{k}") for k, v in ends.items())
        nodes.append(helper.make_node("Slice", [output] + [f"{prefix}_{k}" for k in ends], [node.output[0]], name=f"{prefix}_slice"))
    return nodes


def _gathered_table(node: Any, value_of: Any) -> Any:
    """For a Gather of rows (axis 0) from a 2-D constant table (an embedding lookup): that table; else None."""
    from onnx import helper

    if node.op_type != "Gather" or any(a.name == "axis" and helper.get_attribute_value(a) != 0 for a in node.attribute):
        return None
    table = value_of(node.input[0])
    return table if table is not None and table.ndim == 2 else None


def _tied_transposes(model: Any, smallest: int = 4096) -> int:
    """Store once a float weight the exporter wrote twice, as itself and transposed (a Hugging Face model's embedding
    tied to its LM head: gathered rows in one place, a MatMul's weight in the other): the transposed copy becomes a
    Transpose node of the original, which ONNX Runtime folds when it loads the file. Returns how many were folded."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    big = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and i.dims[0] * i.dims[1] >= smallest]
    if len(big) < 2:
        return 0
    arrays = {i.name: numpy_helper.to_array(i) for i in big}
    by_start = {(value.shape, value[0, :16].tobytes()): name for name, value in arrays.items()}
    folded: list[tuple[str, str]] = []
    for initializer in big:
        value = arrays[initializer.name]
        original = by_start.get((value.shape[::-1], np.ascontiguousarray(value[:16, 0]).tobytes()))
        if original is None or original == initializer.name or original in {name for name, _ in folded}:
            continue
        if np.array_equal(arrays[original].T, value):
            folded.append((initializer.name, original))
    for name, original in folded:
        graph.initializer.remove(next(i for i in graph.initializer if i.name == name))
        graph.node.insert(0, helper.make_node("Transpose", [original], [name], name=f"{name}_tied", perm=[1, 0]))
    return len(folded)


def export(
    model: nn.Module,
    format: str,
    example_input: Any,
    path: str | os.PathLike[str] | None = None,
    dynamic_batch: bool = True,
    tolerance: float | None = None,
    overwrite: bool = False,
    accuracy_level: int = 0,
) -> Result:
    """Export ``model`` as ``format`` ("onnx", "pt2" or "torchscript") to ``path`` (default: ``<class name>`` with
    the format's suffix), load the file back and check it against ``model`` on ``example_input``'s first example
    repeated to batch 1 and 3 (or on ``example_input`` as it is when ``dynamic_batch`` is False).

    ``tolerance`` bounds the largest absolute output difference; by default 1e-4 x the largest output magnitude
    (at least 1e-4). Returns the loaded model and a report with the file's size, the differences and the time taken.

    ``accuracy_level`` (onnx only) is ONNX Runtime's setting for its MatMulNBits kernels: 0 (as written: float
    arithmetic, matches PyTorch), 1 (float32), 2 (float16), 3 (bfloat16) or 4 (activations quantized to int8 per
    block inside the kernel: the fastest form on x86 CPUs, an 8-bit weight's product several times faster). Levels 2 to
    4 change the arithmetic, so the check bounds the relative error ||file - PyTorch|| / ||PyTorch|| over the output
    instead (``tolerance``, default 0.1; a broken file is off by about 1).
    """
    if format not in FORMATS:
        raise TorchslimError(f"export: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(model, nn.Module):
        raise TorchslimError(f"export: expected an nn.Module, got {type(model).__name__}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise TorchslimError(
            f"export: accuracy_level must be one of {', '.join(map(str, ACCURACY_LEVELS))} (ONNX Runtime's MatMulNBits levels), got {accuracy_level!r}"
        )
    if accuracy_level and format != "onnx":
        raise TorchslimError(f"export: accuracy_level sets ONNX Runtime's MatMulNBits kernels; it applies to onnx only, not {format}")
    path = Path(path) if path is not None else Path(f"{type(model).__name__.lower()}{FORMATS[format]}")
    refuse_overwrite(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and moved there only once checked: a failed export leaves what was there alone
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        check = _export_and_check(model, format, example_input, partial, dynamic_batch, tolerance, accuracy_level)
        os.replace(partial, path)
    finally:
        _remove(partial)
    loaded = check.loaded
    if isinstance(loaded, OnnxModule):
        loaded.path = str(path)
    metrics = {
        "format": format,
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "max_abs_difference": check.differences,
        "relative_error": check.relative,
        "tolerance": check.allowed,
        "tolerance_bounds": "relative error" if accuracy_level in APPROXIMATE_LEVELS else "largest absolute difference",
        "dynamic_batch": dynamic_batch,
        "seconds": check.seconds,
    }
    measured = check.relative if accuracy_level in APPROXIMATE_LEVELS else check.differences
    notes = [
        f"checked against PyTorch at batch sizes {', '.join(check.differences)}: {metrics['tolerance_bounds']} {max(measured.values()):.2e} "
        f"(allowed {check.allowed:.2e})"
    ]
    if format == "onnx" and accuracy_level:
        metrics["accuracy_level"] = accuracy_level
        notes.append(
            f"{check.products} MatMulNBits at accuracy level {accuracy_level}"
            if check.products
            else f"accuracy_level {accuracy_level} has no effect: the file has no MatMulNBits (no weight-only layer of at most 8 bits it could hold)"
        )
    stage = Stage(name="export", kind="export", metrics=metrics, notes=notes, execution=_execution(format))
    return Result(model=loaded, report=Report.for_model(model, [stage]))


@dataclasses.dataclass
class _Check:
    loaded: nn.Module
    differences: dict[str, float]  # largest absolute difference per batch size
    relative: dict[str, float]  # ||file - PyTorch|| / ||PyTorch|| per batch size
    allowed: float
    seconds: float
    products: int  # MatMulNBits in an ONNX file


def _export_and_check(
    model: nn.Module, form: str, example_input: Any, path: Path, dynamic_batch: bool, tolerance: float | None, accuracy_level: int = 0
) -> _Check:
    """Write, reload and compare with the PyTorch model at each batch size."""
    started = time.perf_counter()
    try:
        loaded, products = _write(model, form, example_input, path, dynamic_batch, accuracy_level)
    except TorchslimError:
        raise
    except Exception as error:  # exporters raise many types; name the format, the model and the cause
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TorchslimError(f"export of {type(model).__name__} as {form} failed: {cause}") from error
    seconds = time.perf_counter() - started
    differences: dict[str, float] = {}
    relative: dict[str, float] = {}
    approximate = accuracy_level in APPROXIMATE_LEVELS
    allowed = 0.1 if tolerance is None and approximate else tolerance
    for size in (1, 3) if dynamic_batch else (None,):
        example = example_input if size is None else repeat_example(example_input, size)
        expected = _reference(model, example, decoded=form == "onnx")
        try:
            produced = _reference(loaded, example, set_eval=False)
        except Exception as error:
            raise TorchslimError(f"export: the {form} file does not run at batch {size}: {str(error).strip().splitlines()[0]}") from error
        if produced.shape != expected.shape:
            raise TorchslimError(f"export: the {form} file gives outputs of shape {tuple(produced.shape)} where the model gives {tuple(expected.shape)}")
        if allowed is None:
            allowed = 1e-4 * max(1.0, float(expected.abs().max()))
        differences[str(size or "example")] = float((produced - expected).abs().max())
        relative[str(size or "example")] = float((produced - expected).norm() / expected.norm().clamp_min(1e-12))
    assert allowed is not None
    measured = relative if approximate else differences
    worst = max(measured.values())
    if worst > allowed:
        what = f"by a relative error of {worst:.3g} at accuracy level {accuracy_level}" if approximate else f"by {worst:.3g}"
        hint = "a lower accuracy_level or a larger tolerance" if approximate else "onnx or pt2 for a traced model whose control flow depends on its inputs"
        raise TorchslimError(
            f"export: the {form} file differs from the PyTorch model {what} (allowed {allowed:.3g}; per batch size {measured}), "
            f"so nothing was written; try {hint}"
        )
    return _Check(loaded, differences, relative, allowed, seconds, products)


def _execution(form: str) -> str:
    return {"onnx": "ONNX Runtime (CPU)", "pt2": "torch.export program", "torchscript": "TorchScript"}[form]


def _remove(path: Path) -> None:
    if path.is_file():
        path.unlink()


__all__ = ["ACCURACY_LEVELS", "FORMATS", "export"]
