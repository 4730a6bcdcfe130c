"""The knapsack groups of a speed budget beyond the channel sets: a layer's ranks (``rank:<layer>``) and a block's
removal together with every choice of the groups inside it (``block:<block>``), and how a chosen plan reads back."""

from __future__ import annotations

import dataclasses

from torchslim.compression.budget import Option

RANK = "rank:"  # the knapsack group of a layer's rank, next to the sets' names
BLOCK = "block:"  # the knapsack group of a block: its removal, or each choice of the groups inside it
MERGED_LIMIT = 4096  # the most choices a block's group may hold (the product of its inner groups' choices)


@dataclasses.dataclass
class MergedChoice(Option):
    """One choice of a block's group: the block removed (``removes``), or one option of each group inside it."""

    parts: dict[str, Option] = dataclasses.field(default_factory=dict)
    removes: str | None = None


def outermost_blocks(blocks: list[str]) -> list[str]:
    """The blocks not inside another one (a block's removal takes what is inside it)."""
    return [block for block in blocks if not any(block.startswith(f"{other}.") for other in blocks)]


def inside_block(group: str, block: str) -> bool:
    """Whether every layer of a knapsack group (a set "a+b", or a layer's rank group) is inside ``block``."""
    layers = group.removeprefix(RANK).split("+")
    return not group.startswith(BLOCK) and all(layer.startswith(f"{block}.") for layer in layers)


def flatten_plan(plan: dict[str, Option]) -> tuple[dict[str, Option], list[str]]:
    """A plan as {set or rank group: option} and the blocks it removes (a block's group resolved into its parts)."""
    flat: dict[str, Option] = {}
    removed = []
    for name, option in plan.items():
        if isinstance(option, MergedChoice):
            if option.removes:
                removed.append(option.removes)
            flat.update(option.parts)
        else:
            flat[name] = option
    return flat, sorted(removed)


def channels_only(option: Option) -> bool:
    """Whether an option only removes channels (no rank, no block)."""
    if isinstance(option, MergedChoice):
        return option.removes is None and all(channels_only(part) for part in option.parts.values())
    return not option.rank


__all__ = ["BLOCK", "MERGED_LIMIT", "RANK", "MergedChoice", "channels_only", "flatten_plan", "inside_block", "outermost_blocks"]
