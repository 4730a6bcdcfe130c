"""Depth in the speed budgets: ResNet-20 trained on full MNIST, narrowed by ``auto_narrow`` to two MACs budgets and two
latency budgets (eager, batch 1, where a residual net's time is mostly in running its operators, not in their
channels), with the same fine-tuning each time, by two allocations: per-set ratios (channels only), and per-set ratios
or a block's removal (channels + blocks). One ratio for every set (uniform) and SVD ranks are compared with per-set
ratios in benchmarks/speed_budget.py. Reported: test error, the fraction
reached, the blocks removed, and every result's latency in eager and ONNX Runtime at batch 1 and 64, all timed side by
side with the dense model in one run.

    python3 -m benchmarks.depth_budget [--quick]
"""

from __future__ import annotations

import torch

import torchslim as ts
from benchmarks.common import load_mnist, trained_baseline
from benchmarks.harness import arguments, write
from torchslim.compression.speed_budget import auto_narrow
from torchslim.core.errors import TorchslimError
from torchslim.measure.counts import count_macs
from torchslim.measure.latency import compare_latency
from torchslim.report import markdown

MODEL = "resnet20"
BUDGETS = {"macs": (0.5, 0.3), "latency": (0.6, 0.45)}
LATENCY = {"backend": "eager", "batch_size": 1}
ALLOCATIONS: dict[str, dict] = {  # both without SVD ranks (compared in benchmarks/speed_budget.py)
    "channels": {"ranks": (), "depth": False},
    "channels + blocks": {"ranks": (), "depth": True},
}
BACKENDS = ("eager", "onnxruntime")


def main() -> None:
    options = arguments(__doc__)
    data = load_mnist(options.data_root, options.quick)
    dense = trained_baseline(MODEL, data, options.quick).eval()
    dense_error = ts.evaluate(dense, data)["error"]
    finetune = {"epochs": 1, "lr": 0.01, "batch_size": 128, "eval_every_epoch": False, "max_batches_per_epoch": 20 if options.quick else 200}
    example = data.test.inputs[:1]
    dense_macs = count_macs(dense, example)["total"]
    runs, models = [], {}
    for measure, budgets in BUDGETS.items():
        for budget in budgets[:1] if options.quick else budgets:
            for allocation, settings in ALLOCATIONS.items():
                torch.manual_seed(0)
                config = {
                    f"target_{measure}": budget,
                    "finetune": finetune,
                    "ratios": (0.25, 0.5, 0.75),
                    "timing_rounds": 2 if options.quick else 3,
                    "timing_runs": 5 if options.quick else 20,
                    **settings,
                    **(LATENCY if measure == "latency" else {}),
                }
                entry: dict = {"measure": measure, "budget": budget, "allocation": allocation}
                try:
                    result = auto_narrow(dense, data, config, progress=False)
                except TorchslimError as error:  # out of reach: said, not hidden
                    entry.update(error=None, note=str(error))
                else:
                    plan = result.report.artifacts["allocation"]
                    chosen = next(r for r in plan["rounds"] if r["round"] == plan["chosen_round"])
                    key = f"{measure} {budget:g} {allocation}"
                    models[key] = result.model.eval()
                    entry.update(
                        key=key,
                        fraction=chosen["ratio"],
                        met=chosen["met"],
                        rounds=len(plan["rounds"]),
                        error=ts.evaluate(result.model, data)["error"],
                        macs_fraction=count_macs(result.model, example)["total"] / dense_macs,
                        blocks_removed=chosen.get("blocks_removed", []),
                        sets={row["set"]: row["ratio"] for row in plan["sets"] if row["ratio"]},
                        factorized={row["layer"]: row["rank"] for row in plan["factorized"]},
                        trials=[r.get("trials", []) for r in plan["rounds"]],
                    )
                runs.append(entry)
                print(entry, flush=True)
    # every result timed side by side with the dense model, per engine, in one set of interleaved rounds
    latency = {
        backend: compare_latency(
            {"dense": dense, **models},
            example,
            batch_sizes=(1, 64),
            rounds=2 if options.quick else 5,
            runs=5 if options.quick else 20,
            warmup=5,
            backend=backend,
            threads=options.threads,
        )
        for backend in BACKENDS
    }
    rows = []
    for entry in runs:
        if entry["error"] is None:
            rows.append([f"{entry['measure']} {entry['budget']:g}", entry["allocation"], "out of reach", "-", "-", "-", "-", "-", "-"])
            continue
        key = entry["key"]
        speed = {b: {n: latency[b]["dense"][n] / latency[b][key][n] for n in (1, 64)} for b in BACKENDS}
        entry["speedup"] = speed
        removed = entry["blocks_removed"]
        rows.append(
            [
                f"{entry['measure']}{' (eager, b1)' if entry['measure'] == 'latency' else ''} {entry['budget']:g}",
                entry["allocation"],
                f"{entry['fraction']:.3f} ({'met' if entry['met'] else 'missed'})",
                f"{100 * entry['error']:.2f}%",
                f"{1 / entry['macs_fraction']:.2f}x",
                f"{speed['eager'][1]:.2f}x / {speed['eager'][64]:.2f}x",
                f"{speed['onnxruntime'][1]:.2f}x / {speed['onnxruntime'][64]:.2f}x",
                ", ".join(removed) if removed else "-",
                f"{len(entry['sets'])} sets" + (f", {len(entry['factorized'])} ranks" if entry["factorized"] else ""),
            ]
        )
    table = markdown.table(
        [
            "budget",
            "allocation",
            "measured fraction",
            "test error",
            "MACs ratio",
            "eager speedup b1 / b64",
            "ONNX Runtime speedup b1 / b64",
            "blocks removed",
            "channels pruned",
        ],
        rows,
    )
    notes = [
        f"ResNet-20 (option-A shortcuts, 0.27M parameters) trained on full MNIST for 3 epochs: {100 * dense_error:.2f}% test error; "
        f"{dense_macs / 1e6:.1f}M MACs per 28x28 image.",
        "Each allocation: every coupled channel set pruned alone at 1/4, 1/2 and 3/4 of its channels (l1), and (channels + blocks) the "
        "bypassable residual blocks in the order they would go, each depth (the first k removed together) measured: loss rise on 512 training "
        "examples, cost counted (MACs) or timed side by side with the dense model (eager, batch 1, 3 rounds x 20 runs); an exact knapsack per depth; "
        "in each round (up to 3) the knapsack's plan (channels + blocks: the plan without blocks and the 3 deeper ones of least predicted "
        "rise) and the plan of one ratio carried out, trained for 50 batches and measured (loss, and cost as above; at least 50 ms a model "
        "a round), the next round's budget corrected by the plan the round picks; at the end the plan of least loss that met the budget "
        "in any round is carried out: channels pruned, blocks removed, 200 batches of fine-tuning, and the result measured again (its "
        "cost the mean of both timings; a miss sends rounds of trials after the margin it showed).",
        "The speedup columns: every result and the dense model timed together after all runs, per engine, 5 rounds x 20 runs, medians.",
    ]
    for measure in BUDGETS:
        for better, worse in (("channels + blocks", "channels"),):
            reached = [r for r in runs if r["measure"] == measure and r["error"] is not None and r["met"]]
            errors = {a: {r["budget"]: r["error"] for r in reached if r["allocation"] == a} for a in (better, worse)}
            common = [b for b in errors[better] if b in errors[worse]]
            wins = sum(errors[better][b] <= errors[worse][b] for b in common)
            notes.append(f"{measure}: {better} at least as good as {worse} at {wins} of {len(common)} budgets both met.")
    for entry in runs:
        for number, tried in enumerate(entry.get("trials", entry.get("depth_trials", [])), 1):
            if tried:
                said = ", ".join(
                    ("one ratio" if t.get("uniform") else f"{len(t['blocks_removed'])} blocks")
                    + f": predicted rise {t['predicted_loss_rise']:.3f}, after the trial {t['trial_loss_rise']:.3f}"
                    + (" (chosen)" if t["chosen"] else "")
                    for t in tried
                )
                notes.append(f"{entry['measure']} {entry['budget']:g} {entry['allocation']}, round {number}, plans tried: {said}.")
    for allocation in ALLOCATIONS:
        shares = [f"{r['speedup']['eager'][1] * r['macs_fraction']:.2f}" for r in runs if r["allocation"] == allocation and "speedup" in r]
        notes.append(f"{allocation}: eager batch-1 speedup over the MACs ratio, row by row: {', '.join(shares)}.")
    results = {"model": MODEL, "dense_error": dense_error, "dense_macs": dense_macs, "runs": runs, "latency_ms": latency}
    write("depth_budget", "Depth in the speed budgets: ResNet-20 on MNIST", results, [table], options, notes)


if __name__ == "__main__":
    main()
