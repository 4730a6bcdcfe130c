"""GPTQ (Frantar et al. 2022): quantize a layer's weight column by column, each column's rounding error spread over the
columns not yet quantized through the inverse Hessian of the layer's inputs (H = 2 X X^T / n over calibration
tokens), in blocks of columns with lazy updates; damping adds a fraction of the mean diagonal to H. ``act_order``
quantizes columns in order of decreasing Hessian diagonal (the most sensitive first); groups then keep their scales
from the original weight (static groups), so the stored layout stays the plain per-group one.

Example:
    >>> import torch
    >>> from torchslim.quantization.primitives import UniformSpec, dequantize
    >>> _ = torch.manual_seed(0)
    >>> weight, inputs = torch.randn(16, 64), torch.randn(512, 64)
    >>> spec = UniformSpec(bits=3, symmetric=False, granularity="group", group_size=32)
    >>> codes, scale, zero = gptq(weight, hessian_of(inputs), spec)
    >>> rtn = round_to_nearest(weight, spec)
    >>> gptq_error = (inputs @ (weight - dequantize(codes, scale, zero, spec)).T).pow(2).sum()
    >>> bool(gptq_error < (inputs @ (weight - rtn).T).pow(2).sum())
    True
"""

from __future__ import annotations

import torch

from torchslim.core.errors import TorchslimError
from torchslim.quantization.primitives import UniformSpec, compute_qparams, dequantize, quantize_dequantize, search_qparams


class HessianAccumulator:
    """H = 2 X^T X / n over every token a layer sees (running mean, float64 for the sums)."""

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if self.sum.device != x.device:  # the sums live where the layer's inputs are
            self.sum = self.sum.to(x.device)
        self.sum += x.T @ x
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise TorchslimError("GPTQ: a layer saw no calibration tokens")
        return (2 * self.sum / self.count).float()


def hessian_of(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n of a (tokens, features) input."""
    accumulator = HessianAccumulator(inputs.shape[-1])
    accumulator.add(inputs)
    return accumulator.hessian()


def round_to_nearest(weight: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """The RTN baseline: every weight rounded to its min-max grid."""
    return quantize_dequantize(weight, spec)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (H damped by ``damp`` x mean diagonal, raised until it factors)."""
    diagonal_mean = float(hessian.diagonal().mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(6):
        damped = hessian + damp * (10**attempt) * max(diagonal_mean, 1e-8) * eye
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise TorchslimError("GPTQ: the Hessian is not positive definite even with 1e5x damping (inputs all zero or NaN?)")


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: UniformSpec,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    clip_search: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero point) of ``weight`` (out, in) as ``quantization.primitives`` lays them out for ``spec``
    (per channel or per group along the input; per tensor is refused), chosen by GPTQ for inputs with Hessian
    ``hessian`` (in, in). ``clip_search``: each channel's / group's range clipped where that rounds its weights
    better (``search_qparams``) instead of min-max."""
    if spec.granularity == "tensor":
        raise TorchslimError("GPTQ quantizes per channel or per group, not per tensor")
    weight = weight.detach().float().clone()
    rows, columns = weight.shape
    hessian = hessian.detach().float().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    # scales: per channel from the whole row; per group from each group as GPTQ reaches it, or (act_order) from the
    # original weight up front
    group = spec.group_size if spec.granularity == "group" else columns
    qparams = search_qparams if clip_search else compute_qparams
    if spec.granularity == "channel":
        scale, zero = qparams(weight, spec, "GPTQ")
        scale, zero = scale.reshape(rows, 1), zero.reshape(rows, 1)
    else:
        groups = -(-columns // group)
        scale = torch.empty(rows, groups, device=weight.device)
        zero = torch.empty(rows, groups, dtype=torch.int32, device=weight.device)
        if act_order:
            s, z = qparams(weight, spec, "GPTQ")
            scale, zero = s.reshape(rows, groups), z.reshape(rows, groups)
    hessian = hessian.to(weight.device)
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else torch.arange(columns, device=weight.device)
    weight, hessian = weight[:, order], hessian[order][:, order]
    inverse = inverse_hessian_factor(hessian, damp)
    channel_spec = UniformSpec(bits=spec.bits, symmetric=spec.symmetric, signed=spec.signed, granularity="channel")
    codes = torch.zeros(rows, columns, dtype=torch.int32, device=weight.device)
    qmin, qmax = spec.code_range
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        inverse_block = inverse[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            g = column // group
            if spec.granularity == "group" and not act_order and column % group == 0:
                # the group's scale from its current (error-updated) weights: these columns come next, in order
                span = weight[:, start + i : start + i + group].clone()
                span[:, : end - start - i] = block[:, i : i + group][:, : span.shape[1]]
                s, z = qparams(span, channel_spec, "GPTQ")
                scale[:, g], zero[:, g] = s.reshape(rows), z.reshape(rows)
            s, z = scale[:, g], zero[:, g]
            w = block[:, i]
            q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
            codes[:, start + i] = q.to(torch.int32)
            dequantized = (q - z) * s
            error = (w - dequantized) / inverse_block[i, i]
            block[:, i:] -= error.unsqueeze(1) @ inverse_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    codes = codes[:, torch.argsort(order)]
    if spec.granularity == "channel":
        return codes, scale.reshape(rows, 1), zero.reshape(rows, 1)
    return codes, scale.reshape(rows, -1, 1), zero.reshape(rows, -1, 1)


def layer_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the squared output error the approximation causes on the calibration inputs (x2)."""
    difference = (weight - approximation).double()
    return float(((difference @ hessian.double()) * difference).sum())


def dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """The weight GPTQ's codes stand for."""
    return dequantize(codes, scale, zero, spec)


__all__ = ["HessianAccumulator", "dequantized", "gptq", "hessian_of", "inverse_hessian_factor", "layer_error", "round_to_nearest"]
