"""Observers: watch tensors during calibration and choose the range a uniform grid should cover.

min-max, moving-average min-max, percentile, MSE-optimal and KL/entropy (histogram, TensorRT-style) observers;
each gives (low, high), and ``qparams(spec)`` the scale and zero point. ``calibrate`` runs a model over batches.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry
from torchslim.quantization.primitives import UniformSpec, check_finite, dequantize, qparams_from_range, quantize
from torchslim.tasks.batches import forward_batches

OBSERVERS: Registry[Callable[..., Observer]] = Registry("observer")


class Observer(abc.ABC):
    """Base: ``observe(x)`` for each batch, then ``range()`` -> (low, high) as 1-element tensors (per tensor)."""

    def __init__(self, where: str = "tensor") -> None:
        self.where = where
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        check_finite(x, self.where)
        self._observe(x)
        self.batches += 1

    @abc.abstractmethod
    def _observe(self, x: torch.Tensor) -> None:
        """Take one batch into account."""

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batches == 0:
            raise TorchslimError(f"{self.where}: calibration saw no batches; give the calibration data at least one batch")
        return self._range()

    @abc.abstractmethod
    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) from what was observed."""

    def qparams(self, spec: UniformSpec) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = self.range()
        return qparams_from_range(low.reshape(1), high.reshape(1), spec)


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """The smallest and largest value seen."""

    def __init__(self, where: str = "tensor") -> None:
        super().__init__(where)
        self.low, self.high = torch.tensor(float("inf")), torch.tensor(float("-inf"))

    def _observe(self, x: torch.Tensor) -> None:
        self.low, self.high = torch.minimum(self.low, x.min().cpu()), torch.maximum(self.high, x.max().cpu())

    def _range(self):
        return self.low, self.high


@OBSERVERS.register("moving-average")
class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (momentum 0.01 per batch, as in QAT)."""

    def __init__(self, where: str = "tensor", momentum: float = 0.01) -> None:
        super().__init__(where)
        self.momentum = momentum
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def _observe(self, x: torch.Tensor) -> None:
        low, high = x.min().cpu(), x.max().cpu()
        if self.low is None:
            self.low, self.high = low, high
        else:
            self.low = self.low + self.momentum * (low - self.low)
            self.high = self.high + self.momentum * (high - self.high)

    def _range(self):
        return self.low, self.high


class HistogramObserver(Observer, abc.ABC):
    """Keeps a histogram of |x| (2048 bins) grown as larger values arrive; subclasses pick the clip value."""

    def __init__(self, where: str = "tensor", bins: int = 2048) -> None:
        super().__init__(where)
        self.bins = bins
        self.histogram = torch.zeros(bins, dtype=torch.float64)
        self.edge = 0.0  # upper edge of the histogram of |x|
        self.low, self.high = torch.tensor(float("inf")), torch.tensor(float("-inf"))

    def _observe(self, x: torch.Tensor) -> None:
        self.low, self.high = torch.minimum(self.low, x.min().cpu()), torch.maximum(self.high, x.max().cpu())
        magnitude = x.abs().reshape(-1).cpu()
        top = float(magnitude.max())
        if top > self.edge:
            if self.edge > 0:  # re-bin the old counts into the wider range
                old_centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * (self.edge / self.bins)
                index = torch.clamp((old_centers / top * self.bins).long(), max=self.bins - 1)
                rebinned = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, index, self.histogram)
                self.histogram = rebinned
            self.edge = top
        if self.edge == 0:
            self.histogram[0] += magnitude.numel()
            return
        self.histogram += torch.histc(magnitude.double(), bins=self.bins, min=0.0, max=self.edge)

    @abc.abstractmethod
    def clip(self) -> float:
        """The |x| at which to clip."""

    def _range(self):
        clip = self.clip()
        return torch.maximum(self.low, torch.tensor(-clip)), torch.minimum(self.high, torch.tensor(clip))


@OBSERVERS.register("percentile")
class PercentileObserver(HistogramObserver):
    """Clip at the given percentile of |x| (99.99 by default)."""

    def __init__(self, where: str = "tensor", percentile: float = 99.99, bins: int = 2048) -> None:
        super().__init__(where, bins)
        if not 0 < percentile <= 100:
            raise TorchslimError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def clip(self) -> float:
        cumulative = self.histogram.cumsum(0) / self.histogram.sum()
        index = int(torch.searchsorted(cumulative, torch.tensor(self.percentile / 100, dtype=torch.float64)))
        return (min(index, self.bins - 1) + 1) * self.edge / self.bins


@OBSERVERS.register("mse")
class MSEObserver(HistogramObserver):
    """The clip value that minimizes the expected squared quantization error (rounding + clipping) for 8 bits."""

    def __init__(self, where: str = "tensor", bins: int = 2048, bits: int = 8, candidates: int = 100) -> None:
        super().__init__(where, bins)
        self.bits, self.candidates = bits, candidates

    def clip(self) -> float:
        centers = (torch.arange(self.bins, dtype=torch.float64) + 0.5) * self.edge / self.bins
        levels = 2 ** (self.bits - 1) - 1
        best, best_error = self.edge, float("inf")
        for fraction in torch.linspace(0.05, 1.0, self.candidates).tolist():
            clip = fraction * self.edge
            step = clip / levels
            inside = centers <= clip
            error = (self.histogram[inside] * step**2 / 12).sum() + (self.histogram[~inside] * (centers[~inside] - clip) ** 2).sum()
            if float(error) < best_error:
                best, best_error = clip, float(error)
        return best


@OBSERVERS.register("entropy")
class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (TensorRT): the clip whose 8-bit quantized histogram diverges least from the
    observed distribution of |x|."""

    def __init__(self, where: str = "tensor", bins: int = 2048, levels: int = 128) -> None:
        super().__init__(where, bins)
        self.levels = levels
        self.zeros = 0.0  # exact zeros seen (ReLU outputs); they stay in bin 0 whatever the histogram's range

    def _observe(self, x: torch.Tensor) -> None:
        super()._observe(x)
        self.zeros += float((x == 0).sum())

    def clip(self) -> float:
        """The search compares the distributions of the nonzero values: exact zeros (half of a ReLU's outputs) are
        represented exactly by any grid, and left in bin 0 they make the divergence favour grids whose first level
        is narrow, clipping far below the largest values."""
        histogram = self.histogram.clone()
        histogram[0] = (histogram[0] - self.zeros).clamp(min=0.0)
        if float(histogram.sum()) == 0:  # nothing but zeros seen
            return self.edge
        best_index, best_divergence = self.bins, float("inf")
        for index in range(self.levels, self.bins + 1, 16):
            reference = histogram[:index].clone()
            reference[index - 1] += histogram[index:].sum()  # outliers fold into the last bin
            chunks = torch.tensor_split(histogram[:index], self.levels)
            expanded = []
            for chunk in chunks:
                nonzero = (chunk > 0).double()
                count = nonzero.sum()
                expanded.append(nonzero * (chunk.sum() / count) if count > 0 else torch.zeros_like(chunk))
            candidate = torch.cat(expanded)
            p = reference / reference.sum()
            q = candidate / candidate.sum().clamp(min=1e-12)
            support = p > 0
            if (q[support] == 0).any():
                q = q + 1e-12
            divergence = float((p[support] * torch.log(p[support] / q[support])).sum())
            if divergence < best_divergence:
                best_index, best_divergence = index, divergence
        return best_index * self.edge / self.bins


def make_observer(name: str, where: str = "tensor", **kwargs) -> Observer:
    return OBSERVERS.get(name)(where=where, **kwargs)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable,
    modules: Sequence[tuple[str, nn.Module]],
    observer: str = "minmax",
    limit: int | None = None,
    progress: bool = False,
    outputs: bool = False,
) -> dict[str, Observer]:
    """Run ``model`` over calibration batches, observing each listed module's input (or, with ``outputs``, its
    output); returns observers by name. Batches may be tensors, (inputs, targets) tuples or mappings."""
    observers = {name: make_observer(observer, where=f"{'output' if outputs else 'input'} of {name}") for name, _ in modules}
    if outputs:
        handles = [module.register_forward_hook(lambda m, args, out, _n=name: observers[_n].observe(out)) for name, module in modules]
    else:
        handles = [module.register_forward_pre_hook(lambda m, args, _n=name: observers[_n].observe(args[0])) for name, module in modules]
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, total=limit, desc="calibrating", leave=False)
    try:
        count = forward_batches(model, iterator, limit)
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise TorchslimError("calibration got no batches: the calibration data is empty")
    return observers


def observed_sqnr(x: torch.Tensor, observer: Observer, spec: UniformSpec) -> torch.Tensor:
    """x through the observer's grid (for SQNR comparisons)."""
    scale, zero_point = observer.qparams(spec)
    return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec)
