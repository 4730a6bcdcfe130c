"""Unstructured weight pruning: score -> mask -> apply, per layer or with one global threshold, in one step or in
several (iterative pruning, each step optionally followed by fine-tuning: Han et al. 2015).

Example:
    >>> import torchslim as ts
    >>> result = ts.prune(ts.models.create("lenet-300-100"), {"importance": "l1", "scope": "global", "sparsity": 0.9})
    >>> round(result.report.stages[0].metrics["weight_sparsity"], 2)
    0.9
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim.core.checks import check_model
from torchslim.core.config import Config, ConfigError, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import WEIGHT_TYPES, LayerSelector, module_type_name, resolve_overrides, select_modules
from torchslim.core.ties import tied_weights
from torchslim.data.sources import as_source
from torchslim.measure.counts import count_nonzeros, count_parameters
from torchslim.pruning.apply import get_mask, set_mask
from torchslim.pruning.csr import SparseLinear
from torchslim.pruning.importance import ACTIVATIONS, GRADIENTS, WEIGHT_IMPORTANCE, collect_gradient_statistics, collect_input_norms, reads_inputs
from torchslim.pruning.masks import (
    FLOOR,
    check_sparsity,
    global_masks,
    keep_a_floor,
    layer_masks,
    n_m_masks,
    parse_pattern,
    row_masks,
    std_threshold_masks,
    threshold_masks,
)
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.evaluate import evaluate_source
from torchslim.train.fit import TrainConfig, fit
from torchslim.train.progress import Progress, progress_mode


@dataclasses.dataclass(frozen=True)
class PruneConfig(Config):
    """What to prune and how far.

    Give one target: ``sparsity`` (the fraction of selected weights to zero; with ``scope`` "layer" each layer gets
    it, "row" each output row (neuron) gets it, "global" one threshold spans all layers; a list such as [0.5, 0.75,
    0.9] prunes in that many steps, each followed by fine-tuning when the verb is given ``finetune``), ``pattern``
    (N:M semi-structured, "2:4": N weights kept in every M consecutive inputs of a row), ``threshold`` (prune scores
    at or below it) or ``quality`` (Han et al. 2015: prune |w| below quality x the layer's weight standard
    deviation). ``overrides`` gives layers their own final sparsity (``{"fc3": 0.5, "type:Conv2d": 0.7}``; alone,
    only those layers are pruned). ``importance`` is a registered criterion (l1, l2, gradient, taylor, wanda,
    random); gradient criteria read ``calibration_batches`` batches of the training data through the task's loss,
    activation criteria (wanda) the inputs of each layer over them. ``solver`` "sparsegpt" (Frantar & Alistarh 2023)
    instead chooses the mask and updates the remaining weights block by block against each layer's input Hessian
    (``importance`` is then not used; ``damp`` and ``block_size`` as in GPTQ).
    """

    importance: str = "l1"
    scope: str = "layer"
    sparsity: float | tuple[float, ...] | None = None
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    threshold: float | None = None
    quality: float | None = None
    layers: LayerSelector = LayerSelector()
    calibration_batches: int = 16
    batch_size: int = 64
    pattern: str | None = None
    solver: str = "mask"
    damp: float = 0.01
    block_size: int = 128
    seed: int = 0

    def validate(self) -> None:
        targets = [self.sparsity is not None or bool(self.overrides), self.threshold is not None, self.quality is not None, self.pattern is not None]
        check(sum(targets) == 1, "give exactly one of sparsity (and/or overrides), pattern, threshold or quality")
        check(self.scope in ("layer", "row", "global"), f"scope must be 'layer', 'row' or 'global', got {self.scope!r}")
        check(self.solver in ("mask", "sparsegpt"), f"solver must be 'mask' or 'sparsegpt', got {self.solver!r}")
        if self.pattern is not None:
            try:
                parse_pattern(self.pattern)
            except TorchslimError as error:
                raise ConfigError(str(error)) from None
        if self.solver == "sparsegpt":
            check(self.threshold is None and self.quality is None, "solver 'sparsegpt' takes a sparsity or a pattern")
            check(self.scope != "global", "solver 'sparsegpt' prunes layer by layer: scope 'layer' (per block of columns) or 'row'")
            check(0 < self.damp < 1 and self.block_size >= 1, "damp must be in (0, 1) and block_size >= 1")
        if self.importance not in WEIGHT_IMPORTANCE:
            raise ConfigError(f"importance: unknown weight importance {self.importance!r}; valid: {', '.join(WEIGHT_IMPORTANCE.names())}")
        steps = self.steps
        check(all(s is None or 0.0 <= s < 1.0 for s in steps), f"sparsity must be in [0, 1), got {self.sparsity}")
        check(len(steps) > 0, "sparsity must list at least one step")
        check(all(a <= b for a, b in zip(steps, steps[1:]) if a is not None and b is not None), f"the sparsity steps must not decrease, got {list(steps)}")
        for name, value in self.overrides.items():
            check(0.0 <= value < 1.0, f"overrides[{name!r}] must be in [0, 1), got {value}")
        check(self.quality is None or self.importance == "l1", "quality (Han's std rule) works on magnitudes: use importance 'l1'")
        check(self.scope == "layer" or self.sparsity is not None, f"scope {self.scope!r} takes a sparsity")

    @property
    def steps(self) -> tuple[float | None, ...]:
        """The sparsity of each pruning step (one step for a single target)."""
        if isinstance(self.sparsity, tuple):
            return self.sparsity
        return (self.sparsity,)

    def at_step(self, index: int) -> PruneConfig:
        """The one-step config of step ``index``: its sparsity, and overrides scaled as the steps rise."""
        steps = self.steps
        target = steps[index]
        final = steps[-1]
        fraction = 1.0 if not final or target is None else target / final
        return dataclasses.replace(self, sparsity=target, overrides={k: v * fraction for k, v in self.overrides.items()})


def compute_scores(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    config: PruneConfig,
    data: Any = None,
    task: str | Task | None = None,
    uncalled: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Importance of every selected weight, computed on the weights the model currently uses (masked = zero). Under
    an activation criterion, a layer the calibration batches never called is left out of the scores and its name
    added to ``uncalled``: with no inputs every column would score 0, and ties would prune it by position."""
    statistics: dict[str, dict[str, Any]] = {name: {} for name, _ in modules}
    criterion = WEIGHT_IMPORTANCE.get(config.importance)
    if criterion.needs in (GRADIENTS, ACTIVATIONS):
        if data is None:
            raise ConfigError(f"importance {config.importance!r} needs data ({criterion.needs} over calibration batches)")
        source = as_source(data, model)
        batches = source.batches("train", batch_size=config.batch_size, seed=config.seed)
        if criterion.needs == GRADIENTS:
            resolved = resolve_task(task, source, model)
            statistics = collect_gradient_statistics(model, modules, batches, config.calibration_batches, resolved.loss)
        else:
            statistics = collect_input_norms(model, modules, batches, config.calibration_batches)
    generator = torch.Generator().manual_seed(config.seed)
    scores = {}
    for name, module in modules:
        if statistics[name].get("calls") == 0:
            if uncalled is not None:
                uncalled.append(name)
            continue
        score = criterion.score(module.weight.detach(), {**statistics[name], "generator": generator}).float()
        mask = get_mask(module)
        if mask is not None:  # already pruned weights stay pruned: rank them lowest
            score = torch.where(mask, score, torch.full_like(score, -1.0))
        scores[name] = score
    return scores


def compute_masks(
    scores: dict[str, torch.Tensor], modules: list[tuple[str, nn.Module]], config: PruneConfig, aliases: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Masks for the selected layers (layers that keep every weight get none); ``aliases``: other names of those layers
    (tied weights), which overrides may name."""
    if config.quality is not None:
        return std_threshold_masks({n: m.weight.detach() for n, m in modules}, config.quality)
    if config.threshold is not None:
        return threshold_masks(scores, config.threshold)
    if config.pattern is not None:
        return n_m_masks(scores, config.pattern)
    own = resolve_overrides(modules, config.overrides, "prune.overrides", aliases)
    per_layer = row_masks if config.scope == "row" else layer_masks
    masks = per_layer({name: scores[name] for name in own}, own)
    rest = {name: score for name, score in scores.items() if name not in own}
    if config.sparsity is None or not rest:
        return masks
    assert isinstance(config.sparsity, float)
    check_sparsity(config.sparsity, "sparsity")
    masks.update(global_masks(rest, config.sparsity) if config.scope == "global" else per_layer(rest, config.sparsity))
    return masks


def _sparsegpt_step(
    model: nn.Module, modules: list[tuple[str, nn.Module]], config: PruneConfig, data: Any, notes: list[str] | None, aliases: dict[str, str]
) -> list[str]:
    """One SparseGPT step over the selected layers (``llm.sparsegpt``)."""
    from torchslim.llm.sparsegpt import prune_sparsegpt

    if data is None:
        raise ConfigError("solver 'sparsegpt' calibrates on data: pass data=...")
    own = resolve_overrides(modules, config.overrides, "prune.overrides", aliases)
    sparsity = {name: own.get(name, config.sparsity) for name, _ in modules}
    source = as_source(data, model)
    batches = itertools.islice(source.batches("train", batch_size=config.batch_size, seed=config.seed), config.calibration_batches)
    run = prune_sparsegpt(model, modules, batches, sparsity, config)  # type: ignore[arg-type]
    if notes is not None:
        notes.append(f"SparseGPT over {run['blocks']} blocks on {run['calibration_tokens']:,} tokens in {run['calibration_seconds']} s")
        if not run["found_blocks"]:
            from torchslim.llm.quantize import NO_BLOCKS

            notes.append(NO_BLOCKS)
        outside = [name for name in run["left_dense"] if name not in run["uncalled"]]
        if outside:
            notes.append(f"left dense (SparseGPT prunes the Linear layers of the repeated blocks): {', '.join(outside)}")
        if run["uncalled"]:
            notes.append(
                "left dense (never called on the calibration batches: the block reads the weight directly, as nn.MultiheadAttention reads "
                f"out_proj's): {', '.join(run['uncalled'])}"
            )
    return [name for name, _ in modules if name not in run["left_dense"]]


def sparsity_rows(model: nn.Module, names: list[str]) -> list[dict[str, Any]]:
    modules = dict(model.named_modules())
    rows = []
    for name in names:
        weight = modules[name].weight.detach()
        nonzeros = int(torch.count_nonzero(weight))
        rows.append(
            {
                "name": name,
                "type": module_type_name(modules[name]),
                "weights": weight.numel(),
                "nonzeros": nonzeros,
                "sparsity": round(1 - nonzeros / weight.numel(), 4),
            }
        )
    return rows


def prune_in_place(model: nn.Module, config: PruneConfig, data: Any = None, task: str | Task | None = None, notes: list[str] | None = None) -> list[str]:
    """One pruning step (the config's single target): score, mask and attach masks to the selected layers of
    ``model``; earlier masks stay in force. A weight tied to others (a shared embedding and output layer) is scored
    once, under the first selected layer that holds it, and its mask goes on every module that shares it. Returns
    the selected layer names."""
    if isinstance(config.sparsity, tuple):
        raise ConfigError("prune_in_place takes one sparsity; prune() runs a list of steps")
    tied = tied_weights(model)
    sharing = {name: [other.removesuffix(".weight") for other in others if other.endswith(".weight")] for name, others in tied.items()}
    modules: list[tuple[str, nn.Module]] = []
    aliases: dict[str, str] = {}
    for name, module in select_modules(model, config.layers):
        leader = next((other for other, _ in modules if other in sharing.get(name, [])), None)
        if leader is None:
            modules.append((name, module))
        else:
            aliases[name] = leader
    if config.solver == "sparsegpt":
        return _sparsegpt_step(model, modules, config, data, notes, aliases)
    modules = _activation_readable(modules, config, notes)
    uncalled: list[str] = []
    scores = compute_scores(model, modules, config, data, task, uncalled)
    if uncalled:
        if notes is not None:
            notes.append(
                f"left dense ({config.importance} weighs a layer's weights by its inputs, and the calibration batches never called these: their "
                f"parent reads the weight directly, as nn.MultiheadAttention reads out_proj's): {', '.join(uncalled)}"
            )
        modules = [(name, module) for name, module in modules if name in scores]
    masks = compute_masks(scores, modules, config, aliases)
    if config.scope == "global" and config.sparsity is not None:
        _keep_a_floor(masks, scores, notes)
    for name, _ in modules:
        if name not in masks:
            continue
        for holder in [name, *sharing.get(name, [])]:
            module = model.get_submodule(holder)
            previous = get_mask(module)
            set_mask(module, masks[name] if previous is None else (masks[name] & previous))
    return [name for name, _ in modules]


def _activation_readable(modules: list[tuple[str, nn.Module]], config: PruneConfig, notes: list[str] | None) -> list[tuple[str, nn.Module]]:
    """Under an activation-weighted criterion (wanda) and the default selection, the layers it cannot score (a
    language model's embedding) are left dense and named; a selection the user made keeps them, and scoring names
    the layer it cannot score."""
    criterion = WEIGHT_IMPORTANCE.get(config.importance) if config.importance in WEIGHT_IMPORTANCE.names() else None
    if criterion is None or criterion.needs != ACTIVATIONS or config.layers != LayerSelector():
        return modules
    left = [name for name, module in modules if not reads_inputs(module)]
    if left and notes is not None:
        notes.append(f"left dense ({config.importance} scores Linear, Conv1D and ungrouped Conv2d layers by their inputs): {', '.join(left)}")
    return [(name, module) for name, module in modules if reads_inputs(module)] if len(left) < len(modules) else modules


def _keep_a_floor(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], notes: list[str] | None) -> None:
    """A layer whose every weight falls under one global threshold keeps its highest-scored 1% (``keep_a_floor``),
    named in the notes."""
    for name, count in keep_a_floor(masks, scores).items():
        if notes is not None:
            notes.append(
                f"{name}: every weight fell under the global threshold; it keeps its {count:,} highest-scored ({FLOOR:.0%}) so that the "
                "layer still computes (give it its own sparsity in overrides, or prune per layer, if its scale differs from the others')"
            )


def prune(
    model: nn.Module,
    config: PruneConfig | dict,
    data: Any = None,
    task: str | Task | None = None,
    finetune: TrainConfig | dict | None = None,
    inplace: bool = False,
    progress: bool | str | None = None,
    start_step: int = 0,
    on_step: Callable[[int, nn.Module], None] | None = None,
) -> Result:
    """Prune weights of the selected layers (masks attached as parametrizations; see ``make_permanent``), in one
    step or in the config's list of steps, fine-tuning after each step when ``finetune`` is given.

    The model passed in is unchanged unless ``inplace=True``. With ``data`` each step is evaluated by the ``task``
    (chosen from the data when not named). ``on_step(index, model)`` runs after each completed step (for
    checkpoints); ``start_step`` skips steps already done. The report's stage holds overall and per-layer sparsity
    and non-zeros; the numbers are a simulation of sparsity (dense execution) until the weights are stored sparse
    (CSR, .tslim) or structurally removed.
    """
    config = PruneConfig.coerce(config, where="prune")
    check_model(model, "prune", float32=True, copies=True)
    tuning = TrainConfig.coerce(finetune, where="prune.finetune") if finetune is not None else None
    if tuning is not None and data is None:
        raise ConfigError("prune: fine-tuning needs data")
    target = model if inplace else copy_model(model)
    source = as_source(data, target) if data is not None else None
    resolved = resolve_task(task, source, model) if source is not None else None
    started = time.perf_counter()
    notes: list[str] = []
    names: list[str] = []
    steps = config.steps
    lines = Progress("prune", len(steps), progress_mode(progress) if len(steps) > 1 else "off")
    for index in range(start_step, len(steps)):
        step = config.at_step(index)
        names = prune_in_place(target, step, source, resolved, notes)
        note = f"step {index + 1}/{len(steps)}" + (f": sparsity {step.sparsity:.3f}" if step.sparsity is not None else "")
        metric = None
        if source is not None and resolved is not None:
            metric = evaluate_source(target, source, resolved)[resolved.metric]
            note += f", {resolved.metric} {_format(metric, resolved.metric)} after pruning"
            if tuning is not None:
                fit(
                    target,
                    source,
                    tuning.replace(seed=tuning.seed + index * tuning.epochs),  # a new order for every epoch of every step
                    task=resolved,
                    progress=progress,
                    label=f"prune step {index + 1} fine-tune",
                    evaluate_at_end=False,
                )
                metric = evaluate_source(target, source, resolved)[resolved.metric]
                note += f", {_format(metric, resolved.metric)} after fine-tuning"
        notes.append(note)
        lines.step(**({resolved.metric: metric} if resolved is not None and metric is not None else {}))
        if on_step is not None:
            on_step(index, target)
    names = names or [name for name, _ in select_modules(target, config.layers)]
    layers = sparsity_rows(target, names)
    weights = sum(row["weights"] for row in layers)
    nonzero_weights = sum(row["nonzeros"] for row in layers)
    metrics = {
        "parameters": count_parameters(target),
        "nonzeros": count_nonzeros(target),
        "weight_sparsity": 1 - nonzero_weights / weights,
        "seconds": time.perf_counter() - started,
    }
    metrics["compression"] = metrics["parameters"] / max(1, metrics["nonzeros"])
    notes += _uncovered(target)
    stage = Stage(name="prune", kind="prune", metrics=metrics, layers=layers, notes=notes, execution="simulated (masks)", config=config.to_dict())
    return Result(model=target, report=Report.for_model(model, [stage]))


def _uncovered(model: nn.Module) -> list[str]:
    """A note on the weights held by modules of no prunable layer type (a mixture of experts' fused expert weights),
    which pruning leaves dense."""
    from torchslim.quantization.weight_only import uncovered_note

    def covered(module: nn.Module) -> bool:
        return isinstance(module, SparseLinear) or any(k.__name__ in WEIGHT_TYPES for k in type(module).__mro__)

    note = uncovered_note(model, covered, "left dense", "prunable layer", "weight_sparsity counts the selected layers only")
    return [note] if note else []


def _format(value: float, metric: str) -> str:
    """A share (accuracy, error) as a percentage; any other metric (a user's mse, a perplexity) as it is."""
    return f"{100 * value:.2f}%" if metric in ("accuracy", "error", "top5_accuracy") and 0.0 <= value <= 1.0 else f"{value:.4g}"


__all__ = ["PruneConfig", "compute_masks", "compute_scores", "prune", "prune_in_place", "sparsity_rows"]
