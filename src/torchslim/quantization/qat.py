"""Quantization-aware training: fake-quant Linear / Conv2d modules, then conversion to real int8 in ONNX Runtime.

Weights: int8 symmetric per output channel, with scales either recomputed from the weights (observer-driven) or
learned (LSQ, Esser et al. 2020). Activations (each layer's input): uint8 affine, with the range tracked by a
moving-average min-max observer during training and frozen in eval. Exported, the fake-quant ops become ONNX
QuantizeLinear / DequantizeLinear pairs, which ONNX Runtime fuses into integer kernels (U8S8).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.config import Config, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode, model_device
from torchslim.core.selector import LayerSelector, select_modules, weight_of
from torchslim.core.spec import append_transform, model_spec, pin_spec, recorded_layers, register_transform, set_spec
from torchslim.export.onnx import export_onnx
from torchslim.quantization.cpu import cpu_has_vnni
from torchslim.quantization.observers import calibrate
from torchslim.quantization.primitives import UniformSpec, fake_quantize
from torchslim.tasks.batches import model_inputs, move_to
from torchslim.train import distributed

ACTIVATION_SPEC = UniformSpec(bits=8, symmetric=False)


@dataclasses.dataclass(frozen=True)
class QATConfig(Config):
    """Quantization-aware training: which layers train with fake quantization, how their weight scales are set
    ("observer" or "learned"), calibration batches that seed the activation ranges, and whether the trained model is
    exported to a QDQ ONNX model that runs in ONNX Runtime (``export``; otherwise the fake-quant model is returned)."""

    method: str = "qat"
    weight_scale: str = "learned"
    activation_momentum: float = 0.1
    layers: LayerSelector = LayerSelector()
    calibration_batches: int = 8
    export: bool = True
    # weights on 7 bits ([-64, 63]): ONNX Runtime's uint8 x int8 kernels on an x86 CPU without VNNI add pairs of
    # products in int16, which saturate with 8-bit weights (None: 7 bits where this CPU lacks VNNI, decided when the
    # layers are prepared and recorded with them, so a saved model trains and exports on the grid it was given)
    reduce_range: bool | None = None

    def validate(self) -> None:
        check(self.method == "qat", f"method must be 'qat' for QATConfig, got {self.method!r}")
        check(self.weight_scale in ("observer", "learned"), f"weight_scale must be 'observer' or 'learned', got {self.weight_scale!r}")
        check(0 < self.activation_momentum <= 1, f"activation_momentum must be in (0, 1], got {self.activation_momentum}")


class FakeQuant(nn.Module):
    """Fake quantization of a layer's input (uint8 affine, observed range) and weight (int8 per channel)."""

    weight_scale: torch.Tensor
    input_low: torch.Tensor
    input_high: torch.Tensor
    observed: torch.Tensor
    output_low: torch.Tensor
    output_high: torch.Tensor
    output_observed: torch.Tensor

    def __init__(self, weight: torch.Tensor, config: QATConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = UniformSpec(bits=7 if config.reduce_range else 8, symmetric=True, granularity="channel", axis=0)
        self.qmin, self.qmax = self.spec.code_range
        channels = weight.shape[0]
        initial = weight.detach().abs().reshape(channels, -1).amax(dim=1).clamp(min=1e-8) / self.qmax
        shape = (channels,) + (1,) * (weight.dim() - 1)
        if config.weight_scale == "learned":
            self.weight_scale = nn.Parameter(initial.reshape(shape).clone())
        else:
            self.register_buffer("weight_scale", initial.reshape(shape).clone())
        self.register_buffer("input_low", torch.tensor(0.0))
        self.register_buffer("input_high", torch.tensor(0.0))
        self.register_buffer("observed", torch.tensor(False))
        # the layer's output gets its own uint8 grid: Q/DQ after the layer lets ONNX Runtime fuse DQ -> op -> Q
        # into integer kernels (QLinearConv, QGemm) instead of dequantizing into float kernels
        self.register_buffer("output_low", torch.tensor(0.0))
        self.register_buffer("output_high", torch.tensor(0.0))
        self.register_buffer("output_observed", torch.tensor(False))
        self.frozen: dict[str, Any] | None = None
        self.calibrating = False

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the scales as constants for export (the exported graph then holds plain Q/DQ pairs)."""
        scale, zero = self.activation_qparams()
        out_scale, out_zero = _affine_qparams(self.output_low, self.output_high)
        self.frozen = {
            "weight_scale": self.weight_scale.detach().abs().clamp(min=1e-8).reshape(-1).float().clone(),
            "input_scale": float(scale),
            "input_zero": int(zero),
            "observed": bool(self.observed),
            "output_scale": float(out_scale),
            "output_zero": int(out_zero),
            "output_observed": bool(self.output_observed),
        }

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.config.weight_scale == "observer":
            channels = weight.shape[0]
            scale = weight.detach().abs().reshape(channels, -1).amax(dim=1).clamp(min=1e-8) / self.qmax
            self.weight_scale = scale.reshape(self.weight_scale.shape)
        if self.frozen is not None and torch.onnx.is_in_onnx_export():
            scale = self.frozen["weight_scale"]
            return torch.fake_quantize_per_channel_affine(weight, scale, torch.zeros(scale.shape, dtype=torch.int32, device=scale.device), 0, -128, 127)
        scale = self.weight_scale.abs().clamp(min=1e-8)
        zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
        if not self.training:
            return torch.fake_quantize_per_channel_affine(weight, scale.reshape(-1).detach(), zero.reshape(-1), 0, self.qmin, self.qmax)
        if self.config.weight_scale == "learned":  # LSQ gradient scaling: 1 / sqrt(numel * qmax)
            gradient_scale = 1.0 / (weight[0].numel() * self.qmax) ** 0.5
            scale = (scale - scale * gradient_scale).detach() + scale * gradient_scale
        return fake_quantize(weight, scale, zero, self.spec)

    def activation_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _affine_qparams(self.input_low, self.input_high)

    def _observe_and_quantize(self, x: torch.Tensor, which: str) -> torch.Tensor:
        prefix = "input" if which == "input" else "output"
        observed_name = "observed" if which == "input" else "output_observed"
        low_buffer, high_buffer, observed = getattr(self, f"{prefix}_low"), getattr(self, f"{prefix}_high"), getattr(self, observed_name)
        if self.frozen is not None and torch.onnx.is_in_onnx_export():
            if not self.frozen[observed_name]:
                return x
            return torch.fake_quantize_per_tensor_affine(x, self.frozen[f"{prefix}_scale"], self.frozen[f"{prefix}_zero"], 0, 255)
        if self.training or self.calibrating:
            low, high = x.detach().min(), x.detach().max()
            if self.training:  # under torchrun each rank sees a slice of the global batch: observe the whole batch
                low, high = distributed.global_range(low, high)
            if not bool(observed):
                low_buffer.copy_(low)
                high_buffer.copy_(high)
                observed.fill_(True)
            elif self.calibrating and not self.training:  # calibration: the range of every batch seen (an average of
                low_buffer.copy_(torch.minimum(low_buffer, low))  # small batches' ranges would clip the rest)
                high_buffer.copy_(torch.maximum(high_buffer, high))
            else:
                momentum = self.config.activation_momentum
                low_buffer.add_(momentum * (low - low_buffer))
                high_buffer.add_(momentum * (high - high_buffer))
        if torch.compiler.is_exporting():  # torch.export (pt2): the flag is a buffer, read in the graph, not by Python
            scale, zero = _affine_qparams(low_buffer, high_buffer)  # the fake-quant op written out: it has no export rule
            quantized = (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale
            return torch.where(observed, quantized.to(x.dtype), x)
        if not bool(observed):
            return x
        scale, zero = _affine_qparams(low_buffer, high_buffer)
        return torch.fake_quantize_per_tensor_affine(x, scale.detach().reshape(()).float(), zero.to(torch.int32).reshape(()), 0, 255)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._observe_and_quantize(x, "input")

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        return self._observe_and_quantize(y, "output")


def _affine_qparams(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 affine grid over [min(low, 0), max(high, 0)] (zero exactly representable)."""
    low = torch.minimum(low, torch.zeros_like(low))
    high = torch.maximum(high, torch.zeros_like(high))
    scale = ((high - low) / 255).clamp(min=1e-8)
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    return scale, zero


TRANSFORM_KIND = "qat"


class QATLinear(nn.Linear):
    """Linear trained with fake-quantized input and weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake.quantize_output(F.linear(self.fake.quantize_input(x), self.fake.quantize_weight(self.weight), self.bias))


class QATConv2d(nn.Conv2d):
    """Conv2d trained with fake-quantized input and weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake.quantize_output(self._conv_forward(self.fake.quantize_input(x), self.fake.quantize_weight(self.weight), self.bias))


def _convert(module: nn.Module, config: QATConfig) -> nn.Module:
    klass = QATLinear if isinstance(module, nn.Linear) else QATConv2d
    module.__class__ = klass
    weight = weight_of(module)
    module.fake = FakeQuant(weight, config).to(weight.device)
    return module


def prepare_qat(model: nn.Module, config: QATConfig | dict | None = None, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` whose selected Linear / Conv2d layers train with fake quantization.

    Fold BatchNorm first for the closest match to the exported graph (the exporter folds it anyway).
    """
    config = QATConfig.coerce(config, where="qat")
    if config.reduce_range is None:
        config = dataclasses.replace(config, reduce_range=not cpu_has_vnni())
    from torchslim.pruning.apply import get_mask, make_permanent

    target = model if inplace else copy_model(model)
    pin_spec(target)
    # layers masked by pruning train with their masks folded and their pruned weights' gradients zeroed: they stay zero
    # (a zero weight fake-quantizes to zero), as a recipe's prune stage left them
    masks = {name: mask.detach().clone() for name, module in target.named_modules() if (mask := get_mask(module)) is not None}
    if masks:
        make_permanent(target)
    converted = []
    for name, module in select_modules(target, config.layers, default_types=("Linear", "Conv2d")):
        if type(module) in (nn.Linear, nn.Conv2d):
            _convert(module, config)
            converted.append(name)
            if name in masks:
                weight = weight_of(module)
                weight.register_hook(lambda grad, keep=masks[name].to(weight.device): grad * keep)
    if not converted and not any(isinstance(m, (QATLinear, QATConv2d)) for m in target.modules()):  # a QAT model again: its layers are
        left = left_float(target)
        masked = " (masked by pruning: fold the masks first with torchslim.pruning.make_permanent)" if any("Parametrized" in entry for entry in left) else ""
        raise TorchslimError(
            "qat: no layer to fake-quantize: QAT covers plain nn.Linear and nn.Conv2d layers"
            + (f"; the model's weight layers are {', '.join(left[:6])}{', ...' if len(left) > 6 else ''}{masked}" if left else "")
            + (" (or use method 'weight-only' or 'onnxruntime' for these)" if left else "")
        )
    if converted:  # a saved file rebuilds the fake-quant layers (their scales and ranges come from the file)
        append_transform(target, {"kind": TRANSFORM_KIND, "config": config.to_dict(), "layers": {name: {} for name in converted}})
    return target


def left_float(model: nn.Module) -> list[str]:
    """The weight layers QAT leaves in float, as "name (Type)": Linear and Conv2d subclasses with forwards of their
    own, GPT-2's Conv1D, convolutions of other dimensions, and plain layers outside the selection."""
    from torchslim.quantization.modules import is_transposed_linear

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [
        f"{name} ({type(module).__name__})"
        for name, module in model.named_modules()
        if (isinstance(module, kinds) and not isinstance(module, (QATLinear, QATConv2d))) or is_transposed_linear(module)
    ]


@register_transform(TRANSFORM_KIND)
def apply_qat(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Rebuild the fake-quantized layers a saved file lists."""
    config = QATConfig.from_dict(transform.get("config") or {}, where="the file's qat record")
    for name, module, _ in recorded_layers(model, transform, "trains with fake quantization"):
        if type(module) not in (nn.Linear, nn.Conv2d):
            raise TorchslimError(f"the file trains {name!r} ({type(module).__name__}) with fake quantization; only Linear and Conv2d can")
        _convert(module, config)
    return model


def calibrate_qat(model: nn.Module, batches, count: int = 8) -> None:
    """Seed the activation ranges from a few batches: eval-mode passes (BatchNorm statistics stay as they are)
    in which only the fake-quant observers update."""
    fakes = [module.fake for module in model.modules() if isinstance(module, (QATLinear, QATConv2d))]
    for fake in fakes:
        fake.calibrating = True
    try:
        with eval_mode(model), torch.no_grad():
            for index, batch in enumerate(batches):
                if index >= count:
                    break
                args, kwargs = model_inputs(move_to(batch, model_device(model)), model)
                model(*args, **kwargs)
    finally:
        for fake in fakes:
            fake.calibrating = False


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every Conv2d -> BatchNorm2d pair folded into one Conv2d (torch.fx)."""
    from torch.fx.experimental.optimization import fuse

    try:
        folded = fuse(copy_model(model).eval(), inplace=True)
    except Exception as error:  # tracing fails in many ways; name the model and the cause
        raise TorchslimError(f"cannot trace {type(model).__name__} to fold BatchNorm: {str(error).splitlines()[0]}") from None
    set_spec(folded, model_spec(model))
    return folded


def calibrate_observers(model: nn.Module, batches, observer: str = "minmax", count: int = 16) -> None:
    """Set every fake-quant layer's input range from a torchslim observer (minmax, moving-average, percentile, mse,
    entropy) run over calibration batches in eval mode: post-training static quantization with torchslim's own
    calibration, exported through ``export_qat_onnx`` as a QDQ model."""
    layers: list[tuple[str, Any]] = [(name, module) for name, module in model.named_modules() if isinstance(module, (QATLinear, QATConv2d))]
    batches = list(batches)
    observers = calibrate(model, batches, layers, observer=observer, limit=count)
    for name, module in layers:
        low, high = observers[name].range()
        module.fake.input_low.copy_(low.reshape(()))
        module.fake.input_high.copy_(high.reshape(()))
        module.fake.observed.fill_(True)
    # outputs are observed once the inputs are fixed, so each range sees the quantized inputs it will get
    outputs = calibrate(model, batches, layers, observer=observer, limit=count, outputs=True)
    for name, module in layers:
        low, high = outputs[name].range()
        module.fake.output_low.copy_(low.reshape(()))
        module.fake.output_high.copy_(high.reshape(()))
        module.fake.output_observed.fill_(True)


def export_qat_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Export the fake-quantized model as a QDQ ONNX file (real int8 in ONNX Runtime)."""
    layers = [module for module in model.modules() if isinstance(module, (QATLinear, QATConv2d))]
    kept = {}
    for layer in layers:
        layer.fake.freeze()
        if layer.fake.qmax < 127:  # ONNX's QuantizeLinear knows the full int8 range only: the weights clipped to 7 bits
            assert layer.fake.frozen is not None
            bound = layer.fake.frozen["weight_scale"].reshape((-1,) + (1,) * (layer.weight.dim() - 1)).to(layer.weight.device)
            kept[layer] = layer.weight.detach().clone()
            with torch.no_grad():
                layer.weight.copy_(torch.maximum(torch.minimum(layer.weight, bound * layer.fake.qmax), bound * layer.fake.qmin))
    found: list = []
    try:
        exported = export_onnx(model, example_input, path, opset=17, warned=found)
    finally:
        for layer in layers:
            layer.fake.frozen = None
        with torch.no_grad():
            for layer, weight in kept.items():
                layer.weight.copy_(weight)
    store_int8_weights(exported)
    if found:  # the tracer made values computed from the inputs constants: check the trace takes the model's branches
        _refuse_value_branches(model, example_input, exported)
    return exported


def _refuse_value_branches(model: nn.Module, example_input: Any, path: Path) -> None:
    """Export the model with its fake quantization taken out (plain Linear / Conv2d again) as ``ts.export`` checks a
    file: on inputs of other values and the example negated the float file must match the float model within 1e-4 of
    its output (int8 rounding would hide nothing and flag nothing). A branch the trace baked in removes the int8 file
    and refuses the export by name."""
    import tempfile

    from torchslim.quantization.onnx_notes import checked_float_export

    plain = copy_model(model)
    for layer in plain.modules():
        if isinstance(layer, (QATLinear, QATConv2d)):
            plain_type: type[nn.Module] = nn.Linear if isinstance(layer, QATLinear) else nn.Conv2d
            layer.__class__ = plain_type  # type: ignore[assignment]
            del layer.fake
    try:
        with tempfile.TemporaryDirectory() as folder:
            failure = "QAT export: the model with its fake quantization taken out failed the export check"
            checked_float_export(plain, example_input, Path(folder) / "float.onnx", failure)
    except TorchslimError:
        Path(path).unlink(missing_ok=True)
        raise


def store_int8_weights(path: str | os.PathLike[str]) -> None:
    """Replace each QuantizeLinear applied to a float weight initializer by the int8 initializer it computes, so
    that the file holds int8 weights and ONNX Runtime sees the DequantizeLinear(int8 weight) pattern it fuses into
    integer kernels."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    constants = {node.output[0]: node for node in graph.node if node.op_type == "Constant"}

    def value(name: str):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        if name in constants:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    removed = []
    for node in list(graph.node):
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        weight, scale = value(node.input[0]), value(node.input[1])
        zero = value(node.input[2]) if len(node.input) > 2 else np.zeros((), dtype=np.uint8)
        if weight is None or scale is None or zero is None or zero.dtype != np.int8:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * weight.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = -1
        codes = np.clip(np.rint(weight / scale.reshape(shape)) + zero.reshape(shape).astype(np.float32), -128, 127).astype(np.int8)
        graph.initializer.append(numpy_helper.from_array(codes, name=node.output[0]))
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    onnx.save(model, str(path))
