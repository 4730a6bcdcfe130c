"""Architecture specs: how a model is rebuilt from a file, and the structural transforms recorded on top of it.

A spec is a JSON mapping: ``{"name": "lenet-5", "kwargs": {...}}`` (a registered model), ``{"factory":
"package.module:callable", "kwargs": {...}}`` (an import path: a user's own class, its constructor arguments
recovered from the model's attributes where they can be), or ``{"huggingface": "BertModel", "config": {...}}`` (a
Hugging Face transformers class and its config), plus ``"transforms"``: the structural changes compression made,
in order (channels removed, layers replaced by quantized ones). A technique that changes a model's
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
import inspect
import json
from collections.abc import Callable
from typing import Any

import torch
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


SOURCES = ("name", "factory", "huggingface")


def class_path(klass: type) -> str | None:
    """``package.module:Class`` of a class that can be imported again (not one defined in a function or __main__)."""
    if "<locals>" in klass.__qualname__ or klass.__module__ in ("__main__", "builtins"):
        return None
    return f"{klass.__module__}:{klass.__qualname__}"


def _as_json(value: Any) -> Any:
    """``value`` as JSON gives it back: tuples become lists (a dict's keys stay as they are, to be compared)."""
    if isinstance(value, (tuple, list)):
        return [_as_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return value


def _json_value(value: Any) -> bool:
    """Whether JSON writes ``value`` and reads it back the same (a dict keyed by integers comes back keyed by strings,
    which would build another model, or none)."""
    try:
        return bool(json.loads(json.dumps(value)) == _as_json(value))
    except (TypeError, ValueError):
        return False


def same_value(value: Any, other: Any) -> bool:
    """``value == other``, False where the comparison raises or is no bool (a tensor of several elements)."""
    try:
        return bool(value == other)
    except Exception:  # an object whose == raises or is not a bool (a tensor of several elements)
        return False


SEQUENTIAL = "torchslim.io.modelfile:sequential"  # the builder of a plain nn.Sequential from its layers' specs


def factories(spec: dict[str, Any]) -> list[str]:
    """Every import path a spec builds from: its own factory and, for a sequential spec, its layers' (recursively)."""
    found = [spec["factory"]] if isinstance(spec.get("factory"), str) else []
    if spec.get("factory") == SEQUENTIAL:
        for entry in spec.get("kwargs", {}).get("layers", []):
            if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict):
                found += factories(entry[1])
    return found


def _sequential_spec(model: nn.Sequential) -> dict[str, Any]:
    """An inferred spec of a plain ``nn.Sequential``: each layer's own spec (inferred where it carries none), in order."""
    layers, missing, assumed = [], [], []
    for name, child in model.named_children():
        spec = spec_of(child)
        if spec.get("unimportable"):
            missing.append(f"layer {name} ({spec.get('factory')} cannot be imported again)")
        missing += [f"layer {name}'s {argument}" for argument in spec.get("missing", [])]
        assumed += [f"{name}.{argument}" for argument in spec.get("assumed", [])]
        layers.append([name, {key: value for key, value in spec.items() if key not in INFERENCE_KEYS}])
    result: dict[str, Any] = {"factory": SEQUENTIAL, "kwargs": {"layers": layers}, "inferred": True}
    if missing:
        result["missing"] = missing
    if assumed:
        result["assumed"] = assumed
    return result


INFERENCE_KEYS = ("inferred", "missing", "unimportable", "assumed", "unwritable", "held")  # what inference notes in a spec, not written to files


def inferred_spec(model: nn.Module) -> dict[str, Any]:
    """How to rebuild a model that carries no spec: a Hugging Face class with its config, a plain ``nn.Sequential``
    from its layers' specs, or the model's own class with the constructor arguments its attributes of the same names
    hold. Arguments that cannot be recovered are listed under ``missing`` (``check_spec`` then asks for them)."""
    from torch.nn.utils.parametrize import type_before_parametrizations

    klass: type[nn.Module] = type_before_parametrizations(model)  # a pruned layer's class, not torch's parametrized subclass of it
    if klass is nn.Sequential and isinstance(model, nn.Sequential):
        return _sequential_spec(model)
    config = getattr(model, "config", None)
    if klass.__module__.startswith("transformers.") and callable(getattr(config, "to_dict", None)):
        return {"huggingface": klass.__name__, "config": json.loads(json.dumps(config.to_dict(), default=str)), "kwargs": {}}
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    assumed: list[str] = []  # arguments with defaults the model keeps no attribute of: the default is assumed (and checked)
    unwritable: list[str] = []  # arguments without a default the model holds as values JSON cannot write
    held: list[str] = []  # arguments with a default the model holds as values JSON cannot write: the default, compared
    # torch's recurrent layers take *args, **kwargs: their arguments are those of RNNBase (less the mode their class sets)
    init = nn.RNNBase.__init__ if issubclass(klass, nn.RNNBase) and klass is not nn.RNNBase else klass.__init__
    for name, parameter in list(inspect.signature(init).parameters.items())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or (init is nn.RNNBase.__init__ and name == "mode"):
            continue
        value = getattr(model, name, inspect.Parameter.empty)
        if value is not inspect.Parameter.empty and _json_value(value):
            if parameter.default is inspect.Parameter.empty or value != parameter.default:
                kwargs[name] = value
        elif value is not inspect.Parameter.empty and not isinstance(value, (nn.Module, torch.Tensor)) and not klass.__module__.startswith("torch."):
            # held, but JSON cannot write it (a config dataclass, a dict keyed by integers): its default, where the model
            # the default builds holds the same value (``io.modelfile.file_spec`` compares them), else refused
            if parameter.default is inspect.Parameter.empty:
                unwritable.append(f"{name} ({type(value).__name__})")
            else:
                held.append(name)
        elif parameter.default is inspect.Parameter.empty:
            missing.append(name)
        elif not klass.__module__.startswith("torch."):  # torch's layers keep what shapes their tensors as attributes
            assumed.append(name)
    if isinstance(getattr(model, "nonlinearity", None), str) and klass is nn.RNN:
        kwargs["nonlinearity"] = model.nonlinearity
    path = class_path(klass)
    spec: dict[str, Any] = {"factory": path or f"{klass.__module__}:{klass.__qualname__}", "kwargs": kwargs, "inferred": True}
    if path is None:
        spec["unimportable"] = True
    if missing:
        spec["missing"] = missing
    if assumed:
        spec["assumed"] = assumed
    if unwritable:
        spec["unwritable"] = unwritable
    if held:
        spec["held"] = held
    return spec


def spec_of(model: nn.Module) -> dict[str, Any]:
    """The spec a model carries, or the one ``inferred_spec`` finds."""
    return model_spec(model) or inferred_spec(model)


def sizing_spec(model: nn.Module) -> dict[str, Any]:
    """The spec a file of ``model`` would record, as a stand-in for measuring the file's size before the spec is
    checked (an inferred spec's notes on what it could not recover left out)."""
    return {key: value for key, value in spec_of(model).items() if key not in INFERENCE_KEYS}


def check_spec(spec: Any, where: str) -> dict[str, Any]:
    """``spec`` validated: exactly one of ``name`` / ``factory`` / ``huggingface``, JSON-serializable ``kwargs``, a
    list of transforms; an inferred spec that cannot rebuild the model says what to give instead."""
    if not isinstance(spec, dict) or sum(key in spec for key in SOURCES) != 1 or not all(isinstance(spec[k], str) for k in SOURCES if k in spec):
        raise TorchslimError(
            f"{where}: an architecture spec needs exactly one of 'name' (a registered model), 'factory' "
            f"(package.module:callable) or 'huggingface' (a transformers class and its config), as a string; got {str(spec)[:300]}"
        )
    if spec.get("unimportable"):
        raise TorchslimError(
            f"{where}: the model's class {spec['factory']} cannot be imported again (defined in a function or in "
            f"__main__); move it to a module, or save with factory='package.module:build' and its kwargs"
        )
    if spec.get("missing") and spec.get("factory") == SEQUENTIAL:
        raise TorchslimError(
            f"{where}: cannot tell how to rebuild this nn.Sequential: {', '.join(spec['missing'])} "
            "cannot be recovered from the layers; save a model of a class of your own that builds it, or with factory='package.module:build'"
        )
    if spec.get("missing"):
        raise TorchslimError(
            f"{where}: cannot tell how to rebuild {spec['factory']}: its constructor argument(s) "
            f"{', '.join(spec['missing'])} are not attributes of the model; save with "
            f"factory='{spec['factory']}' and kwargs={{...}}"
        )
    if spec.get("unwritable"):
        raise TorchslimError(
            f"{where}: cannot write how to rebuild {spec['factory']}: its constructor argument(s) {', '.join(spec['unwritable'])} are held as "
            "values JSON cannot write back as they are (a config dataclass; a dict keyed by integers comes back keyed by strings), and "
            "have no default; save with factory='package.module:build', a function of JSON arguments that builds the model, and those kwargs"
        )
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise TorchslimError(f"{where}: the spec's 'kwargs' must be a mapping, got {kwargs!r}")
    try:
        json.dumps(kwargs)
    except TypeError as error:
        raise TorchslimError(f"{where}: the spec's kwargs are not JSON-serializable ({error})") from None
    changed = [key for key, value in kwargs.items() if not _json_value(value)]
    if changed:
        raise TorchslimError(f"{where}: the kwargs {', '.join(changed)} read back otherwise from JSON (a dict keyed by integers comes back keyed by strings)")
    transforms = spec.get("transforms", [])
    if not isinstance(transforms, list) or not all(isinstance(t, dict) and isinstance(t.get("kind"), str) for t in transforms):
        raise TorchslimError(f"{where}: the spec's 'transforms' must be a list of mappings with a 'kind'")
    return {**spec, "kwargs": kwargs}


def register_transform(kind: str) -> Callable[[Transform], Transform]:
    """Register how to re-apply a recorded transform of ``kind`` to a freshly built model (for loading files)."""
    return TRANSFORMS.register(kind)


def pin_spec(model: nn.Module) -> None:
    """Attach the inferred spec to a model that carries none, before its structure changes: a plain ``nn.Sequential``
    is inferred from its layers, which a transform is about to replace (a quantized layer has no constructor of its
    own). A transform recorded later then goes on top of the architecture as it was built."""
    if model_spec(model) is None:
        setattr(model, SPEC_ATTRIBUTE, inferred_spec(model))


def append_transform(model: nn.Module, transform: dict[str, Any], replace_kind: bool = False) -> None:
    """Record a structural change in the model's spec (a copy of it), so a saved file rebuilds the changed model;
    ``replace_kind`` drops an earlier transform of the same kind first. A model without a spec gets the inferred one
    first (how its class was built), so a user's own model keeps its history too."""
    spec = copy.deepcopy(spec_of(model))
    transforms = spec.get("transforms", [])
    if replace_kind:
        transforms = [t for t in transforms if t.get("kind") != transform["kind"]]
    spec["transforms"] = transforms + [transform]
    setattr(model, SPEC_ATTRIBUTE, spec)


def recorded_transform(model: nn.Module, kind: str) -> dict[str, Any] | None:
    """The last transform of ``kind`` the model's spec records, or None."""
    return next((t for t in reversed((model_spec(model) or {}).get("transforms", [])) if t.get("kind") == kind), None)


def recorded_module(model: nn.Module, name: str, action: str) -> nn.Module:
    """The submodule a recorded transform names, or an error saying the file ``action`` a layer the architecture lacks."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise TorchslimError(f"the file {action} layer {name!r}, which the architecture does not have") from None


def recorded_layers(model: nn.Module, transform: dict[str, Any], action: str) -> list[tuple[str, nn.Module, Any]]:
    """(name, module, entry) of every layer a transform's ``layers`` mapping names, each checked to exist."""
    layers = transform.get("layers")
    if not isinstance(layers, dict):
        raise TorchslimError(f"the file's {transform.get('kind')} record needs a 'layers' mapping")
    return [(str(name), recorded_module(model, str(name), action), entry) for name, entry in layers.items()]


def apply_transforms(model: nn.Module, transforms: list[dict[str, Any]], where: str) -> nn.Module:
    """Re-apply recorded transforms in order (each by the function registered for its kind)."""
    for transform in transforms:
        kind = str(transform.get("kind"))
        if kind not in TRANSFORMS:
            raise TorchslimError(f"{where}: unknown transform {kind!r} in the architecture spec; known: {', '.join(TRANSFORMS.names())}")
        try:
            model = TRANSFORMS.get(kind)(model, transform)
        except TorchslimError as error:
            if not str(error).startswith(where):
                error.args = (f"{where}: {error}",)
            raise
    return model


__all__ = [
    "SOURCES",
    "SPEC_ATTRIBUTE",
    "TRANSFORMS",
    "append_transform",
    "apply_transforms",
    "check_spec",
    "class_path",
    "inferred_spec",
    "model_spec",
    "recorded_layers",
    "recorded_transform",
    "register_transform",
    "same_value",
    "set_spec",
    "sizing_spec",
    "spec_of",
]
