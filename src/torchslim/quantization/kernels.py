"""Integer CPU kernels for weight-only quantized Linear layers: the layer keeps int8 or packed int4 weights in memory
(no decoded copy) and multiplies with PyTorch's own kernels, activations in bfloat16.

- int8, symmetric, one scale per output channel (the input width padded to a multiple of 16: the kernel reads out
  of bounds otherwise): ``aten._weight_int8pack_mm`` for a few rows (token-by-token
  decoding); above ``INT8_KERNEL_ROWS`` rows the int8 weight is widened to bfloat16 for one bfloat16 matmul, which
  is faster there on this kind of CPU.
- up to 4 bits, per group of 32 to 256 (or per channel / tensor, expressed as such groups; a ragged last group
  padded): ``aten._weight_int4pack_mm_for_cpu`` (two codes per byte); it needs the output width to be a multiple
  of 16.

The shape rules were found by checking every result against a float matmul over a grid of shapes (tests/quantization/
test_kernels.py keeps that check).

- W8A8 (int8 weights per channel, activations quantized to int8 per token on the fly): ``torch._int_mm`` with the
  weight kept transposed, the layout it is fast with (2-3x float32 from 8 tokens up on this CPU; a little slower
  for one token).

Other formats (k-means codebooks, 5-7 bits, ragged groups) have no such kernel here and decode instead; the report
says which layers run on a kernel.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

INT8_KERNEL_ROWS = 8
INT4_GROUPS = (256, 128, 64, 32)


def available() -> bool:
    """Whether this PyTorch build has the CPU kernels."""
    aten = torch.ops.aten
    return all(hasattr(aten, name) for name in ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))


def _padded(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x's rows in bfloat16, widened by ``pad`` zero columns (they meet the weight's padding and add nothing)."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    return F.pad(rows, (0, pad)) if pad else rows


class Int8Kernel:
    """y = x W^T with W = int8 codes x per-output-channel scale (inputs padded to a multiple of 16)."""

    name = "int8 (aten._weight_int8pack_mm)"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.pad = -codes.shape[1] % 16
        self.weight = F.pad(codes.to(torch.int8), (0, self.pad)).contiguous()
        self.scale = scale.reshape(-1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = _padded(x, self.pad)
        if torch.compiler.is_exporting() or rows.shape[0] <= INT8_KERNEL_ROWS:  # an exported program: one path for any rows
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale)
        else:
            y = rows @ (self.weight.to(torch.bfloat16) * self.scale[:, None]).T
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.weight.shape[0])
        return y + bias if bias is not None else y

    def nbytes(self) -> int:
        return self.weight.numel() + self.scale.numel() * 2


PACK_ROWS = 4096  # a multiple of the int4 packing's 64-row blocks


class Int4Kernel:
    """y = x W^T with W[n, k] = code[n, k] x scale[n, g] + offset[n, g] (codes < 16, g = k // group); an input
    width that groups do not divide is padded (a ragged last group runs as a full one whose padding meets zeros)."""

    name = "int4 (aten._weight_int4pack_mm_for_cpu)"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> None:
        self.out_features, self.group = codes.shape[0], group
        self.pad = -codes.shape[1] % group
        # packed 4,096 rows at a time (the layout is blocked by 64 rows, so the pieces join exactly): the int32 codes
        # the packing op takes would otherwise be a transient 4 bytes per weight (113 MiB for a 49k x 576 head)
        pieces = []
        for start in range(0, codes.shape[0], PACK_ROWS):
            chunk = F.pad(codes[start : start + PACK_ROWS].to(torch.int32), (0, self.pad), value=8)
            pieces.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(chunk.contiguous(), 1))
        self.packed = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        # the kernel computes (code - 8) x scale + term
        self.scales_and_zeros = torch.stack([scale.T, (offset + 8 * scale).T], dim=-1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_padded(x, self.pad), self.packed, self.group, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + bias if bias is not None else y

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2


class W8A8Kernel:
    """y = (x quantized per token to int8) (int8 W)^T through ``torch._int_mm``, rescaled by the token's and the
    output channel's scales: integer activations and weights (SmoothQuant's W8A8)."""

    name = "W8A8 (torch._int_mm)"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight_t = codes.to(torch.int8).T.contiguous()  # (in, out): the layout _int_mm is fast with
        self.scale = scale.reshape(1, -1).float()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        token_scale = (rows.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
        codes = torch.clamp(torch.round(rows / token_scale), -127, 127).to(torch.int8)
        y = torch._int_mm(codes, self.weight_t).float() * token_scale * self.scale
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.weight_t.shape[1])
        return y + bias if bias is not None else y

    def nbytes(self) -> int:
        return self.weight_t.numel() + self.scale.numel() * 4


def per_token_fake_quant(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x rounded per token (last dimension) to a symmetric grid of ``bits`` bits: what W8A8 does to activations."""
    levels = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True) / levels).clamp(min=1e-12)
    return torch.clamp(torch.round(x / scale), -levels, levels) * scale


def int4_group(width: int, group_size: int | None) -> int | None:
    """The kernel group for a layer of input ``width``: ``group_size`` itself if the kernel takes it (a ragged last
    group is padded), or (one scale per channel, ``group_size`` None) the largest kernel group dividing the width,
    else 32 with padding; None when the kernel takes no such group."""
    if group_size is not None:
        return group_size if group_size in INT4_GROUPS else None
    return next((g for g in INT4_GROUPS if width % g == 0), INT4_GROUPS[-1])


__all__ = ["INT4_GROUPS", "INT8_KERNEL_ROWS", "Int4Kernel", "Int8Kernel", "W8A8Kernel", "available", "int4_group", "per_token_fake_quant"]
