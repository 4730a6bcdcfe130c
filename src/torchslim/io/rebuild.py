"""How a model rebuilt from a file's spec compares with the model saved, beyond its tensors: the layer classes, the
functions stored on its modules (with the simple values they close over) and the plain attributes (a head count, or
state such as a counter). ``io.modelfile.file_spec`` checks a spec whose constructor defaults were assumed with it."""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from torchslim.core.spec import SPEC_ATTRIBUTE


def structure_differences(rebuilt: nn.Module, model: nn.Module) -> tuple[list[str], list[str]]:
    """How two models differ beyond their tensors, as "where is ... rebuilt, ... in the model": (layer classes and
    stored functions with the simple values they close over, which change what the model computes; plain attributes
    such as a head count, which may, or may be state such as a counter)."""
    mine, theirs = dict(rebuilt.named_modules()), dict(model.named_modules())
    layers: list[str] = []
    plain: list[str] = []
    for name, module in theirs.items():
        if "parametrizations" in name.split("."):  # torch's reparametrizations (pruning masks, weight_norm): not rebuilt
            continue
        other = mine.get(name)
        if other is None or type_name(other) != type_name(module):
            layers.append(f"{name or 'the model'} is {type_name(other) if other is not None else 'missing'} rebuilt, {type_name(module)} in the model")
            continue
        for key, value in vars(module).items():
            if key.startswith("_") or key in ("training", SPEC_ATTRIBUTE):
                continue
            left, right = _plain(getattr(other, key, None)), _plain(value)
            if right is not None and left != right:
                found = layers if callable(value) else plain
                found.append(f"{f'{name}.' if name else ''}{key} is {left} rebuilt, {right} in the model")
    return layers, plain


def _plain(value: Any) -> Any:
    """A comparable summary of an attribute: simple values as they are, a function by its name and the simple
    values it closes over or defaults to; None for what is not compared (tensors, modules, other objects)."""
    if isinstance(value, (bool, int, float, str)) or (isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value)):
        return repr(value)
    if isinstance(value, types.FunctionType):
        captured = [cell.cell_contents for cell in value.__closure__ or () if _filled(cell)] + list(value.__defaults__ or ())
        return f"{value.__qualname__}({', '.join(repr(v) for v in captured if isinstance(v, (bool, int, float, str)))})"
    return None


def _filled(cell: Any) -> bool:
    try:
        _ = cell.cell_contents
    except ValueError:
        return False
    return True


def type_name(module: nn.Module) -> str:
    from torch.nn.utils.parametrize import type_before_parametrizations

    return type_before_parametrizations(module).__qualname__
