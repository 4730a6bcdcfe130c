"""Weight-only quantization of Linear and Conv2d layers, with per-layer schemes (mixed precision).

Example:
    >>> import torchslim as ts
    >>> result = ts.quantize(ts.models.create("lenet-300-100"), {"weights": {"scheme": "kmeans", "bits": 4}})
    >>> result.report.stages[0].metrics["weight_bytes"] < 266_610 * 4 / 7
    True
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.core.config import Config, ConfigError
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import LayerSelector, move_hooks, resolve_overrides, select_modules, set_module, set_module_everywhere
from torchslim.core.spec import append_transform, recorded_module, recorded_transform, register_transform
from torchslim.core.ties import tied_groups
from torchslim.measure.counts import count_parameters
from torchslim.quantization.formats import SCHEME_KEYS, WeightScheme
from torchslim.quantization.modules import (
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    empty_like,
    is_transposed_linear,
    own_forward,
    quantize_module,
)

TRANSFORM_KIND = "weight-quantization"
QUANTIZABLE = ("Linear", "Conv2d", "Conv1D")
# layers with weights weight-only quantization has no form for (named in the report when they are left in float)
UNCOVERED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.RNNBase, nn.Bilinear)


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig(Config):
    """Weight-only quantization: one ``weights`` scheme for the ``layers`` selected (Linear and Conv2d), and
    ``overrides`` per layer pattern (mixed precision), each merged onto ``weights``: ``{"type:Conv2d": {"bits": 8}}``
    (Deep Compression gives convolutions more bits than fully connected layers), ``{"fc3": {"scheme": "uniform",
    "bits": 8}}``. The most specific pattern wins (a layer's name over a type)."""

    method: str = "weight-only"
    weights: WeightScheme = WeightScheme()
    layers: LayerSelector = LayerSelector()
    overrides: dict[str, WeightScheme] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.method != "weight-only":
            raise ConfigError(f"method must be 'weight-only' for WeightOnlyConfig, got {self.method!r}")

    @classmethod
    def from_dict(cls, mapping: Any, where: str | None = None) -> WeightOnlyConfig:
        """As ``Config.from_dict``, with each override a partial scheme merged onto ``weights`` (keys of ``weights``
        that the override's scheme does not read are left out: ``granularity`` does not pass to an ``fp16`` layer). A
        key written for a scheme that ignores it (``granularity`` for k-means, ``bits: 4`` for binary) is an error."""
        where = where or cls.__name__
        if not isinstance(mapping, Mapping):
            return super().from_dict(mapping, where=where)
        base = mapping.get("weights", {})
        base = base.to_dict() if isinstance(base, WeightScheme) else dict(base) if isinstance(base, Mapping) else base
        if isinstance(base, dict):
            _refuse_ignored(base, f"{where}.weights")
        if isinstance(base, dict) and isinstance(mapping.get("overrides"), Mapping):
            merged = {}
            for key, value in mapping["overrides"].items():
                if not isinstance(value, Mapping):
                    merged[key] = value
                    continue
                scheme = value.get("scheme", base.get("scheme", "uniform"))
                _refuse_ignored({**value, "scheme": scheme}, f"{where}.overrides[{key!r}]")
                carried = {k: v for k, v in base.items() if not WeightScheme.inapplicable({"scheme": scheme, k: v})}
                merged[key] = {**carried, **value}
            mapping = {**mapping, "overrides": merged}
        return super().from_dict(mapping, where=where)


def _refuse_ignored(written: Mapping[str, Any], where: str) -> None:
    ignored = WeightScheme.inapplicable(written)
    if ignored:
        scheme = written.get("scheme", "uniform")
        reads = sorted(SCHEME_KEYS.get(scheme, set()))
        raise ConfigError(
            f"{where}: scheme {scheme!r} ignores {', '.join(f'{key}={written[key]!r}' for key in ignored)}"
            + (f" (it reads {', '.join(reads)})" if reads else " (it has no bits, grid or codebook to set)")
            + ("; uniform takes granularity and group_size" if {"granularity", "group_size", "symmetric"} & set(ignored) else "")
        )


@register_transform(TRANSFORM_KIND)
def apply_structure(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Replace the layers a saved file lists with empty quantized modules of the same structure (for loading)."""
    layers, shared = transform.get("layers"), transform.get("shared", {})
    if not isinstance(layers, dict) or not isinstance(shared, dict):
        raise TorchslimError("the file's weight-quantization record needs a 'layers' mapping (and 'shared' a mapping)")
    for name, scheme in layers.items():
        module = recorded_module(model, name, "quantizes")
        if not _quantizable(module):
            raise TorchslimError(f"the file quantizes {name!r}, a {type(module).__name__}: only Linear, Conv2d, Conv1D and Embedding layers are quantized")
        set_module_everywhere(model, name, empty_like(module, WeightScheme.from_dict(scheme, where=f"the file's scheme for {name}")))
    for follower, leader in shared.items():
        if follower not in layers or leader not in layers:
            raise TorchslimError(f"the file shares {leader!r}'s quantized weight with {follower!r}, but does not quantize both")
        share(model, follower, recorded_module(model, str(leader), "shares"))
    return model


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or is_transposed_linear(module)


def share(model: nn.Module, name: str, leader: nn.Module) -> None:
    """Make layer ``name`` (quantized) use ``leader``'s quantized weight, as a tied weight did before quantization."""
    follower: Any = model.get_submodule(name)
    holder: Any = leader.quantized
    if tuple(follower.quantized.shape) != tuple(holder.shape):
        raise TorchslimError(f"{name}: its weight {follower.quantized.shape} cannot share one of shape {holder.shape}")
    follower.quantized = holder


def _tie_plan(
    model: nn.Module, modules: list[tuple[str, nn.Module]], kept_float: frozenset[str] | set[str] = frozenset()
) -> tuple[list[tuple[str, nn.Module]], dict[str, str], list[str]]:
    """(layers to quantize, {follower: leader} for tied layers that share the leader's quantized weight, notes on
    tied layers left in float). A tied weight is quantized once when every layer holding it is selected (an output
    layer and the embedding it shares), else left in float, so it stays tied."""
    selected = dict(modules)
    groups = tied_groups(model)
    plan: list[tuple[str, nn.Module]] = []
    shared: dict[str, str] = {}
    notes: list[str] = []
    for name, module in modules:
        group = next((g for g in groups if f"{name}.weight" in g), None)
        if group is None:
            plan.append((name, module))
            continue
        holders = [n.removesuffix(".weight") for n in group if n.endswith(".weight")]
        if len(holders) == len(group) and all(model.get_submodule(h) is module for h in holders):
            plan.append((name, module))  # one layer under several names (self.enc = self.dec = shared): quantized once
            continue
        if len(holders) != len(group) or any(h not in selected for h in holders):
            others = [n for n in group if n != f"{name}.weight"]
            floating = [h for h in holders if h in kept_float]
            if floating:
                notes.append(
                    f"{name}: left in float, its weight is tied to {', '.join(others)}; {floating[0]} stays in float (its own forward), so it does too"
                )
                continue
            notes.append(
                f"{name}: left in float, its weight is tied to {', '.join(others)}; select every layer holding it "
                f"(layers.types: [Linear, Embedding]) to quantize them as one"
            )
        elif name == holders[0]:
            plan.append((name, module))
            shared.update({holder: name for holder in holders[1:]})
    return plan, shared, notes


@dataclasses.dataclass
class LayerPlan:
    """Which layers a weight-only method quantizes and how: (name, module) pairs, each layer's scheme, the tied
    layers that share a leader's quantized weight, and notes on layers left in float."""

    modules: list[tuple[str, nn.Module]]
    schemes: dict[str, WeightScheme]
    shared: dict[str, str]
    notes: list[str]
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    recorded: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def scheme(self, name: str) -> WeightScheme:
        return self.schemes[name]


def plan_layers(target: nn.Module, config: Any, types: tuple[str, ...] = QUANTIZABLE) -> LayerPlan:
    """The layers ``config`` (``weights``, ``layers``, ``overrides``) selects in ``target``, checked quantizable."""
    modules = select_modules(target, config.layers, default_types=types)
    by_layer = resolve_overrides(modules, config.overrides, "quantize.overrides")
    own = {name: (module, method) for name, module in modules if (method := own_forward(module)) is not None}
    notes = [
        f"{name}: left in float ({type(module).__name__} has its own {method}, which its quantized form would not run)"
        for name, (module, method) in own.items()
    ]
    modules, shared, tie_notes = _tie_plan(target, [(name, module) for name, module in modules if name not in own], set(own))
    notes += tie_notes
    for follower, leader in shared.items():
        mine, theirs = by_layer.get(follower, config.weights), by_layer.get(leader, config.weights)
        if follower not in by_layer or mine == theirs:
            continue  # without a scheme of its own a tied layer follows its leader
        if follower not in (config.overrides or {}):  # a rule that matched it among others (type:Linear)
            notes.append(f"{follower}: follows {leader}'s quantization ({theirs.scheme} {theirs.bits} bits; tied), not the override rule that matched it")
        else:  # an override naming the tied layer itself: it cannot have its own
            raise TorchslimError(
                f"quantize.overrides: {follower} shares its weight with {leader} (tied), which is quantized once, as {leader}; "
                f"give both the same override ({follower}: {mine.scheme} {mine.bits} bits, {leader}: {theirs.scheme} {theirs.bits} bits)"
            )
    padded = [name for name, module in modules if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros"]
    notes += [f"{name}: left in float (padding_mode {target.get_submodule(name).padding_mode!r}; its quantized form pads with zeros)" for name in padded]
    modules = [(name, module) for name, module in modules if name not in padded]
    chosen = {name for name, _ in modules}
    others: dict[str, int] = {}
    for name, module in target.named_modules():
        if name not in chosen and isinstance(module, UNCOVERED):  # weights this quantization leaves in float: said
            others[type(module).__name__] = others.get(type(module).__name__, 0) + 1
    if others:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(others.items()))
        notes.append(f"left in float: {kinds} (weight-only quantization covers Linear, Conv2d, GPT-2's Conv1D and Embedding)")
    covered = (*UNCOVERED, QuantizedLinear, QuantizedConv2d, QuantizedEmbedding)  # UNCOVERED layers: named just above
    note = uncovered_note(
        target,
        lambda module: _quantizable(module) or isinstance(module, covered),
        "left in float",
        "quantizable layer",
        "compression counts the quantized layers only",
    )
    notes += [note] if note else []
    for name, module in modules:
        if isinstance(module, (QuantizedLinear, QuantizedConv2d, QuantizedEmbedding)):
            raise TorchslimError(f"layer {name!r} is already quantized")
        if not _quantizable(module):
            raise TorchslimError(f"layer {name!r} ({type(module).__name__}): weight-only quantization supports Linear, Conv2d, Conv1D and Embedding")
    schemes = {name: by_layer.get(name, config.weights) for name, _ in modules}
    one_bit = [name for name, scheme in schemes.items() if scheme.scheme == "uniform" and scheme.bits == 1]
    if one_bit:  # the grid must hold zero exactly: its second level is all a layer has
        notes.append(
            f"{len(one_bit)} layer{'' if len(one_bit) == 1 else 's'} at 1-bit uniform ({', '.join(one_bit[:4])}{', ...' if len(one_bit) > 4 else ''}): "
            "a uniform grid holds zero exactly, so its two levels are {-s, 0} (symmetric) or {0, s} (affine) and one sign of weights is lost; "
            "scheme 'binary' stores sign x each channel's mean magnitude"
        )
    return LayerPlan(modules, schemes, shared, notes)


def uncovered_weights(model: nn.Module, covered: Callable[[nn.Module], bool]) -> tuple[int, list[str], list[str]]:
    """(how many weights, names, module types) of the weight tensors (parameters with at least two dimensions larger
    than one) that modules ``covered`` rejects hold themselves, such as a mixture of experts' fused expert weights or
    a router's matrix: weights a method that works on layers leaves as they are. A shared tensor counts once; an index
    in a name is folded (``model.layers.*.mlp.experts.down_proj``)."""
    seen: set[int] = set()
    count = 0
    names: list[str] = []
    kinds: list[str] = []
    for name, module in model.named_modules():
        if covered(module) or isinstance(module, parametrize.ParametrizationList):
            continue
        tensors = dict(module.named_parameters(recurse=False))
        if parametrize.is_parametrized(module):
            tensors.update({key: plist.original for key, plist in module.parametrizations.items() if hasattr(plist, "original")})
        for key, tensor in tensors.items():
            if id(tensor) in seen or sum(size > 1 for size in tensor.shape) < 2:
                continue
            seen.add(id(tensor))
            count += tensor.numel()
            folded = re.sub(r"(?<=[^.]\.)\d+(?=\.)", "*", f".{name}.{key}" if name else f".{key}")[1:]  # a top-level index stays
            names += [folded] if folded not in names else []
            kinds += [type(module).__name__] if type(module).__name__ not in kinds else []
    return count, names, kinds


def uncovered_note(model: nn.Module, covered: Callable[[nn.Module], bool], left: str, layer: str, metric: str = "") -> str | None:
    """A note naming the weights ``uncovered_weights`` finds (``left``: what became of them; ``layer``: what a
    covered module is; ``metric``: what the stage's metric counts), or None when there are none."""
    count, names, kinds = uncovered_weights(model, covered)
    if not count:
        return None
    listed = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    types = ", ".join(kinds[:4]) + (", ..." if len(kinds) > 4 else "")
    share = count / max(count_parameters(model), 1)
    return f"{left}: {count:,} weights ({share:.1%} of the parameters) in modules that are no {layer} ({types}): {listed}" + (f"; {metric}" if metric else "")


def float_weight(module: nn.Module) -> torch.Tensor:
    """A layer's float weight as (out, in, ...) (GPT-2's Conv1D stores it transposed)."""
    weight = module.weight.detach().float()
    return weight.t() if is_transposed_linear(module) else weight


def _bias_count(module: nn.Module) -> int:
    bias = getattr(module, "bias", None)
    return bias.numel() if isinstance(bias, torch.Tensor) else 0


@torch.no_grad()
def _keep_bias(before: nn.Module, tied: nn.Module, leader: nn.Module, quantized: nn.Module) -> None:
    """A tied layer shares its ``leader``'s weight only: its own bias comes along (the quantized leader's bias
    parameter, where the two biases were tied too)."""
    bias = getattr(before, "bias", None)
    if not isinstance(bias, torch.Tensor) or getattr(tied, "bias", None) is None:
        return
    if bias is getattr(leader, "bias", None):
        tied.bias = quantized.bias
    else:
        tied.bias.copy_(bias.detach())


def replace_layer(target: nn.Module, plan: LayerPlan, name: str, original: torch.Tensor, quantized: nn.Module, **extra: Any) -> None:
    """Put ``quantized`` in place of layer ``name`` (and of the tied layers sharing it), with its report row; the
    SQNR is measured against the ``original`` float weight."""
    scheme = plan.scheme(name)
    leader = target.get_submodule(name)
    note = move_hooks(name, leader, quantized, "quantized")
    if note is not None:
        plan.notes.append(note)
    set_module_everywhere(target, name, quantized)  # a layer registered under several names stays one layer
    plan.recorded[name] = scheme.to_dict()
    for follower in [f for f, leader in plan.shared.items() if leader == name]:
        before = target.get_submodule(follower)
        tied = empty_like(before, scheme)
        _keep_bias(before, tied, leader, quantized)
        if (note := move_hooks(follower, before, tied, "quantized")) is not None:
            plan.notes.append(note)
        set_module(target, follower, tied)
        share(target, follower, quantized)
        plan.recorded[follower] = scheme.to_dict()
    plan.rows.append(
        {
            "name": name,
            "scheme": scheme.scheme,
            "bits": scheme.stored_bits,
            "weights": original.numel(),
            "sqnr_db": round(layer_sqnr(original, quantized), 2),
            "dense_bytes": (original.numel() + _bias_count(quantized)) * 4,  # the bias too, as stored_bytes counts it
            "stored_bytes": quantized.stored_bytes(),
            "runs_on": _runs_on(quantized),
            **extra,
        }
    )


@torch.no_grad()
def layer_sqnr(original: torch.Tensor, quantized: nn.Module) -> float:
    """SQNR of a quantized layer's weight (with its input scale) against the float weight, a slice of rows at a time."""
    signal, noise = 0.0, 0.0
    input_scale = getattr(quantized, "input_scale", None)
    rows = original.reshape(original.shape[0], -1)
    for start, decoded in quantized.quantized.row_chunks():
        decoded = decoded.reshape(decoded.shape[0], -1)
        decoded = decoded * input_scale if input_scale is not None else decoded
        reference = rows[start : start + decoded.shape[0]].float()
        signal += float(reference.double().pow(2).sum())
        noise += float((reference - decoded).double().pow(2).sum())
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def finish(model: nn.Module, target: nn.Module, config: Any, plan: LayerPlan, notes: list[str] | None = None) -> Stage:
    """Record the quantized layers in ``target``'s spec (so a saved file rebuilds them) and the report stage."""
    previous = recorded_transform(target, TRANSFORM_KIND) or {"layers": {}}
    record = {"kind": TRANSFORM_KIND, "layers": {**previous["layers"], **plan.recorded}}
    if plan.shared or previous.get("shared"):
        record["shared"] = {**previous.get("shared", {}), **plan.shared}
    append_transform(target, record, replace_kind=True)
    rows = plan.rows
    weight_bytes = sum(r["stored_bytes"] for r in rows)
    metrics = {
        "parameters": count_parameters(model),
        "weight_bytes": weight_bytes,
        "dense_weight_bytes": sum(r["dense_bytes"] for r in rows),
        "compression": sum(r["dense_bytes"] for r in rows) / weight_bytes if weight_bytes else 1.0,
    }
    return Stage(
        name="quantize",
        kind="quantize",
        metrics=metrics,
        layers=rows,
        config=config.to_dict(),
        notes=(notes or [])
        + [f"{row['name']}: {row['scheme']} {row['bits']} bits, SQNR {row['sqnr_db']:.1f} dB, runs on {row['runs_on']}" for row in rows]
        + [f"{follower}: shares {leader}'s quantized weight (tied)" for follower, leader in plan.shared.items()]
        + plan.notes,
        execution=_execution(rows),
    )


def quantize_weights(model: nn.Module, config: WeightOnlyConfig | dict, inplace: bool = False) -> Result:
    """Replace the selected layers by weight-only quantized modules (round to nearest); report SQNR and stored bytes
    per layer."""
    config = WeightOnlyConfig.coerce(config, where="quantize")
    target = model if inplace else copy_model(model)
    plan = plan_layers(target, config)
    for name, module in plan.modules:
        replace_layer(target, plan, name, float_weight(module), quantize_module(module, plan.scheme(name), name))
    return Result(model=target, report=Report.for_model(model, [finish(model, target, config, plan)]))


def _runs_on(module: nn.Module) -> str:
    """What runs a quantized layer: its integer kernel, or decoding."""
    if isinstance(module, QuantizedEmbedding):
        return "row decoding"
    with torch.no_grad():
        kernel = module.quantized.kernel() if isinstance(module, QuantizedLinear) else None
    return kernel.name if kernel is not None else "decoding to float32"


def _execution(rows: list[dict[str, Any]]) -> str:
    kernels = sorted({row["runs_on"] for row in rows if not row["runs_on"].startswith(("decoding", "row decoding"))})
    count = sum(1 for row in rows if row["runs_on"] in kernels)
    if count == 0:
        return "weights stored quantized, dequantized in eager forward"
    rest = ", the rest dequantized in eager forward" if count < len(rows) else ""
    return f"{count} of {len(rows)} layers on integer CPU kernels ({'; '.join(kernels)}){rest}"


__all__ = [
    "QUANTIZABLE",
    "TRANSFORM_KIND",
    "LayerPlan",
    "WeightOnlyConfig",
    "apply_structure",
    "finish",
    "float_weight",
    "plan_layers",
    "quantize_weights",
    "replace_layer",
    "set_module",
    "uncovered_note",
    "uncovered_weights",
]
