"""Quantized weights kept as codes in an exported ONNX file: one loaded ``onnx.ModelProto`` edited in place.

- ``int8_weights``: a float initializer that is exactly a symmetric int8 per-channel layer's decoded weight becomes the
  int8 codes behind a DequantizeLinear (a quarter of the bytes, the same values).
- ``block_nodes``: the MatMul / Gather reading a uniform weight of at most 8 bits becomes ONNX Runtime's MatMulNBits
  / GatherBlockQuantized on the packed codes (a tied embedding and LM head share one copy).
- ``tied_transposes``: a weight written twice, as itself and transposed, is stored once.
- ``set_accuracy_level``: MatMulNBits' ``accuracy_level`` (4: int8 activations inside the kernel).

``rewrite_weights`` runs the first three passes and says how many edits they made.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from torchslim.export.onnx import constant_lookup, replace_graph_nodes, weight_product


def rewrite_weights(proto: Any, model: nn.Module) -> int:
    """Every weight pass over ``proto`` (the ONNX file of ``model``): how many edits they made."""
    return int8_weights(proto, _int8_layers(model)) + block_nodes(proto, _block_layers(model)) + tied_transposes(proto)


def set_accuracy_level(model: Any, level: int) -> int:
    """Set ONNX Runtime's ``accuracy_level`` on every MatMulNBits of ``model`` (0 leaves them as written); returns how
    many the file has."""
    from onnx import helper

    products = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    for node in products if level else ():
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("accuracy_level", level)])
    return len(products)


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


def int8_weights(model: Any, layers: list[tuple[Any, Any]]) -> int:
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
    blocks of 32). Symmetric int8 per channel is left to ``int8_weights`` (standard operators)."""
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


def block_nodes(model: Any, layers: list[_BlockLayer]) -> int:
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


def tied_transposes(model: Any, smallest: int = 4096) -> int:
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
