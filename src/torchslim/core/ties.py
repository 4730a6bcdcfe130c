"""Tied weights: one parameter shared by several modules (a language model's token embedding and its output layer).
Files store a tied tensor once and record the tie; every step that replaces parameters (pruning masks made
permanent, channel removal, loading) puts the tie back.

Example:
    >>> from torch import nn
    >>> embedding, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    >>> head.weight = embedding.weight
    >>> tied_groups(nn.ModuleDict({"embed": embedding, "head": head}))
    [['embed.weight', 'head.weight']]
"""

from __future__ import annotations

from torch import nn

from torchslim.core.errors import TorchslimError


def plain_name(name: str) -> str:
    """``a.parametrizations.weight.original`` (a masked weight's stored original) -> ``a.weight``."""
    if ".parametrizations." in f".{name}" and name.endswith(".original"):
        owner, _, rest = name.rpartition("parametrizations.")
        return owner + rest.removesuffix(".original")
    return name


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of parameter (or buffer) names that share one tensor object, in model order (the first name leads): a
    tied weight, or the tensors of a module two layers share (a quantized table read by an embedding and an output
    layer)."""
    by_identity: dict[int, list[str]] = {}
    buffers = [(name, b) for name, b in model.named_buffers(remove_duplicate=False) if ".parametrizations." not in f".{name}"]  # masks
    named = list(model.named_parameters(remove_duplicate=False)) + buffers
    for name, parameter in named:
        names = by_identity.setdefault(id(parameter), [])
        if plain_name(name) not in names:
            names.append(plain_name(name))
    return [names for names in by_identity.values() if len(names) > 1]


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """{module name: the other tensor names its ``weight`` is shared with} for every module whose weight is tied."""
    shared: dict[str, list[str]] = {}
    for group in tied_groups(model):
        for name in group:
            if name.endswith(".weight") or name == "weight":
                shared[name.removesuffix("weight").removesuffix(".")] = [other for other in group if other != name]
    return shared


def retie(model: nn.Module, groups: list[list[str]], where: str) -> None:
    """Make every name of each group point at its leader's parameter again (after steps that replaced them)."""
    for group in groups:
        leader_module, _, leader_name = group[0].rpartition(".")
        leader = getattr(model.get_submodule(leader_module), leader_name)
        for follower in group[1:]:
            module_name, _, name = follower.rpartition(".")
            module = model.get_submodule(module_name)
            current = getattr(module, name)
            if tuple(current.shape) != tuple(leader.shape):
                raise TorchslimError(f"{where}: {follower} {tuple(current.shape)} no longer fits {group[0]} {tuple(leader.shape)}, the weight it is tied to")
            setattr(module, name, leader)


__all__ = ["plain_name", "retie", "tied_groups", "tied_weights"]
