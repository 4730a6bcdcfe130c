r"""One layer selector for every technique: include/exclude by module name (glob, or ``re:`` regex) and by type,
and one form of per-layer overrides.

A layer pattern is a name glob (``fc*``, ``layer1.*.conv1``), a regular expression (``re:blocks\.\d+\.attn\..*``)
or a module type (``type:Conv2d``; subclasses match too). Every config that picks layers has a ``layers`` selector;
every config with per-layer settings has ``overrides``: a mapping from a layer pattern to that layer's value
(``{"fc3": 0.5}``, ``{"type:Conv2d": {"bits": 8}}``). The most specific pattern wins: an exact layer name over a
glob or regex, over a type. A name pattern that matches nothing is an error, never a silent skip (a ``type:``
override is a general rule, so a recipe can carry ``type:Conv2d`` to models without convolutions).

Example:
    >>> import torchslim as ts
    >>> model = ts.models.create("lenet-300-100")
    >>> [name for name, _ in select_modules(model, LayerSelector(include=("fc*",), exclude=("fc3",)))]
    ['fc1', 'fc2']
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn

from torchslim.core.config import Config
from torchslim.core.errors import TorchslimError

# Module types that hold a prunable / quantizable ``weight`` by default.
WEIGHT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Embedding", "Conv1D")


V = TypeVar("V")


def _type_names(module: nn.Module) -> set[str]:
    names = {klass.__name__ for klass in type(module).__mro__}
    return names | {module_type_name(module)}


def matches(pattern: str, name: str, module: nn.Module | None = None) -> bool:
    """Whether a layer pattern (name glob, ``re:`` regex or ``type:Class``) picks the module called ``name``."""
    if pattern.startswith("type:"):
        return module is not None and pattern[5:] in _type_names(module)
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def specificity(pattern: str) -> int:
    """3 for an exact layer name, 2 for a glob or regex, 1 for a type."""
    if pattern.startswith("type:"):
        return 1
    if pattern.startswith("re:") or any(ch in pattern for ch in "*?["):
        return 2
    return 3


def distinct_weights(modules: list[tuple[str, nn.Module]]) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The layers of ``modules`` whose weight no earlier one holds (``self.b.weight = self.a.weight``, ``self.b =
    self.a``), and {each other name: the earlier layer that holds its weight}."""
    kept: list[tuple[str, nn.Module]] = []
    owners: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, module in modules:
        weight = getattr(module, "weight", None)
        key = id(weight) if isinstance(weight, torch.Tensor) else id(module)
        if key in owners:
            aliases[name] = owners[key]
        else:
            owners[key] = name
            kept.append((name, module))
    return kept, aliases


def resolve_overrides(modules: list[tuple[str, nn.Module]], overrides: Mapping[str, V], where: str, aliases: Mapping[str, str] | None = None) -> dict[str, V]:
    """{layer name: value} for every module an override pattern picks, the most specific pattern winning. A pattern
    that names a layer of ``aliases`` (another name of a layer in ``modules``: a tied weight) picks that layer.

    Errors: a name pattern that picks none of ``modules`` (a ``type:`` pattern is a general rule and may pick none);
    two equally specific patterns giving one layer different values.

    Example:
        >>> layers = [("fc1", nn.Linear(2, 2)), ("fc2", nn.Linear(2, 2)), ("conv", nn.Conv2d(1, 1, 1))]
        >>> resolve_overrides(layers, {"type:Linear": 0.5, "fc2": 0.9}, "overrides")
        {'fc1': 0.5, 'fc2': 0.9}
    """
    chosen: dict[str, tuple[int, str, V]] = {}
    for pattern, value in overrides.items():
        picked = [(name, module) for name, module in modules if matches(pattern, name, module)]
        held = dict(modules)
        picked += [(leader, held[leader]) for alias, leader in (aliases or {}).items() if leader in held and matches(pattern, alias, held[leader])]
        picked = list(dict(picked).items())  # a layer picked by its own name and by another counts once
        if not picked and pattern.startswith("type:"):
            continue  # a type rule is general (a recipe may meet models without that type); names must match
        if not picked:
            listed = ", ".join(name for name, _ in modules[:30])
            raise TorchslimError(f"{where}: layer pattern {pattern!r} picks none of the selected layers ({listed})")
        rank = specificity(pattern)
        for name, _ in picked:
            previous = chosen.get(name)
            if previous is not None and previous[0] == rank and previous[2] != value:
                others = [alias for alias, leader in (aliases or {}).items() if leader == name]
                tie = f" ({', '.join(others)} holds the same weight: one layer, one value)" if others else ""
                raise TorchslimError(
                    f"{where}: layer {name!r} is picked by both {previous[1]!r} and {pattern!r} with different values{tie}; name it exactly to say which wins"
                )
            if previous is None or rank > previous[0]:
                chosen[name] = (rank, pattern, value)
    return {name: chosen[name][2] for name, _ in modules if name in chosen}


@dataclasses.dataclass(frozen=True)
class LayerSelector(Config):
    """Which modules a technique touches.

    ``include`` / ``exclude``: layer patterns (``fc*``, ``layer1.*.conv1``, ``re:blocks\\.\\d+\\.attn\\..*``,
    ``type:Conv2d``). ``types``: module class names the technique may touch (subclasses match too); empty means the
    technique's defaults.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    types: tuple[str, ...] = ()


def select_modules(
    model: nn.Module,
    selector: LayerSelector | dict | None = None,
    default_types: tuple[str, ...] = WEIGHT_TYPES,
    require_weight: bool = True,
) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs the selector picks, in model order.

    Errors: an include/exclude pattern or type that matches no module; a module named explicitly by ``include``
    that has no ``weight``; an empty selection.
    """
    selector = LayerSelector.coerce(selector)
    types = selector.types or default_types
    named = [(name, module) for name, module in model.named_modules() if name]
    aliases: dict[int, list[str]] = {}  # a module registered under several names (self.enc = self.dec = shared): all of them
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            aliases.setdefault(id(module), []).append(name)

    def picked(pattern: str, module: nn.Module) -> bool:
        return any(matches(pattern, alias, module) for alias in aliases.get(id(module), []))

    if not named:
        raise TorchslimError(
            f"the model is a single {type(model).__name__} with no submodules: wrap it (nn.Sequential(layer)) so that its layer can be selected and replaced"
        )
    for pattern in selector.include + selector.exclude:
        if not any(picked(pattern, module) for _, module in named):
            raise TorchslimError(f"layer pattern {pattern!r} matches no module; modules: {', '.join(n for n, _ in named[:30])}")
    all_types = set().union(*(_type_names(m) for _, m in named)) if named else set()
    for type_name in selector.types:
        if type_name not in all_types:
            raise TorchslimError(
                f"layer type {type_name!r} matches no module; types present: {', '.join(sorted(all_types & set(WEIGHT_TYPES)) or sorted(all_types)[:20])}"
            )
    chosen = []
    for name, module in named:
        if not any(picked(p, module) for p in selector.include) or any(picked(p, module) for p in selector.exclude):
            continue
        explicit = selector.include != ("*",) and all(specificity(p) == 3 for p in selector.include)
        by_type = next((p for p in selector.include if p.startswith("type:") and picked(p, module)), None)
        if not (_type_names(module) & set(types)):
            if explicit or by_type:  # asked for by its name or its type: never dropped without a word
                asked = f", picked by {by_type!r}" if by_type else ""
                raise TorchslimError(
                    f"layer {name!r} ({type(module).__name__}{asked}) is not one of the selectable types {', '.join(types)} "
                    "(layers.types names others where the technique takes them)"
                )
            continue
        if require_weight and not isinstance(getattr(module, "weight", None), nn.Parameter) and not _parametrized(module):
            raise TorchslimError(f"layer {name!r} ({type(module).__name__}) has no weight to work on")
        chosen.append((name, module))
    if not chosen:
        raise TorchslimError(f"the layer selection (include={list(selector.include)}, exclude={list(selector.exclude)}, types={list(types)}) selects no module")
    return chosen


def _parametrized(module: nn.Module) -> bool:
    parametrizations = getattr(module, "parametrizations", None)
    return parametrizations is not None and "weight" in parametrizations


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace the submodule called ``name`` (``a.b.c``; an index inside a ModuleList) by ``module``; returns the one
    it replaced. A model without a spec gets its inferred one first (``core.spec.pin_spec``)."""
    from torchslim.core.spec import pin_spec

    pin_spec(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    previous = parent.get_submodule(child)
    if isinstance(parent, nn.ModuleList):
        parent[int(child)] = module
    else:
        setattr(parent, child, module)
    if module is not previous:
        carry_frozen(previous, module)
    return previous


def carry_frozen(original: nn.Module, replacement: nn.Module) -> None:
    """A frozen layer's replacement stays frozen: where the original layer's weight (or every parameter) has
    ``requires_grad=False``, so have the replacement's parameters (its factors, codebook, scales), the bias after the
    original's bias."""
    if any(True for child in original.children() for _ in child.parameters()):
        return  # a container (a stack of layers): its layers keep their own flags, whatever replaces it
    own = dict(original.named_parameters())
    frozen = {name for name, parameter in own.items() if not parameter.requires_grad}
    if not frozen:
        return
    every = frozen == set(own)
    weight_frozen = every or any(not name.endswith("bias") for name in frozen)
    bias_frozen = every or any(name.endswith("bias") for name in frozen)
    for name, parameter in replacement.named_parameters():
        if bias_frozen if name.endswith("bias") else weight_frozen:
            parameter.requires_grad_(False)


def set_module_everywhere(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """``set_module`` under ``name`` and under every other name the same module object is registered as
    (``self.enc = self.dec = shared``), so the layer stays one shared layer; returns the names replaced."""
    old = model.get_submodule(name)
    names = [other for other, child in model.named_modules(remove_duplicate=False) if child is old and other]
    for other in names:
        set_module(model, other, module)
    return names


HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def move_hooks(name: str, original: nn.Module, replacement: nn.Module, how: str) -> str | None:
    """Hand the hooks registered on a layer being replaced (forward, pre-forward and backward) to its
    ``replacement``: a feature-capture hook keeps capturing the quantized or factorized layer's output. The hook
    dictionaries themselves move, so the handles the user holds still remove them. A note when there were any."""
    count = len(original._forward_hooks) + len(original._forward_pre_hooks) + len(original._backward_hooks) + len(original._backward_pre_hooks)
    if not count or replacement is original:
        return None
    if original._backward_hooks:
        replacement._is_full_backward_hook = original._is_full_backward_hook
    for attribute in HOOK_DICTS:
        hooks = getattr(original, attribute, None)
        if hooks is None:
            continue
        hooks.update(getattr(replacement, attribute, {}))  # the replacement's own hooks (rarely any) after the user's
        object.__setattr__(replacement, attribute, hooks)
        object.__setattr__(original, attribute, type(hooks)())
    return f"{name}: its {count} hook(s) moved to the {how} layer (they see its input and output, which match the original's)"


def weight_of(module: nn.Module) -> torch.Tensor:
    """A module's ``weight`` as a tensor (as the forward pass computes it)."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__}.weight is not a tensor"
    return weight


def is_conv1d(module: object) -> bool:
    """GPT-2's Conv1D (a Linear whose weight is stored (in, out)), parametrized (masked) or not."""
    return isinstance(module, nn.Module) and module_type_name(module) == "Conv1D"


def module_type_name(module: nn.Module) -> str:
    """The module's class name, looking through parametrization wrappers (ParametrizedLinear -> Linear)."""
    klass = type(module)
    if klass.__name__.startswith("Parametrized") and len(klass.__mro__) > 1:
        klass = klass.__mro__[1]
    return klass.__name__
