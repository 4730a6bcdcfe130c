"""What a speed budget measures: the cost of models (MACs counted, or latency timed side by side with the dense
model), the ranks each layer may be factorized to, and the rank a layer was factorized to."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from torch import nn

from torchslim.compression.budget import Option, full_rank_share
from torchslim.compression.factorize import FactorizedConv2d, FactorizedLinear, weight_reader
from torchslim.compression.speed_choices import RANK
from torchslim.compression.speed_config import SpeedBudgetConfig
from torchslim.core.selector import select_modules
from torchslim.measure.counts import count_macs
from torchslim.measure.latency import compare_latency


class Cost:
    """The cost a budget counts: MACs, or milliseconds on the backend measured side by side with the dense model."""

    def __init__(self, model: nn.Module, config: SpeedBudgetConfig, example: Any, timing_example: Any) -> None:
        self.model, self.config, self.example, self.timing_example = model, config, example, timing_example

    def of(self, models: dict[str, nn.Module]) -> dict[str, float]:
        """Each model's cost ("dense" included): MACs counted, or the median latency of interleaved rounds."""
        if self.config.measure == "macs":
            counted = {"dense": self.model, **models}
            return {name: float(count_macs(model, self.example)["total"]) for name, model in counted.items()}
        medians = compare_latency(
            {"dense": self.model, **models},
            self.timing_example,
            batch_sizes=(self.config.batch_size,),
            rounds=self.config.timing_rounds,
            runs=self.config.timing_runs,
            warmup=5,
            backend=self.config.backend,
            threads=self.config.threads,
            min_seconds=self.config.timing_min_seconds,
        )
        return {name: per_size[self.config.batch_size] for name, per_size in medians.items()}


DISAGREE = 1.5  # a finished model's timing and its trial's further apart than this factor: the finished model is timed again


def finished_cost(finished: float, trial: float | None, retime: Callable[[], float]) -> tuple[float, float | None]:
    """The cost (a fraction of the dense model's) of a finished model timed at ``finished``, its plan's trial timed at
    ``trial`` (None: not tried): the mean of both where they agree within ``DISAGREE`` (the same architecture timed
    twice, apart; MACs: equal). Where they do not, one of them is off (a noise spike of the dense model it was timed
    beside gave a trial 0.006 of the dense time): the finished model is timed again (``retime()``) and the median of
    the three is its cost, so that a finished model that measures over a budget twice is not called within it on
    the strength of a trial far from it. Returns (cost, the second timing or None)."""
    if trial is None:
        return finished, None
    if max(finished, trial) <= DISAGREE * min(finished, trial):
        return (finished + trial) / 2, None
    again = retime()
    return statistics.median([finished, trial, again]), again


def offered_ranks(model: nn.Module, config: SpeedBudgetConfig, outputs: set[str]) -> dict[str, list[int]]:
    """The integer ranks each selected Linear / ungrouped Conv2d layer may be factorized to (those whose two factors
    hold fewer weights than the layer), ``outputs`` (the model's output layers) and the layers torch's attention and
    transformer modules read the weight of (see ``factorize``) left out."""
    if not config.ranks:
        return {}
    found = {}
    for name, module in select_modules(model, config.layers, default_types=("Linear", "Conv2d")):
        if name in outputs or weight_reader(model, name) or not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            continue
        weight = module.weight
        rows, columns = weight.shape[0], weight[0].numel()
        ranks = sorted({full_rank_share(r, rows, columns) for r in config.ranks} - {0})
        kept = [rank for rank in ranks if rank * (rows + columns) < rows * columns]
        if kept:
            found[name] = kept
    return found


def factorized_rank(model: nn.Module, name: str) -> int | None:
    """The rank of layer ``name`` in ``model`` as factorized (None: left whole)."""
    module = model.get_submodule(name)
    if not isinstance(module, (FactorizedLinear, FactorizedConv2d)):
        return None
    first = module[0]
    if isinstance(first, nn.Linear):
        return first.out_features
    assert isinstance(first, nn.Conv2d)
    return first.out_channels


def set_rows(sets: dict[str, int], flat: dict[str, Option], table: dict[str, float], dense: float, inside: dict[str, str]) -> list[dict[str, Any]]:
    """The report's row of each set: its channels, the ratio chosen, and what that ratio was predicted to cost."""
    return [
        {
            "set": name,
            "channels": sets[name],
            "ratio": flat[name].sparsity if name in flat else 0.0,
            "predicted_loss_rise": round(flat[name].cost if name in flat and not flat[name].rank else 0.0, 5),
            # the set pruned alone in the dense model (the plan's prediction rescales it to what removed blocks leave)
            "predicted_factor": round(table[f"{name}@{flat[name].sparsity:g}"] / dense if name in flat and flat[name].sparsity else 1.0, 4),
            **({"removed_with": inside[name]} if name in inside else {}),
        }
        for name in sets
    ]


def factorized_rows(
    layer_ranks: dict[str, list[int]], flat: dict[str, Option], table: dict[str, float], dense: float, in_model: dict[str, int | None]
) -> list[dict[str, Any]]:
    """The report's row of each layer the plan factorizes: the rank in the model and the rank measured."""
    return [
        {
            "layer": name,
            "rank": in_model[name],  # in the model (None: the layer, narrowed by pruning, was left whole)
            "rank_measured": option.rank,  # on the whole layer, as its loss rise and factor were measured
            "predicted_loss_rise": round(option.cost, 5),
            "predicted_factor": round(table[f"{name}#{option.rank}"] / dense, 4),  # factorized alone in the dense model
        }
        for name in layer_ranks
        if (option := flat.get(f"{RANK}{name}") or flat.get(name)) is not None and option.rank
    ]


def budget_note(
    config: SpeedBudgetConfig,
    chosen: dict[str, Any],
    achieved: float,
    dense: float,
    unit: str,
    rounds: int,
    factorized: list[dict[str, Any]],
    removed: list[str],
) -> str:
    """The report's line on the budget: met or missed, by how much, in which round, what was factorized and removed."""

    def amount(value: float) -> str:
        return f"{value:,.0f}" if config.measure == "macs" else f"{value:.3f}"

    timed = config.measure == "latency" and chosen.get("trial_ratio")
    return (
        f"budget {config.target:g} of the dense model's {config.measure} {'met' if chosen['met'] else 'missed'}: {achieved:.3f} "
        f"({amount(chosen['measured'])} against {amount(dense)} {unit}; round {chosen['round']} of {rounds})"
        + "".join(
            f"; {row['layer']} factorized to rank {row['rank']}" if row["rank"] else f"; {row['layer']} left whole (too narrow after pruning to gain)"
            for row in factorized
        )
        + (f"; blocks removed: {', '.join(removed)}" if removed else "")
        + (f"; timed twice, {chosen['trial_ratio']:.3f} tried and {chosen['finished_ratio']:.3f} finished" if timed else "")
        + (f" (far apart: the finished model timed again, {chosen['retimed_ratio']:.3f})" if timed and chosen.get("retimed_ratio") is not None else "")
    )


__all__ = ["DISAGREE", "Cost", "budget_note", "factorized_rank", "factorized_rows", "finished_cost", "offered_ranks", "set_rows"]
