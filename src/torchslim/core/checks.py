"""Checks every verb makes on the model it is given, before any work: weights are finite, and floating-point
weights are float32 (the precision torchslim computes in).

``allow_nonfinite()`` turns the non-finite check into a warning with the count, for a user who knows (say, to
measure a model that went wrong).

Example:
    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(2, 2)
    >>> with torch.no_grad():
    ...     layer.weight[0, 0] = float("nan")
    >>> check_model(layer, "prune")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    torchslim.core.errors.TorchslimError: prune: the model holds 1 non-finite value (NaN or Inf): weight (1); fix the model first, ...
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError

_STATE = {"allow_nonfinite": False}


@contextlib.contextmanager
def allow_nonfinite() -> Iterator[None]:
    """Within the block, non-finite weights give a warning with their count instead of an error."""
    previous = _STATE["allow_nonfinite"]
    _STATE["allow_nonfinite"] = True
    try:
        yield
    finally:
        _STATE["allow_nonfinite"] = previous


def nonfinite_counts(model: nn.Module) -> dict[str, int]:
    """{tensor name: count of NaN / Inf values} over the model's floating-point parameters and buffers."""
    counts = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point() and tensor.device.type != "meta":
            bad = int((~torch.isfinite(tensor.detach())).sum())
            if bad:
                counts[name] = bad
    return counts


def norm_hooks(model: nn.Module) -> list[tuple[str, nn.Module, Any]]:
    """(layer name, layer, hook) of every layer reparametrized by torch's hook-based ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` (not the ``parametrizations`` forms): its weight (``hook.name``) is an attribute computed before
    each call, which a deep copy cannot copy and a mask cannot be attached to."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return [
        (name, module, hook)
        for name, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, (WeightNorm, SpectralNorm))
    ]


def remove_norm_hook(module: nn.Module, hook: Any) -> None:
    """Fold a ``norm_hooks`` entry into a plain weight (the one it computes now), with torch's own remove function,
    and drop the load hook that torch's ``remove_spectral_norm`` leaves behind (it would ask a later
    ``load_state_dict`` for ``weight_orig``)."""
    from torch.nn.utils import remove_spectral_norm, remove_weight_norm
    from torch.nn.utils.spectral_norm import SpectralNormLoadStateDictPreHook
    from torch.nn.utils.weight_norm import WeightNorm

    if isinstance(hook, WeightNorm):
        remove_weight_norm(module, hook.name)
        return
    remove_spectral_norm(module, hook.name)
    for key, entry in list(module._load_state_dict_pre_hooks.items()):
        if isinstance(getattr(entry, "hook", entry), SpectralNormLoadStateDictPreHook):
            del module._load_state_dict_pre_hooks[key]


# hooks these register are theirs to rebuild (transformers_modules: a Hub model's own code, run again when it is built)
LIBRARY_HOOKS = ("torch.", "torchslim.", "transformers.", "transformers_modules.", "accelerate.", "deepspeed.")


def user_hooks(model: nn.Module) -> list[str]:
    """The forward hooks and forward pre-hooks a person registered on the model's modules, as "layer: function"
    (torch's weight_norm / spectral_norm and the hooks of torch, torchslim, transformers and accelerate left out):
    a file stores weights and the architecture, so a model rebuilt from it runs without them."""
    found = []
    for name, module in model.named_modules():
        for hook in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
            function = getattr(hook, "func", hook)  # a functools.partial: the function it calls
            owner = getattr(function, "__module__", None) or type(function).__module__ or ""
            if f"{owner}.".startswith(LIBRARY_HOOKS):  # torch's weight_norm / spectral_norm among them
                continue
            found.append(f"{name or '(the model itself)'}: {getattr(function, '__qualname__', type(function).__name__)}")
    return found


def hook_norms(model: nn.Module) -> dict[str, str]:
    """{layer name: "weight_norm" | "spectral_norm"} of ``norm_hooks``."""
    from torch.nn.utils.weight_norm import WeightNorm

    return {name or "(the model itself)": "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm" for name, _, hook in norm_hooks(model)}


def unwrapped(model: Any) -> Any:
    """The module a ``torch.compile`` / ``nn.DataParallel`` / ``DistributedDataParallel`` wrapper holds (the model
    itself otherwise): what a file stores and an exporter traces."""
    while isinstance(model, nn.Module):
        inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
        if inner is None and isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def check_model(model: nn.Module, where: str, float32: bool = False, copies: bool = False) -> None:
    """Refuse non-finite weights (a warning inside ``allow_nonfinite()``), with ``float32`` floating-point weights
    of another precision, and with ``copies`` (a verb that copies or rewrites the model) torch's hook-based
    weight_norm / spectral_norm, naming the tensors or layers."""
    if not isinstance(model, nn.Module):
        raise TorchslimError(f"{where}: expected a torch.nn.Module, got {type(model).__name__}")
    scripted = [name or "(the model itself)" for name, module in model.named_modules() if isinstance(module, torch.jit.ScriptModule)] if copies else []
    if scripted:
        raise TorchslimError(
            f"{where}: {', '.join(scripted[:5])}{', ...' if len(scripted) > 5 else ''} {'is a' if len(scripted) == 1 else 'are'} TorchScript "
            "module (torch.jit.script / torch.jit.trace), whose code and weights torchslim cannot rewrite or copy: pass the model "
            "before scripting it (script or export the compressed model afterwards: torchslim.export(model, 'torchscript', ...))"
        )
    hooked = hook_norms(model) if copies else {}
    if hooked:
        kinds = sorted(set(hooked.values()))
        listed = ", ".join(f"{name} ({kind})" for name, kind in list(hooked.items())[:5]) + (", ..." if len(hooked) > 5 else "")
        raise TorchslimError(
            f"{where}: {len(hooked)} layer{'s' if len(hooked) != 1 else ''} use torch's hook-based "
            f"{' / '.join('torch.nn.utils.' + kind for kind in kinds)}: {listed}; its weight is recomputed by a hook "
            "before each call, so the model cannot be copied or its weight masked or replaced. Apply "
            f"{' / '.join('torch.nn.utils.parametrizations.' + kind for kind in kinds)} instead (the same reparametrization, "
            f"which torchslim supports), or fold it into a plain weight first with "
            f"{' / '.join('torch.nn.utils.remove_' + kind + '(layer)' for kind in kinds)}"
        )
    empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if empty:
        raise TorchslimError(
            f"{where}: {len(empty)} of the model's tensors are on the meta device, shapes without values (e.g. {', '.join(empty[:3])}): "
            "load its weights first (model.to_empty(device='cpu') then load_state_dict, or from_pretrained)"
        )
    counts = nonfinite_counts(model)
    if counts:
        total = sum(counts.values())
        listed = ", ".join(f"{name} ({count})" for name, count in list(counts.items())[:5])
        message = f"{where}: the model holds {total} non-finite value{'s' if total != 1 else ''} (NaN or Inf): {listed}"
        if not _STATE["allow_nonfinite"]:
            raise TorchslimError(f"{message}; fix the model first, or wrap the call in torchslim.allow_nonfinite()")
        warnings.warn(message, stacklevel=3)
    if float32:
        other = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32})
        if other:
            raise TorchslimError(
                f"{where}: the model holds {', '.join(other)} weights; torchslim trains and compresses in float32: "
                f"pass model.float() (and cast the result back if you need {other[0]})"
            )


__all__ = ["allow_nonfinite", "check_model", "hook_norms", "nonfinite_counts", "norm_hooks", "remove_norm_hook", "unwrapped"]
