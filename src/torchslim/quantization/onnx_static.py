"""Real int8 execution in ONNX Runtime: static (weights and activations, calibrated) and dynamic quantization.

Static quantization writes a QDQ model with uint8 activations and int8 weights (U8S8: the fast form on x86 CPUs;
S8S8 runs no faster than fp32 there), per-channel weights, BatchNorm folded by the export. Calibration runs
ONNX Runtime's calibrators (min-max, entropy, percentile) over batches of the user's data.

Transformers (models called with keyword inputs such as ``input_ids`` / ``attention_mask``) export with dynamic batch
and sequence length; only the matrix products with weights are quantized (per output channel), while LayerNorm,
softmax, GELU, the attention products of two activations and residual adds stay float: per-tensor activation ranges
cannot hold what those see. ``float_head`` keeps the last product with a weight (the LM head or classifier)
float as well (on SmolLM2-135M: perplexity 41.2 instead of 42.1 under dynamic int8, for 80 MiB more file).
``smooth`` (SmoothQuant's alpha) first moves per-channel activation outliers into the weights, folded into the
normalization before each group of layers (only where the outputs stay the same), so the
per-tensor activation scales that the engine calibrates lose less. Calibration batches are re-cut to one shape
(rows padded to the longest with their attention mask zero), which ONNX Runtime's histogram calibrators need.

Dynamic int8 (no calibration data) of a transformer gives every token its own activation scale, computed at run time
(``per_token``; ONNX Runtime's quantize_dynamic has one scale per tensor, which a few tokens with very large
activations set for all the others): the products with weights become MatMulInteger on uint8 tokens and int8
per-channel weights, in standard ONNX operators.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.config import Config, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.export.onnx import INPUT_NAME, OnnxModule, as_called, constant_lookup, export_onnx, replace_graph_nodes, sole_input, weight_product
from torchslim.quantization.cpu import cpu_has_vnni
from torchslim.quantization.observers import OBSERVERS
from torchslim.quantization.onnx_notes import EXPORT_NOTES_KEY, add_metadata, checked_float_export, note_float_products
from torchslim.tasks.batches import example_of

DEFAULT_FLOAT_BELOW_DB = 20.0  # transformers: products whose static-grid input SQNR is lower stay float


@dataclasses.dataclass(frozen=True)
class OnnxInt8Config(Config):
    """Static or dynamic int8 through ONNX Runtime's quantizer: ``mode`` static (QDQ, calibrated with ONNX Runtime's
    ``calibration`` method: minmax, entropy or percentile) or dynamic; ``activations`` uint8 (the fast U8S8 form on
    x86) or int8; per-channel weights.

    ``float_below_db`` (static): a product with a weight whose input rows (tokens), rounded to the input's per-tensor
    uint8 min-max grid over the calibration batches, keep a median signal-to-noise ratio below this many dB stays
    float, named in the result (``input_sqnr``).
    Outlier channels do that: the inputs of a Llama MLP's down projection (SiLU(gate) x up) span hundreds of times
    their standard deviation, and rounding them per tensor wrecks the model (SmolLM2-135M: perplexity 26.3 -> 44.5;
    with its down projections kept float, 28.0). ``None`` means 20 dB for models called with keyword inputs
    (transformers) and no check otherwise; 0 turns it off."""

    method: str = "onnxruntime"
    mode: str = "static"
    calibration: str = "minmax"
    calibration_batches: int = 16
    batch_size: int = 64
    per_channel: bool = True
    activations: str = "uint8"
    percentile: float = 99.999
    smooth: float | None = None
    weight_matmuls_only: bool | None = None  # None: for models with keyword inputs (transformers)
    float_head: bool = False  # with weight_matmuls_only: the last product with a weight (LM head, classifier) stays float
    observer: str | None = None  # a torchslim observer sets every activation range (ONNX Runtime's calibrator is not used)
    float_below_db: float | None = None
    per_token: bool | None = None  # dynamic mode: each token's own activation scale (None: for transformers)
    reduce_range: bool | None = None  # 7-bit weights (None: where uint8 activations meet an x86 CPU without VNNI)

    def weights_on_7_bits(self) -> bool:
        """U8S8 (static with uint8 activations, or dynamic, whose activations are uint8) on an x86 CPU without VNNI: ONNX
        Runtime's kernels multiply uint8 by int8 in pairs summed into int16 (AVX2's vpmaddubsw), which saturates with
        full-range weights; 7-bit weights keep the sums in range."""
        if self.reduce_range is not None:
            return self.reduce_range
        return (self.mode == "dynamic" or self.activations == "uint8") and not cpu_has_vnni()

    def uses_per_token(self, keyword_inputs: bool) -> bool:
        """Whether dynamic int8 scales each token on its own (by default for models called with keyword inputs)."""
        return self.mode == "dynamic" and (keyword_inputs if self.per_token is None else self.per_token)

    def validate(self) -> None:
        check(self.method == "onnxruntime", f"method must be 'onnxruntime' for OnnxInt8Config, got {self.method!r}")
        check(self.mode in ("static", "dynamic"), f"mode must be 'static' or 'dynamic', got {self.mode!r}")
        check(self.calibration in ("minmax", "entropy", "percentile"), f"calibration must be minmax, entropy or percentile, got {self.calibration!r}")
        check(self.calibration_batches >= 1, f"calibration_batches must be >= 1, got {self.calibration_batches}")
        check(self.activations in ("uint8", "int8"), f"activations must be uint8 or int8, got {self.activations!r}")
        check(self.smooth is None or 0.0 <= self.smooth <= 1.0, f"smooth (SmoothQuant's alpha) must be in [0, 1] or None, got {self.smooth}")
        check(0.0 < self.percentile <= 100.0, f"percentile must be in (0, 100], got {self.percentile}")
        check(not self.per_token or self.mode == "dynamic", "per_token activation scales are computed at run time: use mode 'dynamic'")
        check(not self.float_below_db or self.mode == "static", "float_below_db chooses products a static calibration would round badly: use mode 'static'")
        check(self.float_below_db is None or self.float_below_db >= 0, f"float_below_db must be >= 0 (0: off), got {self.float_below_db}")
        check(self.observer is None or self.observer in OBSERVERS, f"observer must be one of {', '.join(OBSERVERS.names())} or None, got {self.observer!r}")
        for key, value, default in (("observer", self.observer, None), ("calibration", self.calibration, "minmax")):
            check(self.mode == "static" or value == default, f"{key} {value!r}: dynamic int8 calibrates nothing; use mode 'static' or leave {key} out")
        check(self.observer is None or self.calibration == "minmax", f"give observer or calibration, not both (calibration {self.calibration!r})")

    def float_threshold(self, keyword_inputs: bool) -> float:
        """The SQNR (dB) below which a static product stays float (0: none does)."""
        if self.mode != "static":
            return 0.0
        return (DEFAULT_FLOAT_BELOW_DB if keyword_inputs else 0.0) if self.float_below_db is None else self.float_below_db


def _uniform(batches: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The same rows re-cut into batches of one shape: sequences padded to the longest (attention mask 0 there), rows
    regrouped in batches of the first batch's size (a short remainder is dropped when full batches exist)."""
    if len({tuple(tuple(v.shape) for v in b.values()) for b in batches}) <= 1:
        return batches
    length = max(v.shape[1] for b in batches for v in b.values() if v.dim() >= 2)
    rows: dict[str, list[torch.Tensor]] = {}
    for batch in batches:
        for name, value in batch.items():
            if value.dim() >= 2 and value.shape[1] < length:
                value = torch.nn.functional.pad(value, (0, 0) * (value.dim() - 2) + (0, length - value.shape[1]))
            rows.setdefault(name, []).extend(value)
    size = next(iter(batches[0].values())).shape[0]
    total = len(next(iter(rows.values())))
    stop = total - total % size if total >= size else total
    return [{name: torch.stack(values[i : i + size]) for name, values in rows.items()} for i in range(0, stop, size or 1)]


class _Reader:
    """CalibrationDataReader over torch batches (one tensor input, several positional ones, or named inputs)."""

    def __init__(self, batches: Iterable, limit: int, names: list[str], keyword: bool = False) -> None:
        self.names = names
        taken: list[dict[str, torch.Tensor]] = []
        for batch in batches:
            if len(taken) >= limit:
                break
            inputs = sole_input(example_of(batch), names)  # {"input_ids": ids} for forward(idx): one positional input
            if isinstance(inputs, torch.Tensor):
                taken.append({names[0]: inputs.detach().cpu()})
            elif isinstance(inputs, dict):
                missing = [n for n in names if n not in inputs]
                if missing:
                    raise TorchslimError(f"the calibration batches lack the model's inputs {', '.join(missing)}")
                taken.append({n: inputs[n].detach().cpu() for n in names})
            elif isinstance(inputs, (tuple, list)) and len(inputs) == len(names) and all(isinstance(t, torch.Tensor) for t in inputs):
                taken.append({n: t.detach().cpu() for n, t in zip(names, inputs)})  # positional inputs, in order
            else:
                raise TorchslimError(
                    f"ONNX Runtime calibration takes batches of the model's {len(names)} input(s) ({', '.join(names)}): one tensor, a tuple of "
                    f"that many tensors, or a mapping of named inputs; this data gives {type(inputs).__name__}"
                )
        shapes = sorted({tuple(batch[name].shape[1:]) for batch in taken for name in names[:1]})
        if len(shapes) > 1 and not keyword:  # keyword inputs (token ids and their mask) are padded to one length below
            # tensors of several lengths (a signal, a fully convolutional input): the exported model takes one shape
            raise TorchslimError(
                f"static int8 calibration: the batches' inputs come in {len(shapes)} shapes ({', '.join(map(str, shapes[:4]))} after the batch axis), "
                "and the exported model takes one, its example's; pad or crop the calibration batches to one shape"
            )
        self.batches = _uniform(taken)
        self.count = 0

    def get_next(self) -> dict[str, Any] | None:
        if self.count >= len(self.batches):
            return None
        self.count += 1
        return {name: value.numpy() for name, value in self.batches[self.count - 1].items()}

    def rewind(self) -> None:  # ONNX Runtime may call it; one pass is all we give
        return None


def _weight_matmuls(path: Path) -> tuple[list[str], list[str]]:
    """(names of MatMul/Gemm nodes that multiply by a weight, names of those that multiply two activations)."""
    import onnx

    graph = onnx.load(str(path)).graph
    weights = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    with_weight: list[str] = []
    between: list[str] = []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            (with_weight if any(i in weights for i in node.input) else between).append(node.name)
    return with_weight, between


def per_token_int8(source: Path, target: Path, nodes: list[str], levels: int = 127) -> int:
    """Rewrite each named MatMul/Gemm with a 2-D weight of the ONNX model at ``source`` as int8 with per-token
    activation scales, computed at run time: every row x of the input (one token) is scaled by max|x| / 127 and
    stored as uint8 with zero point 128 (the U8S8 form x86 kernels run fastest), multiplied by the weight rounded
    symmetrically per output channel in ``MatMulInteger``, and the int32 result scaled back to float. Standard ONNX
    operators only. Writes ``target``; returns how many products were rewritten."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    value_of = constant_lookup(graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    wanted = set(nodes)
    shared: dict[str, Any] = {
        "tslim_pt_127": np.array(127.0, dtype=np.float32),
        "tslim_pt_eps": np.array(1e-12, dtype=np.float32),
        "tslim_pt_128": np.array(128.0, dtype=np.float32),
        "tslim_pt_zero": np.array(128, dtype=np.uint8),
        "tslim_pt_last": np.array([-1], dtype=np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in shared.items())
    rebuilt = []
    rewritten = 0
    for node in graph.node:
        if node.name not in wanted:
            rebuilt.append(node)
            continue
        product = weight_product(node, value_of)
        if product is None:
            rebuilt.append(node)
            continue
        weight, bias = product  # weight (in, out)
        x = node.input[0]
        scale = np.abs(weight).max(axis=0) / float(levels)  # levels 63: 7-bit weights where uint8 x int8 pairs saturate
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        codes = np.clip(np.round(weight / scale), -levels, levels).astype(np.int8)
        prefix = f"tslim_pt_{rewritten}"
        graph.initializer.extend([numpy_helper.from_array(codes, f"{prefix}_w"), numpy_helper.from_array(scale, f"{prefix}_wscale")])
        t = {k: f"{prefix}_{k}" for k in ("abs", "amax", "floor", "scale", "div", "round", "shift", "q", "acc", "accf", "y1", "y2")}
        if opset >= 18:
            reduce = helper.make_node("ReduceMax", [t["abs"], "tslim_pt_last"], [t["amax"]], keepdims=1)
        else:
            reduce = helper.make_node("ReduceMax", [t["abs"]], [t["amax"]], axes=[-1], keepdims=1)
        output = node.output[0]
        rebuilt += [
            helper.make_node("Abs", [x], [t["abs"]]),
            reduce,
            helper.make_node("Max", [t["amax"], "tslim_pt_eps"], [t["floor"]]),
            helper.make_node("Div", [t["floor"], "tslim_pt_127"], [t["scale"]]),
            helper.make_node("Div", [x, t["scale"]], [t["div"]]),
            helper.make_node("Round", [t["div"]], [t["round"]]),
            helper.make_node("Add", [t["round"], "tslim_pt_128"], [t["shift"]]),
            helper.make_node("Cast", [t["shift"]], [t["q"]], to=TensorProto.UINT8),
            helper.make_node("MatMulInteger", [t["q"], f"{prefix}_w", "tslim_pt_zero"], [t["acc"]], name=f"{node.name}_int8"),
            helper.make_node("Cast", [t["acc"]], [t["accf"]], to=TensorProto.FLOAT),
            helper.make_node("Mul", [t["accf"], t["scale"]], [t["y1"]]),
            helper.make_node("Mul", [t["y1"], f"{prefix}_wscale"], [t["y2"] if bias else output]),
        ]
        if bias:
            rebuilt.append(helper.make_node("Add", [t["y2"], bias], [output]))
        rewritten += 1
    replace_graph_nodes(graph, rebuilt)
    onnx.save(model, str(target))
    return rewritten


def observed_ranges(path: Path, batches: list[dict[str, torch.Tensor]], observer: str) -> dict[str, list[dict[str, Any]]]:
    """Every float activation of the ONNX model at ``path`` (its inputs and each node's outputs) watched by a
    torchslim observer over ``batches``; returns ONNX Runtime's TensorQuantOverrides ({tensor: [{rmin, rmax}]})."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from torchslim.quantization.observers import make_observer

    model = onnx.load(str(path))
    typed = onnx.shape_inference.infer_shapes(model).graph
    floats = {v.name for v in [*typed.value_info, *typed.input, *typed.output] if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    weights = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name in floats and i.name not in weights]
    produced = [name for node in model.graph.node if node.op_type != "Constant" for name in node.output if name in floats]
    listed = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in produced if name not in listed)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as named in the file
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    observers = {name: make_observer(observer, where=f"ONNX tensor {name}") for name in inputs + produced}
    unbounded: set[str] = set()  # tensors with an infinity (T5's log of a zero offset, masked out later): no range of ours

    def watch(name: str, value: torch.Tensor) -> None:
        if name in unbounded:
            return
        if not bool(torch.isfinite(value).all()):
            unbounded.add(name)  # left to ONNX Runtime's own calibration, as the "onnxruntime" method does everywhere
            observers.pop(name, None)
            return
        observers[name].observe(value)

    for batch in batches:
        feed = {name: value.numpy() for name, value in batch.items()}
        for name in inputs:
            watch(name, torch.from_numpy(feed[name]))
        for name, value in zip(names, _run(session, names, feed, f"observe its activations ({observer} observer)")):
            if name in observers or name in unbounded:
                watch(name, torch.from_numpy(np.asarray(value)))
    overrides = {}
    for name, seen in observers.items():
        low, high = seen.range()
        overrides[name] = [{"rmin": np.float32(min(float(low), 0.0)), "rmax": np.float32(max(float(high), 0.0))}]
    return overrides


def input_sqnr(path: Path, batches: list[dict[str, torch.Tensor]], nodes: list[str]) -> dict[str, float]:
    """For each named MatMul/Gemm of the ONNX model at ``path``: the median over the rows of its activation input
    (tokens, examples) of each row's SQNR (dB) when rounded to one uint8 grid spanning the whole input's min and max
    over ``batches`` (what per-tensor static int8 does with min-max calibration). The median, not the SQNR of the
    whole tensor: a few tokens with huge values (a transformer's massive activations) carry most of the tensor's
    power, so the tensor's SQNR can look fine while every other token rounds to nothing. Two passes: the ranges,
    then the rounding error on them."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer} | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    wanted = set(nodes)
    inputs = {n.name: next((i for i in n.input if i not in weights), None) for n in model.graph.node if n.name in wanted}
    tensors = sorted({t for t in inputs.values() if t})
    listed = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in tensors if name not in listed)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as named in the file
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def each() -> Any:
        for batch in batches:
            feed = {name: value.numpy() for name, value in batch.items()}
            yield dict(zip(tensors, _run(session, tensors, feed, "measure its products' input SQNR (float_below_db)")))

    low = dict.fromkeys(tensors, 0.0)
    high = dict.fromkeys(tensors, 0.0)
    for values in each():
        for name, value in values.items():
            low[name], high[name] = min(low[name], float(value.min())), max(high[name], float(value.max()))
    rows: dict[str, list[Any]] = {name: [] for name in tensors}
    for values in each():
        for name, value in values.items():
            scale = max(high[name] - low[name], 1e-12) / 255.0
            zero = np.round(-low[name] / scale)
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            rounded = (np.clip(np.round(flat / scale) + zero, 0, 255) - zero) * scale
            signal, noise = np.square(flat).sum(axis=1), np.square(flat - rounded).sum(axis=1)
            rows[name].append(10.0 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-30)))
    return {node: float(np.median(np.concatenate(rows[t]))) for node, t in inputs.items() if t and rows[t]}


def _failure(error: BaseException, path: Path) -> str:
    """What ONNX Runtime's quantizer raised, at which node and weight (its innermost frames'), and the weight's users."""
    import onnx

    found, frame = {"node": "", "weight": ""}, error.__traceback__
    while frame is not None:
        seen, frame = frame.tb_frame.f_locals, frame.tb_next
        info, node = seen.get("bias_info"), seen.get("node")
        found["node"] = str(getattr(info, "node_name", None) or getattr(node, "name", None) or found["node"])
        found["weight"] = str(getattr(info, "weight_name", None) or seen.get("weight_name") or found["weight"])
    where = ", ".join(f"{key} {name}" for key, name in found.items() if name)
    users = [n.name or n.op_type for n in onnx.load(str(path)).graph.node if found["weight"] in n.input] if found["weight"] else []
    shared = f"; the weight {found['weight']} is used by {len(users)} nodes ({', '.join(users[:4])}), and ONNX Runtime quantizes a weight once, "
    shared += "per channel along one axis (a weight reused transposed, as by a tied decoder, cannot): give each use its own copy, or use method 'weight-only'"
    return (f" at {where} ({type(error).__name__}: {error})" if where else f": {type(error).__name__}: {error}") + (shared if len(users) > 1 else "")


def _run(session: Any, names: list[str], feed: dict[str, Any], purpose: str) -> list[Any]:
    """``session.run``; where ONNX Runtime cannot run the model (an operator form it lacks) a clear error naming the node."""
    try:
        return session.run(names, feed)
    except Exception as error:  # ONNX Runtime's own exception types
        raise TorchslimError(f"ONNX Runtime cannot run the exported model to {purpose}: {type(error).__name__}: {error}") from None


@contextlib.contextmanager
def _quiet_root_logging() -> Iterator[None]:
    """ONNX Runtime's quantization tools log their own diagnostics ("Axis 1 is out-of-range") as warnings on the root
    logger: raised to errors while they run, and put back."""
    level = logging.root.level
    logging.root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logging.root.setLevel(level)


def quantize_onnx(
    model: nn.Module, example_input: Any, calibration: Iterable | None, path: str | os.PathLike[str], config: OnnxInt8Config | dict | None = None
) -> Path:
    """Export ``model`` and write an int8 ONNX model to ``path``; returns the path."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    config = OnnxInt8Config.coerce(config, where="quantize")
    path = Path(path)
    example_input = as_called(model, example_input)  # {"input_ids": ids} for forward(idx): one positional input
    keyword = isinstance(example_input, dict)
    names = [k for k, v in example_input.items() if isinstance(v, torch.Tensor)] if keyword else [INPUT_NAME]
    if isinstance(example_input, (tuple, list)) and len(example_input) > 1:  # several positional inputs, as exported
        names += [f"{INPUT_NAME}_{index}" for index in range(1, len(example_input))]
    if config.smooth is not None:
        if calibration is None:
            raise TorchslimError("smooth (SmoothQuant) needs calibration data")
        from torchslim.llm.scaling import smooth_float

        calibration = list(itertools.islice(calibration, config.calibration_batches))
        model = smooth_float(copy_model(model), calibration, config.smooth)
    with tempfile.TemporaryDirectory() as folder, _quiet_root_logging():
        fp32, noted = checked_float_export(model, example_input, Path(folder) / "fp32.onnx")
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        temporary = Path(folder) / "int8.onnx"
        only_weights = keyword if config.weight_matmuls_only is None else config.weight_matmuls_only
        per_token = config.uses_per_token(keyword)
        with_weight, between = _weight_matmuls(prepared) if only_weights or per_token else ([], [])
        head = with_weight[-1:] if config.float_head else []
        selection: dict[str, Any] = {}
        if only_weights:
            selection = {"op_types_to_quantize": ["MatMul", "Gemm"], "nodes_to_exclude": between + head}
        if per_token:
            if not per_token_int8(prepared, temporary, [name for name in with_weight if name not in head], 63 if config.weights_on_7_bits() else 127):
                raise TorchslimError("per-token int8: the model has no matrix product with a 2-D weight to quantize")
        elif config.mode == "dynamic":
            quantize_dynamic(
                str(prepared), str(temporary), weight_type=QuantType.QInt8, per_channel=config.per_channel, reduce_range=config.weights_on_7_bits(), **selection
            )
        else:
            if calibration is None:
                raise TorchslimError("static int8 needs calibration data (a loader of batches)")
            reader = _Reader(calibration, config.calibration_batches, names, keyword)
            if not reader.batches:
                raise TorchslimError("static int8 calibration got no batches: the calibration data is empty")
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[config.calibration]
            extra: dict[str, Any] = {"CalibPercentile": config.percentile} if config.calibration == "percentile" else {}
            if config.observer is not None:  # torchslim's observer sets every range; ONNX Runtime places the Q/DQ pairs
                extra["TensorQuantOverrides"] = observed_ranges(prepared, reader.batches, config.observer)
                method = CalibrationMethod.MinMax
            if only_weights:  # the products' outputs go on in float (to norms, activations, residual adds)
                extra["OpTypesToExcludeOutputQuantization"] = ["MatMul", "Gemm"]
            threshold = config.float_threshold(keyword)
            kept_float: dict[str, float] = {}
            if threshold > 0:
                ratios = input_sqnr(prepared, reader.batches, with_weight or _weight_matmuls(prepared)[0])
                kept_float = {name: db for name, db in ratios.items() if db < threshold}
                if kept_float:
                    selection.setdefault("nodes_to_exclude", []).extend(kept_float)
            try:
                quantize_static(
                    str(prepared),
                    str(temporary),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=config.per_channel,
                    activation_type=QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    reduce_range=config.weights_on_7_bits(),
                    calibrate_method=method,
                    extra_options=extra,
                    **selection,
                )
            except Exception as error:  # ONNX Runtime's quantizer and its calibration runs raise many kinds
                calibrated = "torchslim's " + config.observer if config.observer is not None else config.calibration
                raise TorchslimError(f"ONNX Runtime static quantization ({calibrated} calibration) failed{_failure(error, prepared)}") from None
            if threshold > 0:
                note_float_products(temporary, kept_float, threshold)
        if noted:
            add_metadata(temporary, EXPORT_NOTES_KEY, noted)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(temporary, path)
    return path


def onnx_int8_module(
    model: nn.Module,
    example_input: torch.Tensor,
    calibration: Iterable | None,
    path: str | os.PathLike[str],
    config: OnnxInt8Config | dict | None = None,
    threads: int = 2,
) -> OnnxModule:
    """Quantize to an int8 ONNX file and return an nn.Module that runs it in ONNX Runtime."""
    return OnnxModule(quantize_onnx(model, example_input, calibration, path, config), threads)


def fp32_onnx_module(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str], threads: int = 2) -> OnnxModule:
    """The same model exported in fp32, for side-by-side timing in the same engine."""
    return OnnxModule(export_onnx(model, example_input, path), threads)


def count_ops(path: str | os.PathLike[str]) -> dict[str, int]:
    """Operator histogram of an ONNX file (to check for QDQ pairs and folded BatchNorm)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
