"""Automatic compression to a size budget on full MNIST: LeNet-300-100 and LeNet-5 fitted into four file sizes each,
once with per-layer sparsity and bits allocated from sensitivity curves and once with one (sparsity, bits) pair for
every layer (uniform), and once more with factorization (SVD ranks) among each layer's options, with the same pruning
schedule and fine-tuning; test error against bytes on disk, and a Pareto plot (benchmarks/results/budget.png).

    python3 -m benchmarks.budget [--quick] [--only "automatic|uniform|automatic + ranks"]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import torchslim as ts
from benchmarks.common import each_model, load_mnist, pareto_axis, save_figure, trained_baseline
from benchmarks.harness import arguments, only_rows, write
from torchslim.compression.budget import auto_compress
from torchslim.report import markdown

# (model, budget, allocation) -> the last full run's entry, for the allocations --only leaves out
PREVIOUS: dict[tuple[str, int, str], dict] = {}
BUDGETS = {"lenet-300-100": (40_000, 24_000, 16_000, 11_000), "lenet-5": (60_000, 36_000, 24_000, 16_000)}
# each allocation's options on top of the shared configuration; "+ ranks" (auto_compress's default) may also factorize a
# layer (SVD) instead of pruning it
ALLOCATIONS: dict[str, dict] = {"automatic": {"ranks": ()}, "uniform": {"uniform": True}, "automatic + ranks": {"ranks": (0.03, 0.05, 0.1, 0.2)}}


def run(name: str, data, quick: bool) -> tuple[dict, list[list[str]]]:
    dense = trained_baseline(name, data, quick)
    dense_error = ts.evaluate(dense, data)["error"]
    finetune = {"epochs": 1, "lr": 0.02 if name == "lenet-300-100" else 0.005, "batch_size": 64, "eval_every_epoch": False}
    if quick:
        finetune["max_batches_per_epoch"] = 40
    budgets = BUDGETS[name][:2] if quick else BUDGETS[name]
    results, rows = {"dense_error": dense_error, "runs": []}, []
    for budget in budgets:
        for allocation_name, allocation_options in ALLOCATIONS.items():
            kept = PREVIOUS.get((name, budget, allocation_name))
            if kept is not None:  # not run again (--only): the last full run's entry
                results["runs"].append(kept)
                rows.append(_row(name, dense, kept))
                continue
            torch.manual_seed(0)
            config = {"target_size": budget, "finetune": finetune, "sensitivity_split": "train", **allocation_options}
            if quick:
                config["quantize_finetune"] = {"epochs": 1, "optimizer": "adam", "lr": 3e-5, "max_batches_per_epoch": 40, "eval_every_epoch": False}
            result = auto_compress(dense, data, config, progress=False)
            final = result.report.stages[-1].metrics
            allocation = result.report.artifacts["allocation"]
            entry = {
                "budget": budget,
                "allocation": allocation_name,
                "bytes": final["stored_bytes"],
                "error": final["error"],
                "nonzeros": final["nonzeros"],
                "met": final["stored_bytes"] <= budget,
                "rounds": len(allocation["rounds"]),
                "layers": [(row["layer"], row["sparsity"], row["bits"], row["rank"]) for row in allocation["layers"]],
            }
            results["runs"].append(entry)
            rows.append(_row(name, dense, entry))
    return results, rows


def _row(name: str, dense: torch.nn.Module, entry: dict) -> list[str]:
    plan = ", ".join(f"{layer} {f'rank {rest[0]}' if rest and rest[0] else f'{sparsity:.2f}'}/{bits}b" for layer, sparsity, bits, *rest in entry["layers"])
    return [
        name,
        f"{entry['budget']:,}",
        entry["allocation"],
        f"{entry['bytes']:,}",
        "yes" if entry["met"] else "no",
        f"{100 * entry['error']:.2f}%",
        f"{ts.measure.count_parameters(dense) / max(1, entry['nonzeros']):.1f}x",
        plan,
    ]


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for axis, (name, entry) in zip(axes[0], results.items()):
        series = {a: [(r["bytes"] / 1000, 100 * r["error"]) for r in entry["runs"] if r["allocation"] == a] for a in ALLOCATIONS}
        pareto_axis(axis, series, entry["dense_error"], "bytes on disk (KB)", f"{name}: error against size")
    save_figure(figure, "budget.png")


def main() -> None:
    only = only_rows(list(ALLOCATIONS))  # run these allocations again; the others keep their last full run
    options = arguments(__doc__)
    if only:
        saved = json.loads((Path(__file__).parent / "results" / "budget.json").read_text())["results"]
        PREVIOUS.update({(n, r["budget"], r["allocation"]): r for n, e in saved.items() for r in e["runs"] if r["allocation"] not in only})
    data = load_mnist(options.data_root, options.quick)
    results, rows = each_model(run, data, options.quick)
    if not options.no_write:
        plot(results)
    table = markdown.table(
        ["model", "budget (bytes)", "allocation", ".tslim bytes", "met", "test error", "weights / non-zeros", "per layer: sparsity or rank / bits"], rows
    )
    notes = [
        "Each run: per-layer sensitivity (sparsities 0.5-0.98, bits 8-2 as uniform levels per channel, one layer at a time, loss on 1,024 training examples: "
        "the allocation never sees the test set), "
        "allocation (automatic: the exact multiple-choice knapsack on the summed loss rises; uniform: the one pair with the least summed rise that fits; "
        "automatic + ranks, auto_compress's default: the knapsack may also factorize a layer by SVD to 3, 5, 10 or 20% of its full rank, "
        "measured by its own sensitivity curve, "
        "fine-tuned one epoch after), "
        "3-step pruning with one epoch of fine-tuning per step, k-means with one epoch of centroid training, entropy coding; "
        "the allocation repeats with a corrected size model while the measured file misses the budget or leaves more than a tenth of it unused.",
        "Pareto plot: benchmarks/results/budget.png.",
    ]
    for name, entry in results.items():
        errors = {a: {r["budget"]: r["error"] for r in entry["runs"] if r["allocation"] == a} for a in ALLOCATIONS}
        for automatic in ("automatic", "automatic + ranks"):
            wins = sum(errors[automatic][b] <= errors["uniform"][b] for b in errors[automatic] if b in errors["uniform"])
            notes.append(f"{name}: {automatic} at least as good as uniform at {wins} of {len(errors[automatic])} budgets.")
    if only:
        kept = [a for a in ALLOCATIONS if a not in only]
        notes.append(
            f"this run measured {', '.join(only)}; the rows of {', '.join(kept)} are kept from the last full run, "
            "which measured them with the same configuration."
        )
    write("budget", "Automatic compression to a size budget", results, [table], options, notes)


if __name__ == "__main__":
    main()
