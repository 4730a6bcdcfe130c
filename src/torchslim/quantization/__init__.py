"""Quantization: uniform and non-uniform primitives, observers, weight-only quantized modules (packed codes)."""

from torchslim.quantization.modules import QuantizedConv2d, QuantizedLinear, WeightScheme
from torchslim.quantization.nonuniform import binarize, kmeans_quantize, power_of_two_quantize, ternarize
from torchslim.quantization.observers import OBSERVERS, calibrate, make_observer
from torchslim.quantization.primitives import (
    UniformSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize_dequantize,
    sqnr_db,
)
from torchslim.quantization.weight_only import WeightOnlyConfig, quantize_weights

__all__ = [
    "OBSERVERS",
    "QuantizedConv2d",
    "QuantizedLinear",
    "UniformSpec",
    "WeightOnlyConfig",
    "WeightScheme",
    "binarize",
    "calibrate",
    "compute_qparams",
    "dequantize",
    "fake_quantize",
    "kmeans_quantize",
    "make_observer",
    "power_of_two_quantize",
    "quantize_dequantize",
    "quantize_weights",
    "sqnr_db",
    "ternarize",
]
