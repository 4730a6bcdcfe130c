"""Bit packing of integer codes below 8 bits into bytes (little-endian within each byte)."""

from __future__ import annotations

import torch

from torchslim.core.errors import TorchslimError


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative codes (< 2^bits) into a flat uint8 tensor of ceil(n * bits / 8) bytes.

    Example:
        >>> pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist()   # 0b00_11_10_01
        [57]
    """
    if not 1 <= bits <= 8:
        raise TorchslimError(f"bit packing takes 1 to 8 bits, got {bits}")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**bits):
        raise TorchslimError(f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    if 8 % bits == 0:  # whole codes per byte: shift each into place
        per = 8 // bits
        grid = torch.cat([flat.to(torch.uint8), torch.zeros(-flat.numel() % per, dtype=torch.uint8, device=flat.device)]).reshape(-1, per)
        out = torch.zeros(grid.shape[0], dtype=torch.uint8, device=flat.device)
        for slot in range(per):
            out |= grid[:, slot] << (slot * bits)
        return out
    # codes that straddle bytes: through a bit stream, a chunk of codes at a time (bounded memory)
    chunks = [_pack_stream(flat[start : start + PACK_CHUNK].to(torch.int64), bits) for start in range(0, flat.numel(), PACK_CHUNK)]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8, device=flat.device)


PACK_CHUNK = 2**18  # codes per chunk: a multiple of 8, so every chunk starts on a byte


def _pack_stream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    count = codes.numel()
    bit_values = ((codes.unsqueeze(1) >> torch.arange(bits, device=codes.device)) & 1).to(torch.uint8).reshape(-1)  # code i's bits, lowest first
    stream = torch.cat([bit_values, torch.zeros(-(count * bits) % 8, dtype=torch.uint8, device=codes.device)]).reshape(-1, 8)
    out = torch.zeros(stream.shape[0], dtype=torch.uint8, device=codes.device)
    for bit in range(8):
        out |= stream[:, bit] << bit
    return out


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``count`` codes as int64."""
    if not 1 <= bits <= 8:
        raise TorchslimError(f"bit packing takes 1 to 8 bits, got {bits}")
    return unpack_small(packed, bits, count).to(torch.int64)


def unpack_small(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """``unpack_bits`` as uint8 codes (a quarter of the memory of int64 for 8 bits, an eighth below): widths that
    divide 8 are shifted out of each byte directly, the others read through a bit stream."""
    flat = packed.reshape(-1)
    needed = count * bits
    if flat.numel() * 8 < needed:
        raise TorchslimError(f"packed data holds {flat.numel() * 8} bits, {count} codes of {bits} bits need {needed}")
    if bits == 8:
        return flat[:count].clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=flat.device)
        return ((flat.unsqueeze(1) >> shifts) & (2**bits - 1)).reshape(-1)[:count]
    stream = ((flat.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=flat.device)) & 1).reshape(-1)[:needed]
    weights = (2 ** torch.arange(bits, dtype=torch.int32, device=flat.device)).reshape(1, bits)
    return (stream.reshape(count, bits).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of any width up to 16 bits as bytes: bit-packed up to 8 bits, two little-endian bytes each above."""
    if bits <= 8:
        return pack_bits(codes, bits)
    value = codes.reshape(-1).to(torch.int64)  # 9-16 bits: small layers in practice
    return torch.stack([value & 0xFF, value >> 8], dim=1).reshape(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``count`` codes as int64."""
    if bits <= 8:
        return unpack_bits(packed, bits, count)
    pairs = packed.reshape(-1, 2).to(torch.int64)
    return (pairs[:, 0] | (pairs[:, 1] << 8))[:count]
