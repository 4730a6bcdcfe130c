"""The weights a model really computes with: masked parametrizations resolved to their effective values."""

from __future__ import annotations

import torch
from torch import nn


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
            for name in parametrizations.keys():
                for original in parametrizations[name].parameters(recurse=False):
                    seen.add(id(original))
                out[f"{module_name}.{name}" if module_name else name] = getattr(module, name).detach()
    return out
