"""One layer selector for every technique: include/exclude by module name (glob, or ``re:`` regex) and by type.

A pattern that matches nothing is an error, never a silent skip.

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

from torch import nn

from torchslim.core.config import Config
from torchslim.core.errors import TorchslimError

# Module types that hold a prunable / quantizable ``weight`` by default.
WEIGHT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding")


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _type_names(module: nn.Module) -> set[str]:
    return {klass.__name__ for klass in type(module).__mro__}


@dataclasses.dataclass(frozen=True)
class LayerSelector(Config):
    """Which modules a technique touches.

    ``include`` / ``exclude``: module-name patterns (``fc*``, ``layer1.*.conv1``, or ``re:blocks\\.\\d+\\.attn\\..*``).
    ``types``: module class names (subclasses match too); empty means the technique's defaults.
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
    for pattern in selector.include + selector.exclude:
        if not any(_matches(pattern, name) for name, _ in named):
            raise TorchslimError(f"layer pattern {pattern!r} matches no module; modules: {', '.join(n for n, _ in named[:30])}")
    all_types = set().union(*(_type_names(m) for _, m in named)) if named else set()
    for type_name in selector.types:
        if type_name not in all_types:
            raise TorchslimError(f"layer type {type_name!r} matches no module; types present: {', '.join(sorted(all_types & set(WEIGHT_TYPES)) or sorted(all_types)[:20])}")
    chosen = []
    for name, module in named:
        if not any(_matches(p, name) for p in selector.include) or any(_matches(p, name) for p in selector.exclude):
            continue
        explicit = selector.include != ("*",) and not any(ch in p for p in selector.include for ch in "*?[") and not any(p.startswith("re:") for p in selector.include)
        if not (_type_names(module) & set(types)):
            if explicit:
                raise TorchslimError(f"layer {name!r} ({type(module).__name__}) is not one of the selectable types {', '.join(types)}")
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


def module_type_name(module: nn.Module) -> str:
    """The module's class name, looking through parametrization wrappers (ParametrizedLinear -> Linear)."""
    klass = type(module)
    if klass.__name__.startswith("Parametrized") and len(klass.__mro__) > 1:
        klass = klass.__mro__[1]
    return klass.__name__
