"""The knapsack groups of a speed budget beyond the channel sets: a layer's ranks (``rank:<layer>``), and depth: the
blocks a plan removes, measured together in the order they would go, with each set's factor rescaled to what is left."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from torch import nn

from torchslim.compression.budget import FLOAT, Option, allocate_exact
from torchslim.compression.depth import bypass_for, bypassed
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.selector import set_module
from torchslim.measure.counts import count_macs

RANK = "rank:"  # the knapsack group of a layer's rank, next to the sets' names
BLOCK = "block:"  # the cost table's key of the model with the first k blocks of the removal order removed
DEPTH = "depth"  # a plan's key for the blocks it removes
LEAST_FACTOR = 0.05  # a set's rescaled factor never predicts less than this share of what the blocks leave
RESCORE = 4  # the blocks scored again after each step of the removal order


@dataclasses.dataclass
class Removal(Option):
    """The depth of a plan: the first ``len(blocks)`` blocks of the removal order, removed together (``cost``: their
    loss rise measured together; ``size``: the log of the cost left, measured)."""

    blocks: tuple[str, ...] = ()


@dataclasses.dataclass
class RemovalStep:
    """One step of the removal order: ``block`` removed after those before it; the loss rise with all of them gone."""

    block: str
    rise: float
    model: nn.Module | None  # with this block and those before it removed (None once measured)


def outermost_blocks(blocks: list[str]) -> list[str]:
    """The blocks not inside another one (a block's removal takes what is inside it)."""
    return [block for block in blocks if not any(block.startswith(f"{other}.") for other in blocks)]


def inside_block(group: str, block: str) -> bool:
    """Whether every layer of a knapsack group (a set "a+b", or a layer's rank group) is inside ``block``."""
    layers = group.removeprefix(RANK).split("+")
    return all(layer.startswith(f"{block}.") for layer in layers)


def removal_order(
    model: nn.Module, blocks: list[str], loss: Callable[[nn.Module], float], base: float, limit: float
) -> tuple[dict[str, float], list[RemovalStep]]:
    """Each block's loss rise when bypassed alone, and the order blocks go in: at each step the block whose removal,
    with those before it, raises the loss least, until none is left or the rise passes ``limit`` (removing several
    compounds: each step is measured together, not summed). After each step the ``RESCORE`` blocks that scored
    lowest so far are scored again with the ones removed gone (as ``remove_blocks(iterative)`` re-scores them all; a
    bound on the evaluations, which would otherwise grow with the square of the blocks)."""
    current = copy_model(model)
    remaining, steps = list(blocks), list[RemovalStep]()
    scores: dict[str, float] = {}
    alone: dict[str, float] = {}

    def score(block: str) -> float:
        with bypassed(current, block):
            return loss(current) - base

    while remaining:
        scored = remaining if not steps else sorted(remaining, key=lambda name: scores[name])[:RESCORE]
        scores.update({block: score(block) for block in scored})
        if not steps:
            alone = {block: max(0.0, value) for block, value in scores.items()}
        block = min(scored, key=lambda name: scores[name])
        if scores[block] > limit:
            break
        remaining.remove(block)
        set_module(current, block, bypass_for(current.get_submodule(block)))
        steps.append(RemovalStep(block, max(0.0, scores[block]), copy_model(current)))
    return alone, steps


def layer_macs(model: nn.Module, example: Any) -> dict[str, int]:
    """{layer name: MACs} of one forward pass (see ``count_macs``)."""
    return {row["name"]: int(row["macs"]) for row in count_macs(model, example)["layers"]}


def saving_outside(dense: dict[str, int], pruned: dict[str, int], removed: tuple[str, ...]) -> float:
    """The share of a candidate's MACs saving (``dense`` against ``pruned``, per layer) in layers outside the
    ``removed`` blocks: what it still saves once they are gone (a residual stream's set loses channels in every block,
    the removed ones included)."""

    def outside(layers: dict[str, int]) -> int:
        return sum(macs for name, macs in layers.items() if not any(name.startswith(f"{block}.") for block in removed))

    total = sum(dense.values()) - sum(pruned.values())
    return 1.0 if total <= 0 else min(1.0, max(0.0, (outside(dense) - outside(pruned)) / total))


def candidate_key(group: str, option: Option) -> str:
    """The cost table's key of an option: ``<set>@<ratio>`` or ``<layer>#<rank>``."""
    return f"{group.removeprefix(RANK)}#{option.rank}" if option.rank else f"{group}@{option.sparsity:g}"


def depth_choices(
    options: dict[str, list[Option]], steps: list[RemovalStep], shares: list[float], outside: Callable[[str, Option, tuple[str, ...]], float]
) -> list[tuple[Removal, dict[str, list[Option]]]]:
    """Per depth (the first k blocks of the order removed, their cost ``shares[k-1]`` of the dense model's), the
    groups left (those inside a removed block go with it) with each option's factor rescaled to the model that is
    left: an option saves the part of its dense saving outside the removed blocks (``outside(group, option,
    removed)``, a share of it; asked only of options that save), a larger share of less (a product with the blocks' factor would count that saving
    twice, or miss it). A depth that saves nothing over a shallower one is left out."""
    choices = [(Removal(0.0, FLOAT, 0.0, 0.0), options)]
    for k, share in enumerate(shares, 1):
        removed = tuple(step.block for step in steps[:k])
        if share <= 0.0 or share >= min(math.exp(choice[0].size) for choice in choices):
            continue  # removing this block as well saves nothing measured (or leaves nothing to measure)
        left = {
            group: [
                dataclasses.replace(option, size=_rescaled(option.size, share, outside(group, option, removed) if option.size < 0 else 1.0))
                for option in group_options
            ]
            for group, group_options in options.items()
            if not any(inside_block(group, block) for block in removed)
        }
        choices.append((Removal(0.0, FLOAT, steps[k - 1].rise, math.log(share), blocks=removed), left))
    return choices


def _rescaled(size: float, share: float, kept: float) -> float:
    """A log factor on the dense model as a log factor on a model ``share`` of the dense cost, ``kept`` of its saving
    left there."""
    return math.log(max(LEAST_FACTOR, 1.0 - kept * (1.0 - math.exp(size)) / share))


def _least(groups: dict[str, list[Option]]) -> float:
    """The least log cost of ``groups``: each at its cheapest option."""
    return sum(min(option.size for option in group) for group in groups.values())


def depth_floor(choices: list[tuple[Removal, dict[str, list[Option]]]]) -> float:
    """The least log cost any depth allows, every group left at its cheapest."""
    return min(removal.size + _least(left) for removal, left in choices)


def depth_plans(choices: list[tuple[Removal, dict[str, list[Option]]]], budget: float) -> list[tuple[float, float, dict[str, Option]]]:
    """Per depth that fits ``budget`` (a log cost), the knapsack of the groups left in what its removed blocks leave
    of it: (predicted loss rise, predicted log cost, plan), shallowest first."""
    plans = []
    for removal, left in choices:
        room = budget - removal.size
        least = _least(left)
        if room < least - 1e-9:
            continue
        plan: dict[str, Option] = {**allocate_exact(left, max(room, least)), DEPTH: removal} if left else {DEPTH: removal}
        plans.append((sum(option.cost for option in plan.values()), sum(option.size for option in plan.values()), plan))
    return plans


def least_rise(plans: list[tuple[float, float, dict[str, Option]]]) -> tuple[float, float, dict[str, Option]]:
    """The plan of least loss rise; of equal rises the one that spends more of the budget."""
    return min(plans, key=lambda entry: (round(entry[0], 12), -entry[1]))


def allocate_depth(choices: list[tuple[Removal, dict[str, list[Option]]]], budget: float) -> dict[str, Option]:
    """The plan of least predicted loss rise over every depth: per depth, the knapsack of the groups left in what
    the removed blocks leave of the budget. Of equal rises the plan that spends more of the budget wins."""
    plans = depth_plans(choices, budget)
    if not plans:
        raise TorchslimError(f"no depth and no setting of the channel sets fits a log cost of {budget:.4g} (the floor is {depth_floor(choices):.4g})")
    return least_rise(plans)[2]


def trial_plans(plans: list[tuple[float, float, dict[str, Option]]], count: int) -> list[tuple[float, float, dict[str, Option]]]:
    """The depths worth a trial: the plan that removes no block (where it fits and prunes or factorizes something)
    and the others of least predicted loss rise, ``count`` in all, shallowest first."""
    shallow = [entry for entry in plans if not removed_blocks(entry[2]) and any(option.sparsity > 0 or option.rank for option in entry[2].values())]
    deeper = sorted((entry for entry in plans if removed_blocks(entry[2])), key=lambda entry: (round(entry[0], 12), -entry[1]))
    chosen = shallow[:1] + deeper[: max(0, count - len(shallow[:1]))]
    return sorted(chosen, key=lambda entry: len(removed_blocks(entry[2])))


def removed_blocks(plan: dict[str, Option]) -> tuple[str, ...]:
    """The blocks a plan removes."""
    removal = plan.get(DEPTH)
    return removal.blocks if isinstance(removal, Removal) else ()


def flatten_plan(plan: dict[str, Option]) -> tuple[dict[str, Option], list[str]]:
    """A plan as {set or rank group: option} and the blocks it removes."""
    flat = {name: option for name, option in plan.items() if not isinstance(option, Removal)}
    removed = [block for option in plan.values() if isinstance(option, Removal) for block in option.blocks]
    return flat, sorted(removed)


def plan_parts(plan: dict[str, Option], sets: Any) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """What a plan does: each of ``sets`` pruned to its ratio, each layer factorized to its rank, the blocks removed."""
    flat, removed = flatten_plan(plan)
    ratios = {name: option.sparsity for name, option in flat.items() if name in sets and option.sparsity > 0}
    factored = {name.removeprefix(RANK): option.rank for name, option in flat.items() if option.rank}
    return ratios, factored, removed


def channels_only(option: Option) -> bool:
    """Whether an option only removes channels (no rank, no block)."""
    if isinstance(option, Removal):
        return not option.blocks
    return not option.rank


def next_budget(points: list[tuple[float, float, float]], target: float) -> float:
    """The knapsack's next (log) budget from the rounds measured so far, each (budget given, predicted, measured):
    between the loosest budget that met the target and the tightest that missed it, interpolated in log cost; else
    the last budget corrected by how far the product model was off (a miss tightens it by that and 2% more; a plan
    far under the target loosens it by at most half the log gap past a 1.25x step, since a product of many factors
    can be far off and the loosened plan might spend the whole budget and more)."""
    met = [(given, measured) for given, _, measured in points if measured <= target]
    missed = [(given, measured) for given, _, measured in points if measured > target]
    if met and missed:
        low, high = max(met), min(missed)
        if high[0] > low[0] and high[1] > low[1]:
            share = (math.log(target) - math.log(low[1])) / (math.log(high[1]) - math.log(low[1]))
            return low[0] + min(0.9, max(0.1, share)) * (high[0] - low[0])
    given, predicted, measured = points[-1]
    if measured > target:
        return given - math.log(measured / predicted) - math.log(1.02)
    step = math.log(predicted / measured)
    return given + min(step, max(math.log(1.25), step / 2))


__all__ = [
    "BLOCK",
    "DEPTH",
    "RANK",
    "Removal",
    "RemovalStep",
    "allocate_depth",
    "candidate_key",
    "channels_only",
    "depth_choices",
    "depth_floor",
    "depth_plans",
    "flatten_plan",
    "inside_block",
    "layer_macs",
    "least_rise",
    "next_budget",
    "outermost_blocks",
    "plan_parts",
    "removal_order",
    "removed_blocks",
    "saving_outside",
    "trial_plans",
]
