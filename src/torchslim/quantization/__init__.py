"""Quantization: uniform and non-uniform primitives, observers, weight-only quantized modules (packed codes), and
the ``quantize`` verb over every method (weight-only, ONNX Runtime int8, torchslim's native int8, PT2E, QAT)."""

from torchslim.quantization.api import METHODS, NativeInt8Config, Pt2eConfig, quantization_method, quantize, quantize_config
from torchslim.quantization.formats import FORMATS, StorageFormat, WeightScheme
from torchslim.quantization.modules import QuantizedConv2d, QuantizedLinear, QuantizedWeight
from torchslim.quantization.nonuniform import binarize, kmeans_quantize, power_of_two_quantize, ternarize
from torchslim.quantization.observers import OBSERVERS, calibrate, make_observer
from torchslim.quantization.onnx_static import OnnxInt8Config
from torchslim.quantization.primitives import (
    UniformSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize_dequantize,
    sqnr_db,
)
from torchslim.quantization.qat import QATConfig
from torchslim.quantization.weight_only import WeightOnlyConfig, quantize_weights

__all__ = [
    "FORMATS",
    "METHODS",
    "OBSERVERS",
    "NativeInt8Config",
    "OnnxInt8Config",
    "Pt2eConfig",
    "QATConfig",
    "QuantizedConv2d",
    "QuantizedLinear",
    "QuantizedWeight",
    "StorageFormat",
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
    "quantization_method",
    "quantize",
    "quantize_config",
    "quantize_dequantize",
    "quantize_weights",
    "sqnr_db",
    "ternarize",
]
