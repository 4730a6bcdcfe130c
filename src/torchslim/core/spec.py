"""Architecture specs: how a model is rebuilt from a file, and the structural transforms recorded on top of it.

A spec is a JSON mapping: ``{"name": "lenet-5", "kwargs": {...}}`` (a registered model) or ``{"factory":
"package.module:callable", "kwargs": {...}}`` (an import path), plus ``"transforms"``: the structural changes
compression made, in order (channels removed, layers replaced by quantized ones). A technique that changes a model's
structure registers, under its transform kind, how to re-apply a recorded transform to a freshly built model; the
model-file readers know no technique by name.

Example:
    >>> from torch import nn
    >>> model = nn.Linear(2, 2)
    >>> set_spec(model, {"name": "tiny", "kwargs": {}})
    >>> append_transform(model, {"kind": "example", "layers": {}})
    >>> [t["kind"] for t in model_spec(model)["transforms"]]
    ['example']
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry

SPEC_ATTRIBUTE = "torchslim_spec"

Transform = Callable[[nn.Module, dict[str, Any]], nn.Module]
TRANSFORMS: Registry[Transform] = Registry("transform kind")


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The architecture spec a model carries (set by ``torchslim.models.create``, a loader, or ``set_spec``)."""
    return getattr(model, SPEC_ATTRIBUTE, None)


def set_spec(model: nn.Module, spec: dict[str, Any] | None) -> None:
    """Attach ``spec`` to ``model`` (a copy, so later changes to either stay apart)."""
    setattr(model, SPEC_ATTRIBUTE, copy.deepcopy(spec))


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """``spec`` validated: exactly one of ``name`` / ``factory``, JSON-serializable ``kwargs``, a list of transforms."""
    if not isinstance(spec, dict) or ("name" in spec) == ("factory" in spec):
        raise TorchslimError(
            f"{where}: an architecture spec needs exactly one of 'name' (a registered model) or 'factory' (package.module:callable), got {spec!r}"
        )
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise TorchslimError(f"{where}: the spec's 'kwargs' must be a mapping, got {kwargs!r}")
    try:
        json.dumps(kwargs)
    except TypeError as error:
        raise TorchslimError(f"{where}: the spec's kwargs are not JSON-serializable ({error})") from None
    transforms = spec.get("transforms", [])
    if not isinstance(transforms, list) or not all(isinstance(t, dict) and isinstance(t.get("kind"), str) for t in transforms):
        raise TorchslimError(f"{where}: the spec's 'transforms' must be a list of mappings with a 'kind'")
    return {**spec, "kwargs": kwargs}


def register_transform(kind: str) -> Callable[[Transform], Transform]:
    """Register how to re-apply a recorded transform of ``kind`` to a freshly built model (for loading files)."""
    return TRANSFORMS.register(kind)


def append_transform(model: nn.Module, transform: dict[str, Any], replace_kind: bool = False) -> None:
    """Record a structural change in the model's spec (a copy of it), so a saved file rebuilds the changed model;
    ``replace_kind`` drops an earlier transform of the same kind first. A model without a spec is left alone."""
    spec = model_spec(model)
    if spec is None:
        return
    spec = copy.deepcopy(spec)
    transforms = spec.get("transforms", [])
    if replace_kind:
        transforms = [t for t in transforms if t.get("kind") != transform["kind"]]
    spec["transforms"] = transforms + [transform]
    setattr(model, SPEC_ATTRIBUTE, spec)


def recorded_transform(model: nn.Module, kind: str) -> dict[str, Any] | None:
    """The last transform of ``kind`` the model's spec records, or None."""
    return next((t for t in reversed((model_spec(model) or {}).get("transforms", [])) if t.get("kind") == kind), None)


def apply_transforms(model: nn.Module, transforms: list[dict[str, Any]], where: str) -> nn.Module:
    """Re-apply recorded transforms in order (each by the function registered for its kind)."""
    for transform in transforms:
        kind = str(transform.get("kind"))
        if kind not in TRANSFORMS:
            raise TorchslimError(f"{where}: unknown transform {kind!r} in the architecture spec; known: {', '.join(TRANSFORMS.names())}")
        model = TRANSFORMS.get(kind)(model, transform)
    return model


__all__ = [
    "SPEC_ATTRIBUTE",
    "TRANSFORMS",
    "append_transform",
    "apply_transforms",
    "check_spec",
    "model_spec",
    "recorded_transform",
    "register_transform",
    "set_spec",
]
