"""Automatic structured compression to a MACs or a measured-latency budget: how much of each coupled set of channels
to remove, chosen from measured sensitivity and measured cost, so that the model meets the budget with the least
predicted loss of quality.

1. ``channel_sets`` lists the coupled sets (a layer's filters, a residual stream) structured pruning may shrink.
2. For every set and every ratio, that set alone is pruned (its lowest-importance channels removed) and measured: the
   task's loss on a few evaluation batches (its rise over the dense model's is the predicted cost) and the model's
   MACs (counted) or its latency on the named backend. The latency table times all these models side by side with
   the dense one in interleaved rounds, once; MACs never stand in for latency.
3. The cost of a plan is modelled as the dense cost times each set's own factor (its cost pruned alone over the
   dense cost; a sum of savings would count a layer between two pruned sets twice). Each set's ratio is picked so the
   predicted loss rises sum to the least while the predicted cost fits the budget (``budget.allocate_exact``, a
   knapsack over the logs of the factors); ``uniform`` instead gives every set the same ratio (the baseline an
   allocation must beat).
4. The plan runs as a recipe (channels removed, then fine-tuning) and the result is measured the same way (latency
   timed side by side with the dense model). While it misses the budget, the budget given to the allocation is
   tightened by how far the prediction was off and the allocation repeated (a plan far under the budget loosens it,
   by at most half its log gap; once one round met and another missed, the next budget is interpolated between
   them); of the plans that met it, the one that spends most of it is kept. When every round misses, the most-pruned
   plan (every set at its largest ratio) is measured too before the budget is called missed. With ``trials`` (the
   default; see below) the rounds are rounds of trials, each corrected by what its plan measured in its trial, and
   only the best plan tried is carried out with the whole fine-tuning.

With ``ranks``, each Linear / ungrouped Conv2d layer may also be factorized by SVD (two thinner layers, see
``factorize``) at each rank: that layer factorized alone is measured the same way (loss rise, MACs or latency), and
its ranks are further choices of the set of its own outputs (channels or a rank: both cut the same layer, and the
product of their factors would count that saving twice), or one more group of the knapsack where no set is its own.
A plan that factorizes runs the channel pruning first, then the factorization (each layer at the rank it was measured
at, so that its quality is what was measured; a layer whose inputs pruning left too few to gain from that rank stays
whole and is named), then the fine-tuning. A rank kept on a layer whose inputs shrank costs more than the product
model predicts; the rounds correct for it as for any miss. The layers whose outputs are the model's own (a
classifier, a language model's head) are not factorized, as structured pruning keeps their channels: a classifier
below the rank of its classes cannot tell them apart, and fine-tuning does not bring that back.

With ``depth``, bypassable blocks (see ``remove_blocks``) may be removed as well: the order they would go in is found
as ``remove_blocks`` finds it, and each depth (the first k blocks of that order removed together) is measured like a
set, its loss rise and cost with all k gone. For each depth the knapsack allocates the sets and ranks left in what the
blocks leave of the budget, each factor rescaled to the part of its saving outside the removed blocks (counted MACs,
per layer). A plan prunes channels, factorizes, then removes its blocks (so every name is as measured), and fine-tunes.

Both models can be wrong: summed loss rises judge a plan of many pruned sets far worse than it does after a few
batches of training and rank depths apart from how fine-tuning recovers them, and a product of factors misjudges the
latency of a layer both narrowed and factorized. So with ``trials`` each round carries out several plans (the depths
of least predicted rise, the knapsack's with channels alone, the plan of one ratio), trains each for ``trial_batches``
batches and measures its loss and cost (a short fine-tuning per proposal, as NetAdapt chooses among its proposals);
the round picks the least loss among those that meet the budget, and the next budget is corrected by it. Nothing is
fine-tuned in full while the rounds search: at the end the plan of least loss that met the budget in its trial, in
any round, is carried out; where the finished model misses (a latency met by a hair), the next must meet with the
margin that miss showed, and a round of trials more is aimed at it where none does. Details and measured cases:
docs/network-compression.md.

Example:
    >>> import torchslim as ts
    >>> data = ts.data.load("digits")
    >>> model = ts.models.create("lenet-300-100", in_features=64)
    >>> result = auto_narrow(model, data, {"target_macs": 0.5, "finetune": None, "ratios": [0.5, 0.75]})
    >>> allocation = result.report.artifacts["allocation"]
    >>> chosen = allocation["rounds"][allocation["chosen_round"] - 1]
    >>> chosen["met"] and chosen["measured"] <= 0.5 * allocation["dense"]
    True
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from torchslim.compression.budget import FLOAT, SLACK, Option, allocate
from torchslim.compression.depth import bypass_for, candidate_blocks, leaves_no_marks
from torchslim.compression.factorize import factorize
from torchslim.compression.speed_choices import (
    BLOCK,
    RANK,
    RemovalStep,
    allocate_depth,
    candidate_key,
    channels_only,
    depth_choices,
    depth_floor,
    depth_plans,
    flatten_plan,
    inside_block,
    layer_macs,
    least_rise,
    next_budget,
    outermost_blocks,
    plan_parts,
    removal_order,
    removed_blocks,
    saving_outside,
    trial_plans,
)
from torchslim.compression.speed_config import SpeedBudgetConfig
from torchslim.compression.speed_measure import Cost, budget_note, factorized_rank, factorized_rows, finished_cost, offered_ranks, set_rows
from torchslim.core.config import ConfigError
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.selector import set_module
from torchslim.data.sources import as_source
from torchslim.pruning.structured import channel_sets, output_layers, prune_channels
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.evaluate import evaluate_source
from torchslim.train.fit import fit


@leaves_no_marks
def auto_narrow(
    model: nn.Module,
    data: Any,
    config: SpeedBudgetConfig | dict,
    task: str | Task | None = None,
    example_input: Any = None,
    progress: bool | str | None = None,
) -> Any:
    """Remove channels from ``model`` until it meets a MACs or latency budget (see the module's documentation).
    Returns the ``CompressResult`` of the round that met the budget (or the last one, with a note that it missed);
    ``report.artifacts["allocation"]`` holds each set's ratio with its predicted loss rise and cost change, and each
    round's predicted and measured cost."""
    from torchslim.pipeline.runner import compress

    config = SpeedBudgetConfig.coerce(config, where="auto_narrow")
    source = as_source(data, model)
    resolved = resolve_task(task, source, model)
    example = example_input if example_input is not None else source.example(2)
    timing_example = example_input if example_input is not None else source.example(1)
    structured = config.structured()
    sets = channel_sets(model, structured, data, example)
    if not sets:
        raise TorchslimError("auto_narrow: structured pruning finds no set of channels it may remove in this model (see prune_channels' notes)")
    base = evaluate_source(model, source, resolved, limit=config.eval_limit, split=config.sensitivity_split)
    if "loss" not in base:
        raise ConfigError(f"auto_narrow ranks channel sets by the task's loss; the task's metrics hold none: {sorted(base)}")
    candidates: dict[str, nn.Module] = {}
    rises: dict[str, float] = {}
    for name in sets:
        for ratio in config.ratios:
            key = f"{name}@{ratio:g}"
            pruned = prune_channels(model, {**structured, "sets": {name: ratio}}, data=data, example_input=example, task=task).model
            candidates[key] = pruned
            rises[key] = max(0.0, evaluate_source(pruned, source, resolved, limit=config.eval_limit, split=config.sensitivity_split)["loss"] - base["loss"])
    layer_ranks = {} if config.uniform else offered_ranks(model, config, output_layers(model, data, example))
    for name, ranks in layer_ranks.items():
        for rank in ranks:
            thinner = factorize(model, {"method": "svd", "overrides": {name: rank}, "layers": {"include": [name]}}, example_input=example).model
            candidates[f"{name}#{rank}"] = thinner
            rises[f"{name}#{rank}"] = max(
                0.0, evaluate_source(thinner, source, resolved, limit=config.eval_limit, split=config.sensitivity_split)["loss"] - base["loss"]
            )
    blocks = outermost_blocks(candidate_blocks(model, example)) if config.removes_blocks and not config.uniform else []
    alone: dict[str, float] = {}
    steps: list[RemovalStep] = []
    if blocks:
        # the order blocks would go in, each step measured with those before it gone (summed rises under-predict)
        limit = sum(max(rises[f"{name}@{r:g}"] for r in config.ratios) for name in sets)  # every set at its harshest

        def loss(bypassed: nn.Module) -> float:
            return evaluate_source(bypassed, source, resolved, limit=config.eval_limit, split=config.sensitivity_split)["loss"]

        alone, steps = removal_order(model, blocks, loss, base["loss"], limit)
        candidates.update({f"{BLOCK}{k}": step.model for k, step in enumerate(steps, 1) if step.model is not None})
    cost = Cost(model, config, example, timing_example)
    table = cost.of(candidates)  # the per-set cost table, measured once
    # where each option's saving lies, by layer (MACs counted; a stand-in for a latency budget): what it still saves
    # once blocks are gone
    macs = {key: layer_macs(candidate, example) for key, candidate in candidates.items() if not key.startswith(BLOCK)} if steps else {}
    dense_macs = layer_macs(model, example) if steps else {}
    del candidates
    for step in steps:
        step.model = None  # measured: no longer held
    dense = table["dense"]
    # cost is modelled as the dense cost times each set's own factor (the cost with that set alone pruned, over the
    # dense cost): a layer between two pruned sets loses work to both, which a sum of savings would count twice
    options = {
        name: [Option(0.0, FLOAT, 0.0, 0.0)]
        + [Option(r, FLOAT, rises[f"{name}@{r:g}"], min(0.0, math.log(table[f"{name}@{r:g}"] / dense))) for r in config.ratios]
        for name in sets
    }
    # a layer's ranks, offered only where they cost less than the layer and do no more harm than the harshest channel
    # ratio offered (a classifier at rank 1 would be a knapsack's last resort, not a compression)
    harshest = max(rises[f"{name}@{r:g}"] for name in sets for r in config.ratios)
    for name, ranks in layer_ranks.items():
        factored = [
            Option(0.0, FLOAT, rises[f"{name}#{r}"], math.log(table[f"{name}#{r}"] / dense), r)
            for r in ranks
            if table[f"{name}#{r}"] < dense and rises[f"{name}#{r}"] <= harshest
        ]
        if factored and name in options:
            # the set of this layer's own outputs: its ranks are further choices of that set (channels or a rank, not
            # both: both cut the same layer, and the product of their factors would count that saving twice)
            options[name] += factored
        elif factored:
            options[f"{RANK}{name}"] = [Option(0.0, FLOAT, 0.0, 0.0), *factored]  # one more group of the knapsack
    channel_options = {name: options[name][: 1 + len(config.ratios)] for name in sets}  # the channel ratios alone
    shares = [table[f"{BLOCK}{k}"] / dense for k in range(1, len(steps) + 1)]
    choices = depth_choices(options, steps, shares, lambda group, option, gone: saving_outside(dense_macs, macs[candidate_key(group, option)], gone))
    channel_choices = [(removal, {name: [o for o in group if channels_only(o)] for name, group in left.items()}) for removal, left in choices]
    floor = depth_floor(choices)
    reach = math.exp(floor)
    if reach > config.target:
        raise TorchslimError(
            f"auto_narrow: a {config.measure} budget of {config.target:g} of the dense model's is out of reach: with every set at its largest "
            f"ratio ({max(config.ratios):g}){' and every layer at its lowest rank' if layer_ranks else ''}"
            f"{' and the blocks that may go removed' if len(choices) > 1 else ''} the model is predicted at {reach:.3f} of it"
            + (f" (each set measured alone on {config.backend}: this model's time there is mostly not in its channels)" if config.measure == "latency" else "")
            + f"; allow larger ratios{' or lower ranks' if layer_ranks else ''} or a looser target"
        )
    rounds: list[dict[str, Any]] = []
    best = last = None
    tried: list[tuple[dict[str, float], dict[str, int], list[str]]] = []
    trial_results: dict[str, tuple[float, float]] = {}
    trial_plan: dict[str, dict[str, Option]] = {}  # each plan tried, by its key
    tried_in: dict[str, int] = {}  # the round that first tried each plan, by its key
    pending: list[str] = []  # plans tried for the round not yet recorded
    picks: set[str] = set()  # the plans the rounds of trials picked
    searching = config.trials and not config.uniform  # rounds of trials, then the best plan tried carried out
    trials: list[dict[str, Any]] = []  # the plans the one being carried out was chosen from

    def plan_key(plan: dict[str, Option]) -> str:
        ratios, factored, removed = plan_parts(plan, sets)
        return repr((sorted(ratios.items()), sorted(factored.items()), removed))

    def trial_of(plans: list[dict[str, Option]]) -> list[tuple[float, float]]:
        """Each plan carried out (channels pruned, layers factorized, blocks bypassed), trained for ``trial_batches``
        batches and measured: (loss rise, cost as a fraction of the dense model's, timed side by side with it).
        Measured once per plan."""
        built: dict[str, nn.Module] = {}
        for plan in plans:
            key = plan_key(plan)
            if key in trial_results or key in built:
                continue
            ratios, factored, removed = plan_parts(plan, sets)
            trial = prune_channels(model, {**structured, "sets": ratios}, data=data, example_input=example, task=task).model if ratios else copy_model(model)
            if factored:
                trial = factorize(trial, {"method": "svd", "overrides": factored, "layers": {"include": list(factored)}}, example_input=example).model
            for block in removed:
                set_module(trial, block, bypass_for(trial.get_submodule(block)))
            if config.finetune and config.trial_batches:
                # no warm-up (it would fill the trial); another seed than the evaluation's, so that the examples the
                # trial is measured on are not the batches it was trained on last
                tuning = {**config.finetune, "epochs": 1, "max_batches_per_epoch": config.trial_batches, "warmup_epochs": 0, "eval_every_epoch": False}
                tuning["seed"] = int(config.finetune.get("seed", 0)) + 1
                fit(trial, data, tuning, task=task, progress=False, label="trial", evaluate_at_end=False, reference=model)
            built[key] = trial
            trial_plan[key] = plan
            pending.append(key)  # its round is numbered when the round is recorded
        for key, trial in built.items():
            # each timed with the dense model alone, as the round's result is: timed beside other models, the dense
            # model ran slower (LeNet-5 in ONNX Runtime at batch 64: 0.31 of it in a group, 0.37 alone)
            costs = cost.of({key: trial})
            loss = evaluate_source(trial, source, resolved, limit=config.eval_limit, split=config.sensitivity_split)["loss"]
            trial_results[key] = (loss - base["loss"], costs[key] / costs["dense"])
        return [trial_results[plan_key(plan)] for plan in plans]

    def even_plan(given: float) -> tuple[float, float, dict[str, Option]] | None:
        """The plan of one ratio for every set that fits ``given`` (None: none does)."""
        try:
            plan = allocate(channel_options, given, uniform=True)
        except TorchslimError:
            return None
        return sum(option.cost for option in plan.values()), sum(option.size for option in plan.values()), plan

    def choose(given: float) -> dict[str, Option]:
        """The plan for a log budget: uniform, or per depth the knapsack's. With ``trials``, the plans worth it (the
        depths of least predicted rise, the knapsack's with channels alone, the plan of one ratio) are carried out,
        trained briefly and measured, and of those that meet the budget the one of least loss is chosen (the plan of
        one ratio only where no other has less loss; none: the least loss of the allocated plans)."""
        trials.clear()
        if config.uniform:
            return allocate(options, given, uniform=True)
        plans = depth_plans(choices, given)
        if not searching or not plans:
            return allocate_depth(choices, given)
        tried_plans = trial_plans(plans, config.depth_trials) if len(plans) > 1 and config.depth_trials > 1 else [least_rise(plans)]
        others = [least_rise(found)] if layer_ranks and (found := depth_plans(channel_choices, given)) else []
        even = even_plan(given)
        for entry in [*others, *([even] if even is not None else [])]:
            if plan_key(entry[2]) not in {plan_key(plan) for _, _, plan in tried_plans} and any(o.sparsity > 0 for o in entry[2].values()):
                tried_plans.append(entry)
        if not tried_plans:
            return allocate_depth(choices, given)  # nothing to try: the plan removes nothing
        measured = trial_of([plan for _, _, plan in tried_plans])
        even_at = next((i for i, entry in enumerate(tried_plans) if even is not None and entry[2] is even[2]), None)
        allocated = [i for i in range(len(tried_plans)) if i != even_at]
        eligible = [i for i in allocated if measured[i][1] <= config.target]
        if even_at is not None and measured[even_at][1] <= config.target and measured[even_at][0] < min(measured[i][0] for i in allocated):
            # the plan of one ratio lands where its ratio puts it, often far under the budget: it is carried out only
            # where it meets the budget with less loss than every plan allocated for it (ResNet-20 at 0.45 of eager
            # batch-1 latency: 0.37 of it at a loss rise of 1.15, against 0.09 for the knapsack's)
            eligible.append(even_at)
        # the least loss (of equal losses the plan that spends more); none meets the budget: the least loss still,
        # and the next round corrects the budget by what the plan measures
        picked = min(eligible or allocated, key=lambda i: (round(measured[i][0], 9), -measured[i][1]))
        trials.extend(
            {
                "blocks_removed": sorted(removed_blocks(plan)),
                "sets": sum(1 for name, option in plan.items() if name in sets and option.sparsity > 0),
                "ranks": sum(1 for option in plan.values() if option.rank),
                "predicted": round(math.exp(size), 4),
                "predicted_loss_rise": round(rise, 5),
                "trial_fraction": round(measured[i][1], 4),
                "trial_loss_rise": round(measured[i][0], 5),
                "chosen": i == picked,
                "least_predicted": plan is least_rise(plans)[2],
                "uniform": even is not None and plan is even[2],
            }
            for i, (rise, size, plan) in enumerate(tried_plans)
        )
        return tried_plans[picked][2]

    def attempt(plan: dict[str, Option]) -> tuple[Any, dict[str, Option], float, int] | None:
        """Carry out ``plan`` (channels removed, layers factorized, blocks removed, then the whole fine-tuning) and
        measure it (None: the same ratios, ranks and blocks were carried out already, or none)."""
        ratios, factored, removed = plan_parts(plan, sets)
        if (ratios, factored, removed) in tried or not (ratios or factored or removed):
            return None  # measured already, or nothing removed (a budget below the dense cost is not met by timing noise)
        tried.append((ratios, factored, removed))
        finetune = {"finetune": dict(config.finetune)} if config.finetune else {}
        stages: list[dict[str, Any]] = []
        if ratios:
            stages.append({"prune-channels": {**structured, "sets": ratios}})
        if factored:  # after the channels go: the ranks as measured on the whole layers
            stages.append({"factorize": {"method": "svd", "overrides": factored, "layers": {"include": list(factored)}}})
        if removed:  # last, so that every set and layer is still named as measured (a decoder stack is renumbered)
            stages.append({"depth": {"layers": {"include": removed}, "count": len(removed), "calibration_batches": 1, "iterative": False}})
        stages[-1] = {kind: {**settings, **finetune} for kind, settings in stages[-1].items()}  # then the fine-tuning
        recipe = {"name": f"{config.measure}-budget-{config.target:g}{'-uniform' if config.uniform else ''}", "stages": stages}
        result = compress(model, recipe, data, task=task, latency=False, progress=progress)
        measured = cost.of({"pruned": result.model})
        finished = measured["pruned"] / measured["dense"]  # side by side with the dense model, as the budget is stated
        # a plan tried before is the same model timed twice, apart: its cost is the mean of both where they agree; one
        # timing of a small model can be far off (LeNet-300-100 at batch 64 in ONNX Runtime: 0.59 to 0.88 of the dense
        # time for one model, timed six times), so where they do not, the finished model is timed again
        trial = trial_results[plan_key(plan)][1] if plan_key(plan) in trial_results else None
        ratio, retimed = finished_cost(finished, trial, lambda: (again := cost.of({"pruned": result.model}))["pruned"] / again["dense"])
        predicted = math.exp(sum(option.size for option in plan.values()))
        rounds.append(
            {
                "round": len(rounds) + 1,
                "predicted": predicted,
                "ratio": ratio,
                "measured": ratio * dense,
                "met": ratio <= config.target,
                "sets": ratios,
                "ranks": {name: factorized_rank(result.model, name) for name in factored},
                "blocks_removed": removed,
                "carried_out": True,
                "finished_ratio": finished,
                "trial_ratio": trial,
                "retimed_ratio": retimed,
                **({"trials": list(trials)} if trials else {}),
                **({"trial_round": tried_in[plan_key(plan)]} if plan_key(plan) in tried_in else {}),
            }
        )
        return result, plan, ratio, len(rounds)

    def search(given: float) -> bool | None:
        """A round of trials (see ``choose``), recorded by the plan it picks. True: that plan meets the budget close
        enough to end the rounds; None: it was picked before, or removes nothing."""
        plan = choose(given)
        key = plan_key(plan)
        ratios, factored, removed = plan_parts(plan, sets)
        if key in picks or not (ratios or factored or removed):
            pending.clear()  # no round recorded: the plans it tried keep no round
            return None
        if key not in trial_results:
            trial_of([plan])
        picks.add(key)
        tried_in.update({tried: len(rounds) + 1 for tried in pending})
        pending.clear()
        fraction = trial_results[key][1]
        rounds.append(
            {
                "round": len(rounds) + 1,
                "predicted": math.exp(sum(option.size for option in plan.values())),
                "ratio": fraction,
                "measured": fraction * dense,
                "met": fraction <= config.target,
                "sets": ratios,
                "ranks": factored,
                "blocks_removed": removed,
                "carried_out": False,
                "trials": list(trials),
            }
        )
        return config.target >= fraction >= SLACK * config.target

    points: list[tuple[float, float, float]] = []  # per measured round: (log budget given, predicted, measured)
    available = math.log(config.target)
    for _ in range(2 * config.rounds):
        if len(rounds) >= config.rounds:
            break
        given = max(available, floor)  # corrected past the floor: the most the sets allow
        if searching:
            close = search(given)
            if close is not None:
                points.append((given, rounds[-1]["predicted"], rounds[-1]["ratio"]))
                if close:
                    break  # close enough to the budget: little left to spend
                available = next_budget(points, config.target)
                continue
            outcome = None
        else:
            outcome = attempt(choose(given))
        if outcome is None:
            # the corrected budget picks a plan measured already, or one that removes nothing: halfway back, once more
            if not points or abs(given - points[-1][0]) < 1e-3:
                break
            available = (given + points[-1][0]) / 2
            continue
        last = outcome
        points.append((given, rounds[-1]["predicted"], outcome[2]))
        if rounds[-1]["met"]:
            if best is None or outcome[2] > best[2]:
                best = last  # of the plans that met the budget, the one that spends most of it
            if outcome[2] >= SLACK * config.target:
                break  # close enough to the budget: little left to spend
        available = next_budget(points, config.target)
    excess, carried, searches = 1.0, set(), 0  # finished over trial cost, at most; plans carried out; rounds aimed at it
    for _ in range(3 * config.rounds if searching else 0):
        # of every plan tried in every round, those that meet the budget by their trial with the margin finished models
        # needed so far, least loss first (of equal losses the one that spends more): the first is carried out
        ranked = sorted(
            (round(rise, 9), -fraction, key) for key, (rise, fraction) in trial_results.items() if fraction * excess <= config.target and key not in carried
        )
        if excess > 1.0 and searches < config.rounds and not any(-spent * excess >= SLACK * config.target for _, spent, _ in ranked):
            # none meets with that margin close to the budget: rounds of trials more (as many as the first search),
            # aimed at the target less it, before a plan far under the budget is taken (ResNet-20 at 0.45 of eager
            # batch-1 latency: after one such round, a plan of six blocks at 0.32, 5.4% error)
            searches, given = searches + 1, max(next_budget(points, config.target / excess), floor)
            if search(given) is not None:
                points.append((given, rounds[-1]["predicted"], rounds[-1]["ratio"]))
                continue
            searches = config.rounds  # the search picks plans tried already: no more
        if not ranked:
            break
        key = ranked[0][2]
        carried.add(key)
        trials.clear()
        outcome = attempt(trial_plan[key])
        if outcome is None:
            continue
        last = outcome
        if rounds[-1]["met"]:
            best = outcome
            break
        # the finished model missed where its trial met (a latency met by a hair): the next plan needs that margin (not
        # where the two timings were far apart and the finished model was timed again: then the trial's was noise)
        excess = max(excess, outcome[2] / trial_results[key][1]) if rounds[-1]["retimed_ratio"] is None else excess
    if best is None and not config.uniform:
        # every round missed: the most-pruned plan (every set at its largest ratio, what uniform would end on, and
        # where blocks may go, the depth that leaves the least) is measured before the budget is called missed
        trials.clear()
        outcome = attempt(allocate_depth(channel_choices, depth_floor(channel_choices)))
        if outcome is not None:
            last = outcome
            best = outcome if rounds[-1]["met"] else None
    result, plan, achieved, number = best if best is not None else last  # type: ignore[misc]
    flat, removed = flatten_plan(plan)
    order = {step.block: k for k, step in enumerate(steps, 1)}
    offered = {block for removal, _ in choices for block in removal.blocks}
    inside = {name: next(block for block in removed if inside_block(name, block)) for name in sets if any(inside_block(name, block) for block in removed)}
    chosen = rounds[number - 1]
    unit = "MACs" if config.measure == "macs" else f"ms on {config.backend} at batch {config.batch_size}"
    result.report.artifacts["allocation"] = {
        "measure": config.measure,
        "target": config.target,
        "backend": config.backend if config.measure == "latency" else None,
        "unit": unit,
        "dense": dense,
        "uniform": config.uniform,
        "sets": set_rows(sets, flat, table, dense, inside),
        "factorized": factorized_rows(layer_ranks, flat, table, dense, chosen["ranks"]),
        "blocks": [
            {
                "block": block,
                "removed": block in removed,
                "loss_rise_alone": round(alone[block], 5),
                # where it stands in the removal order, and the rise and cost factor with it and those before it gone
                "order": order.get(block),
                "predicted_loss_rise": round(steps[order[block] - 1].rise, 5) if block in order else None,
                "predicted_factor": round(table[f"{BLOCK}{order[block]}"] / dense, 4) if block in order else None,
                "offered": block in offered,  # in a depth the knapsack was offered (one that saves over a shallower one)
            }
            for block in blocks
        ],
        "rounds": rounds,
        "chosen_round": chosen["round"],
    }
    result.report.stages[-1].metrics[f"{config.measure}_fraction"] = achieved
    allocation = result.report.artifacts["allocation"]
    result.report.stages[-1].notes.append(budget_note(config, chosen, achieved, dense, unit, len(rounds), allocation["factorized"], removed))
    return result


__all__ = ["SpeedBudgetConfig", "auto_narrow"]
