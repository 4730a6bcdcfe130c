"""Structured pruning: whole channels, neurons and attention heads physically removed.

The model is traced once (``pruning.tracing``) into groups of coupled channels; each group gets one importance score
(a registered group criterion, or any callable ``criterion(model, group) -> float``); the lowest-scoring groups of
each coupled set (per layer) or of the whole model (global) are removed by slicing every weight, bias and buffer
they touch (``pruning.removal``). The result is a plain ``nn.Module`` with smaller layers and the same output
shapes; the architecture spec records the new shapes so the model file reloads.

It never hands back a broken model: removal happens on a copy, which must run on the example input, give outputs
of the original shapes and, where the channels do not feed a cross-channel normalization, the same outputs as the
original with the removed channels' readers zeroed. A coupled set whose removal breaks the model (a hard-coded
view, a lambda's fixed padding) is left intact and named in the report; the input model is never changed on
failure.

Example:
    >>> import torch, torchslim as ts
    >>> model = ts.models.create("lenet-300-100")
    >>> result = prune_channels(model, {"ratio": 0.5}, example_input=torch.zeros(1, 1, 28, 28))
    >>> result.model.fc1.out_features, result.model.fc2.out_features
    (150, 50)
"""

from __future__ import annotations

import dataclasses
import math
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
from torchslim.core.selector import LayerSelector, resolve_overrides, select_modules
from torchslim.core.spec import append_transform, pin_spec
from torchslim.data.sources import as_source
from torchslim.measure.counts import count_macs, count_parameters
from torchslim.pruning.apply import masks_of
from torchslim.pruning.graph import ChannelGraph, Group, HeadGroup
from torchslim.pruning.importance import (
    ACTIVATIONS,
    GRADIENTS,
    GROUP_IMPORTANCE,
    INPUT_NORMS,
    activation_sites,
    activation_statistics,
    collect_input_norms,
    group_norm,
    reader_contribution,
    reads_inputs,
)
from torchslim.pruning.model_config import update_model_config
from torchslim.pruning.multiples import channel_multiple, check_round_to
from torchslim.pruning.removal import module_width, remove_channels
from torchslim.pruning.removal_checks import safe_removal
from torchslim.pruning.tracing import trace
from torchslim.pruning.transformer_rules import heads_kept_note
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.fit import TrainConfig, fit

GroupCriterion = Callable[[nn.Module, Group], float]


@dataclasses.dataclass(frozen=True)
class StructuredConfig(Config):
    """Which channels to remove.

    ``ratio``: fraction of the channels of every prunable set (with ``scope`` "layer": each coupled set of channels
    separately, e.g. one layer's filters or one residual stream; "global": one ranking over the whole model, scores
    normalized by their set's mean). ``layers`` picks the layers whose output channels may go; ``overrides`` gives
    layers their own ratio (``{"fc2": 0.1}``; 0 keeps a layer's channels whole); ``sets`` gives one coupled set its
    own ratio, named as ``channel_sets`` names it (a residual stream's layers joined by "+"), over ``overrides``. ``importance``: a registered group
    criterion (l1, l2, bn_scale, mean_activation, apoz, taylor, wanda, random) or a callable ``(model, group) ->
    float``; "wanda" (what the channels add to the layers that read them, over calibration data) is the one for
    gated MLPs and transformers. ``round_to``: kept channel counts are multiples of this, or the name of the engine
    that will run the model ("onnxruntime", "eager", "cuda") for the multiple that engine was measured fastest with
    (``channel_multiple``). ``head_ratio``: fraction of
    attention heads to remove per attention module (ranked by l1, l2, wanda or random; with grouped key/value heads a
    unit is one key/value head with the query heads that share it). ``prune_residual``: whether channels joined
    across a residual add may be removed (for a transformer, its hidden width). The model's inputs and outputs are
    never pruned. A Hugging Face model's config is updated to the new widths where it can describe them.
    """

    ratio: float = 0.0
    scope: str = "layer"
    importance: Any = "l1"
    layers: LayerSelector = LayerSelector()
    overrides: dict[str, float] = dataclasses.field(default_factory=dict)
    sets: dict[str, float] = dataclasses.field(default_factory=dict)
    round_to: int | str = 1
    min_channels: int = 1
    prune_residual: bool = True
    head_ratio: float = 0.0
    calibration_batches: int = 8
    seed: int = 0

    def validate(self) -> None:
        check(0.0 <= self.ratio < 1.0, f"ratio must be in [0, 1), got {self.ratio}")
        check(0.0 <= self.head_ratio < 1.0, f"head_ratio must be in [0, 1), got {self.head_ratio}")
        for field, values in (("overrides", self.overrides), ("sets", self.sets)):
            for name, value in values.items():
                check(0.0 <= value < 1.0, f"{field}[{name!r}] must be in [0, 1), got {value}")
        check(not self.sets or self.scope == "layer", "sets gives each set its own ratio, which needs scope 'layer'")
        check(self.scope in ("layer", "global"), f"scope must be 'layer' or 'global', got {self.scope!r}")
        check(
            callable(self.importance) or self.importance in GROUP_IMPORTANCE,
            f"importance must be one of {', '.join(GROUP_IMPORTANCE.names())} or a callable (model, group) -> float, got {self.importance!r}",
        )
        check_round_to(self.round_to)
        check(self.min_channels >= 1, f"min_channels must be >= 1, got {self.min_channels}")

    def to_dict(self) -> dict[str, Any]:
        plain = super().to_dict()
        if callable(self.importance):
            plain["importance"] = getattr(self.importance, "__qualname__", repr(self.importance))
        return plain


# -- importance ------------------------------------------------------------------------------------------------------


def group_scores(model: nn.Module, groups: list[Group], config: StructuredConfig, data: Any = None, task: str | Task | None = None) -> dict[int, float]:
    """One importance score per group (groups a criterion cannot score are left out, and so kept)."""
    if callable(config.importance):
        return {g.id: float(config.importance(model, g)) for g in groups}
    criterion = GROUP_IMPORTANCE.get(config.importance)
    statistics: dict[str, Any] = {}
    if criterion.needs == INPUT_NORMS:
        statistics = _input_norms(model, [p for g in groups for p in g.consumers], config, data)
    elif criterion.needs in (ACTIVATIONS, GRADIENTS):
        if data is None:
            raise ConfigError(f"importance {config.importance!r} needs calibration data (data=...)")
        source = as_source(data, model)
        loss = resolve_task(task, source, model).loss if criterion.needs == GRADIENTS else None
        sites = {p.module for g in groups for p in activation_sites(model, g)}
        batches = source.batches("train", batch_size=64, shuffle=True, seed=config.seed)
        statistics = activation_statistics(model, sites, batches, config.calibration_batches, loss)
    statistics["generator"] = torch.Generator().manual_seed(config.seed)
    scores = {}
    for g in groups:
        value = criterion.score(model, g, statistics)
        if value is not None:
            scores[g.id] = float(value)
    if not scores and config.importance == "bn_scale":
        raise ConfigError("importance 'bn_scale' needs BatchNorm layers after the pruned channels; this model has none")
    return scores


def _input_norms(model: nn.Module, readers: list[Any], config: StructuredConfig, data: Any) -> dict[str, Any]:
    """Input-feature norms over calibration batches of the layers in ``readers`` that can be measured."""
    if data is None:
        raise ConfigError(f"importance {config.importance!r} needs calibration data (data=...)")
    names = sorted({p.module for p in readers if p.name == "weight" and reads_inputs(model.get_submodule(p.module))})
    batches = as_source(data, model).batches("train", batch_size=64, shuffle=True, seed=config.seed)
    return collect_input_norms(model, [(n, model.get_submodule(n)) for n in names], batches, config.calibration_batches)


HEAD_IMPORTANCE = ("l1", "l2", "wanda", "random")


def head_scores(model: nn.Module, graph: ChannelGraph, heads: list[HeadGroup], config: StructuredConfig, data: Any = None) -> dict[tuple[str, int], float]:
    """One score per attention head (unit): the L1 / L2 norm of its weights, what its output columns add to the
    output projection ("wanda", as for channels), or random; other criteria rank heads by L1."""
    importance = config.importance if config.importance in HEAD_IMPORTANCE else "l1"
    pieces = {(h.module, h.head): graph.head_slices(h) for h in heads}
    if importance == "random":
        generator = torch.Generator().manual_seed(config.seed)
        return {key: float(torch.rand(1, generator=generator)) for key in pieces}
    if importance == "wanda":
        reading = {(h.module, h.head): graph.head_readers(h) for h in heads}
        statistics = _input_norms(model, [s for slices in reading.values() for s in slices], config, data)
        scores = {key: reader_contribution(model, slices, statistics) for key, slices in reading.items()}
        return {key: value for key, value in scores.items() if value is not None}
    return {key: group_norm(model, [s for s in slices if s.name == "weight"], 2 if importance == "l2" else 1) for key, slices in pieces.items()}


# -- selection -------------------------------------------------------------------------------------------------------


def _kept_count(total: int, ratio: float, config: StructuredConfig, width: int = 1) -> int:
    """How many of ``total`` groups ``width`` channels wide stay: kept channels a multiple of round_to and width."""
    if ratio <= 0:
        return total  # a set kept whole stays whole, whatever the multiple
    channels = total * width
    kept = channels - round(ratio * channels)
    multiple = math.lcm(channel_multiple(config.round_to), width)
    if width > 1 and multiple > channels // 2:
        multiple = width  # a multiple of both would be coarser than half the set: whole groups alone
    if multiple > 1:
        kept = max(multiple, int(round(kept / multiple)) * multiple)
    return -(-min(channels, max(kept, config.min_channels)) // width)


def group_width(group: Group) -> int:
    """The channels one group holds: 1, or a GroupNorm group's size (a group across a concatenation counted whole)."""
    return max((len(p.indices) for p in group.producers + group.members), default=1)


def _protection_notes(groups: list[Group], head_ratio: float) -> list[str]:
    notes = []
    outputs = sorted({layer for g in groups if "model output" in g.blocked for layer in g.layers})
    if outputs:
        notes.append(f"protected: output channels of {', '.join(outputs)} (they are the model's output)")
    blocked = sorted(
        {
            reason
            for g in groups
            for reason in g.blocked
            if reason not in ("model input", "model output") and not (head_ratio > 0 and "attention head dimensions" in reason)
        }
    )
    return notes + [f"left intact: {reason}" for reason in blocked]


def set_name(layers: tuple[str, ...]) -> str:
    """A coupled set's name: the layers whose outputs its channels are, joined by "+"."""
    return "+".join(layers)


def _candidates(groups: list[Group], names: set[str], config: StructuredConfig) -> list[Group]:
    return [g for g in groups if g.prunable and g.layers and set(g.layers) <= names and (config.prune_residual or not g.joined)]


def channel_sets(model: nn.Module, config: StructuredConfig | dict | None = None, data: Any = None, example_input: Any = None) -> dict[str, int]:
    """The coupled sets of channels ``prune_channels`` may shrink under ``config`` (its ``layers`` and
    ``prune_residual``): {name: channel count}, a set named by the layers whose outputs its channels are, joined by
    "+" (``"conv1+layer1.0.conv2"``), the name ``StructuredConfig.sets`` takes."""
    config = StructuredConfig.coerce(config or {}, where="channel_sets")
    working = copy_model(model)
    graph = trace(working, _example(data, example_input, working))
    names = {name for name, _ in select_modules(working, config.layers)}
    sets: dict[str, int] = {}
    for group in _candidates(graph.groups(), names, config):
        key = set_name(group.layers)
        sets[key] = sets.get(key, 0) + group_width(group)
    return sets


def output_layers(model: nn.Module, data: Any = None, example_input: Any = None) -> set[str]:
    """The layers whose outputs are the model's own outputs (a classifier, a language model's head): structured
    pruning keeps their channels, and a budget does not factorize them either."""
    working = copy_model(model)
    graph = trace(working, _example(data, example_input, working))
    return {layer for g in graph.groups() if "model output" in g.blocked for layer in g.layers}


def select_groups(
    model: nn.Module, graph: ChannelGraph, config: StructuredConfig, data: Any = None, task: str | Task | None = None
) -> tuple[list[Group], list[str]]:
    """The groups to remove, and notes on what was left alone and why."""
    groups = graph.groups()
    selected = select_modules(model, config.layers)
    names = {name for name, _ in selected}
    ratios = resolve_overrides(selected, config.overrides, "prune_channels.overrides")
    notes = _protection_notes(groups, config.head_ratio)
    kept_whole = sorted(name for name, ratio in ratios.items() if ratio == 0.0)
    if kept_whole:
        notes.append(f"protected by overrides: {', '.join(kept_whole)}")
    candidates = _candidates(groups, names, config)
    if not candidates:
        return [], notes
    scores = group_scores(model, candidates, config, data, task)
    sets: dict[tuple[str, ...], list[Group]] = {}
    for g in candidates:
        if g.id in scores:
            sets.setdefault(g.layers, []).append(g)
    unknown = sorted(set(config.sets) - {set_name(key) for key in sets})
    if unknown:
        raise ConfigError(f"prune_channels.sets: no set of channels named {unknown[0]!r}; the sets: {', '.join(set_name(key) for key in sets)}")
    for key, members in sets.items():  # a set that is one GroupNorm group: it goes whole (the layer with it) or not at all
        if len(members) == 1 and group_width(members[0]) > 1:
            norms = [(len(p.indices), model.get_submodule(p.module)) for p in members[0].members]
            nest = all(size == norm.num_channels // norm.num_groups for size, norm in norms if isinstance(norm, nn.GroupNorm))
            why = "all of its channels are one GroupNorm group" if nest else "GroupNorm group sizes that do not nest join all of its channels into one group"
            notes.append(f"left intact: {set_name(key)} ({why})")
    chosen: list[Group] = []
    if config.scope == "layer":
        for key, members in sets.items():
            own = [ratios[layer] for layer in key if layer in ratios]
            ratio = config.sets.get(set_name(key), max(own) if own else config.ratio)
            kept = _kept_count(len(members), ratio, config, group_width(members[0]))
            chosen += sorted(members, key=lambda g: (scores[g.id], g.id))[: len(members) - kept]
    else:
        normalized = []
        for key, members in sets.items():
            if any(ratios.get(layer) == 0.0 for layer in key):
                continue
            mean = sum(scores[g.id] for g in members) / len(members) or 1.0
            normalized += [(scores[g.id] / mean, g.id, key, g) for g in members]
        normalized.sort(key=lambda item: (item[0], item[1]))
        budget = round(config.ratio * sum(group_width(g) for *_, g in normalized))  # in channels
        removed: dict[tuple[str, ...], int] = {}
        gone = 0
        for _, _, key, g in normalized:
            width = group_width(g)
            if gone + width > budget:
                continue
            if (len(sets[key]) - removed.get(key, 0) - 1) * width < config.min_channels:
                continue
            removed[key] = removed.get(key, 0) + 1
            gone += width
            chosen.append(g)
    return chosen, notes


def select_heads(model: nn.Module, graph: ChannelGraph, config: StructuredConfig, data: Any = None) -> list[HeadGroup]:
    """The attention heads to remove: the lowest-scoring ``head_ratio`` of each attention module (one always stays;
    with grouped key/value heads a unit is a key/value head with its query heads)."""
    if config.head_ratio <= 0:
        return []
    by_module: dict[str, list[HeadGroup]] = {}
    for head in graph.heads:
        by_module.setdefault(head.module, []).append(head)
    selected = {name for name, _ in select_modules(model, config.layers)}
    candidates = [h for h in graph.heads if h.module in selected or any(s.module in selected for s in h.slices)]
    scores = head_scores(model, graph, candidates, config, data) if candidates else {}
    heads: list[HeadGroup] = []
    for module_heads in by_module.values():
        scored = [h for h in module_heads if (h.module, h.head) in scores]
        count = min(len(module_heads) - 1, round(config.head_ratio * len(module_heads)), len(scored))
        heads += sorted(scored, key=lambda h: (scores[(h.module, h.head)], h.head))[:count]
    return heads


# -- the verb --------------------------------------------------------------------------------------------------------


def _example(data: Any, example_input: Any, model: nn.Module) -> Any:
    if example_input is not None:
        return example_input
    if data is not None:
        return as_source(data, model).example(2)
    raise ConfigError("structured pruning traces the model: pass example_input=... or data=...")


def prune_channels(
    model: nn.Module,
    config: StructuredConfig | dict,
    data: Any = None,
    example_input: Any = None,
    task: str | Task | None = None,
    finetune: TrainConfig | dict | None = None,
    inplace: bool = False,
    progress: bool | str | None = None,
) -> Result:
    """Remove channels, neurons and heads (physically), then fine-tune when ``finetune`` is given; the report lists
    every layer's width before and after, what was protected and why, and MACs before and after.

    ``example_input`` (a tensor, a tuple of tensors or a mapping such as ``{"input_ids": ..., "attention_mask":
    ...}``) or ``data`` drives the trace. On any failure the input model is left as it was.
    """
    config = StructuredConfig.coerce(config, where="prune_channels")
    check_model(model, "prune_channels", float32=True, copies=True)
    tuning = TrainConfig.coerce(finetune, where="prune_channels.finetune") if finetune is not None else None
    if masks_of(model):
        raise TorchslimError("the model still carries unstructured pruning masks: call torchslim.make_permanent(model) first")
    if tuning is not None and data is None:
        raise ConfigError("prune_channels: fine-tuning needs data")
    example = _example(data, example_input, model)
    started = time.perf_counter()
    working = copy_model(model)
    graph = trace(working, example)
    chosen, notes = select_groups(working, graph, config, data, task)
    heads = select_heads(working, graph, config, data)
    notes += heads_kept_note(working, graph) if config.head_ratio > 0 else []
    chosen, heads = safe_removal(working, graph, chosen, heads, example, notes)
    before = {n: module_width(m) for n, m in working.named_modules() if module_width(m) is not None}
    macs_before = count_macs(working, example)["total"]
    target = model if inplace else working
    if inplace:
        graph = trace(target, example)  # the same names and slots on the caller's own model
        chosen = [g for g in graph.groups() if g.id in {c.id for c in chosen}]
        heads = [h for h in graph.heads if (h.module, h.head) in {(x.module, x.head) for x in heads}]
    pin_spec(target)  # a plain Sequential's spec from its layers' widths before the removal
    channels_last = any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in target.parameters())
    transform = remove_channels(target, graph, chosen, heads)
    if channels_last:  # the sliced weights come out contiguous: the model keeps the memory format it was given in
        target.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    append_transform(target, transform)
    notes += update_model_config(target)
    seconds = time.perf_counter() - started
    after = {n: module_width(m) for n, m in target.named_modules() if module_width(m) is not None}
    rows = [
        {"name": n, "type": type(target.get_submodule(n)).__name__, "before": before[n], "after": after.get(n)} for n in before if before[n] != after.get(n)
    ]
    macs_after = count_macs(target, example)["total"]
    metrics = {
        "parameters_before": count_parameters(model),
        "parameters": count_parameters(target),
        "macs_before": macs_before,
        "macs": macs_after,
        "macs_ratio": macs_before / max(1, macs_after),
        "groups_removed": len(chosen),
        "heads_removed": sum(int(head.attributes.get("per_unit", 1)) for head in heads),  # query heads (a grouped unit holds several)
        "prune_seconds": seconds,
    }
    if graph.unsupported:
        listed = "; ".join(graph.unsupported[:5]) + ("; ..." if len(graph.unsupported) > 5 else "")
        notes.append(f"{len(graph.unsupported)} op(s) the tracer could not follow; the channels they read or write were left intact: {listed}")
    if tuning is not None:
        history = fit(target, data, tuning, task=task, progress=progress, label="prune-channels fine-tune", evaluate_at_end=False, reference=model)
        notes.append(f"fine-tuned {len(history.epochs)} epochs ({history.seconds:.1f} s)")
    execution = "channels removed (smaller dense layers)"
    stage = Stage(name="prune channels", kind="prune-channels", metrics=metrics, layers=rows, notes=notes, config=config.to_dict(), execution=execution)
    return Result(model=target, report=Report.for_model(model, [stage]))


__all__ = ["StructuredConfig", "channel_sets", "group_scores", "output_layers", "prune_channels", "select_groups", "select_heads", "set_name"]
