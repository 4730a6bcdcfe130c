"""Activation substitution: smooth activations (GELU, SiLU, Mish, ELU, Tanh, Sigmoid, ...) replaced by ReLU or by
their piecewise-linear "hard" variants, which engines run faster and quantize better.

``to: relu`` replaces the unbounded ones (GELU, SiLU / Swish, Mish, ELU, LeakyReLU, ReLU6, Hardswish) by ReLU and
leaves bounded gates (Sigmoid, Tanh) alone, since a gate needs its range; ``to: hard`` replaces SiLU / Swish, GELU
and Mish by Hardswish, Sigmoid by Hardsigmoid and Tanh by Hardtanh. Only activation *modules* can be replaced;
activations called as functions in a model's ``forward`` (``F.gelu(x)``) are counted on an example forward and
named in the report, since no module swap reaches them. Hugging Face activation classes (``GELUActivation``, ...)
count as their kind. The model's spec records each replacement, so saved files load back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2), nn.Sigmoid())
    >>> result = substitute_activations(model, {"to": "relu"}, example_input=torch.zeros(1, 4))
    >>> [type(m).__name__ for m in result.model]
    ['Linear', 'ReLU', 'Linear', 'Sigmoid']
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from typing_extensions import Unpack

from torchslim.compression.common import Transforming, TransformOptions
from torchslim.core.config import Config, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import LayerSelector, matches, move_hooks, set_module, set_module_everywhere
from torchslim.core.spec import append_transform, recorded_layers, register_transform
from torchslim.measure.latency import compare_latency
from torchslim.tasks.batches import call_model

TRANSFORM_KIND = "activations"

# activation class names (torch and Hugging Face) -> their kind
KINDS = {
    "GELU": "gelu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu",
    "FastGELUActivation": "gelu",
    "QuickGELUActivation": "gelu",
    "GELUTanh": "gelu",
    "PytorchGELUTanh": "gelu",
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "Mish": "mish",
    "MishActivation": "mish",
    "ELU": "elu",
    "LeakyReLU": "leaky_relu",
    "ReLU6": "relu6",
    "Hardswish": "hardswish",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
}
# what each target puts in place of each kind (kinds not listed are left)
TARGETS: dict[str, dict[str, type[nn.Module]]] = {
    "relu": {kind: nn.ReLU for kind in ("gelu", "silu", "mish", "elu", "leaky_relu", "relu6", "hardswish")},
    "hard": {"gelu": nn.Hardswish, "silu": nn.Hardswish, "mish": nn.Hardswish, "sigmoid": nn.Hardsigmoid, "tanh": nn.Hardtanh},
}
FUNCTIONS = {
    F.gelu: "gelu",
    F.silu: "silu",
    F.mish: "mish",
    F.elu: "elu",
    F.leaky_relu: "leaky_relu",
    F.relu6: "relu6",
    torch.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",  # x.sigmoid(), F.sigmoid
    torch.tanh: "tanh",
    torch.Tensor.tanh: "tanh",  # x.tanh(), F.tanh
    F.hardswish: "hardswish",
}
# the fused inference path of torch's TransformerEncoderLayer reads this flag, not its activation module: 1 ReLU, 2 GELU,
# 0 neither (the module is called)
FAST_PATH_FLAGS = {"ReLU": 1, "GELU": 2}
# Hugging Face config fields naming the activation, and the names its activation table knows the replacements by
CONFIG_FIELDS = ("hidden_act", "hidden_activation", "activation_function", "activation", "feat_extract_activation", "projection_hidden_act")
CONFIG_NAMES = {"ReLU": "relu", "Hardswish": "hardswish", "GELU": "gelu", "SiLU": "silu"}
REPLACEMENTS = {cls.__name__: cls for targets in TARGETS.values() for cls in targets.values()} | {"ReLU": nn.ReLU}


@dataclasses.dataclass(frozen=True)
class ActivationConfig(Config):
    """``to``: "relu" or "hard" (see the module's documentation); ``kinds``: which kinds to replace (default: every
    kind the target has a replacement for); ``layers``: which activation modules (by name pattern)."""

    to: str = "relu"
    kinds: tuple[str, ...] = ()
    layers: LayerSelector = LayerSelector()

    def validate(self) -> None:
        check(self.to in TARGETS, f"to must be one of {', '.join(TARGETS)}, got {self.to!r}")
        known = sorted(set(KINDS.values()))
        for kind in self.kinds:
            check(kind in known, f"kinds: unknown activation kind {kind!r}; known: {', '.join(known)}")


class _CountCalls(TorchFunctionMode):
    """Counts activation functions called outside activation modules during a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = 0
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = FUNCTIONS.get(func)
        if kind is not None and self.inside == 0:
            self.calls[kind] = self.calls.get(kind, 0) + 1
        return func(*args, **(kwargs or {}))


def functional_activations(model: nn.Module, example_input: Any) -> dict[str, int]:
    """{kind: calls} of activation functions a forward of ``model`` calls outside activation modules."""
    counter = _CountCalls()
    handles = []
    for module in model.modules():
        if type(module).__name__ in KINDS or type(module).__name__ in REPLACEMENTS:
            handles.append(module.register_forward_pre_hook(lambda *_: setattr(counter, "inside", counter.inside + 1)))
            handles.append(module.register_forward_hook(lambda *_: setattr(counter, "inside", counter.inside - 1)))
    try:
        with torch.no_grad(), counter:
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return counter.calls


def _replacement(module: nn.Module, config: ActivationConfig) -> nn.Module | None:
    kind = KINDS.get(type(module).__name__)
    if kind is None or (config.kinds and kind not in config.kinds):
        return None
    target = TARGETS[config.to].get(kind)
    if target is None or isinstance(module, target):
        return None
    return target(inplace=getattr(module, "inplace", False)) if target in (nn.ReLU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh) else target()


def substitute_activations(model: nn.Module, config: ActivationConfig | dict, threads: int | None = 2, **options: Unpack[TransformOptions]) -> Result:
    """Replace the selected activation modules of a copy of ``model``, then fine-tune when ``finetune`` is given;
    ``options`` are ``TransformOptions`` (data, example_input, task, finetune, inplace, progress). The report lists
    each replacement, the activations left (bounded gates under ``to: relu``, functional calls), the task's metrics
    before, after replacing and after fine-tuning (with ``data``), and eager batch-1 latency before and after,
    measured side by side with ``threads``."""
    config = ActivationConfig.coerce(config, where="substitute_activations")
    run = Transforming.start("substitute_activations", model, options)
    target, example = run.target, run.example
    original = copy_model(model) if target is model else model
    metrics: dict[str, Any] = run.evaluate("_before")
    selector = LayerSelector.coerce(config.layers)
    named = [(name, module) for name, module in target.named_modules() if name]
    for pattern in selector.include + selector.exclude:
        if not any(matches(pattern, name, module) for name, module in named):
            raise TorchslimError(f"substitute_activations: layer pattern {pattern!r} matches no module; modules: {', '.join(n for n, _ in named[:30])}")
    # a pattern naming a block selects (or leaves out) the activations inside it as well
    included = {name for name, module in named if any(matches(p, name, module) for p in selector.include)}
    excluded = {name for name, module in named if any(matches(p, name, module) for p in selector.exclude)}

    def within(name: str, names: set[str]) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:end]) in names for end in range(1, len(parts) + 1))

    rows, record, notes = [], {}, []
    for name, module in list(target.named_modules()):
        if not name or not within(name, included) or within(name, excluded):
            continue
        new = _replacement(module, config)
        if new is None:
            kind = KINDS.get(type(module).__name__)
            if kind is not None and kind not in TARGETS[config.to] and (not config.kinds or kind in config.kinds):
                why = (
                    "a bounded gate; to: hard replaces it by its hard variant" if config.to == "relu" else "to: hard has no variant of it; to: relu replaces it"
                )
                notes.append(f"{name}: {type(module).__name__} left ({why})")
            continue
        if (note := move_hooks(name, module, new, "substituted")) is not None:
            notes.append(note)
        for other in set_module_everywhere(target, name, new):  # one activation object under several names: every name
            rows.append({"name": other, "before": type(module).__name__, "after": type(new).__name__})
            record[other] = type(new).__name__
    calls = functional_activations(target, example) if example is not None else {}
    if not rows and not notes and selector.include != ("*",):
        chosen = [f"{n} is {type(m).__name__}" for n, m in named if n in included][:4]
        kinds = f" of kinds {list(config.kinds)}" if config.kinds else ""
        raise TorchslimError(
            f"substitute_activations: layers {list(selector.include)} select no activation module{kinds} that to={config.to!r} replaces "
            f"({', '.join(chosen) or 'nothing'}); name the activation modules or the blocks holding them (activations called as "
            "functions in forward cannot be replaced)"
        )
    if not rows and not notes and not calls:
        raise TorchslimError(f"substitute_activations: the model has no activation module to replace with to={config.to!r} (kinds: {', '.join(sorted(KINDS))})")
    if record:
        append_transform(target, {"kind": TRANSFORM_KIND, "layers": record})
        notes += _sync_fast_paths(target) + _sync_config(target, rows)
    for kind, count in sorted(calls.items()):
        notes.append(f"{count} call(s) of {kind} as a function in forward code: not replaced (only activation modules can be)")
    metrics["replaced"] = len(rows)
    metrics.update(run.evaluate("_substituted"))
    notes += run.finetune()
    metrics.update(run.evaluate())
    if example is not None and rows:
        latency = compare_latency({"before": original, "after": target}, example, batch_sizes=(1,), rounds=5, runs=20, threads=threads)
        metrics.update(latency_before_ms=latency["before"][1], latency_ms=latency["after"][1], speedup=latency["before"][1] / latency["after"][1])
    stage = Stage(name="activations", kind="activations", metrics=metrics, layers=rows, notes=notes, config=config.to_dict(), execution="eager")
    return Result(model=target, report=Report.for_model(model, [stage]))


def _sync_fast_paths(model: nn.Module) -> list[str]:
    """Point the fused inference path of each ``nn.TransformerEncoderLayer`` at its activation as it now is (left at
    GELU, inference would still run GELU while training ran the replacement)."""
    notes = []
    for name, layer in model.named_modules():
        if isinstance(layer, nn.TransformerEncoderLayer) and isinstance(layer.activation, nn.Module):
            flag = FAST_PATH_FLAGS.get(type(layer.activation).__name__, 0)
            if layer.activation_relu_or_gelu != flag:
                layer.activation_relu_or_gelu = flag
                notes.append(f"{name}: its fused inference path set to {type(layer.activation).__name__}" if flag else f"{name}: fused inference path off")
    return notes


def _activation_classes(model: nn.Module) -> dict[str, str]:
    """The class of every parameterless leaf module (activations, dropouts, ...), by name."""
    return {
        name: type(m).__name__
        for name, m in model.named_modules()
        if not any(True for _ in m.children()) and not any(True for _ in m.parameters(recurse=False))
    }


def _differences(model: nn.Module, config: Any) -> list[str] | None:
    """The modules whose class a model built from ``config`` (on the meta device) would not have as ``model`` has it
    now; None where the class cannot be built from a config alone."""
    if not type(model).__module__.startswith("transformers."):
        return None
    try:
        with torch.device("meta"):
            rebuilt = _activation_classes(type(model)(config))
    except Exception:  # a class that takes more than its config: the fields are set as named, unchecked
        return None
    return [f"{name} ({kind} runs, {rebuilt[name]} from the config)" for name, kind in _activation_classes(model).items() if rebuilt.get(name, kind) != kind]


def _sync_config(model: nn.Module, rows: list[dict[str, str]]) -> list[str]:
    """A Hugging Face config's activation fields set to the replacement, so that ``save_pretrained`` reloads what runs:
    of the fields the config has (``hidden_act``, DistilBERT's ``activation``, Wav2Vec2's ``feat_extract_activation``,
    ...), the set whose model, built from the config on the meta device, has every activation module of the class
    that runs now (a field that also drives activations left alone is not set). Otherwise a note names the modules
    save_pretrained would reload another way."""
    config = getattr(model, "config", None)
    fields = [field for field in CONFIG_FIELDS if isinstance(getattr(config, field, None), str)]
    if not fields:
        return []
    after = {row["after"] for row in rows}
    name = CONFIG_NAMES.get(next(iter(after))) if len(after) == 1 else None
    if name is None:
        return [f"config.{field} still names {getattr(config, field)!r}: save_pretrained would reload it; ts.save keeps the replacements" for field in fields]
    best: tuple[int, list[str], list[str]] | None = None
    for chosen in itertools.chain.from_iterable(itertools.combinations(fields, size) for size in range(len(fields), 0, -1)):
        trial = copy.deepcopy(config)
        for field in chosen:
            setattr(trial, field, name)
        differ = _differences(model, trial)
        if differ is None:  # nothing to check against: every field set, as the replacement asks
            best = (0, list(chosen), [])
            break
        if best is None or len(differ) < best[0]:
            best = (len(differ), list(chosen), differ)
        if not differ:
            break
    assert best is not None
    for field in best[1]:
        setattr(config, field, name)
    notes = [f"config.{field} set to {name!r}" for field in best[1]]
    differ = best[2]
    if differ:
        shown = "; ".join(differ[:3]) + (f"; ... ({len(differ)} in all)" if len(differ) > 3 else "")
        notes.append(f"the config cannot name every activation as it runs: save_pretrained would reload {shown}; ts.save keeps the replacements")
    return notes


@register_transform(TRANSFORM_KIND)
def apply_activations(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Put back the activation replacements a saved file lists."""
    for name, _, class_name in recorded_layers(model, transform, "replaces the activation of"):
        if class_name not in REPLACEMENTS:
            raise TorchslimError(f"the file replaces {name!r} by {class_name!r}, which is not one of {', '.join(sorted(REPLACEMENTS))}")
        set_module(model, name, REPLACEMENTS[class_name]())
    _sync_fast_paths(model)
    return model


__all__ = ["ActivationConfig", "apply_activations", "functional_activations", "substitute_activations"]
