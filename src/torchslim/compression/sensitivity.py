"""Per-layer sensitivity: the task's metric when only one layer is compressed, for each layer and each level of each
technique (magnitude sparsity, uniform bits, low rank). The curves show where compression is cheap; automatic
allocation reads them.

Each measurement changes one layer's weight in place (masked by |w|, quantized per channel and dequantized, or
replaced by its best rank-r approximation), evaluates, and puts the weight back, so the model is not copied and is
returned unchanged. A model whose weights are computed by parametrizations (pruning masks, weight_norm, spectral_norm: each access
recomputes the weight, so a change to it would not reach the forward) is measured on a copy with every such weight
folded into the plain tensor it computes now.

Example:
    >>> import torch
    >>> import torchslim as ts
    >>> data = ts.data.load("digits")
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = ts.train(ts.models.create_for("lenet-300-100", data), data, {"epochs": 2}, progress=False).model
    >>> result = sensitivity(model, data, {"sparsities": [0.5, 0.99], "bits": [2]})
    >>> rows = result.report.stages[0].layers
    >>> sorted({row["technique"] for row in rows}), len(rows)
    (['bits', 'sparsity'], 9)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from torchslim.compression.common import other_weights_note
from torchslim.core.checks import check_model
from torchslim.core.config import Config, check
from torchslim.core.copying import copy_model
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import LayerSelector, distinct_weights, select_modules
from torchslim.data.sources import as_source
from torchslim.pruning.apply import fold_parametrizations
from torchslim.quantization.nonuniform import binarize, kmeans_quantize
from torchslim.quantization.primitives import UniformSpec, quantize_dequantize
from torchslim.report.plots import sensitivity_plot, write_sensitivity_plots
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.evaluate import evaluate_source


@dataclasses.dataclass(frozen=True)
class SensitivityConfig(Config):
    """Levels per technique: ``sparsities`` (fractions of the layer's weights zeroed by |w|), ``bits`` (both default
    to the levels shown, [] skips one) in ``bits_scheme`` "uniform" (symmetric, per output channel; 1 bit: sign
    times the channel's mean magnitude) or "kmeans" (a
    shared codebook of 2^bits centroids, at most 8 bits: what Deep Compression's weight sharing does), ``ranks`` (an
    integer rank, or a fraction: that share of the layer's full rank); ``layers`` to measure (default every Linear /
    Conv2d); ``eval_limit``: examples evaluated per measurement (None: the whole split); ``split``: the data measured
    on, "eval" or "train" (an allocation that must not see the data it is tested on)."""

    sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    bits: tuple[int, ...] = (8, 4, 3, 2)
    bits_scheme: str = "uniform"
    ranks: tuple[float, ...] = ()
    layers: LayerSelector = LayerSelector()
    eval_limit: int | None = None
    split: str = "eval"

    def validate(self) -> None:
        check(bool(self.sparsities or self.bits or self.ranks), "give at least one of sparsities, bits or ranks")
        for value in self.sparsities:
            check(0.0 <= value < 1.0, f"sparsities: each must be in [0, 1), got {value}")
        check(self.bits_scheme in ("uniform", "kmeans"), f"bits_scheme must be uniform or kmeans, got {self.bits_scheme!r}")
        highest = 8 if self.bits_scheme == "kmeans" else 16
        for value in self.bits:
            check(1 <= value <= highest, f"bits: each must be between 1 and {highest} ({self.bits_scheme}), got {value}")
        check(self.split in ("eval", "train"), f"split must be eval or train, got {self.split!r}")
        for value in self.ranks:
            check(value > 0 and (value < 1 or float(value).is_integer()), f"ranks: each must be an integer rank or a fraction in (0, 1), got {value}")
        check(self.eval_limit is None or self.eval_limit >= 1, f"eval_limit must be >= 1, got {self.eval_limit}")


def _sparse(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    count = int(round(fraction * weight.numel()))
    if count == 0:
        return weight.clone()
    threshold = weight.abs().flatten().kthvalue(count).values
    return torch.where(weight.abs() > threshold, weight, torch.zeros_like(weight))


def _quantized(weight: torch.Tensor, bits: int, scheme: str) -> torch.Tensor:
    if scheme == "kmeans":
        codebook, index = kmeans_quantize(weight, bits)
        return codebook[index].to(weight.dtype)
    if bits == 1:  # two levels: sign times each channel's mean |w| (a symmetric grid of one bit has a single level)
        signs, scale = binarize(weight)
        return (signs * scale).to(weight.dtype)
    return quantize_dequantize(weight, UniformSpec(bits=bits, symmetric=True, granularity="channel", axis=0))


def _low_rank(weight: torch.Tensor, rank: float) -> tuple[torch.Tensor, int]:
    matrix = weight.reshape(weight.shape[0], -1).double()
    full = min(matrix.shape)
    kept = max(1, min(full, int(rank) if rank >= 1 else round(rank * full)))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :kept] * s[:kept]) @ vh[:kept]).reshape(weight.shape).to(weight.dtype), kept


TECHNIQUES = {"sparsity": "sparsities", "bits": "bits", "rank": "ranks"}


def sensitivity(model: nn.Module, data: Any, config: SensitivityConfig | dict, task: str | Task | None = None) -> Result:
    """For every selected layer and every level: the task's metrics with only that layer compressed. The report's
    stage has the baseline metrics and one row per (layer, technique, level) with the metric and its change; the
    model comes back unchanged."""
    config = SensitivityConfig.coerce(config, where="sensitivity")
    check_model(model, "sensitivity", float32=True, copies=True)
    source = as_source(data, model)
    resolved = resolve_task(task, source, model)
    started = time.perf_counter()
    measured, notes = _plain(model)
    chosen, aliases = distinct_weights(select_modules(measured, config.layers, default_types=("Linear", "Conv2d")))
    notes += [f"{alias} holds {leader}'s weight: measured once, as {leader}" for alias, leader in aliases.items()]
    notes += [note] if (note := other_weights_note(measured, config.layers, "not measured")) else []
    baseline = evaluate_source(measured, source, resolved, limit=config.eval_limit, split=config.split)
    metric = resolved.metric
    rows = []
    for name, module in chosen:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        original = weight.detach().clone()
        for technique, field in TECHNIQUES.items():
            for level in getattr(config, field):
                if technique == "sparsity":
                    changed, shown = _sparse(original, level), level
                elif technique == "bits":
                    changed, shown = _quantized(original, int(level), config.bits_scheme), int(level)
                else:
                    changed, shown = _low_rank(original, level)
                with torch.no_grad():
                    weight.copy_(changed)
                try:
                    metrics = evaluate_source(measured, source, resolved, limit=config.eval_limit, split=config.split)
                finally:
                    with torch.no_grad():
                        weight.copy_(original)
                rows.append(
                    {
                        "layer": name,
                        "technique": technique,
                        "level": shown,
                        "weights": original.numel(),
                        metric: metrics[metric],
                        "change": metrics[metric] - baseline[metric],
                        **({"loss": metrics["loss"]} if "loss" in metrics and metric != "loss" else {}),
                    }
                )
    stage = Stage(
        name="sensitivity",
        kind="sensitivity",
        metrics={**baseline, "metric": metric, "measurements": len(rows), "seconds": time.perf_counter() - started},
        layers=rows,
        config=config.to_dict(),
        notes=[f"{metric} with only one layer compressed at a time; baseline {baseline[metric]:.4g}", *notes],
    )
    return Result(model=model, report=Report.for_model(model, [stage]))


def _plain(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """``model``, or where weights are computed by parametrizations a copy with each folded into the plain weight it
    computes now, and a note saying so (torch's hook-based norms are refused by ``check_model`` before)."""
    computed = [name for name, module in model.named_modules() if getattr(module, "parametrizations", None)]
    if not computed:
        return model, []
    training = model.training
    plain = fold_parametrizations(copy_model(model).eval()).train(training)  # in eval mode: spectral_norm uses its stored vectors
    listed = ", ".join(sorted(computed)[:5]) + (", ..." if len(computed) > 5 else "")
    return plain, [f"measured on a copy with computed weights folded into plain ones (masks or weight norms of {listed})"]


__all__ = ["SensitivityConfig", "sensitivity", "sensitivity_plot", "write_sensitivity_plots"]
