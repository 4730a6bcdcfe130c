"""Unstructured weight pruning: score -> mask -> apply, per layer or with one global threshold.

Example:
    >>> import torchslim as ts
    >>> result = ts.prune(ts.models.create("lenet-300-100"), {"method": "l1", "scope": "global", "sparsity": 0.9})
    >>> round(result.report.stages[0].metrics["weight_sparsity"], 2)
    0.9
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
from torch import nn

from torchslim.core.config import Config, ConfigError, check
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import LayerSelector, module_type_name, select_modules
from torchslim.measure.counts import count_nonzeros, count_parameters
from torchslim.pruning.apply import get_mask, set_mask
from torchslim.pruning.importance import NEEDS_GRADIENTS, WEIGHT_IMPORTANCE, collect_gradient_statistics
from torchslim.pruning.masks import check_sparsity, global_masks, layer_masks, std_threshold_masks, threshold_masks


@dataclasses.dataclass(frozen=True)
class PruneConfig(Config):
    """What to prune and how far.

    Give exactly one target: ``sparsity`` (fraction of selected weights to zero; with ``scope`` "layer" each layer
    gets it, with "global" one threshold spans all layers), ``layer_sparsity`` (a fraction per layer name),
    ``threshold`` (prune scores at or below it) or ``quality`` (Han et al. 2015: prune |w| below quality x the
    layer's weight standard deviation). ``method`` is a registered importance criterion (l1, l2, gradient, taylor,
    random); gradient criteria read ``calibration_batches`` batches of the training data.
    """

    method: str = "l1"
    scope: str = "layer"
    sparsity: float | None = None
    layer_sparsity: dict[str, float] = dataclasses.field(default_factory=dict)
    threshold: float | None = None
    quality: float | None = None
    layers: LayerSelector = LayerSelector()
    calibration_batches: int = 16
    seed: int = 0

    def validate(self) -> None:
        targets = [self.sparsity is not None, bool(self.layer_sparsity), self.threshold is not None, self.quality is not None]
        check(sum(targets) == 1, "give exactly one of sparsity, layer_sparsity, threshold or quality")
        check(self.scope in ("layer", "global"), f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.method not in WEIGHT_IMPORTANCE:
            raise ConfigError(f"method: unknown weight importance {self.method!r}; valid: {', '.join(WEIGHT_IMPORTANCE.names())}")
        if self.sparsity is not None:
            check(0.0 <= self.sparsity < 1.0, f"sparsity must be in [0, 1), got {self.sparsity}")
        for name, value in self.layer_sparsity.items():
            check(0.0 <= value < 1.0, f"layer_sparsity[{name!r}] must be in [0, 1), got {value}")
        check(self.quality is None or self.method == "l1", "quality (Han's std rule) works on magnitudes: use method 'l1'")
        check(self.scope == "layer" or self.sparsity is not None, "scope 'global' takes a single sparsity")


def compute_scores(
    model: nn.Module, modules: list[tuple[str, nn.Module]], config: PruneConfig, data: Any = None
) -> dict[str, torch.Tensor]:
    """Importance of every selected weight, computed on the weights the model currently uses (masked = zero)."""
    statistics: dict[str, dict[str, Any]] = {name: {} for name, _ in modules}
    if config.method in NEEDS_GRADIENTS:
        if data is None:
            raise ConfigError(f"method {config.method!r} needs data (gradients over calibration batches)")
        batches = data.loader("train", batch_size=64, seed=config.seed) if hasattr(data, "loader") else data
        statistics = collect_gradient_statistics(model, modules, batches, config.calibration_batches)
    generator = torch.Generator().manual_seed(config.seed)
    scores = {}
    for name, module in modules:
        weight = module.weight.detach()
        score = WEIGHT_IMPORTANCE.get(config.method)(weight, {**statistics[name], "generator": generator}).float()
        mask = get_mask(module)
        if mask is not None:  # already pruned weights stay pruned: rank them lowest
            score = torch.where(mask, score, torch.full_like(score, -1.0))
        scores[name] = score
    return scores


def compute_masks(scores: dict[str, torch.Tensor], modules: list[tuple[str, nn.Module]], config: PruneConfig) -> dict[str, torch.Tensor]:
    if config.quality is not None:
        return std_threshold_masks({n: m.weight.detach() for n, m in modules}, config.quality)
    if config.threshold is not None:
        return threshold_masks(scores, config.threshold)
    if config.layer_sparsity:
        unknown = sorted(set(config.layer_sparsity) - set(scores))
        if unknown:
            raise ConfigError(f"layer_sparsity names layers that are not selected: {unknown}; selected: {sorted(scores)}")
        return layer_masks(scores, {name: config.layer_sparsity.get(name, 0.0) for name in scores})
    assert config.sparsity is not None
    check_sparsity(config.sparsity, "sparsity")
    if config.scope == "global":
        return global_masks(scores, config.sparsity)
    return layer_masks(scores, config.sparsity)


def sparsity_rows(model: nn.Module, names: list[str]) -> list[dict[str, Any]]:
    modules = dict(model.named_modules())
    rows = []
    for name in names:
        weight = modules[name].weight.detach()
        nonzeros = int(torch.count_nonzero(weight))
        rows.append({"name": name, "type": module_type_name(modules[name]), "weights": weight.numel(), "nonzeros": nonzeros,
                     "sparsity": round(1 - nonzeros / weight.numel(), 4)})
    return rows


def prune_in_place(model: nn.Module, config: PruneConfig, data: Any = None) -> list[str]:
    """Score, mask and attach masks to the selected layers of ``model``; returns the pruned layer names."""
    modules = select_modules(model, config.layers)
    scores = compute_scores(model, modules, config, data)
    masks = compute_masks(scores, modules, config)
    for name, module in modules:
        previous = get_mask(module)
        mask = masks[name] if previous is None else (masks[name] & previous)
        set_mask(module, mask)
    return [name for name, _ in modules]


def prune(model: nn.Module, config: PruneConfig | dict, data: Any = None, inplace: bool = False) -> Result:
    """Prune weights of the selected layers (masks attached as parametrizations; see ``make_permanent``).

    The model passed in is unchanged unless ``inplace=True``. The report's stage holds overall and per-layer
    sparsity and non-zeros; the numbers are a simulation of sparsity (dense execution) until the weights are stored
    sparse (CSR) or structurally removed.
    """
    config = PruneConfig.coerce(config, where="prune")
    target = model if inplace else copy.deepcopy(model)
    started = time.perf_counter()
    names = prune_in_place(target, config, data)
    seconds = time.perf_counter() - started
    layers = sparsity_rows(target, names)
    weights = sum(row["weights"] for row in layers)
    nonzero_weights = sum(row["nonzeros"] for row in layers)
    metrics = {
        "parameters": count_parameters(target),
        "nonzeros": count_nonzeros(target),
        "weight_sparsity": 1 - nonzero_weights / weights,
        "seconds": seconds,
    }
    metrics["compression"] = metrics["parameters"] / max(1, metrics["nonzeros"])
    stage = Stage(name="prune", kind="prune", metrics=metrics, layers=layers, execution="simulated (masks)", config=config.to_dict())
    return Result(model=target, report=Report.for_model(model, [stage]))
