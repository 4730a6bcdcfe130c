"""Coupled channel groups, found by running the model once on an example input.

Every channel of every tensor the forward pass makes is a *slot*. Operations either create slots (a convolution's
or Linear's output channels, an embedding's features), pass them through (activations, pooling, BatchNorm,
depthwise convolutions, flatten, subsampling), or join them (a residual add joins the channels it adds; a
concatenation lays slot lists side by side; zero-padding channels adds free zero slots). Joined slots form one
*group*: the channels that must be removed together. Each group collects what it owns:

- producers: the weight rows (and bias entries) that compute it (a conv's filter, a Linear's neuron);
- members: per-channel parameters and buffers it passes through (BatchNorm, LayerNorm, depthwise filters);
- consumers: the weight columns that read it (the next conv's input channels, a Linear's inputs, one block of
  features per channel after a flatten).

Whatever the tracer does not understand (an op that mixes channels in a way it cannot follow, a grouped
convolution, a reshape that splits the channel axis) blocks the slots it touches; the report names the module and
op, and those channels are left intact. Slots that reach the model's input or output are never pruned.

This module holds the graph and its bookkeeping; ``pruning.rules`` says what each module and function does to the
slots, and ``pruning.tracing`` runs the model to build the graph. A module of a user's own can declare its rule as a
method ``channel_rule(graph, name, inputs, output)`` (as ``attention_macs`` declares its MACs), using the graph's
``produce`` / ``consume`` / ``add_head`` helpers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class ParamSlice:
    """Entries of one tensor that belong to a group: ``module.name`` along ``dim`` at ``indices``."""

    module: str
    name: str
    dim: int
    indices: list[int]


@dataclasses.dataclass
class Group:
    """Channels that must be removed together."""

    id: int
    producers: list[ParamSlice] = dataclasses.field(default_factory=list)
    members: list[ParamSlice] = dataclasses.field(default_factory=list)
    consumers: list[ParamSlice] = dataclasses.field(default_factory=list)
    blocked: list[str] = dataclasses.field(default_factory=list)
    joined: bool = False  # the channels of several layers added together (a residual stream), not multiplied

    @property
    def prunable(self) -> bool:
        return not self.blocked and bool(self.producers or self.members)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(sorted({p.module for p in self.producers}))


@dataclasses.dataclass
class HeadGroup:
    """One attention head of a module: its q/k/v rows and output-projection columns (``slots``: the head's output
    features, whose readers are found after tracing)."""

    module: str
    head: int
    slices: list[ParamSlice]
    slots: list[int] = dataclasses.field(default_factory=list)
    attributes: dict[str, str] = dataclasses.field(default_factory=dict)
    readers: list[str] = dataclasses.field(default_factory=list)  # the modules whose weight reads the head's output (else: columns, dim 1)


class UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, count: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return list(range(start, start + count))

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclasses.dataclass
class SlotInfo:
    """Channel slots of one traced tensor: ``slots[i]`` is the slot of index i along ``axis``."""

    slots: list[int]
    axis: int


class ChannelGraph:
    """The result of tracing: groups of coupled channels, attention head groups, and what could not be followed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(m): n for n, m in model.named_modules()}
        self.uf = UnionFind()
        self.info: dict[int, SlotInfo] = {}
        self.keep_alive: list[torch.Tensor] = []
        self.slot_params: list[tuple[int, str, ParamSlice]] = []  # (slot, role, slice of one index)
        self.consumer_records: list[tuple[str, str, int, list[int]]] = []  # (module, param, dim, slot per index)
        self.blocked: dict[int, str] = {}
        self.unsupported: list[str] = []
        self.heads: list[HeadGroup] = []
        self.joined: set[int] = set()  # slots where layers' outputs are added (residual streams)
        self.leaf_records: dict[str, list[tuple[list[int] | None, list[int]]]] = {}  # pad-shortcut slot maps
        self.calls: dict[str, int] = {}  # how often each module ran in the traced forward
        self.seen: dict[tuple, list[int]] = {}  # the slots each layer first produced or read (a layer run again: the same)

    # -- slot bookkeeping ------------------------------------------------------------------------------------------
    def set_info(self, tensor: Any, slots: list[int], axis: int) -> None:
        self.keep_alive.append(tensor)
        self.info[id(tensor)] = SlotInfo(list(slots), axis % tensor.dim() if tensor.dim() else 0)

    def get_info(self, tensor: Any) -> SlotInfo | None:
        return self.info.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None

    def new_slots(self, count: int) -> list[int]:
        return self.uf.new(count)

    def block(self, slots: list[int], reason: str) -> None:
        for slot in slots:
            self.blocked.setdefault(slot, reason)

    def unsupported_op(self, where: str, op: str, tensors: list[Any]) -> None:
        message = f"{where or 'model'}: {op}"
        if message not in self.unsupported:
            self.unsupported.append(message)
        for tensor in tensors:
            info = self.get_info(tensor)
            if info is not None:
                self.block(info.slots, message)

    def param(self, slot: int, role: str, module: str, name: str, dim: int, index: int) -> None:
        self.slot_params.append((slot, role, ParamSlice(module, name, dim, [index])))

    # -- helpers for rules ------------------------------------------------------------------------------------------
    def produce(self, name: str, module: nn.Module, output: torch.Tensor, count: int, axis: int, weight_dim: int = 0, bias: bool = True) -> list[int]:
        """New slots for ``count`` output channels of ``name``, owned by its weight rows (and bias entries)."""
        slots = self.new_slots(count)
        for index, slot in enumerate(slots):
            self.param(slot, "producer", name, "weight", weight_dim, index)
            if bias and getattr(module, "bias", None) is not None:
                self.param(slot, "producer", name, "bias", 0, index)
        self._same_as_before(("produce", name, weight_dim), slots)
        self.set_info(output, slots, axis)
        return slots

    def consume(self, name: str, info: SlotInfo | None, dim: int, parameter: str = "weight") -> None:
        """``name``'s ``parameter`` reads the channels of ``info`` along ``dim`` (e.g. a Linear's input columns)."""
        if info is not None:
            self.consumer_records.append((name, parameter, dim, list(info.slots)))
            self._same_as_before(("consume", name, parameter, dim), info.slots)

    def _same_as_before(self, key: tuple, slots: list[int]) -> None:
        """A layer run several times (one block applied twice, weights shared across depth) reads and writes the same
        rows and columns each time: the channels of every call are one channel."""
        before = self.seen.setdefault(key, list(slots))
        if before is not slots and len(before) == len(slots):
            for a, b in zip(before, slots):
                self.uf.union(a, b)

    def attention(
        self,
        name: str,
        module: nn.Module,
        inputs: list[Any],
        projections: tuple[str, str, str],
        heads: int,
        width: int,
        output_projection: str | None = None,
        output: Any = None,
        head_slots: list[int] | None = None,
        attributes: dict[str, str] | None = None,
    ) -> None:
        """Record an attention module: its q/k/v ``projections`` (submodule names) read the input channels; each of
        ``heads`` heads of ``width`` is their rows (and bias entries) plus, with ``output_projection``, that layer's
        columns, which also produces the module's ``output`` channels. ``head_slots`` are the heads' output features
        where another module reads them."""
        # every input of the projections' width with channels of its own: a cross-attention's context (by position or
        # keyword) is read by k / v, so its channels are joined with the stream's (one index, removed from both)
        reads = getattr(getattr(module, projections[0], None), "in_features", None)
        found = [self.get_info(t) for t in inputs if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == reads]
        first = self.get_info(inputs[0]) if inputs else None
        infos = [info for info in found if info is not None] or ([first] if first is not None else [])
        if attributes is None:  # the module's head count follows the removal
            count = next((a for a in ("num_heads", "num_attention_heads") if isinstance(getattr(module, a, None), int)), None)
            attributes = {"count": count} if count else {}
        for projection in projections:
            for info in infos:
                self.consume(f"{name}.{projection}", info, 1)
        if output_projection is not None:
            layer = getattr(module, output_projection)
            self.produce(f"{name}.{output_projection}", layer, output, layer.out_features, -1)
        for head in range(heads):
            rows = list(range(head * width, (head + 1) * width))
            slices = [ParamSlice(f"{name}.{p}", "weight", 0, rows) for p in projections]
            slices += [ParamSlice(f"{name}.{p}", "bias", 0, rows) for p in projections if getattr(module, p).bias is not None]
            if output_projection is not None:
                slices.append(ParamSlice(f"{name}.{output_projection}", "weight", 1, rows))
            slots = head_slots[head * width : (head + 1) * width] if head_slots is not None else None
            self.add_head(name, head, slices, slots=slots, attributes=attributes)

    @staticmethod
    def slice(module: str, name: str, dim: int, indices: list[int]) -> ParamSlice:
        """Entries ``indices`` of ``module.name`` along ``dim`` (for head groups)."""
        return ParamSlice(module, name, dim, list(indices))

    def add_head(
        self,
        module: str,
        head: int,
        slices: list[ParamSlice],
        slots: list[int] | None = None,
        attributes: dict[str, str] | None = None,
        readers: list[str] | None = None,
    ) -> None:
        """One attention head of ``module`` that may be removed whole; ``readers``: the modules whose weight slices
        among ``slices`` read the head's output (GPT-2's transposed c_proj reads rows), where they are not columns."""
        self.heads.append(HeadGroup(module, head, slices, slots=list(slots or []), attributes=dict(attributes or {}), readers=list(readers or [])))

    def head_readers(self, head: HeadGroup) -> list[ParamSlice]:
        """The weight slices that read a head's output: zeroed, they take the head out of the model's computation."""
        slices = [s for s in self.head_slices(head) if s.name == "weight"]
        return [s for s in slices if s.module in head.readers] if head.readers else [s for s in slices if s.dim == 1]

    def head_slices(self, head: HeadGroup) -> list[ParamSlice]:
        """A head's own slices plus the columns of whatever reads its output features."""
        slices = list(head.slices)
        wanted = set(head.slots)
        for module, name, dim, slots in self.consumer_records:
            indices = [i for i, slot in enumerate(slots) if slot in wanted]
            if indices:
                slices.append(ParamSlice(module, name, dim, indices))
        return slices

    # -- results ---------------------------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        by_root: dict[int, Group] = {}

        def group(slot: int) -> Group:
            root = self.uf.find(slot)
            if root not in by_root:
                by_root[root] = Group(id=root)
            return by_root[root]

        for slot, role, piece in self.slot_params:
            target = getattr(group(slot), role + "s")
            target.append(piece)
        for module, name, dim, slots in self.consumer_records:
            per_root: dict[int, list[int]] = {}
            for index, slot in enumerate(slots):
                if slot >= 0:
                    per_root.setdefault(self.uf.find(slot), []).append(index)
            for root, indices in per_root.items():
                group(root).consumers.append(ParamSlice(module, name, dim, indices))
        for slot in self.joined:
            group(slot).joined = True
        for slot, reason in self.blocked.items():
            if reason not in group(slot).blocked:
                group(slot).blocked.append(reason)
        for item in by_root.values():
            item.producers = _merge(item.producers)
            item.members = _merge(item.members)
        return sorted(by_root.values(), key=lambda g: g.id)


def _merge(pieces: list[ParamSlice]) -> list[ParamSlice]:
    merged: dict[tuple[str, str, int], ParamSlice] = {}
    for piece in pieces:
        key = (piece.module, piece.name, piece.dim)
        if key in merged:
            merged[key].indices.extend(i for i in piece.indices if i not in merged[key].indices)
        else:
            merged[key] = ParamSlice(piece.module, piece.name, piece.dim, list(piece.indices))
    return list(merged.values())
