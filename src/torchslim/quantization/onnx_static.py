"""Real int8 execution in ONNX Runtime: static (weights and activations, calibrated) and dynamic quantization.

Static quantization writes a QDQ model with uint8 activations and int8 weights (U8S8: the fast form on x86 CPUs;
S8S8 runs no faster than fp32 there), per-channel weights, BatchNorm folded by the export. Calibration runs
ONNX Runtime's calibrators (min-max, entropy, percentile) over batches of the user's data.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.config import Config, check
from torchslim.core.errors import TorchslimError
from torchslim.export.onnx import INPUT_NAME, OnnxModule, export_onnx
from torchslim.tasks.batches import example_of


@dataclasses.dataclass(frozen=True)
class OnnxInt8Config(Config):
    """Static or dynamic int8 through ONNX Runtime's quantizer: ``mode`` static (QDQ, calibrated with ONNX Runtime's
    ``calibration`` method: minmax, entropy or percentile) or dynamic; ``activations`` uint8 (the fast U8S8 form on
    x86) or int8; per-channel weights."""

    method: str = "onnxruntime"
    mode: str = "static"
    calibration: str = "minmax"
    calibration_batches: int = 16
    batch_size: int = 64
    per_channel: bool = True
    activations: str = "uint8"
    percentile: float = 99.999

    def validate(self) -> None:
        check(self.method == "onnxruntime", f"method must be 'onnxruntime' for OnnxInt8Config, got {self.method!r}")
        check(self.mode in ("static", "dynamic"), f"mode must be 'static' or 'dynamic', got {self.mode!r}")
        check(self.calibration in ("minmax", "entropy", "percentile"), f"calibration must be minmax, entropy or percentile, got {self.calibration!r}")
        check(self.calibration_batches >= 1, f"calibration_batches must be >= 1, got {self.calibration_batches}")
        check(self.activations in ("uint8", "int8"), f"activations must be uint8 or int8, got {self.activations!r}")


class _Reader:
    """CalibrationDataReader over torch batches."""

    def __init__(self, batches: Iterable, limit: int) -> None:
        self.iterator = iter(batches)
        self.limit, self.count = limit, 0

    def get_next(self) -> dict[str, Any] | None:
        if self.count >= self.limit:
            return None
        try:
            inputs = example_of(next(self.iterator))
        except StopIteration:
            return None
        if not isinstance(inputs, torch.Tensor):
            raise TorchslimError("ONNX Runtime calibration feeds models of one tensor input; this data gives several")
        self.count += 1
        return {INPUT_NAME: inputs.detach().cpu().numpy()}

    def rewind(self) -> None:  # ONNX Runtime may call it; one pass is all we give
        return None


def quantize_onnx(
    model: nn.Module, example_input: torch.Tensor, calibration: Iterable | None, path: str | os.PathLike[str], config: OnnxInt8Config | dict | None = None
) -> Path:
    """Export ``model`` and write an int8 ONNX model to ``path``; returns the path."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    config = OnnxInt8Config.coerce(config, where="quantize")
    path = Path(path)
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(model, example_input, Path(folder) / "fp32.onnx")
        prepared = Path(folder) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        temporary = Path(folder) / "int8.onnx"
        if config.mode == "dynamic":
            quantize_dynamic(str(prepared), str(temporary), weight_type=QuantType.QInt8, per_channel=config.per_channel)
        else:
            if calibration is None:
                raise TorchslimError("static int8 needs calibration data (a loader of batches)")
            reader = _Reader(calibration, config.calibration_batches)
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}[config.calibration]
            extra = {"CalibPercentile": config.percentile} if config.calibration == "percentile" else {}
            try:
                quantize_static(
                    str(prepared),
                    str(temporary),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=config.per_channel,
                    activation_type=QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=method,
                    extra_options=extra,
                )
            except ValueError as error:
                if reader.count == 0:
                    raise TorchslimError("static int8 calibration got no batches: the calibration data is empty") from None
                raise TorchslimError(f"ONNX Runtime static quantization failed: {error}") from None
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
