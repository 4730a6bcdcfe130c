"""Automatic compression to a size budget: per-layer sparsity and bit width chosen from sensitivity curves, so that
the compressed file fits the budget with the least predicted loss of quality.

1. ``sensitivity`` measures, per layer, the task's loss with only that layer pruned to each sparsity and only that
   layer quantized to each bit width.
2. Each layer's options are (sparsity, bits) pairs, bits 32 meaning "left in float", and, with ``ranks``, (rank,
   bits) pairs: the layer factorized by SVD into two thinner layers (no sparsity) whose weights are then shared; an
   option's predicted cost is the rise of the loss its sparsity or rank and its bit width each cause alone (summed),
   its predicted size the bytes of its non-zero codes, their relative indices and its codebooks. Every layer's option is picked so the sum fits the
   budget with the least summed cost: the multiple-choice knapsack, solved exactly by dynamic programming over the
   bytes (a Lagrangian search would find only its convex-hull plans, which can leave a third of a budget unspent).
   ``uniform`` instead gives every layer the same pair (the baseline an automatic allocation must beat).
3. The plan runs as a recipe (the chosen layers factorized and fine-tuned, iterative pruning with fine-tuning,
   k-means weight sharing with centroid fine-tuning, entropy coding); the file's real size is measured, and while it
   misses the budget, or leaves more than a tenth of it unused, the weights' size model is corrected by the measured
   ratio of the weights' bytes (the file less the header and the tensors stored whole) and the allocation repeated
   (of the files that fit, the largest is kept; a corrected budget that picks a plan that missed already is tightened
   further, one that picks a plan that met ends the rounds).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torchslim.compression.sensitivity import sensitivity
from torchslim.core.config import Config, ConfigError, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.selector import LayerSelector, distinct_weights, select_modules
from torchslim.pruning.importance import parametrized_weight
from torchslim.tasks.base import Task

FLOAT = 32
HEADER_BYTES = 1024  # the .tslim header (architecture spec, tensor records), compressed
SLACK = 0.9  # a file within this fraction of the budget ends the rounds; a smaller one is re-allocated to use the rest


@dataclasses.dataclass(frozen=True)
class BudgetConfig(Config):
    """``target_size``: bytes of the compressed .tslim file. ``sparsities`` and ``bits``: the levels each layer may
    take (0 and 32 = unpruned / float are always allowed). ``uniform``: one pair for all layers. ``prune_steps`` and
    ``finetune``: the pruning schedule's steps and the training after each; ``quantize_finetune``: centroid training;
    ``rounds``: files made while the file misses the budget (or leaves a tenth of it unused); ``eval_limit``: examples evaluated per
    sensitivity measurement, on ``sensitivity_split`` ("train", the default, so that the allocation never sees the
    data the result is tested on; or "eval"). The bit widths' sensitivity is measured with uniform levels per output channel,
    although the plan shares k-means centroids: one-shot k-means on a layer costs almost no loss (at high sparsity it
    can lower it), so allocations measured that way chose 2 bits that cost 2 to 4 points of error once fine-tuned
    (LeNet-300-100, benchmarks.budget); the uniform levels' harsher curve steers away from them. ``ranks``: the
    ranks a layer may be factorized to instead of pruned (integers, or fractions of the layer's full rank; by default 3,
    5, 10 and 20% of it; empty: no factorization), each measured by its own sensitivity curve; a rank that would not
    shrink the layer is left out, and ``uniform`` takes none. With them the allocation beat its own sparsity-and-bits
    plans at 5 of 8 budgets on LeNet-300-100 and LeNet-5 (benchmarks.budget)."""

    target_size: int = 0
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98)
    bits: tuple[int, ...] = (8, 6, 5, 4, 3, 2)
    uniform: bool = False
    ranks: tuple[float, ...] = (0.03, 0.05, 0.1, 0.2)
    layers: LayerSelector = LayerSelector()
    prune_steps: int = 3
    finetune: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epochs": 2, "lr": 0.02, "eval_every_epoch": False})
    quantize_finetune: dict[str, Any] = dataclasses.field(default_factory=lambda: {"epochs": 1, "optimizer": "adam", "lr": 3e-5, "eval_every_epoch": False})
    rounds: int = 3
    eval_limit: int | None = 1024
    sensitivity_split: str = "train"

    def validate(self) -> None:
        check(self.target_size > 0, f"target_size must be a positive number of bytes, got {self.target_size}")
        check(all(0.0 < s < 1.0 for s in self.sparsities), f"sparsities must be in (0, 1), got {self.sparsities}")
        check(all(1 <= b <= 8 for b in self.bits), f"bits must be between 1 and 8 (k-means codes), got {self.bits}")
        check(self.prune_steps >= 1 and self.rounds >= 1, "prune_steps and rounds must be >= 1")
        check(self.sensitivity_split in ("eval", "train"), f"sensitivity_split must be eval or train, got {self.sensitivity_split!r}")
        for value in self.ranks:
            check(value > 0 and (value < 1 or float(value).is_integer()), f"ranks: each must be an integer rank or a fraction in (0, 1), got {value}")
        from torchslim.train.fit import TrainConfig

        for key in ("finetune", "quantize_finetune"):  # before the sensitivity sweep, not when the recipe reaches them
            TrainConfig.coerce(getattr(self, key), where=f"auto_compress.{key}")


def index_bits(sparsity: float) -> float:
    """Bits of a relative index per kept weight (with filler entries) at ``sparsity``: about log2 of the mean gap, one
    more for the spread, at most 8 (Deep Compression's relative indexing, entropy coding left out)."""
    if sparsity <= 0:
        return 0.0
    return min(8.0, math.log2(1.0 / (1.0 - sparsity)) + 1.0)


def layer_bytes(weights: int, sparsity: float, bits: int) -> float:
    """Predicted bytes of one layer's weight: kept codes and their indices, plus the codebook (fp32 centroids)."""
    kept = weights * (1.0 - sparsity)
    if bits >= FLOAT:
        return kept * (32 + index_bits(sparsity)) / 8
    return kept * (bits + index_bits(sparsity)) / 8 + 4 * 2**bits


def factorized_bytes(rows: int, columns: int, rank: int, bits: int) -> float:
    """Predicted bytes of a weight (``rows`` x ``columns``, a convolution's kernel flattened) factorized at ``rank``:
    the two factors' codes and a codebook each."""
    weights = rank * (rows + columns)
    return weights * 4 if bits >= FLOAT else weights * bits / 8 + 2 * 4 * 2**bits


def full_rank_share(rank: float, rows: int, columns: int) -> int:
    """The integer rank that ``rank`` (an integer, or a fraction of the full rank) means for a ``rows`` x ``columns``
    weight, as ``sensitivity`` measures it."""
    full = min(rows, columns)
    return max(1, min(full, int(rank) if rank >= 1 else round(rank * full)))


@dataclasses.dataclass
class Option:
    sparsity: float
    bits: int
    cost: float  # predicted rise of the loss
    size: float  # predicted bytes
    rank: int = 0  # factorized to this rank (0: not factorized)


def layer_options(curves: dict[str, dict[float, float]], shape: tuple[int, int], config: BudgetConfig) -> list[Option]:
    """Every (sparsity, bits) pair of one layer of ``shape`` (rows, columns) with its predicted loss rise (sum of the
    two curves) and bytes; with ``config.ranks``, every (rank, bits) pair whose factors are smaller than the weight."""
    rows, columns = shape
    options = []
    for sparsity in (0.0, *config.sparsities):
        for bits in (FLOAT, *config.bits):
            cost = curves["sparsity"].get(sparsity, 0.0) + curves["bits"].get(bits, 0.0)
            options.append(Option(sparsity, bits, max(0.0, cost), layer_bytes(rows * columns, sparsity, bits)))
    for rank in sorted({full_rank_share(r, rows, columns) for r in config.ranks}):
        if rank * (rows + columns) >= rows * columns or rank not in curves.get("rank", {}):
            continue
        for bits in (FLOAT, *config.bits):
            cost = curves["rank"][rank] + curves["bits"].get(bits, 0.0)
            options.append(Option(0.0, bits, max(0.0, cost), factorized_bytes(rows, columns, rank, bits), rank))
    return options


def uniform_plans(options: dict[str, list[Option]]) -> list[dict[str, Option]]:
    """Every plan of one shared (sparsity, bits) pair for all layers, in the order of the pairs."""
    pairs = sorted({(o.sparsity, o.bits) for layer in options.values() for o in layer})
    return [{name: next(o for o in layer if (o.sparsity, o.bits) == pair) for name, layer in options.items()} for pair in pairs]


def allocate(options: dict[str, list[Option]], budget: float, uniform: bool = False) -> dict[str, Option]:
    """Each layer's option with the least summed predicted cost whose sizes fit ``budget`` (``allocate_exact``;
    ``uniform``: the one shared (sparsity, bits) pair that fits with the least cost). Of equal costs (rises clamped
    at 0 tie often) the larger plan, the least compressed, wins, as in ``allocate_exact``."""
    if uniform:
        fitting = []
        for chosen in uniform_plans(options):
            size, cost = sum(o.size for o in chosen.values()), sum(o.cost for o in chosen.values())
            if size <= budget:
                fitting.append((round(cost, 12), -size, chosen))
        if not fitting:
            raise TorchslimError(f"no single (sparsity, bits) pair fits a budget of {budget:,.4g} (in the allocation's units)")
        return min(fitting, key=lambda entry: (entry[0], entry[1]))[2]

    return allocate_exact(options, budget)


def allocate_exact(options: dict[str, list[Option]], budget: float, bins: int = 2000) -> dict[str, Option]:
    """Each layer's option with the least summed predicted cost whose sizes fit ``budget``, by dynamic programming
    over the sizes in ``bins`` steps (each rounded up, so the plan fits): the multiple-choice knapsack solved outright,
    where a Lagrangian search (one price per unit of size) finds only the plans on the convex hull and so leaves
    budget unspent. Of equal costs the larger plan (less compressed) wins."""
    floors = {name: min(o.size for o in layer) for name, layer in options.items()}
    room = budget - sum(floors.values())
    if room < 0:
        raise TorchslimError(f"the smallest allowed setting of every layer takes {sum(floors.values()):,.4g}, more than the {budget:,.4g} available")
    step = room / bins if room > 0 else 1.0
    states: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    names = list(options)
    for name in names:
        grown: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (cost, picks) in states.items():
            for index, option in enumerate(options[name]):
                extra = option.size - floors[name]
                total = used + (math.ceil(extra / step - 1e-9) if extra > 0 else 0)
                if total > bins or (room == 0 and extra > 0):
                    continue
                value = cost + option.cost
                if total not in grown or value < grown[total][0]:
                    grown[total] = (value, (*picks, index))
        states = grown
    _, (_, picks) = min(states.items(), key=lambda item: (round(item[1][0], 12), -item[0]))
    return {name: options[name][index] for name, index in zip(names, picks)}


def _curves(result: Any, names: list[str]) -> dict[str, dict[str, dict[float, float]]]:
    """{layer: {"sparsity": {level: loss rise}, "bits": {level: loss rise}}} from a sensitivity report (the loss, not
    the error: it moves smoothly where the error does not)."""
    stage = result.report.stages[0]
    base = stage.metrics["loss"]
    curves: dict[str, dict[str, dict[float, float]]] = {name: {"sparsity": {}, "bits": {}, "rank": {}} for name in names}
    for row in stage.layers:
        curves[row["layer"]][row["technique"]][row["level"]] = row["loss"] - base
    return curves


def auto_compress(
    model: nn.Module,
    data: Any,
    config: BudgetConfig | dict,
    task: str | Task | None = None,
    progress: bool | str | None = None,
    factory: str | None = None,
    factory_kwargs: dict[str, Any] | None = None,
) -> Any:
    """Compress ``model`` into a .tslim of at most ``target_size`` bytes (see the module's documentation). Returns the
    ``CompressResult`` of the round that met the budget (or the last one, with a note that it missed), its report
    holding the allocation (``artifacts["allocation"]``: each layer's sparsity, bits, predicted bytes and loss rise,
    and each round's predicted and measured size).

    Every plan is measured as the .tslim file it saves to, so the file must be able to rebuild the model; this is
    checked before any work. A model whose class cannot be imported again (defined in the script being run, or in a
    function) names its builder with ``factory="package.module:callable"`` and ``factory_kwargs`` (as ``ts.save``
    takes them): the file records it, and the result saves and loads with it (``trust_factory``)."""
    from torchslim.pipeline.runner import compress

    config = BudgetConfig.coerce(config, where="auto_compress")
    model = _rebuildable(model, factory, factory_kwargs)
    chosen, _ = distinct_weights(select_modules(model, config.layers, default_types=("Linear", "Conv2d")))  # a tied weight: one layer
    for name, module in chosen:  # its stages: k-means weight sharing and SVD of Linear / Conv2d weights
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise ConfigError(
                f"auto_compress.layers: layer {name!r} is a {type(module).__name__}; auto_compress compresses Linear and Conv2d layers "
                "(leave the others out of layers.types / include)"
            )
    names = [name for name, _ in chosen]
    shapes = {name: (int(module.weight.shape[0]), int(module.weight[0].numel())) for name, module in chosen}
    weights = {name: rows * columns for name, (rows, columns) in shapes.items()}
    fixed = HEADER_BYTES + _whole_bytes(model, [module for _, module in chosen])
    _check_room(config.target_size, fixed)  # before any measurement
    measured = sensitivity(
        model,
        data,
        {
            "sparsities": config.sparsities,
            "bits": config.bits,
            "bits_scheme": "uniform",  # the better predictor of the fine-tuned k-means plan (see BudgetConfig)
            "ranks": () if config.uniform else config.ranks,
            "layers": config.layers,
            "eval_limit": config.eval_limit,
            "split": config.sensitivity_split,
        },
        task=task,
    )
    if "loss" not in measured.report.stages[0].metrics:
        raise ConfigError(f"auto_compress ranks its choices by the task's loss; the task's metrics hold none: {sorted(measured.report.stages[0].metrics)}")
    curves = _curves(measured, names)
    for name, module in chosen:  # factorize's SVD forms: a Linear, an ungrouped convolution
        if not (isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)):
            curves[name]["rank"] = {}
    options = {name: layer_options(curves[name], shapes[name], config) for name in names}

    def run(plan: dict[str, Option]) -> tuple[Any, int]:
        result = compress(model, _recipe(plan, config), data, task=task, latency=False, progress=progress)
        return result, _file_bytes(result)

    rounds, outcomes, best, ended = size_rounds(options, fixed, config, run)
    result, plan = outcomes[best if best is not None else -1]
    chosen_round = rounds[best if best is not None else -1]
    result.report.artifacts["allocation"] = {
        "target_size": config.target_size,
        "uniform": config.uniform,
        "layers": [
            {
                "layer": name,
                "weights": weights[name],
                "sparsity": plan[name].sparsity,
                "rank": plan[name].rank or None,
                "bits": plan[name].bits,
                "predicted_bytes": round(plan[name].size),
                "predicted_loss_rise": round(plan[name].cost, 5),
            }
            for name in names
        ],
        "rounds": rounds,
        "chosen_round": chosen_round["round"],
    }
    result.report.stages[-1].notes.append(
        f"budget {config.target_size:,} bytes {'met' if chosen_round['met'] else 'missed'}: {chosen_round['measured_bytes']:,} bytes "
        f"(round {chosen_round['round']} of {len(rounds)})" + (f"; {ended}" if ended else "")
    )
    return result


def size_rounds(
    options: dict[str, list[Option]], fixed: float, config: BudgetConfig, run: Callable[[dict[str, Option]], tuple[Any, int]]
) -> tuple[list[dict[str, Any]], list[tuple[Any | None, dict[str, Option]]], int | None, str | None]:
    """The rounds of a size budget: allocate the bytes left for the selected weights (``target_size`` less ``fixed``,
    the header and the tensors stored whole), carry the plan out (``run(plan)``: the result and its file's bytes) and
    correct the weights' size model by what the file measured, ``(measured - fixed) / (predicted - fixed)`` (with 2%
    more after a miss), up to ``config.rounds`` files. A corrected budget that picks a plan that missed already is
    tightened further (until the plan no longer fits) instead of ending the rounds; one that picks a plan that met
    ends them (the same file again). Returns each round's row, its (result, plan), the index of the round that met the
    budget with the largest file (None: none met) and why the rounds ended early (None: they did not); of the results
    only the best round's and the last round's are kept (the others are None)."""
    target = config.target_size
    room = _check_room(target, fixed)
    correction = 1.0  # measured over predicted bytes of the selected weights
    rounds: list[dict[str, Any]] = []
    outcomes: list[tuple[Any | None, dict[str, Option]]] = []
    best: int | None = None
    for _ in range(4 * config.rounds):  # a repeated plan costs no round, but its tightening is bounded
        if len(rounds) >= config.rounds:
            break
        available = room / correction
        try:
            plan = allocate(options, available, config.uniform)
        except TorchslimError:
            smallest = _smallest(options, config.uniform)
            if not rounds:
                raise TorchslimError(
                    f"auto_compress: target_size {target:,} bytes leaves {room:,.0f} bytes for the weights of the {len(options)} selected layers once "
                    f"the header ({HEADER_BYTES:,} bytes) and the tensors stored whole (biases, norms, buffers: {fixed - HEADER_BYTES:,.0f} bytes) are "
                    f"counted; the smallest allowed setting of {'all layers (one shared pair)' if config.uniform else 'every layer'} "
                    f"(its highest sparsity, fewest bits or lowest rank) takes {smallest:,.0f} bytes: raise target_size to at least "
                    f"{fixed + smallest:,.0f} bytes, or allow higher sparsities, fewer bits or lower ranks"
                ) from None
            # a later round: the corrected size model leaves less than the smallest plan; that plan is measured before
            # the budget is called missed (the rounds run so far stand: one may have met the budget)
            plan = allocate(options, smallest * (1 + 1e-9), config.uniform)
            if any(ran == plan for _, ran in outcomes):
                note = (
                    f"round {len(rounds) + 1} not run: the size model, corrected by the files measured (x{correction:.3f}), leaves "
                    f"{available:,.0f} bytes for the weights, less than the {smallest:,.0f} bytes of their smallest allowed setting, which was run"
                )
                return rounds, outcomes, best, note
        earlier = next((index for index, (_, ran) in enumerate(outcomes) if ran == plan), None)
        if earlier is not None:
            if rounds[earlier]["met"]:
                break  # the corrected size model chose a plan that met already: running it again gives the same file
            # it chose a plan that missed already: tighten by that plan's own miss, so that it no longer fits
            correction = max(correction * 1.02, _weights_ratio(rounds[earlier]["measured_bytes"], fixed, plan) * 1.02)
            continue
        result, actual = run(plan)
        met = actual <= target
        rounds.append({"round": len(rounds) + 1, "predicted_bytes": round(fixed + sum(o.size for o in plan.values())), "measured_bytes": actual, "met": met})
        outcomes.append((result, plan))
        if met and (best is None or actual > rounds[best]["measured_bytes"]):
            best = len(rounds) - 1  # of the files that fit, the one that spends most of the budget
        # only the best and the last result are held (each is a whole model); the plans run stay, to be recognized
        outcomes[:-1] = [(ran if index == best else None, plan_run) for index, (ran, plan_run) in enumerate(outcomes[:-1])]
        if met and actual >= SLACK * target:
            break  # close enough to the budget: little left to spend
        # the weights' size model corrected by what was measured, both ways (the fixed bytes do not scale with it)
        correction = _weights_ratio(actual, fixed, plan) * (1.02 if not met else 1.0)
    return rounds, outcomes, best, None


def _rebuildable(model: nn.Module, factory: str | None, factory_kwargs: dict[str, Any] | None) -> nn.Module:
    """``model`` as auto_compress measures it: with ``factory`` (a copy of it) recording that builder, and checked
    to save to a file that rebuilds it (an error, before any work, says what to give where it would not)."""

    from torchslim.core.spec import set_spec, spec_of
    from torchslim.io.modelfile import file_spec

    if factory is None and factory_kwargs:
        raise TorchslimError("auto_compress: factory_kwargs given without a factory; name the builder with factory='package.module:callable'")
    if factory is not None:
        if factory.split(":", 1)[0] == "__main__":
            raise TorchslimError(
                f"auto_compress: factory {factory!r} is in the script being run (__main__), which another process cannot import; "
                "move the class (or a function that builds it) to a module and name it there, e.g. factory='mynets:Net'"
            )
        model = copy_model(model)  # the caller's model keeps its own spec
        set_spec(model, {"factory": factory, "kwargs": dict(factory_kwargs or {}), "transforms": spec_of(model).get("transforms", []), "inferred": True})
    spec = spec_of(model)
    if spec.get("unimportable"):
        raise TorchslimError(
            f"auto_compress: the model's class {spec['factory']} cannot be imported again (it is defined in the script being run or in a "
            "function), and every plan is measured as the .tslim file it saves, which records how to rebuild the model; checked before any "
            "work: move the class to a module and import it from there, or pass auto_compress(..., factory='package.module:callable', "
            "factory_kwargs={...}) naming an importable builder of this architecture"
        )
    try:
        file_spec(model, "auto_compress")
    except TorchslimError as error:
        raise TorchslimError(
            f"{error}. auto_compress measures every plan as the .tslim file it saves, so this is checked before any work: "
            "move the class to a module and import it from there, or pass auto_compress(..., factory='package.module:callable', "
            "factory_kwargs={...}) naming an importable builder of this architecture"
        ) from None
    return model


def _whole_bytes(model: nn.Module, layers: list[nn.Module]) -> int:
    """fp32 bytes of the floating-point tensors stored whole (all but the selected layers' weights), each tensor once
    however many names it has (a layer kept as self.a = self.b, tied weights)."""
    selected = {id(parametrized_weight(layer)) for layer in layers}
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)}
    return sum(4 * t.numel() for key, t in unique.items() if key not in selected and t.is_floating_point())


def _check_room(target: int, fixed: float) -> float:
    """The bytes ``target`` leaves for the selected weights once the ``fixed`` bytes are counted (an error: none)."""
    if target <= fixed:
        raise TorchslimError(
            f"auto_compress: target_size {target:,} bytes is used up before any weight is stored: the header ({HEADER_BYTES:,} bytes) and the "
            f"tensors stored whole (biases, norms, buffers: {fixed - HEADER_BYTES:,.0f} bytes) take {fixed:,.0f} bytes; raise target_size"
        )
    return target - fixed


def _weights_ratio(measured: int, fixed: float, plan: dict[str, Option]) -> float:
    """Measured over predicted bytes of a plan's weights (the file less the fixed bytes)."""
    return max(1.0, measured - fixed) / max(1e-9, sum(o.size for o in plan.values()))


def _smallest(options: dict[str, list[Option]], uniform: bool) -> float:
    """Bytes of the smallest plan allowed: every layer at its smallest option (``uniform``: the smallest shared pair)."""
    if not uniform:
        return sum(min(o.size for o in layer) for layer in options.values())
    return min(sum(o.size for o in chosen.values()) for chosen in uniform_plans(options))


def _file_bytes(result: Any) -> int:
    """Bytes of the .tslim file the result saves to (its header holds the recipe and stage names too)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.tslim"
        result.save(path)
        return path.stat().st_size


def _recipe(plan: dict[str, Option], config: BudgetConfig) -> dict[str, Any]:
    """The recipe that carries out an allocation: the factorized layers first (SVD, as their sensitivity was
    measured; fine-tuned), then the pruned ones, then weight sharing of every quantized layer (both factors of a
    factorized one)."""
    stages: list[dict[str, Any]] = []
    factorized = {name: o.rank for name, o in plan.items() if o.rank}
    if factorized:
        stages.append({"factorize": {"method": "svd", "overrides": factorized, "layers": {"include": list(factorized)}, "finetune": dict(config.finetune)}})
    pruned = {name: o.sparsity for name, o in plan.items() if o.sparsity > 0}
    if pruned:
        final = max(pruned.values())
        steps = [round(final * (k + 1) / config.prune_steps, 4) for k in range(config.prune_steps)]
        stages.append(
            {"prune": {"scope": "layer", "sparsity": steps, "overrides": pruned, "layers": {"include": list(pruned)}, "finetune": dict(config.finetune)}}
        )
    quantized = {part: o.bits for name, o in plan.items() if o.bits < FLOAT for part in ((f"{name}.0", f"{name}.1") if o.rank else (name,))}
    if quantized:
        stages.append(
            {
                "quantize": {
                    "weights": {"scheme": "kmeans", "bits": min(quantized.values())},
                    "overrides": {name: {"bits": bits} for name, bits in quantized.items()},
                    "layers": {"include": list(quantized)},
                    "finetune": dict(config.quantize_finetune),
                }
            }
        )
    stages.append({"encode": {}})
    return {"name": f"budget-{config.target_size}{'-uniform' if config.uniform else ''}", "stages": stages}


def parse_size(text: str) -> int:
    """``20KB`` / ``20KiB`` / ``1.5MB`` / ``20000`` -> bytes (KB = 1000, KiB = 1024)."""
    units = {"": 1, "B": 1, "KB": 1000, "KIB": 1024, "MB": 1000**2, "MIB": 1024**2, "GB": 1000**3, "GIB": 1024**3}
    stripped = text.strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGIB")
    unit = stripped[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ConfigError(f"--target-size: expected a size such as 20KB, 20KiB or 20000 (bytes), got {text!r}")
    return int(value * units[unit])


__all__ = ["BudgetConfig", "allocate", "auto_compress", "layer_bytes", "parse_size", "size_rounds"]
