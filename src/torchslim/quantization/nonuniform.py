"""Non-uniform weight quantization: k-means weight sharing (Deep Compression), log / power-of-two, binary and
ternary. Pure tensor functions returning (codebook, indices) or the quantized tensor."""

from __future__ import annotations

import math

import torch

from torchslim.core.errors import TorchslimError
from torchslim.quantization.primitives import MAX_BITS, check_finite

KMEANS_INITS = ("linear", "density", "random")


def _check_bits(bits: int, low: int = 1, high: int = MAX_BITS) -> None:
    if not (isinstance(bits, int) and low <= bits <= high):
        raise TorchslimError(f"bits must be between {low} and {high}, got {bits!r}")


def initial_centroids(values: torch.Tensor, count: int, init: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Deep Compression's three initializations: ``linear`` spaces centroids evenly over [min, max]; ``density``
    spaces them evenly over the CDF (quantiles); ``random`` picks existing values."""
    values = values.float()
    if init == "linear":
        return torch.linspace(values.min().item(), values.max().item(), count, device=values.device)
    if init == "density":
        sorted_values = values.sort().values
        positions = torch.linspace(0, len(sorted_values) - 1, count, device=values.device).round().long()
        return sorted_values[positions].clone()
    if init == "random":
        index = torch.randperm(len(values), generator=generator)[:count].to(values.device)
        return values[index].sort().values.clone()
    raise TorchslimError(f"k-means init must be one of {', '.join(KMEANS_INITS)}, got {init!r}")


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each value (centroids sorted ascending)."""
    boundaries = (centroids[1:] + centroids[:-1]) / 2
    return torch.bucketize(values, boundaries)


def kmeans_1d(values: torch.Tensor, count: int, init: str = "linear", iterations: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars: (sorted centroids (count,), indices (n,)).

    Example:
        >>> codebook, index = kmeans_1d(torch.tensor([0.0, 0.1, 1.0, 1.1]), 2)
        >>> [round(c, 2) for c in codebook.tolist()], index.tolist()
        ([0.05, 1.05], [0, 0, 1, 1])
    """
    values = values.reshape(-1).float()
    if values.numel() == 0:
        raise TorchslimError("k-means needs at least one value")
    distinct = torch.unique(values)  # sorted
    if distinct.numel() <= count:  # a codebook as large as the values it holds: each value its own centroid, exactly
        return distinct, assign(values, distinct)
    centroids = initial_centroids(values, count, init, torch.Generator().manual_seed(seed))
    for _ in range(iterations):
        index = assign(values, centroids)
        sums = torch.zeros(count, device=values.device).index_add_(0, index, values)
        counts = torch.zeros(count, device=values.device).index_add_(0, index, torch.ones_like(values))
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        updated = updated.sort().values
        if torch.allclose(updated, centroids):
            centroids = updated
            break
        centroids = updated
    return centroids, assign(values, centroids)


def kmeans_quantize(
    weight: torch.Tensor, bits: int, init: str = "linear", iterations: int = 30, seed: int = 0, keep_zeros: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight sharing with a codebook of 2^bits centroids: (codebook, indices shaped like the weight).

    With ``keep_zeros`` (the default) pruned zeros stay exactly zero: they get their own centroid fixed at 0 and
    k-means runs on the non-zero weights with the remaining 2^bits - 1 centroids.
    """
    _check_bits(bits, 1, 8)
    where = "weight"
    check_finite(weight, where)
    flat = weight.detach().reshape(-1).float()
    count = 2**bits
    nonzero = flat != 0
    if keep_zeros and not nonzero.all() and count >= 2:
        if nonzero.sum() == 0:
            return torch.zeros(1, device=flat.device), torch.zeros_like(flat, dtype=torch.long).reshape(weight.shape)
        centroids, _ = kmeans_1d(flat[nonzero], count - 1, init, iterations, seed)
        codebook = torch.cat([torch.zeros(1, device=centroids.device), centroids]).sort().values
        index = assign(flat, codebook)
        index[~nonzero] = int((codebook == 0).nonzero()[0])
        return codebook, index.reshape(weight.shape)
    codebook, index = kmeans_1d(flat, count, init, iterations, seed)
    return codebook, index.reshape(weight.shape)


def power_of_two_quantize(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Log quantization: sign(w) * 2^round(log2|w|), exponents clipped to the 2^(bits-1) - 1 largest levels below
    max|w| (one code is zero). Multiplication by such weights is a shift."""
    _check_bits(bits, 2, 8)
    check_finite(weight, "weight")
    magnitude = weight.abs()
    top = math.floor(math.log2(magnitude.max().item())) if magnitude.max() > 0 else 0
    levels = 2 ** (bits - 1) - 1
    exponent = torch.round(torch.log2(magnitude.clamp(min=torch.finfo(torch.float32).tiny)))
    exponent = exponent.clamp(top - levels + 1, top)
    quantized = torch.sign(weight) * torch.pow(2.0, exponent)
    smallest = 2.0 ** (top - levels + 1)
    return torch.where(magnitude < smallest / 2, torch.zeros_like(weight), quantized)


def binarize(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary weights (Rastegari et al. 2016): (sign(w) in {-1, +1}, scale = mean|w|, per output channel)."""
    check_finite(weight, "weight")
    signs = torch.where(weight >= 0, 1.0, -1.0)
    if per_channel:
        scale = weight.abs().reshape(weight.shape[0], -1).mean(dim=1).reshape((-1,) + (1,) * (weight.dim() - 1))
    else:
        scale = weight.abs().mean().reshape(1)
    return signs, scale


def ternarize(weight: torch.Tensor, threshold_factor: float = 0.7, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weight networks (Li et al. 2016): codes in {-1, 0, +1} with threshold 0.7 * mean|w|, and the scale
    that minimizes the error: the mean |w| of the weights above the threshold."""
    check_finite(weight, "weight")
    magnitude = weight.abs()
    if per_channel:
        flat = magnitude.reshape(weight.shape[0], -1)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        threshold = (threshold_factor * flat.mean(dim=1)).reshape(shape)
        above = magnitude > threshold
        scale = ((magnitude * above).reshape(weight.shape[0], -1).sum(dim=1) / above.reshape(weight.shape[0], -1).sum(dim=1).clamp(min=1)).reshape(shape)
    else:
        threshold = threshold_factor * magnitude.mean()
        above = magnitude > threshold
        scale = (magnitude[above].mean() if above.any() else magnitude.new_zeros(())).reshape(1)
    codes = torch.sign(weight) * above
    return codes, scale
