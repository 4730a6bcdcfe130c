"""The weights a model really computes with: masked parametrizations resolved to their effective values, and
compressed layers' stored forms given back as the weights they stand for.

A module that stores its weights in another form (codes and a codebook, packed integers) declares
``logical_parameters() -> {local name: tensor}``: what its parameters are as the forward pass uses them. Counting
parameters and non-zeros goes through these, so a quantized layer counts as the weights it encodes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from torchslim.core.checks import norm_hooks


@torch.no_grad()
def effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified name: tensor} of every parameter as the forward pass sees it.

    For parametrized tensors (``torch.nn.utils.parametrize``, e.g. pruning masks) the computed value is used under
    the plain name (``fc1.weight``), not the stored original.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        parametrizations = getattr(module, "parametrizations", None)
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            out[f"{module_name}.{name}" if module_name else name] = parameter.detach()
        if parametrizations is not None:
            for name in parametrizations:
                for original in parametrizations[name].parameters(recurse=False):
                    seen.add(id(original))
                out[f"{module_name}.{name}" if module_name else name] = getattr(module, name).detach()
    computed, replaced = hook_norm_weights(model)
    return {**{name: tensor for name, tensor in out.items() if name not in replaced}, **computed}


@torch.no_grad()
def hook_norm_weights(model: nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """For torch's hook-based weight_norm / spectral_norm: ({weight's name: the weight they compute}, the names of
    the tensors it is computed from: ``weight_g`` / ``weight_v``, or ``weight_orig`` / ``weight_u`` / ``weight_v``).
    spectral_norm's weight is computed from its stored vectors, without a power iteration."""
    from torch.nn.utils.weight_norm import WeightNorm

    computed, replaced = {}, set()
    for module_name, module, hook in norm_hooks(model):
        prefix = f"{module_name}.{hook.name}" if module_name else hook.name
        if isinstance(hook, WeightNorm):
            computed[prefix] = hook.compute_weight(module).detach()
            replaced |= {prefix + "_g", prefix + "_v"}
        else:
            computed[prefix] = hook.compute_weight(module, do_power_iteration=False).detach()
            replaced |= {prefix + "_orig", prefix + "_u", prefix + "_v"}
    return computed, replaced


@torch.no_grad()
def logical_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``effective_weights`` with every module that declares ``logical_parameters`` counted by what it declares
    (e.g. a quantized Linear: its decoded weight and its bias, not its codebook).

    Example:
        >>> sorted(logical_weights(nn.Linear(3, 2)))
        ['bias', 'weight']
    """
    return dict(iter_logical_weights(model))


@torch.no_grad()
def iter_logical_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``logical_weights`` one tensor at a time (a decoded or masked weight lives only while it is looked at, so
    counting a large model never holds a float copy of all of it); shared tensors and shared quantized tables
    once."""
    seen: set[int] = set()
    declaring: list[str] = []
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if any(prefix.startswith(outer) for outer in declaring):
            continue  # inside a module that declares its own logical parameters
        declared = getattr(module, "logical_parameters", None)
        if callable(declared):
            declaring.append(prefix)
            holder = getattr(module, "quantized", module)
            if id(holder) in seen:
                continue
            seen.add(id(holder))
            for key, tensor in declared().items():
                yield prefix + key, tensor.detach()
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                yield prefix + name, parameter.detach()
        parametrizations = getattr(module, "parametrizations", None)
        if parametrizations is not None:
            for name in parametrizations:
                originals = [id(p) for p in parametrizations[name].parameters(recurse=False)]
                if any(o in seen for o in originals):
                    continue
                seen.update(originals)
                yield prefix + name, getattr(module, name).detach()
