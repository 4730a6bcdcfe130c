"""Automatic structured compression to a MACs and to a measured-latency budget on full MNIST: LeNet-300-100 and LeNet-5
narrowed to four MACs budgets and four ONNX Runtime latency budgets (batch 64) each, once with per-set ratios chosen
from measured sensitivity and cost (``auto_narrow``) and once with one ratio for every set (uniform), with the same
fine-tuning, and once more with SVD factorization among the choices (``ranks``, auto_narrow's default); test error
against the measured MACs and latency fractions, and a Pareto plot (benchmarks/results/speed_budget.png).

    python3 -m benchmarks.speed_budget [--quick] [--only "automatic|uniform|automatic + ranks"]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import torchslim as ts
from benchmarks.common import each_model, load_mnist, pareto_axis, save_figure, trained_baseline
from benchmarks.harness import arguments, only_rows, write
from torchslim.compression.speed_budget import auto_narrow
from torchslim.core.errors import TorchslimError
from torchslim.report import markdown

BUDGETS = {"macs": (0.5, 0.3, 0.2, 0.1), "latency": (0.8, 0.6, 0.45, 0.3)}
LATENCY = {"backend": "onnxruntime", "batch_size": 64}
# each allocation's options on top of the shared configuration; "+ ranks" (auto_narrow's default) may also factorize a
# layer (SVD) as well as remove channels
ALLOCATIONS: dict[str, dict] = {"automatic": {"ranks": ()}, "uniform": {"uniform": True}, "automatic + ranks": {"ranks": (0.05, 0.1, 0.2, 0.3)}}
# (model, measure, budget, allocation) -> the last full run's entry, for the allocations --only leaves out
PREVIOUS: dict[tuple[str, str, float, str], dict] = {}


def run(name: str, data, quick: bool) -> tuple[dict, list[list[str]]]:
    dense = trained_baseline(name, data, quick)
    dense_error = ts.evaluate(dense, data)["error"]
    finetune = {"epochs": 1, "lr": 0.02 if name == "lenet-300-100" else 0.005, "batch_size": 64, "eval_every_epoch": False}
    if quick:
        finetune["max_batches_per_epoch"] = 40
    results: dict = {"dense_error": dense_error, "runs": []}
    rows = []
    for measure, budgets in BUDGETS.items():
        for budget in budgets[:2] if quick else budgets:
            for allocation_name, allocation_options in ALLOCATIONS.items():
                kept = PREVIOUS.get((name, measure, budget, allocation_name))
                if kept is not None:  # not run again (--only): the last full run's entry
                    results["runs"].append(kept)
                    rows.append(_row(name, kept))
                    continue
                torch.manual_seed(0)
                config = {f"target_{measure}": budget, "finetune": finetune, **allocation_options, **(LATENCY if measure == "latency" else {})}
                if quick:
                    config.update(timing_rounds=2, timing_runs=5)
                entry = {"measure": measure, "budget": budget, "allocation": allocation_name}
                started = time.perf_counter()
                try:
                    result = auto_narrow(dense, data, config, progress=False)
                except TorchslimError as error:  # out of reach: said, not hidden
                    entry.update(error=None, note=str(error))
                else:
                    allocation = result.report.artifacts["allocation"]
                    chosen = next(r for r in allocation["rounds"] if r["round"] == allocation["chosen_round"])
                    entry.update(
                        fraction=chosen["ratio"],
                        met=chosen["met"],
                        rounds=len(allocation["rounds"]),
                        fine_tuned=sum(r.get("carried_out", True) for r in allocation["rounds"]),  # plans fine-tuned in full
                        seconds=time.perf_counter() - started,
                        error=ts.evaluate(result.model, data)["error"],
                        sets={row["set"]: row["ratio"] for row in allocation["sets"]},
                        factorized={row["layer"]: row["rank"] for row in allocation["factorized"]},
                    )
                results["runs"].append(entry)
                rows.append(_row(name, entry))
                print(rows[-1], flush=True)
    return results, rows


def _row(name: str, entry: dict) -> list[str]:
    measure = entry["measure"]
    engine = f" ({LATENCY['backend']}, b{LATENCY['batch_size']})" if measure == "latency" and entry["error"] is not None else ""
    if entry["error"] is None:
        return [name, measure, f"{entry['budget']:g}", entry["allocation"], "-", "out of reach", "-", "-", "-"]
    plan = ", ".join(f"{key.split('+')[0]} {ratio:.3f}" for key, ratio in entry["sets"].items())
    plan += "".join(f"; {layer} {f'rank {rank}' if rank else 'left whole'}" for layer, rank in entry.get("factorized", {}).items())
    met = "yes" if entry["met"] else "no"
    spent = f"{entry['seconds']:.0f} ({entry['fine_tuned']})" if "seconds" in entry else "-"
    return [name, measure + engine, f"{entry['budget']:g}", entry["allocation"], f"{entry['fraction']:.3f}", met, f"{100 * entry['error']:.2f}%", spent, plan]


def _reached(entry: dict, measure: str, allocation: str) -> list[dict]:
    return [r for r in entry["runs"] if r["measure"] == measure and r["allocation"] == allocation and r["error"] is not None]


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    for row, (name, entry) in zip(axes, results.items()):
        for axis, measure in zip(row, BUDGETS):
            series = {a: [(r["fraction"], 100 * r["error"]) for r in _reached(entry, measure, a)] for a in ALLOCATIONS}
            label = "MACs, fraction of dense" if measure == "macs" else "latency in ONNX Runtime (batch 64), fraction of dense"
            pareto_axis(axis, series, entry["dense_error"], label, f"{name}: error against {measure}")
    save_figure(figure, "speed_budget.png")


def main() -> None:
    only = only_rows(list(ALLOCATIONS))  # run these allocations again; the others keep their last full run
    options = arguments(__doc__)
    if only:
        previous = json.loads((Path(__file__).parent / "results" / "speed_budget.json").read_text())
        facts = {key: previous["machine"][key] for key in ("date", "cpu", "commit")}
        for name, entry in previous["results"].items():
            for kept in entry["runs"]:
                if kept["allocation"] not in only:
                    # a row kept through several --only runs keeps the machine and commit that measured it
                    PREVIOUS[(name, kept["measure"], kept["budget"], kept["allocation"])] = {"measured_on": facts, **kept}
    data = load_mnist(options.data_root, options.quick)
    results, rows = each_model(run, data, options.quick)
    if not options.no_write:
        plot(results)
    columns = ["model", "budget on", "budget", "allocation", "measured fraction", "met", "test error", "seconds (plans fine-tuned)"]
    columns.append("channels removed per set; ranks")
    table = markdown.table(columns, rows)
    notes = [
        "Each run: every coupled channel set pruned alone at 1/8 ... 7/8 of its channels (l1), its loss rise on 512 training examples "
        "(the allocation never sees the test set) and its cost measured (MACs counted; latency of all these models timed side by side "
        "with the dense one in ONNX Runtime, 5 rounds x 20 runs (at least 50 ms a model a round), "
        "batch 64); automatic: an exact knapsack over the sets' loss rises under the product cost model; uniform: the one ratio with the "
        "least summed rise that fits; then channels removed, one epoch of fine-tuning, and the result measured side by side with the dense "
        "model (the allocation repeats with a corrected cost model while it misses). automatic + ranks (auto_narrow's default): each Linear / "
        "Conv2d layer factorized alone by SVD to 5, 10, 20 and 30% of its full rank is measured the same way, and its rank is one more "
        "choice of the knapsack; a plan that factorizes removes the channels first, then factorizes, then fine-tunes. Automatic (both): each "
        "round tries the knapsack's plan, its plan with channels alone (+ ranks) and the plan of one ratio, each trained for 50 batches, its "
        "loss and cost measured, and the next round's budget is corrected by the plan it picks; no round fine-tunes in full: at the end the "
        "plan of least loss among all those that met the budget in their trials is carried out with the epoch of fine-tuning. Seconds: the "
        "whole auto_narrow call (sensitivity, cost table, trials, fine-tuning), with the number of plans fine-tuned in full.",
        "Pareto plot: benchmarks/results/speed_budget.png.",
    ]
    for name, entry in results.items():
        for measure in BUDGETS:
            errors = {a: {r["budget"]: r["error"] for r in _reached(entry, measure, a)} for a in ALLOCATIONS}
            for better, worse in (("automatic", "uniform"), ("automatic + ranks", "uniform"), ("automatic + ranks", "automatic")):
                common = [b for b in errors[better] if b in errors[worse]]
                wins = sum(errors[better][b] <= errors[worse][b] for b in common)
                notes.append(f"{name}, {measure}: {better} at least as good as {worse} at {wins} of {len(common)} budgets both reached.")
    if only:
        kept = [a for a in ALLOCATIONS if a not in only]
        facts = {(f["date"][:10], f["cpu"], f["commit"]) for f in (r["measured_on"] for r in PREVIOUS.values())}
        origins = "; ".join(f"{date}, {cpu}, commit {commit}" for date, cpu, commit in sorted(facts))
        notes.append(
            f"this run measured {', '.join(only)}; the rows of {', '.join(kept)} are kept from the last full run, "
            f"which measured them with the same configuration ({origins}; each fraction measured side by side with the dense model in its own run)."
        )
    write("speed_budget", "Automatic compression to a MACs or latency budget", results, [table], options, notes)


if __name__ == "__main__":
    main()
