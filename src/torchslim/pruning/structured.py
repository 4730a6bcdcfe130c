"""Structured pruning: whole channels, neurons and attention heads physically removed.

The model is traced once (``pruning.graph``) into groups of coupled channels; each group gets one importance score
aggregated over everything it owns; the lowest-scoring groups of each coupled set (per layer) or of the whole model
(global) are removed by slicing every weight, bias and buffer they touch. The result is a plain ``nn.Module`` with
smaller layers and the same output shape; the architecture spec records the new shapes so the model file reloads.

Importance criteria (``importance``): ``l1`` / ``l2`` filter norms (Li et al. 2017), ``bn_scale`` (|gamma|,
Network Slimming), ``mean_activation`` and ``apoz`` (average percentage of zeros after ReLU, over calibration
batches), ``taylor`` (|activation x gradient|, Molchanov et al. 2017), ``random``.

Example:
    >>> import torch, torchslim as ts
    >>> model = ts.models.create("lenet-300-100")
    >>> result = prune_channels(model, {"ratio": 0.5}, example_input=torch.zeros(1, 1, 28, 28))
    >>> result.model.fc1.out_features, result.model.fc2.out_features
    (150, 50)
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.config import Config, ConfigError, check
from torchslim.core.errors import TorchslimError
from torchslim.core.report import Report, Result, Stage
from torchslim.measure.counts import count_macs, count_parameters
from torchslim.io.modelfile import append_transform
from torchslim.pruning.graph import ChannelGraph, Group, HeadGroup, ParamSlice, trace

IMPORTANCE = ("l1", "l2", "bn_scale", "mean_activation", "apoz", "taylor", "random")
TRANSFORM_KIND = "channel-pruning"


@dataclasses.dataclass(frozen=True)
class StructuredConfig(Config):
    """Which channels to remove.

    ``ratio``: fraction of the channels of every prunable set (with ``scope`` "layer": each coupled set of channels
    separately, e.g. one layer's filters or one residual stream; "global": one ranking over the whole model, scores
    normalized by their set's mean). ``layer_ratios`` overrides the ratio for sets produced by the named layers.
    ``protect``: layers whose output channels stay (default: the first and the last weight layer).
    ``round_to``: kept channel counts are multiples of this. ``head_ratio``: fraction of attention heads to remove
    per attention module. ``prune_residual``: whether channels joined across a residual add may be removed.
    """

    ratio: float = 0.0
    layer_ratios: dict[str, float] = dataclasses.field(default_factory=dict)
    scope: str = "layer"
    importance: str = "l1"
    protect: tuple[str, ...] | None = None
    round_to: int = 1
    min_channels: int = 1
    prune_residual: bool = True
    head_ratio: float = 0.0
    calibration_batches: int = 8
    seed: int = 0

    def validate(self) -> None:
        check(0.0 <= self.ratio < 1.0, f"ratio must be in [0, 1), got {self.ratio}")
        check(0.0 <= self.head_ratio < 1.0, f"head_ratio must be in [0, 1), got {self.head_ratio}")
        for name, value in self.layer_ratios.items():
            check(0.0 <= value < 1.0, f"layer_ratios[{name!r}] must be in [0, 1), got {value}")
        check(self.scope in ("layer", "global"), f"scope must be 'layer' or 'global', got {self.scope!r}")
        check(self.importance in IMPORTANCE, f"importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        check(self.round_to >= 1, f"round_to must be >= 1, got {self.round_to}")
        check(self.min_channels >= 1, f"min_channels must be >= 1, got {self.min_channels}")


# -- importance ------------------------------------------------------------------------------------------------------

def _tensor(model: nn.Module, piece: ParamSlice) -> torch.Tensor:
    return getattr(model.get_submodule(piece.module), piece.name).detach()


def _norm(model: nn.Module, pieces: list[ParamSlice], p: int) -> float:
    """The group's L1 norm (p=1) or L2 norm (p=2) over its weights, from the per-weight criteria of unstructured
    pruning (the same registry: |w| and w^2 summed over the group)."""
    from torchslim.pruning.importance import WEIGHT_IMPORTANCE

    criterion = WEIGHT_IMPORTANCE.get("l1" if p == 1 else "l2")
    total = 0.0
    for piece in pieces:
        if piece.name != "weight":
            continue
        values = _tensor(model, piece).index_select(piece.dim, torch.tensor(piece.indices))
        total += float(criterion(values, {}).sum())
    return total if p == 1 else total ** 0.5


def _activation_statistics(model: nn.Module, modules: set[str], data: Any, config: StructuredConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Per module and output channel: mean activation after ReLU, APoZ, and |a * dL/da| (Taylor)."""
    if data is None:
        raise ConfigError(f"importance {config.importance!r} needs calibration data (data=...)")
    batches = data.loader("train", batch_size=64, shuffle=True, seed=config.seed) if hasattr(data, "loader") else data
    stats: dict[str, dict[str, torch.Tensor]] = {}
    handles, captured = [], {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            axis = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d)) and output.dim() > 2 else output.dim() - 1
            dims = [d for d in range(output.dim()) if d != axis]
            active = F.relu(output.detach())
            entry = stats.setdefault(name, {"mean_activation": 0.0, "apoz": 0.0, "taylor": 0.0, "batches": 0})
            entry["mean_activation"] = entry["mean_activation"] + active.mean(dim=dims)
            entry["apoz"] = entry["apoz"] + (active == 0).float().mean(dim=dims)
            entry["batches"] += 1
            if output.requires_grad:
                output.retain_grad()
                captured[name] = (output, axis, dims)
        return record

    for name, module in model.named_modules():
        if name in modules:
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        for index, (inputs, targets) in enumerate(batches):
            if index >= config.calibration_batches:
                break
            captured.clear()
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                logits = model(inputs)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
                loss.backward()
            for name, (output, axis, dims) in captured.items():
                if output.grad is not None:
                    contribution = (output.detach() * output.grad).mean(dim=[d for d in dims if d != 0]).abs().mean(dim=0) if output.dim() > 2 \
                        else (output.detach() * output.grad).abs().mean(dim=0)
                    stats[name]["taylor"] = stats[name]["taylor"] + contribution
        if not stats:
            raise TorchslimError("calibration got no batches: the calibration data is empty")
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {name: {key: value / entry["batches"] for key, value in entry.items() if key != "batches"} for name, entry in stats.items()}


def group_scores(model: nn.Module, groups: list[Group], config: StructuredConfig, data: Any = None) -> dict[int, float]:
    """One importance score per group, aggregated over the tensors it owns."""
    method = config.importance
    if method in ("l1", "l2"):
        return {g.id: _norm(model, g.producers or g.members, 1 if method == "l1" else 2) for g in groups}
    if method == "random":
        generator = torch.Generator().manual_seed(config.seed)
        return {g.id: float(torch.rand(1, generator=generator)) for g in groups}
    if method == "bn_scale":
        scores = {}
        for g in groups:
            gammas = [p for p in g.members if p.name == "weight" and isinstance(model.get_submodule(p.module), nn.modules.batchnorm._BatchNorm)]
            if not gammas:
                continue
            scores[g.id] = sum(float(_tensor(model, p)[p.indices].abs().sum()) for p in gammas)
        if not scores:
            raise ConfigError("importance 'bn_scale' needs BatchNorm layers after the pruned channels; this model has none")
        return scores
    # activation-based: measured where the group's channels leave their BatchNorm, else at their producers
    sites = {}
    for g in groups:
        norms = [p for p in g.members if p.name == "weight" and isinstance(model.get_submodule(p.module), nn.modules.batchnorm._BatchNorm)]
        sites[g.id] = norms or [p for p in g.producers if p.name == "weight"]
    modules = {p.module for pieces in sites.values() for p in pieces}
    stats = _activation_statistics(model, modules, data, config)
    scores = {}
    for g in groups:
        values = [stats[p.module][method][p.indices].mean().item() for p in sites[g.id] if p.module in stats]
        if not values:
            continue
        value = sum(values) / len(values)
        scores[g.id] = 1.0 - value if method == "apoz" else value
    return scores


def _head_score(model: nn.Module, graph: ChannelGraph, head: HeadGroup, method: str) -> float:
    return _norm(model, [s for s in graph.head_slices(head) if s.name == "weight"], 2 if method == "l2" else 1)


# -- selection -------------------------------------------------------------------------------------------------------

def _weight_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding))]


def _kept_count(total: int, ratio: float, config: StructuredConfig) -> int:
    kept = total - round(ratio * total)
    if config.round_to > 1:
        kept = max(config.round_to, int(round(kept / config.round_to)) * config.round_to)
    return min(total, max(kept, config.min_channels))


def select_groups(model: nn.Module, graph: ChannelGraph, config: StructuredConfig, data: Any = None) -> tuple[list[Group], list[str]]:
    """The groups to remove, and notes on what was left alone and why."""
    groups = graph.groups()
    layers = _weight_layers(model)
    protect = set(config.protect) if config.protect is not None else ({layers[0], layers[-1]} if layers else set())
    unknown = sorted(set(config.protect or ()) - set(layers)) + sorted(set(config.layer_ratios) - set(layers))
    if unknown:
        raise ConfigError(f"protect / layer_ratios name layers the model does not have: {unknown}; weight layers: {layers[:20]}")
    candidates, notes = [], []
    for g in groups:
        if not g.prunable:
            continue
        if set(g.layers) & protect or not g.layers:
            continue
        if len(g.layers) > 1 and not config.prune_residual:
            continue
        candidates.append(g)
    blocked = sorted({reason for g in groups for reason in g.blocked if reason not in ("model input", "model output")
                      and not (config.head_ratio > 0 and "attention head dimensions" in reason)})
    notes += [f"left intact: {reason}" for reason in blocked]
    if not candidates:
        return [], notes
    scores = group_scores(model, candidates, config, data)
    candidates = [g for g in candidates if g.id in scores]
    sets: dict[tuple[str, ...], list[Group]] = {}
    for g in candidates:
        sets.setdefault(g.layers, []).append(g)
    chosen: list[Group] = []
    if config.scope == "layer":
        for key, members in sets.items():
            ratio = max((config.layer_ratios.get(layer, -1.0) for layer in key), default=-1.0)
            ratio = config.ratio if ratio < 0 else ratio
            kept = _kept_count(len(members), ratio, config)
            ordered = sorted(members, key=lambda g: (scores[g.id], g.id))
            chosen += ordered[: len(members) - kept]
    else:
        normalized = []
        for key, members in sets.items():
            mean = sum(scores[g.id] for g in members) / len(members) or 1.0
            normalized += [(scores[g.id] / mean, g.id, key, g) for g in members]
        normalized.sort(key=lambda item: (item[0], item[1]))
        budget = round(config.ratio * len(normalized))
        removed: dict[tuple[str, ...], int] = {}
        for _, _, key, g in normalized:
            if len(chosen) >= budget:
                break
            if len(sets[key]) - removed.get(key, 0) - 1 < config.min_channels:
                continue
            removed[key] = removed.get(key, 0) + 1
            chosen.append(g)
    return chosen, notes


# -- removal ---------------------------------------------------------------------------------------------------------

def _drops(pieces: list[ParamSlice]) -> dict[tuple[str, str, int], set[int]]:
    out: dict[tuple[str, str, int], set[int]] = {}
    for piece in pieces:
        out.setdefault((piece.module, piece.name, piece.dim), set()).update(piece.indices)
    return out


def _update_attributes(module: nn.Module) -> None:
    """Make a module's size attributes agree with its (sliced) tensors."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.in_channels = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]


def _slice_module(module: nn.Module, keeps: dict[tuple[str, int], torch.Tensor]) -> None:
    for (name, dim), keep in keeps.items():
        tensor = getattr(module, name)
        sliced = tensor.detach().index_select(dim, keep.to(tensor.device)).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            setattr(module, name, sliced)
    _update_attributes(module)


def remove_channels(model: nn.Module, graph: ChannelGraph, groups: list[Group], heads: list[HeadGroup]) -> dict[str, Any]:
    """Slice the pruned groups and heads out of ``model`` (in place); returns the spec transform."""
    pieces = [p for g in groups for p in g.producers + g.members + g.consumers] + [s for h in heads for s in graph.head_slices(h)]
    drops = _drops(pieces)
    per_module: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for (module_name, name, dim), indices in drops.items():
        tensor = getattr(model.get_submodule(module_name), name)
        keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in indices], dtype=torch.long)
        if keep.numel() == 0:
            raise TorchslimError(f"pruning would remove every channel of {module_name}.{name} (dim {dim})")
        per_module.setdefault(module_name, {})[(name, dim)] = keep
    transform: dict[str, Any] = {"kind": TRANSFORM_KIND, "shapes": {}, "attributes": {}}
    for module_name, keeps in per_module.items():
        module = model.get_submodule(module_name)
        _slice_module(module, keeps)
        transform["shapes"][module_name] = {name: list(getattr(module, name).shape) for name, _ in
                                            list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
                                            if getattr(module, name) is not None and getattr(module, name).dim() > 0}
    pruned_slots = {g.id for g in groups}
    for name, records in graph.leaf_records.items():  # option-A shortcuts: where the kept inputs land now
        module = model.get_submodule(name)
        in_slots, out_slots = records[0]
        kept_out = [s for s in out_slots if graph.uf.find(s) not in pruned_slots]
        kept_in = [s for s in in_slots if graph.uf.find(s) not in pruned_slots]
        roots_out = [graph.uf.find(s) for s in kept_out]
        positions = [roots_out.index(graph.uf.find(s)) for s in kept_in]
        if len(kept_out) != module.out_channels or len(kept_in) != module.in_channels:
            module.in_channels, module.out_channels = len(kept_in), len(kept_out)
            module.index = positions
            transform["attributes"][name] = {"in_channels": len(kept_in), "out_channels": len(kept_out), "index": positions}
    removed_heads: dict[str, list[HeadGroup]] = {}
    for head in heads:
        removed_heads.setdefault(head.module, []).append(head)
    for name, gone in removed_heads.items():
        module = model.get_submodule(name)
        names = gone[0].attributes or {"count": "num_heads"}
        setattr(module, names["count"], getattr(module, names["count"]) - len(gone))
        attributes = {names["count"]: getattr(module, names["count"])}
        if "size" in names:  # e.g. all_head_size = heads x head size
            setattr(module, names["size"], getattr(module, names["count"]) * getattr(module, names["head"]))
            attributes[names["size"]] = getattr(module, names["size"])
        transform["attributes"][name] = attributes
    return transform


def apply_structure(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Rebuild the shapes a saved file records (for loading): slice each tensor to its recorded shape."""
    for module_name, shapes in transform["shapes"].items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise TorchslimError(f"the file prunes layer {module_name!r}, which the architecture does not have") from None
        keeps = {}
        for name, shape in shapes.items():
            tensor = getattr(module, name, None)
            if tensor is None or tensor.dim() != len(shape):
                raise TorchslimError(f"the file's shape {shape} for {module_name}.{name} does not fit the architecture")
            for dim, size in enumerate(shape):
                if size != tensor.shape[dim]:
                    keeps[(name, dim)] = torch.arange(size)
        for (name, dim), keep in keeps.items():
            _slice_module(module, {(name, dim): keep})
    for module_name, attributes in transform.get("attributes", {}).items():
        module = model.get_submodule(module_name)
        for key, value in sorted(attributes.items(), key=lambda item: item[0] == "index"):  # sizes before the index
            setattr(module, key, value)
    return model


def _example(data: Any, example_input: Any) -> Any:
    if example_input is not None:
        return example_input
    if data is not None and hasattr(data, "example_input"):
        return data.example_input(2)
    raise ConfigError("structured pruning traces the model: pass example_input=... or data=...")


def prune_channels(model: nn.Module, config: StructuredConfig | dict, data: Any = None, example_input: Any = None,
                   inplace: bool = False) -> Result:
    """Remove channels, neurons and heads (physically); the report lists every layer's width before and after."""
    config = StructuredConfig.coerce(config, where="prune")
    from torchslim.pruning.apply import masks_of

    if masks_of(model):
        raise TorchslimError("the model still carries unstructured pruning masks: call torchslim.make_permanent(model) first")
    target = model if inplace else copy.deepcopy(model)
    example = _example(data, example_input)
    started = time.perf_counter()
    graph = trace(target, example)
    chosen, notes = select_groups(target, graph, config, data)
    heads: list[HeadGroup] = []
    if config.head_ratio > 0:
        by_module: dict[str, list[HeadGroup]] = {}
        for head in graph.heads:
            by_module.setdefault(head.module, []).append(head)
        for module_heads in by_module.values():
            count = min(len(module_heads) - 1, round(config.head_ratio * len(module_heads)))
            ordered = sorted(module_heads, key=lambda h: (_head_score(target, graph, h, config.importance), h.head))
            heads += ordered[:count]
    before = {n: _width(m) for n, m in target.named_modules() if _width(m) is not None}
    macs_before = count_macs(target, example)["total"]
    transform = remove_channels(target, graph, chosen, heads)
    seconds = time.perf_counter() - started
    append_transform(target, transform)
    after = {n: _width(m) for n, m in target.named_modules() if _width(m) is not None}
    rows = [{"name": n, "type": type(target.get_submodule(n)).__name__, "before": before[n], "after": after.get(n)}
            for n in before if before[n] != after.get(n)]
    macs_after = count_macs(target, example)["total"]
    metrics = {"parameters_before": count_parameters(model), "parameters": count_parameters(target), "macs_before": macs_before,
               "macs": macs_after, "macs_ratio": macs_before / max(1, macs_after), "groups_removed": len(chosen),
               "heads_removed": len(heads), "prune_seconds": seconds}
    notes = notes + [f"{len(graph.unsupported)} op(s) the tracer could not follow; their channels were left intact"] if graph.unsupported else notes
    stage = Stage(name="prune channels", kind="prune", metrics=metrics, layers=rows, notes=notes, config=config.to_dict(),
                  execution="channels removed (smaller dense layers)")
    return Result(model=target, report=Report.for_model(model, [stage]))


def _width(module: nn.Module) -> str | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"{module.in_channels}->{module.out_channels}"
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return str(module.num_features)
    if hasattr(module, "num_heads") and isinstance(getattr(module, "num_heads"), int):
        return f"{module.num_heads} heads"
    return None


__all__ = ["IMPORTANCE", "StructuredConfig", "apply_structure", "group_scores", "prune_channels", "remove_channels", "select_groups"]
