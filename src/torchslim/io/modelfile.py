"""Saving and loading models without pickle: safetensors weights plus a JSON architecture spec.

The spec names how to rebuild the module: a registry name with its arguments (``{"name": "lenet-5", "kwargs":
{}}``) or an import path ``package.module:callable`` with arguments (``{"factory": "mypkg.nets:Net", "kwargs":
{...}}``). It is stored in the safetensors header, with a SHA-256 of the tensor data, so one file holds both.
Import paths from a file run code, so loading one needs ``trust_factory=True``.

Example:
    >>> import torchslim as ts, tempfile, os
    >>> model = ts.models.create("lenet-300-100")
    >>> path = save_model(model, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
    >>> sum(p.numel() for p in load_model(path).parameters())
    266610
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import re
import sys
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from torchslim.core.checks import check_model, norm_hooks, remove_norm_hook
from torchslim.core.errors import ChecksumError, TorchslimError
from torchslim.core.files import ModelFormat, refuse_overwrite, register_format, write_atomic
from torchslim.core.memory import release_freed_memory
from torchslim.core.spec import SEQUENTIAL, apply_transforms, check_spec, factories, register_transform, same_value, set_spec, spec_of
from torchslim.core.ties import plain_name, retie, tied_groups
from torchslim.io.rebuild import structure_differences
from torchslim.measure.weights import effective_weights, hook_norm_weights

FORMAT = "torchslim-model"
VERSION = 1
SPEC_KEY = "torchslim.spec"
TIES_KEY = "torchslim.ties"
DIGEST_KEY = "torchslim.sha256"
Stored = TypeVar("Stored")


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Plain state dict (CPU, contiguous copies) with pruning parametrizations resolved to the weights they compute;
    a tied weight is kept once, under its leading name (``core.ties``)."""
    replaced = hook_norm_weights(model)[1]  # torch's hook-based weight_norm / spectral_norm: stored as the weight they compute
    state = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k and not k.startswith("parametrizations.") and k not in replaced}
    state.update(effective_weights(model))
    followers = {name for group in tied_groups(model) for name in group[1:]}
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items() if name not in followers}


def stored_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """{name: shape} of what ``state_for_saving`` would store, without copying any tensor (but for a parametrization
    of several originals, weight_norm's, whose weight is computed once for its shape)."""
    followers = {name for group in tied_groups(model) for name in group[1:]}
    layout = {}
    for name, tensor in model.state_dict().items():
        if ".parametrizations." in f".{name}":
            owner, _, rest = name.rpartition("parametrizations.")
            tensor_name, _, part = rest.partition(".")
            if part == "original":
                layout[plain_name(name)] = tuple(tensor.shape)
            elif part.startswith("original") and part != "original":  # original0, original1, ...: the weight they compute
                module = model.get_submodule(owner.rstrip("."))
                layout[owner + tensor_name] = tuple(getattr(module, tensor_name).shape)
            continue  # a mask: applied into the weight, not stored
        if plain_name(name) not in followers:
            layout[plain_name(name)] = tuple(tensor.shape)
    computed, replaced = hook_norm_weights(model)
    layout = {name: shape for name, shape in layout.items() if name not in replaced} | {name: tuple(tensor.shape) for name, tensor in computed.items()}
    return {name: shape for name, shape in layout.items() if name not in followers}


def with_ties(stored: dict[str, Stored], ties: Any, where: str) -> dict[str, Stored]:
    """What a file stores by name (tensors, or their shapes) with each tied follower filled in from its leader; the
    record is checked: a list of lists of names, each led by a name the file holds."""
    if not isinstance(ties, list) or not all(isinstance(group, list) and len(group) > 1 and all(isinstance(n, str) for n in group) for group in ties):
        raise TorchslimError(f"{where}: the recorded ties must be a list of lists of tensor names")
    filled = dict(stored)
    for group in ties:
        if group[0] not in stored:
            raise TorchslimError(f"{where}: the tie of {group[1:]} names {group[0]!r}, which the file does not hold")
        filled.update({name: stored[group[0]] for name in group[1:]})
    return filled


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def refuse_engine(model: nn.Module, where: str) -> None:
    """Refuse what holds no PyTorch weights to write, saying how it is kept: an ONNX Runtime engine (what
    quantize's onnxruntime, native-int8 and exported qat methods return) and a compiled PT2E int8 model."""
    from torchslim.export.onnx import OnnxModule
    from torchslim.quantization.pt2e import CompiledModule

    if isinstance(model, OnnxModule):
        raise TorchslimError(
            f"{where}: an ONNX Runtime engine is saved as its .onnx file: give a path ending in .onnx "
            "(ts.save(model, 'model.onnx')); it holds an int8 ONNX graph, not PyTorch weights for .safetensors or .tslim"
        )
    if isinstance(model, CompiledModule):
        raise TorchslimError(
            f"{where}: a PT2E int8 model runs a graph compiled in this process and holds no PyTorch weights to save; "
            "export it with ts.export(model, 'pt2', example_input) (a .pt2 file torch.export.load reads back)"
        )


def file_spec(model: nn.Module, where: str, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec a file records for ``model``: ``spec`` as given, else the model's own, or for a model that carries
    none (a user's own class, a Hugging Face model) the one ``core.spec.inferred_spec`` finds. An inferred spec (or
    a factory a user named at save time) is checked by building the model from it: the rebuilt model must hold
    tensors of the same names and shapes, or the error says which differs."""
    refuse_engine(model, where)
    spec = check_spec(spec if spec is not None else spec_of(model), where)
    assumed, held = spec.pop("assumed", []), spec.pop("held", [])
    if spec.pop("inferred", False):
        builder = spec.get("factory") or spec.get("huggingface")
        built_by = f"{builder} from {spec['kwargs']}"
        guess = f" ({builder} keeps no attribute named {', '.join(repr(a) for a in assumed)}: its default was assumed)" if assumed else ""
        try:
            rebuilt = build_from_spec(spec, trust_factory=True, where=where)  # the class is this process's own: nothing new runs
        except TorchslimError as error:  # e.g. a recorded pruning step that does not fit the model the defaults build
            raise TorchslimError(
                f"{where}: rebuilding {built_by}{guess} and replaying its recorded changes fails ({error}); "
                "save with factory='package.module:callable' and the kwargs that build it"
            ) from None
        expected, actual = stored_layout(rebuilt), stored_layout(model)
        if expected != actual:
            differing = sorted(set(expected) ^ set(actual)) or sorted(n for n in expected if expected[n] != actual[n])
            raise TorchslimError(
                f"{where}: rebuilding {built_by}{guess} does not give this "
                f"model ({differing[0]} differs); save with factory='package.module:callable' and the kwargs that build it"
            )
        for name in held:  # a value JSON cannot write (a config dataclass): the default must build the model's own
            if not same_value(getattr(rebuilt, name, None), getattr(model, name)):
                raise TorchslimError(
                    f"{where}: {name} is {getattr(model, name)!r} in the model, a value JSON cannot write back as it is, and "
                    f"{getattr(rebuilt, name, None)!r} in the model its default builds; save with factory='package.module:build', a function "
                    "of JSON arguments that builds the model, and those kwargs"
                )
        layers, plain = structure_differences(rebuilt, model) if assumed else ([], [])
        if layers or plain:  # same tensors, yet a default the model keeps no attribute of may have built something else
            told = (
                f"{spec['factory']} keeps no attribute named {', '.join(repr(a) for a in assumed)}, so its default"
                f"{'s were' if len(assumed) > 1 else ' was'} assumed, and the model rebuilt from {spec['kwargs']} differs: "
            )
            fix = (
                f"store each argument under its own name (self.{assumed[0]} = {assumed[0]}), "
                "or save with factory='package.module:callable' and the kwargs that build it"
            )
            if layers:  # another layer class or function: the loaded model would compute something else
                raise TorchslimError(f"{where}: {told}{layers[0]}; {fix}")
            # plain attributes (a head count, or state such as a counter forward updates): said, not refused
            warnings.warn(f"{where}: {told}{'; '.join(plain[:3])}; if these shape what the model computes, {fix}", stacklevel=3)
    transforms = [t for t in spec.get("transforms", []) if t.get("kind") != PRECISION]
    precision = _precision(model, where)
    if precision is not None or len(transforms) != len(spec.get("transforms", [])):
        spec = {**spec, "transforms": transforms + ([{"kind": PRECISION, "dtype": precision}] if precision is not None else [])}
    return spec


PRECISION = "precision"
HALF_PRECISIONS = ("float16", "bfloat16")


def _precision(model: nn.Module, where: str) -> str | None:
    """The half precision the model's floating-point weights are in (None for float32); mixed precisions are refused."""
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}
    if dtypes <= {"float32"}:
        return None
    if len(dtypes) == 1 and next(iter(dtypes)) in HALF_PRECISIONS:
        return next(iter(dtypes))
    held = f"mixes {', '.join(sorted(dtypes))} weights" if len(dtypes) > 1 else f"holds {next(iter(dtypes))} weights, which torchslim's files do not store"
    raise TorchslimError(f"{where}: the model {held}; cast it to float32, float16 or bfloat16 (model.float(), model.half()) to save it")


@register_transform(PRECISION)
def _apply_precision(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """A model saved in half precision is rebuilt in it (its files hold float16 or bfloat16 tensors)."""
    dtype = transform.get("dtype")
    if dtype not in HALF_PRECISIONS:
        raise TorchslimError(f"the file's precision {dtype!r} is not one of {', '.join(HALF_PRECISIONS)}")
    return model.to(getattr(torch, str(dtype)))


def save_model(model: nn.Module, path: str | os.PathLike[str], spec: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write the model's weights and architecture spec to one .safetensors file, atomically.

    The spec is the one the model carries, or how its class is rebuilt (see ``file_spec``). Masks from pruning are
    applied (zeros are stored).
    """
    path = Path(path)
    refuse_engine(model, str(path))
    refuse_overwrite(path, overwrite)
    check_model(model, str(path))
    spec = file_spec(model, str(path), spec)
    tensors = state_for_saving(model)
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        SPEC_KEY: json.dumps(spec),
        DIGEST_KEY: _digest(tensors),
        TIES_KEY: json.dumps(tied_groups(model)),
    }
    write_atomic(path, safetensors_save(tensors, metadata=metadata))
    return path


def _resolve_factory(reference: str, where: str):
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise TorchslimError(f"{where}: factory {reference!r} must look like package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TorchslimError(f"{where}: cannot import {module_name!r} for factory {reference!r} ({error})") from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise TorchslimError(f"{where}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TorchslimError(f"{where}: factory {reference!r} is not callable")
    return target


def _torch_layer(factory: str) -> bool:
    """Whether ``factory`` names one of torch's own layer classes, ``torch.nn.modules.<module>:<Class>``: the class
    itself (one name, no attribute path), an ``nn.Module`` subclass defined in that module of torch."""
    module_name, _, attribute = factory.partition(":")
    if not module_name.startswith("torch.nn.modules.") or not attribute.isidentifier():
        return False
    module = sys.modules.get(module_name)  # torch's own modules, imported with torch: nothing new is imported here
    target = getattr(module, attribute, None) if module is not None else None
    return isinstance(target, type) and issubclass(target, nn.Module) and target.__module__ == module_name


def _trusted(factory: str, trust_factory: bool | str) -> bool:
    """Whether an import path may be imported: torch's own layer classes and torchslim's sequential builder always;
    otherwise ``trust_factory=True`` trusts any, a string exactly that one."""
    if factory == SEQUENTIAL or _torch_layer(factory):
        return True
    return trust_factory is True or (isinstance(trust_factory, str) and trust_factory == factory)


def build_from_spec(spec: dict[str, Any], trust_factory: bool | str = False, where: str = "spec") -> nn.Module:
    """Build an (untrained) model from a spec. An import-path factory runs code, so it needs ``trust_factory``:
    True, or the exact ``package.module:callable`` the caller means (never a path taken from a file on trust)."""
    from torchslim.models import create

    spec = check_spec(spec, where)
    try:
        if "name" in spec:
            model = create(spec["name"], **spec["kwargs"])
        elif "huggingface" in spec:
            model = _huggingface_model(spec, where)
        else:
            untrusted = [factory for factory in factories(spec) if not _trusted(factory, trust_factory)]
            if untrusted:
                raise TorchslimError(
                    f"{where}: the architecture is the import path {untrusted[0]!r}; importing it runs its code, so "
                    f"pass trust_factory=True (CLI: --trust-factory) if you trust this file"
                )
            model = _resolve_factory(spec["factory"], where)(**spec["kwargs"])
            if not isinstance(model, nn.Module):
                raise TorchslimError(f"{where}: factory {spec['factory']!r} returned {type(model).__name__}, not an nn.Module")
        model = apply_transforms(model, spec.get("transforms", []), where)
    except TorchslimError as error:
        if spec.get("factory") == SEQUENTIAL and not str(error).startswith(where):
            raise TorchslimError(f"{where}: nn.Sequential {error}") from None  # a layer's failure, named with the file
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as error:
        raise TorchslimError(f"{where}: the architecture spec does not build a model ({type(error).__name__}: {error})") from None
    set_spec(model, spec)
    return model


def sequential(layers: list[list[Any]]) -> nn.Sequential:
    """An ``nn.Sequential`` of ``[name, spec]`` pairs, each layer built from its spec (the factory an inferred spec of
    a plain ``nn.Sequential`` names; ``build_from_spec`` has checked every factory in it is trusted)."""
    if not isinstance(layers, list) or not all(isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) for entry in layers):
        raise TorchslimError(f"a sequential spec's layers must be [name, spec] pairs, got {str(layers)[:200]}")
    return nn.Sequential(OrderedDict((name, build_from_spec(spec, trust_factory=True, where=f"layer {name}")) for name, spec in layers))


def build_checked(
    spec: dict[str, Any], stored: dict[str, tuple[tuple[int, ...], torch.dtype]], trust_factory: bool | str = False, where: str = "spec"
) -> nn.Module:
    """Build the model a file's spec describes, after building it on the meta device (no memory) and checking that it
    holds exactly the stored tensors' names, shapes and dtypes: a spec that would build something else (a hidden
    width of 40,000, a float64 weight in a float32 layer) is refused before any allocation."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # a forged zero size: refused below
        skeleton = fold_to_stored(build_from_spec(spec, trust_factory, where), set(stored))
    expected = {name: (tuple(t.shape), t.dtype) for name, t in skeleton.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise TorchslimError(f"{where}: the stored tensors do not fit the architecture (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for name, (shape, dtype) in expected.items():
        if stored[name] != (shape, dtype):
            raise TorchslimError(f"{where}: {name} is stored as {stored[name][1]} {stored[name][0]}, the architecture holds {dtype} {shape}")
    return fold_to_stored(build_from_spec(spec, trust_factory, where), set(stored))


def fold_to_stored(model: nn.Module, stored: set[str]) -> nn.Module:
    """The weight_norm / spectral_norm an architecture applies itself (torch's hook-based functions or its
    parametrizations) folded into a plain weight wherever the file stores that weight, as ``save`` writes it: the
    loaded model computes with the stored weight (and no longer renormalizes it)."""
    from torch.nn.utils import parametrize

    for name, module, hook in norm_hooks(model):
        if (f"{name}.{hook.name}" if name else hook.name) in stored:
            remove_norm_hook(module, hook)
    for name, module in list(model.named_modules()):
        for tensor in list(getattr(module, "parametrizations", None) or {}):
            key = f"{name}.{tensor}" if name else tensor
            if key in stored and not any(k.startswith(f"{name + '.' if name else ''}parametrizations.{tensor}.") for k in stored):
                parametrize.remove_parametrizations(module, tensor, leave_parametrized=True)
    return model


def _huggingface_model(spec: dict[str, Any], where: str) -> nn.Module:
    """A Hugging Face transformers model from its class name and config (no import path from the file is used)."""
    try:
        import transformers
    except ImportError:
        raise TorchslimError(f"{where}: the model is a Hugging Face {spec['huggingface']}; install transformers to load it") from None
    klass = getattr(transformers, str(spec["huggingface"]), None)
    if not (isinstance(klass, type) and issubclass(klass, transformers.PreTrainedModel)):
        raise TorchslimError(f"{where}: {spec['huggingface']!r} is not a transformers model class")
    config = spec.get("config")
    if not isinstance(config, dict):
        raise TorchslimError(f"{where}: the Hugging Face spec needs the model's config as a mapping")
    return klass(klass.config_class.from_dict(config))


def load_huggingface(folder: str | os.PathLike[str]) -> nn.Module:
    """A Hugging Face transformers model saved with ``save_pretrained`` in a local folder (never fetched from a hub):
    the class its ``config.json`` names under ``architectures``, weights read without pickle where the folder has
    safetensors."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise TorchslimError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        import transformers
    except ImportError:
        raise TorchslimError(f"{folder}: loading a Hugging Face model needs transformers (pip install 'torchslim[hf]')") from None
    names = json.loads(config_path.read_text()).get("architectures") or []
    klass = getattr(transformers, str(names[0]), None) if names else None
    if not (isinstance(klass, type) and issubclass(klass, transformers.PreTrainedModel)):
        raise TorchslimError(f"{config_path}: 'architectures' names no transformers model class ({names})")
    model = klass.from_pretrained(str(folder), local_files_only=True)
    return model.eval()


def read_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The spec and tensors of a torchslim .safetensors file, its checksum verified."""
    path = Path(path)
    if not path.is_file():
        raise TorchslimError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - safe_open is not iterable
    except Exception as error:  # safetensors raises several types for corrupt files
        raise ChecksumError(f"{path}: not a readable safetensors file (corrupt or truncated: {error})") from None
    if metadata.get("format") != FORMAT or SPEC_KEY not in metadata:
        raise TorchslimError(f"{path}: a safetensors file without a torchslim architecture spec; load its weights with load_weights()")
    expected = metadata.get(DIGEST_KEY)
    if expected is not None and _digest(tensors) != expected:
        raise ChecksumError(f"{path}: tensor data does not match its SHA-256 checksum (corrupt file)")
    try:
        spec = json.loads(metadata[SPEC_KEY])
        ties = json.loads(metadata.get(TIES_KEY, "[]"))
    except (ValueError, RecursionError) as error:
        raise TorchslimError(f"{path}: the architecture spec is not valid JSON ({type(error).__name__})") from None
    return spec, with_ties(tensors, ties, str(path))


def load_model(path: str | os.PathLike[str], trust_factory: bool | str = False, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model saved by ``save_model``: architecture from the spec (checked on the meta device against the
    stored tensors before it is built), weights from safetensors (no pickle)."""
    spec, tensors = read_model_file(path)
    stored = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
    model = build_checked(spec, stored, trust_factory, str(path))
    load_state(model, tensors, str(path))
    del tensors
    release_freed_memory()  # the float layers the architecture was built with are gone
    model.eval()
    return model.to(device) if device is not None else model


ALIGNMENT = 64  # bytes: a cache line, and the widest vector load


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, cast: bool = False) -> None:
    """Load ``tensors`` into ``model``, with an error naming ``where`` when names, shapes or dtypes do not fit
    (``cast``: floating-point tensors of a user's weights file take the architecture's float dtype instead)."""
    expected = model.state_dict()
    if cast:  # a user's file: a state saved from a wrapper (module. of DataParallel, _orig_mod. of torch.compile, model.) fits
        tensors = _without_wrapper_prefix(tensors, set(expected))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TorchslimError(f"{where}: weights do not fit the architecture (missing: {missing[:5]}, unexpected: {unexpected[:5]})")
    for name, tensor in tensors.items():
        if tuple(expected[name].shape) != tuple(tensor.shape):
            raise TorchslimError(f"{where}: {name} has shape {tuple(tensor.shape)}, the architecture needs {tuple(expected[name].shape)}")
        if expected[name].dtype != tensor.dtype:
            if cast and tensor.is_floating_point() and expected[name].is_floating_point():
                tensors = {**tensors, name: tensor.to(expected[name].dtype)}
                continue
            raise TorchslimError(f"{where}: {name} is {tensor.dtype}, the architecture holds {expected[name].dtype}")
    # a tensor read from a file can start anywhere in its buffer; CPU kernels choose their code path (and so the order
    # of their sums) by alignment, so an unaligned weight gives results that differ in the last bits from the model
    # that was saved: each such tensor gets its own (aligned) copy
    tensors = {name: tensor.clone() if tensor.data_ptr() % ALIGNMENT else tensor for name, tensor in tensors.items()}
    ties = tied_groups(model)  # what the architecture ties (an assigned state would untie it)
    model.load_state_dict(tensors, assign=True)
    retie(model, ties, where)


def _without_wrapper_prefix(tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``tensors`` with the leading name components they all share removed (a wrapper's ``module.``, a compiled
    model's ``_orig_mod.``, or both: ``module._orig_mod.``), where that gives exactly ``expected``."""
    stripped = tensors
    while set(stripped) != expected and all("." in name for name in stripped) and len({name.partition(".")[0] for name in stripped}) == 1:
        stripped = {name.partition(".")[2]: tensor for name, tensor in stripped.items()}
    return stripped if set(stripped) == expected else tensors


def load_weights(path: str | os.PathLike[str], trusted: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a user's weights file: .safetensors, or a .pt/.pth read with ``weights_only=True``.

    A .pt that holds more than plain tensors is refused with a clear error unless ``trusted=True`` (which unpickles
    it: only for files you made yourself). A checkpoint dict with a 'state_dict' or 'model' entry is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise TorchslimError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:
            raise ChecksumError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as error:
        # torch's message runs over many lines with terminal colour codes; the line naming the object is the one to show
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines() if line.strip()]
        first_line = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), lines[0] if lines else "refused")
        raise TorchslimError(
            f"{path}: refused to unpickle objects beyond plain tensors ({first_line}). Save a plain state_dict "
            f"(torch.save(model.state_dict(), ...)) or safetensors; if you made this file yourself, pass trusted=True "
            f"(CLI: --trust-weights)"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise TorchslimError(f"{path}: not a readable PyTorch file ({error})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TorchslimError(f"{path}: expected a mapping of names to tensors (a state_dict)")
    return state


register_format(ModelFormat(".safetensors", save=save_model, load=load_model))
