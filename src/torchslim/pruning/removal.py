"""Removing channel groups and attention heads from a model: slicing every weight, bias and buffer they own, and
making each module's size attributes agree. The removal is recorded as a ``channel-pruning`` transform in the
model's spec and re-applied on load.

Example:
    >>> import torch, torchslim as ts
    >>> from torchslim.pruning.tracing import trace
    >>> model = ts.models.create("lenet-300-100")
    >>> graph = trace(model, torch.zeros(1, 1, 28, 28))
    >>> group = next(g for g in graph.groups() if g.layers == ("fc2",))
    >>> transform = remove_channels(model, graph, [group], [])
    >>> model.fc2.out_features, model.fc3.in_features
    (99, 99)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.selector import is_conv1d
from torchslim.core.spec import recorded_module, register_transform
from torchslim.core.ties import retie, tied_groups
from torchslim.pruning.graph import ChannelGraph, Group, HeadGroup, ParamSlice

TRANSFORM_KIND = "channel-pruning"


def _drops(pieces: list[ParamSlice]) -> dict[tuple[str, str, int], set[int]]:
    out: dict[tuple[str, str, int], set[int]] = {}
    for piece in pieces:
        out.setdefault((piece.module, piece.name, piece.dim), set()).update(piece.indices)
    return out


def update_attributes(module: Any) -> None:
    """Make a module's size attributes agree with its (sliced) tensors."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.in_channels = module.out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = (module.weight if module.weight is not None else module.running_mean).shape[0]
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:  # whole groups removed: the group size stays
        size = module.num_channels // module.num_groups
        module.num_channels = module.weight.shape[0]
        module.num_groups = module.num_channels // size
    elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
        module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.shape[0]
    elif isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        module.in_channels, module.out_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
    elif is_conv1d(module) and hasattr(module, "nf"):  # GPT-2's (in, out) Linear
        module.nx, module.nf = module.weight.shape


def slice_module(module: nn.Module, keeps: dict[tuple[str, int], torch.Tensor]) -> None:
    """Keep entries ``keep`` along ``dim`` of each named tensor of ``module``."""
    for (name, dim), keep in keeps.items():
        tensor = getattr(module, name)
        sliced = tensor.detach().index_select(dim, keep.to(tensor.device)).clone()
        if isinstance(tensor, nn.Parameter):
            setattr(module, name, nn.Parameter(sliced, requires_grad=tensor.requires_grad))
        else:
            setattr(module, name, sliced)
    update_attributes(module)


def _pieces(graph: ChannelGraph, groups: list[Group], heads: list[HeadGroup]) -> list[ParamSlice]:
    return [p for g in groups for p in g.producers + g.members + g.consumers] + [s for h in heads for s in graph.head_slices(h)]


@torch.no_grad()
def zero_readers(model: nn.Module, graph: ChannelGraph, groups: list[Group], heads: list[HeadGroup]) -> None:
    """Zero the weight columns that read the given channels and heads (in place): the model then computes what the
    model with those channels removed computes, which is how removal is checked."""
    readers = [p for g in groups for p in g.consumers] + [s for h in heads for s in graph.head_readers(h)]
    for piece in readers:
        tensor = getattr(model.get_submodule(piece.module), piece.name)
        tensor.index_fill_(piece.dim, torch.tensor(piece.indices, device=tensor.device), 0.0)


def remove_channels(model: nn.Module, graph: ChannelGraph, groups: list[Group], heads: list[HeadGroup]) -> dict[str, Any]:
    """Slice the pruned groups and heads out of ``model`` (in place); returns the spec transform. Tied weights must
    come out of it the same shape (they are tied again), or the removal is refused."""
    ties = tied_groups(model)
    per_module: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for (module_name, name, dim), indices in _drops(_pieces(graph, groups, heads)).items():
        tensor = getattr(model.get_submodule(module_name), name)
        keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in indices], dtype=torch.long, device=tensor.device)
        if keep.numel() == 0:
            raise TorchslimError(f"pruning would remove every channel of {module_name}.{name} (dim {dim})")
        per_module.setdefault(module_name, {})[(name, dim)] = keep
    transform: dict[str, Any] = {"kind": TRANSFORM_KIND, "shapes": {}, "attributes": {}}
    for module_name, keeps in per_module.items():
        module = model.get_submodule(module_name)
        slice_module(module, keeps)
        transform["shapes"][module_name] = {
            name: list(getattr(module, name).shape)
            for name, _ in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            if getattr(module, name) is not None and getattr(module, name).dim() > 0
        }
    pruned_slots = {g.id for g in groups}
    for name, records in graph.leaf_records.items():  # option-A shortcuts: where the kept inputs land now
        shortcut: Any = model.get_submodule(name)
        in_slots, out_slots = records[0]
        kept_out = [s for s in out_slots if graph.uf.find(s) not in pruned_slots]
        kept_in = [s for s in in_slots if graph.uf.find(s) not in pruned_slots]
        roots_out = [graph.uf.find(s) for s in kept_out]
        positions = [roots_out.index(graph.uf.find(s)) for s in kept_in]
        if len(kept_out) != shortcut.out_channels or len(kept_in) != shortcut.in_channels:
            shortcut.in_channels, shortcut.out_channels = len(kept_in), len(kept_out)
            shortcut.index = positions
            transform["attributes"][name] = {"in_channels": len(kept_in), "out_channels": len(kept_out), "index": positions}
    removed_heads: dict[str, list[HeadGroup]] = {}
    for head in heads:
        removed_heads.setdefault(head.module, []).append(head)
    for name, gone in removed_heads.items():
        module = model.get_submodule(name)
        names = gone[0].attributes
        per_unit = int(names.get("per_unit", 1))  # query heads per removed unit (grouped key/value heads)
        attributes = {}
        for key, removed in (("count", per_unit * len(gone)), ("kv_count", len(gone))):
            if key in names:
                setattr(module, names[key], getattr(module, names[key]) - removed)
                attributes[names[key]] = getattr(module, names[key])
        if "size" in names:  # e.g. all_head_size = heads x head size
            setattr(module, names["size"], getattr(module, names["count"]) * getattr(module, names["head"]))
            attributes[names["size"]] = getattr(module, names["size"])
        if attributes:
            transform["attributes"][name] = attributes
    retie(model, ties, "unties a shared weight")
    return transform


# size attributes a channel-pruning record may set (on modules that already hold them): nothing else, so a file cannot
# replace a method or any other attribute
SIZE_ATTRIBUTES = (
    "in_channels",
    "out_channels",
    "index",
    "num_heads",
    "num_attention_heads",
    "num_key_value_heads",
    "num_kv_heads",
    "all_head_size",
    "attention_head_size",
    "split_size",
)


def _size_value(value: Any) -> bool:
    integer = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return integer or (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


@register_transform(TRANSFORM_KIND)
def apply_structure(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Rebuild the shapes a saved file records (for loading): slice each tensor to its recorded shape, and set the
    recorded size attributes (only those in ``SIZE_ATTRIBUTES``, on modules that already have them)."""
    shapes, attributes = transform.get("shapes"), transform.get("attributes", {})
    ties = tied_groups(model)
    if not isinstance(shapes, dict) or not isinstance(attributes, dict):
        raise TorchslimError("the file's channel-pruning record needs 'shapes' and 'attributes' mappings")
    for module_name, named in shapes.items():
        module = recorded_module(model, module_name, "prunes")
        keeps: dict[tuple[str, int], torch.Tensor] = {}
        if not isinstance(named, dict):
            raise TorchslimError(f"the file's shapes for {module_name} must be a mapping of tensor names to shapes")
        for name, shape in named.items():
            tensor = module._parameters.get(name) if name in module._parameters else module._buffers.get(str(name))
            if (
                tensor is None
                or not isinstance(shape, list)
                or tensor.dim() != len(shape)
                or not _size_value(shape)
                or any(size > full for size, full in zip(shape, tensor.shape))
            ):
                raise TorchslimError(f"the file's shape {shape} for {module_name}.{name} does not fit the architecture")
            for dim, size in enumerate(shape):
                if size != tensor.shape[dim]:
                    keeps[(name, dim)] = torch.arange(size, device=tensor.device)
        for key, keep in keeps.items():
            slice_module(module, {key: keep})
    for module_name, values in attributes.items():
        module = recorded_module(model, module_name, "prunes")
        if not isinstance(values, dict):
            raise TorchslimError(f"the file's attributes for {module_name} must be a mapping")
        for attribute, value in sorted(values.items(), key=lambda item: item[0] == "index"):
            if attribute not in SIZE_ATTRIBUTES or not hasattr(module, attribute) or not _size_value(value):
                raise TorchslimError(
                    f"the file sets {module_name}.{attribute} = {value!r}; a channel-pruning record sets only the sizes "
                    f"{', '.join(SIZE_ATTRIBUTES)} that the module has"
                )
            try:
                setattr(module, attribute, value)
            except (ValueError, TypeError) as error:
                raise TorchslimError(f"the file's {module_name}.{attribute} = {value!r} does not fit the module ({error})") from None
    retie(model, ties, "the file's channel-pruning record")
    return model


def module_width(module: nn.Module) -> str | None:
    """A layer's width for reports: in->out channels / features (transposed convolutions too), normalized features or
    channels, an embedding's dimension, attention heads."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{module.in_channels}->{module.out_channels}"
    if isinstance(module, nn.Linear):
        return f"{module.in_features}->{module.out_features}"
    weight = getattr(module, "weight", None)
    if is_conv1d(module) and isinstance(weight, torch.Tensor):  # GPT-2's (in, out) Linear
        return "->".join(map(str, weight.shape))
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return str(module.num_features)
    if isinstance(module, nn.GroupNorm):
        return f"{module.num_channels} ({module.num_groups} groups)"
    if isinstance(module, nn.LayerNorm):
        return "x".join(map(str, module.normalized_shape))
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"{module.num_embeddings}x{module.embedding_dim}"
    for attribute in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(module, attribute, None), int):
            return f"{getattr(module, attribute)} heads"
    projections = [getattr(module, n, None) for n in ("q_proj", "k_proj")]
    width = getattr(module, "head_dim", None)
    if all(isinstance(p, nn.Linear) for p in projections) and isinstance(width, int) and width > 0:
        return f"{projections[0].out_features // width} heads ({projections[1].out_features // width} key/value)"
    return None


__all__ = ["TRANSFORM_KIND", "apply_structure", "module_width", "remove_channels", "slice_module", "update_attributes", "zero_readers"]
