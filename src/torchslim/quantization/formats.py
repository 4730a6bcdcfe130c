"""How a quantized weight is stored: the per-layer ``WeightScheme`` (scheme, bits, grid, kernel use) and one
``StorageFormat`` per scheme (the tensors it registers on a ``QuantizedWeight``, how it encodes a float weight into
them, decodes them back and which integer kernel runs them). ``FORMATS`` maps scheme names to formats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchslim.core.config import Config, check
from torchslim.quantization import kernels
from torchslim.quantization.nonuniform import binarize, kmeans_quantize, power_of_two_quantize, ternarize
from torchslim.quantization.primitives import UniformSpec, compute_qparams, dequantize, quantize

if TYPE_CHECKING:
    from torchslim.quantization.modules import QuantizedWeight

# weights encoded (and decoded for measuring) this many at a time, bounding the float temporaries of a large table
ENCODE_CHUNK = 2**22


# the keys each scheme reads besides these common ones; any other key a person writes for it would be ignored
COMMON_KEYS = {"scheme", "kernel", "input_scale", "activation_bits"}  # activations are quantized per token whatever the weights' scheme
SCHEME_KEYS = {
    "uniform": {"bits", "symmetric", "granularity", "group_size"},
    "kmeans": {"bits", "kmeans_init", "kmeans_iterations", "trainable_codebook"},
    "pow2": {"bits"},
    "binary": set(),
    "ternary": set(),
    "fp16": set(),
    "bf16": set(),
}


@dataclasses.dataclass(frozen=True)
class WeightScheme(Config):
    """How one layer's weight is stored: scheme, bits and (for uniform) the grid. ``kernel``: run on an integer CPU
    kernel where one exists for the format (``quantization.kernels``: int8 per channel, up to 4 bits per group;
    activations in bfloat16, no decoded weight kept in memory); otherwise the weight is decoded to float32.
    ``input_scale``: the layer multiplies its input by a stored per-input-channel scale first (AWQ / SmoothQuant
    scales that could not be folded into the layer before). ``activation_bits`` 8: the input is also quantized, per
    token, to int8 on the fly (W8A8; with an int8 per-channel symmetric weight it runs on ``torch._int_mm``)."""

    scheme: str = "uniform"
    bits: int = 8
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int = 128
    kmeans_init: str = "linear"
    kmeans_iterations: int = 50
    trainable_codebook: bool = True
    kernel: bool = True
    input_scale: bool = False
    activation_bits: int | None = None

    def validate(self) -> None:
        check(self.scheme in FORMATS, f"scheme must be one of {', '.join(FORMATS)}, got {self.scheme!r}")
        if self.scheme == "uniform":
            check(1 <= self.bits <= 16, f"bits must be between 1 and 16, got {self.bits}")
        elif self.scheme in ("kmeans", "pow2"):
            check(
                1 <= self.bits <= 8 if self.scheme == "kmeans" else 2 <= self.bits <= 8,
                f"{self.scheme} takes {'1' if self.scheme == 'kmeans' else '2'} to 8 bits, got {self.bits}",
            )
        check(self.activation_bits in (None, 8), f"activation_bits must be null or 8, got {self.activation_bits}")

    @property
    def stored_bits(self) -> int:
        return {"binary": 1, "ternary": 2, "fp16": 16, "bf16": 16}.get(self.scheme, self.bits)

    @classmethod
    def inapplicable(cls, written: Mapping[str, Any]) -> list[str]:
        """The keys of a scheme as a person wrote it that its scheme would ignore (``granularity`` for k-means,
        ``bits: 4`` for binary): a key at its default, or ``bits`` equal to what the scheme stores, is not counted."""
        scheme = written.get("scheme", "uniform")
        if scheme not in SCHEME_KEYS:
            return []  # validate names an unknown scheme
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        stored = {"binary": 1, "ternary": 2, "fp16": 16, "bf16": 16}.get(scheme)
        return [
            key
            for key, value in written.items()
            if key in defaults and key not in COMMON_KEYS | SCHEME_KEYS[scheme] and value != defaults[key] and not (key == "bits" and value == stored)
        ]

    def uniform_spec(self) -> UniformSpec:
        return UniformSpec(bits=self.bits, symmetric=self.symmetric, granularity=self.granularity, axis=0, group_size=self.group_size)


class StorageFormat:
    """How one scheme stores a weight inside a ``QuantizedWeight``: which tensors it registers, how it encodes a
    float weight into them and decodes them back. ``code_bits`` is the width of its integer codes (None for float
    casts), the symbols the .tslim codec entropy-codes."""

    def code_bits(self, scheme: WeightScheme) -> int | None:
        return scheme.stored_bits

    def register(self, holder: QuantizedWeight) -> None:
        """Register the tensors this format stores on ``holder`` (shapes from ``holder.shape``)."""

    def encode(self, holder: QuantizedWeight, weight: torch.Tensor, where: str) -> None:
        """Quantize ``weight`` into ``holder``'s tensors."""

    def decode(self, holder: QuantizedWeight, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight from ``holder``'s tensors and its integer ``codes`` (shaped like the weight), or only the
        given ``rows`` of it (``codes`` then holds those rows)."""
        return codes.float()

    def kernel(self, holder: QuantizedWeight) -> Any:
        """An integer kernel running this weight (``quantization.kernels``), or None where there is none."""
        return None


def _rows(tensor: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """A per-row (per output channel) tensor restricted to ``rows``; a tensor shared by all rows as it is."""
    return tensor if rows is None or tensor.shape[0] == 1 else tensor.index_select(0, rows)


class HalfFormat(StorageFormat):
    """fp16 / bf16: the weight cast to 16 bits (no codes)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def code_bits(self, scheme: WeightScheme) -> int | None:
        return None

    def register(self, holder: QuantizedWeight) -> None:
        holder.register_buffer("value16", torch.zeros(holder.shape, dtype=self.dtype))

    def encode(self, holder: QuantizedWeight, weight: torch.Tensor, where: str) -> None:
        holder.value16.copy_(weight.to(self.dtype))

    def decode(self, holder: QuantizedWeight, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return _rows(holder.value16, rows).float()


class UniformFormat(StorageFormat):
    """Uniform grid codes (stored unsigned) with a scale and zero point per tensor, channel or group."""

    def register(self, holder: QuantizedWeight) -> None:
        shape = holder.scale_shape(holder.scheme.uniform_spec())
        holder.register_buffer("scale", torch.ones(shape))
        holder.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))

    def encode(self, holder: QuantizedWeight, weight: torch.Tensor, where: str) -> None:
        spec = holder.scheme.uniform_spec()
        if spec.granularity == "tensor":
            scale, zero_point = compute_qparams(weight, spec, where)
            holder.scale, holder.zero_point = scale.float(), zero_point
            holder.pack(quantize(weight, scale, zero_point, spec, where) - spec.code_range[0])
            return
        # per channel or group: rows at a time, so a large table never has more than a slice in float temporaries
        rows = weight.reshape(weight.shape[0], -1)
        codes = torch.empty(rows.shape, dtype=torch.uint8 if holder.scheme.bits <= 8 else torch.int32)
        scales, zero_points = [], []
        step = max(1, ENCODE_CHUNK // max(1, rows.shape[1]))
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step]
            scale, zero_point = compute_qparams(chunk, spec, where)
            codes[start : start + step] = (quantize(chunk, scale, zero_point, spec, where) - spec.code_range[0]).to(codes.dtype)
            scales.append(scale.float())
            zero_points.append(zero_point)
        shape = holder.scale_shape(spec)
        holder.scale, holder.zero_point = torch.cat(scales).reshape(shape), torch.cat(zero_points).reshape(shape)
        holder.pack(codes)

    def decode(self, holder: QuantizedWeight, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        spec = holder.scheme.uniform_spec()
        scale, zero_point = _rows(holder.scale, rows), _rows(holder.zero_point, rows)
        signed = codes.to(torch.int32) + spec.code_range[0]
        if spec.granularity == "group":
            return dequantize(signed.reshape(codes.shape[0], -1), scale, zero_point, spec).reshape(codes.shape)
        return dequantize(signed, scale, zero_point, spec)

    def kernel(self, holder: QuantizedWeight) -> Any:
        scheme, spec = holder.scheme, holder.scheme.uniform_spec()
        if len(holder.shape) != 2 or not scheme.kernel or holder.packed.device.type != "cpu" or not kernels.available():
            return None
        out_features, width = holder.shape
        qmin = spec.code_range[0]
        if scheme.activation_bits == 8:
            if scheme.bits == 8 and spec.symmetric and spec.granularity == "channel":
                return kernels.W8A8Kernel(holder.codes().reshape(holder.shape).to(torch.int16) + qmin, holder.scale.reshape(-1))
            return None
        if scheme.bits == 8 and spec.symmetric and spec.granularity == "channel":
            codes = holder.codes().reshape(holder.shape).to(torch.int16) + qmin
            return kernels.Int8Kernel(codes, holder.scale.reshape(-1))
        if scheme.bits > 4 or out_features % 16:
            return None
        group = kernels.int4_group(width, spec.group_size if spec.granularity == "group" else None)
        if group is None:
            return None
        groups = -(-width // group)
        scale = holder.scale.reshape(holder.scale.shape[0], -1).expand(out_features, groups if spec.granularity == "group" else 1)
        zero_point = holder.zero_point.reshape(holder.zero_point.shape[0], -1).expand_as(scale)
        if spec.granularity != "group":
            scale, zero_point = scale[:, :1].expand(out_features, groups), zero_point[:, :1].expand(out_features, groups)
        # codes narrower than 4 bits are centred on the kernel's 8 (fewer cancelled digits in bfloat16)
        shift = 8 - 2 ** (scheme.bits - 1)
        offset = (qmin - shift - zero_point.float()) * scale
        codes = holder.codes().reshape(holder.shape)  # uint8: the kernel widens a slice of rows at a time
        return kernels.Int4Kernel(codes + shift if shift else codes, scale.float(), offset, group)


class CodebookFormat(StorageFormat):
    """Codes into a codebook of 2^bits values: k-means shared weights (centroids trainable) or power-of-two levels."""

    def register(self, holder: QuantizedWeight) -> None:
        scheme = holder.scheme
        holder.codebook = nn.Parameter(torch.zeros(2**scheme.bits), requires_grad=scheme.scheme == "kmeans" and scheme.trainable_codebook)

    def encode(self, holder: QuantizedWeight, weight: torch.Tensor, where: str) -> None:
        scheme = holder.scheme
        if scheme.scheme == "kmeans":
            codebook, index = kmeans_quantize(weight, scheme.bits, scheme.kmeans_init, scheme.kmeans_iterations)
        else:
            codebook, index = torch.unique(power_of_two_quantize(weight, scheme.bits), return_inverse=True)
        padded = torch.cat([codebook.float(), codebook[-1:].float().expand(2**scheme.bits - codebook.numel())])
        holder.codebook.data.copy_(padded)
        holder.pack(index)

    def decode(self, holder: QuantizedWeight, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        # gather: its backward sums each cluster's gradients into its centroid. A centroid at exactly zero is the
        # pruned weights' code: it gets no gradient, so pruned weights stay zero through centroid fine-tuning.
        codebook = torch.where(holder.codebook.detach() == 0, torch.zeros_like(holder.codebook), holder.codebook)
        return codebook.index_select(0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)


class SignFormat(StorageFormat):
    """Binary (sign x per-channel scale, 1 bit) or ternary ({-1, 0, +1} x per-channel scale, 2 bits)."""

    def __init__(self, ternary: bool) -> None:
        self.ternary = ternary

    def register(self, holder: QuantizedWeight) -> None:
        holder.register_buffer("scale", torch.ones((holder.shape[0],) + (1,) * (len(holder.shape) - 1)))

    def encode(self, holder: QuantizedWeight, weight: torch.Tensor, where: str) -> None:
        if self.ternary:
            codes, scale = ternarize(weight, per_channel=True)
            holder.scale = scale.float()
            holder.pack(codes.to(torch.int64) + 1)
        else:
            signs, scale = binarize(weight)
            holder.scale = scale.float()
            holder.pack((signs > 0).to(torch.int64))

    def decode(self, holder: QuantizedWeight, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        scale, codes = _rows(holder.scale, rows), codes.float()
        return (codes - 1.0) * scale if self.ternary else (2.0 * codes - 1.0) * scale


FORMATS: dict[str, StorageFormat] = {
    "uniform": UniformFormat(),
    "kmeans": CodebookFormat(),
    "pow2": CodebookFormat(),
    "binary": SignFormat(ternary=False),
    "ternary": SignFormat(ternary=True),
    "fp16": HalfFormat(torch.float16),
    "bf16": HalfFormat(torch.bfloat16),
}


__all__ = ["ENCODE_CHUNK", "FORMATS", "CodebookFormat", "HalfFormat", "SignFormat", "StorageFormat", "UniformFormat", "WeightScheme"]
