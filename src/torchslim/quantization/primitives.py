"""Uniform quantization primitives: pure tensor functions.

Affine (asymmetric, min-max) and symmetric schemes; per tensor, per channel (any axis) or per group (groups of
``group_size`` along the input dimension, the last one shorter where the size does not divide it); 1 to 16 bits;
signed or unsigned codes; round to nearest; and a straight-through estimator for training.

Example:
    >>> spec = UniformSpec(bits=8, symmetric=True)
    >>> x = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    >>> scale, zero_point = compute_qparams(x, spec)
    >>> dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec).tolist()[-1]
    1.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from torchslim.core.config import Config, check
from torchslim.core.errors import TorchslimError

MIN_BITS, MAX_BITS = 1, 16


@dataclasses.dataclass(frozen=True)
class UniformSpec(Config):
    """A uniform quantization scheme.

    ``granularity``: "tensor", "channel" (one scale per index of ``axis``) or "group" (``group_size`` consecutive
    values along the last dimension share a scale, per row). ``signed`` picks codes in [-2^(b-1), 2^(b-1)-1]
    (default for symmetric) or [0, 2^b - 1] (default for affine).
    """

    bits: int = 8
    symmetric: bool = True
    signed: bool | None = None
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 128

    def validate(self) -> None:
        check(MIN_BITS <= self.bits <= MAX_BITS, f"bits must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")
        check(self.granularity in ("tensor", "channel", "group"), f"granularity must be tensor, channel or group, got {self.granularity!r}")
        check(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        check(not (self.symmetric and self.signed is False and self.bits == 1), "1-bit unsigned symmetric codes hold only zero")

    @property
    def is_signed(self) -> bool:
        return self.symmetric if self.signed is None else self.signed

    @property
    def code_range(self) -> tuple[int, int]:
        """(qmin, qmax) of the integer codes."""
        if self.is_signed:
            if self.bits == 1:
                return -1, 0
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1


def check_finite(x: torch.Tensor, where: str) -> None:
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise TorchslimError(f"{where}: {bad} value(s) are NaN or Inf; quantization needs finite values")


def group_count(width: int, group_size: int) -> int:
    """Groups along a dimension of ``width``: the last one is shorter (ragged) where ``group_size`` does not divide it."""
    return -(-width // group_size)


def _grouped(x: torch.Tensor, spec: UniformSpec, where: str = "tensor") -> torch.Tensor:
    """x as (..., groups, group_size) along its last dimension; a ragged last group is filled up with copies of the
    row's last value, which lies in that group, so its range (and so its scale) is the ragged group's own."""
    width = x.shape[-1]
    missing = group_count(width, spec.group_size) * spec.group_size - width
    if missing:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], missing)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, spec.group_size)


def _ungrouped(view: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of ``_grouped``: (..., groups, group_size) back to (..., width)."""
    return view.reshape(*view.shape[:-2], -1)[..., :width]


def _per_scale(x: torch.Tensor, spec: UniformSpec, where: str, reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``reduce(values, dim)`` over the elements each scale covers at the spec's granularity, shaped to broadcast
    against x (or its grouped view) as the scale does."""
    if spec.granularity == "tensor":
        return reduce(x.reshape(1, -1), 1).reshape(1)
    if spec.granularity == "channel":
        axis = spec.axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = x.shape[axis]
        return reduce(x.movedim(axis, 0).reshape(x.shape[axis], -1), 1).reshape(shape)
    return reduce(_grouped(x, spec, where), -1).unsqueeze(-1)


def reduce_range(x: torch.Tensor, spec: UniformSpec, where: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) at the spec's granularity, shaped to broadcast against x (or its grouped view)."""
    return _per_scale(x, spec, where, torch.amin), _per_scale(x, spec, where, torch.amax)


def qparams_from_range(low: torch.Tensor, high: torch.Tensor, spec: UniformSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering [low, high] (widened to include 0 so that zero is exact)."""
    qmin, qmax = spec.code_range
    low = torch.minimum(low, torch.zeros_like(low)).float()
    high = torch.maximum(high, torch.zeros_like(high)).float()
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        bound = torch.maximum(-low, high)
        if spec.is_signed:
            # 1-bit signed codes are {-1, 0}: cover the larger side with one step
            scale = bound / max(qmax, -qmin if spec.bits == 1 else qmax)
        else:
            scale = bound / qmax
        scale = torch.clamp(scale, min=tiny)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return scale, zero_point
    scale = torch.clamp((high - low) / (qmax - qmin), min=tiny)
    zero_point = torch.clamp(qmin - torch.round(low / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def compute_qparams(x: torch.Tensor, spec: UniformSpec, where: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of x at the spec's granularity."""
    check_finite(x, where)
    low, high = reduce_range(x.detach(), spec, where)
    return qparams_from_range(low, high, spec)


def search_qparams(
    x: torch.Tensor, spec: UniformSpec, where: str = "tensor", grid: int = 100, max_shrink: float = 0.8, norm: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of x at the spec's granularity with the range clipped where that rounds better: each
    channel's / group's [min, max] shrunk by factors 1, 1 - 1/grid, ... down to 1 - max_shrink, keeping the factor with
    the least sum |error|^norm (the clipping search of GPTQ's reference quantizer). Never worse than min-max."""
    check_finite(x, where)
    x = x.detach()
    low, high = reduce_range(x, spec, where)
    best_scale, best_zero = qparams_from_range(low, high, spec)
    best_error = None
    for step in range(int(max_shrink * grid) + 1):
        factor = 1.0 - step / grid
        scale, zero_point = qparams_from_range(low * factor, high * factor, spec)
        error = _per_scale((dequantize(quantize(x, scale, zero_point, spec, where), scale, zero_point, spec) - x).abs().pow(norm), spec, where, torch.sum)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero_point, best_zero)
    return best_scale, best_zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: UniformSpec, where: str = "tensor") -> torch.Tensor:
    """Integer codes: clamp(round(x / scale) + zero_point, qmin, qmax), as int32 (grouped view when per group)."""
    qmin, qmax = spec.code_range
    if spec.granularity == "group":
        codes = torch.clamp(torch.round(_grouped(x, spec, where) / scale) + zero_point, qmin, qmax)
        return _ungrouped(codes, x.shape[-1]).to(torch.int32)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """(codes - zero_point) * scale, back in the input's shape."""
    if spec.granularity == "group":
        return _ungrouped((_grouped(codes, spec, "codes").float() - zero_point) * scale, codes.shape[-1])
    return (codes.float() - zero_point) * scale


def quantize_dequantize(x: torch.Tensor, spec: UniformSpec, where: str = "tensor") -> torch.Tensor:
    """x rounded to the nearest point of its min-max uniform grid (no gradient)."""
    scale, zero_point = compute_qparams(x, spec, where)
    return dequantize(quantize(x, scale, zero_point, spec, where), scale, zero_point, spec).to(x.dtype)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """Quantize-dequantize with a straight-through estimator: gradients pass where x is inside the grid's range
    and are zero where it clamps; gradients also reach ``scale`` when it is a learned parameter (LSQ)."""
    qmin, qmax = spec.code_range
    view = _grouped(x, spec, "tensor") if spec.granularity == "group" else x
    codes = _RoundSTE.apply(view / scale) + zero_point
    codes = torch.clamp(codes, qmin, qmax)
    values = (codes - zero_point) * scale
    return _ungrouped(values, x.shape[-1]) if spec.granularity == "group" else values


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - q(x)|^2) (inf when exact)."""
    reference, approximation = reference.detach().float(), approximation.detach().float()
    noise = (reference - approximation).pow(2).sum()
    signal = reference.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def cast_float(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """fp16 / bf16 round trip: the trivial baseline."""
    target = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
    if target is None:
        raise TorchslimError(f"float cast must be fp16 or bf16, got {dtype!r}")
    return x.to(target).to(x.dtype)
