"""Pruning I on full MNIST: >= 12x fewer non-zero weights at <= 1.7% (LeNet-300-100) and <= 0.9% (LeNet-5) test
error by iterative global magnitude pruning with fine-tuning (Han et al. 2015: 267K -> 22K), side by side with
torch.nn.utils.prune's global magnitude pruning under the same schedule and fine-tuning; and a 90%-sparse
4096x4096 Linear in CSR against dense at batch 1 and 64."""

from __future__ import annotations

import copy
import time
from statistics import median

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import torchslim as ts
from benchmarks.common import load_mnist, trained_baseline
from benchmarks.harness import arguments, write
from torchslim.measure import compare_latency
from torchslim.pruning import SparseLinear, make_permanent, prune_in_place, to_csr
from torchslim.pruning.unstructured import PruneConfig
from torchslim.report import markdown
from torchslim.train import fit

TARGETS = {"lenet-300-100": 0.017, "lenet-5": 0.009}
SPARSITIES = {"lenet-300-100": (0.5, 0.7, 0.8, 0.87, 0.9, 0.92), "lenet-5": (0.5, 0.75, 0.875, 0.925)}
FINETUNE = {
    "lenet-300-100": {"epochs": 4, "lr": 0.02, "batch_size": 64, "weight_decay": 1e-4},
    "lenet-5": {"epochs": 2, "lr": 0.005, "batch_size": 64, "weight_decay": 5e-4},
}


def weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def torchslim_step(model: nn.Module, sparsity: float) -> None:
    prune_in_place(model, PruneConfig(importance="l1", scope="global", sparsity=sparsity))


def torch_step(model: nn.Module, sparsity: float, previous: float) -> None:
    amount = (sparsity - previous) / (1 - previous)  # torch's amount applies to the weights still unpruned
    parameters = [(m, "weight") for _, m in weight_modules(model)]
    torch_prune.global_unstructured(parameters, pruning_method=torch_prune.L1Unstructured, amount=amount)


def run_schedule(name: str, model: nn.Module, data, library: str, quick: bool) -> dict:
    model = copy.deepcopy(model)
    finetune = dict(FINETUNE[name], eval_every_epoch=False)
    if quick:
        finetune["epochs"], finetune["max_batches_per_epoch"] = 1, 30
    step_seconds, previous, rows = [], 0.0, []
    for index, sparsity in enumerate(SPARSITIES[name]):
        started = time.perf_counter()
        if library == "torchslim":
            torchslim_step(model, sparsity)
        else:
            torch_step(model, sparsity, previous)
        step_seconds.append(time.perf_counter() - started)
        after_prune = ts.evaluate(model, data)["error"]
        fit(model, data, dict(finetune, seed=index), progress=False)
        rows.append({"sparsity": sparsity, "error_after_prune": after_prune, "error_after_finetune": ts.evaluate(model, data)["error"]})
        previous = sparsity
    if library == "torchslim":
        make_permanent(model)
    else:
        for _, module in weight_modules(model):
            torch_prune.remove(module, "weight")
    metrics = ts.evaluate(model, data)
    nonzeros = ts.measure.count_nonzeros(model)
    return {
        "test_error": metrics["error"],
        "test_errors": metrics["errors"],
        "nonzeros": nonzeros,
        "parameters": ts.measure.count_parameters(model),
        "compression": ts.measure.count_parameters(model) / nonzeros,
        "prune_step_seconds_median": median(step_seconds),
        "steps": rows,
        "layers": [{"name": n, "sparsity": 1 - int(torch.count_nonzero(m.weight)) / m.weight.numel()} for n, m in weight_modules(model)],
    }


def pruning_step_time(model: nn.Module, repeats: int) -> dict:
    """Median seconds of one 90% global pruning call on a fresh copy, for each library."""
    ours, theirs = [], []
    for _ in range(repeats):
        copy_a, copy_b = copy.deepcopy(model), copy.deepcopy(model)
        started = time.perf_counter()
        torchslim_step(copy_a, 0.9)
        ours.append(time.perf_counter() - started)
        started = time.perf_counter()
        torch_step(copy_b, 0.9, 0.0)
        theirs.append(time.perf_counter() - started)
    return {"torchslim_s": median(ours), "torch_s": median(theirs)}


def csr_latency(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    dense = nn.Linear(4096, 4096)
    with torch.no_grad():
        dense.weight[torch.rand_like(dense.weight) < 0.9] = 0
    sparse = SparseLinear(dense)
    csr = to_csr(dense.weight)
    rows = []
    runs = 10 if quick else 60
    for batch in (1, 64):
        x = torch.randn(batch, 4096)
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)
        # interleaved rounds so drift on a shared machine hits both alike
        latency = compare_latency({"dense": dense, "csr": sparse}, x, batch_sizes=(batch,), rounds=3, runs=runs, warmup=5)
        dense_ms, csr_ms = latency["dense"][batch], latency["csr"][batch]
        rows.append(
            {
                "batch": batch,
                "dense_ms": dense_ms,
                "csr_ms": csr_ms,
                "csr_speedup": dense_ms / csr_ms,
                "dense_bytes": dense.weight.numel() * 4,
                "csr_bytes": csr.stored_bytes,
            }
        )
    return rows


def main() -> None:
    options = arguments(__doc__)
    data = load_mnist(options.data_root, options.quick)
    results, table_rows = {}, []
    for name, target in TARGETS.items():
        baseline = trained_baseline(name, data, options.quick)
        base_error = ts.evaluate(baseline, data)["error"]
        entry = {"baseline_error": base_error, "target_error": target}
        for library in ("torchslim", "torch.nn.utils.prune"):
            run = run_schedule(name, baseline, data, library, options.quick)
            entry[library] = run
            table_rows.append(
                [
                    name,
                    library,
                    f"{100 * base_error:.2f}%",
                    f"{100 * run['test_error']:.2f}%",
                    f"{run['nonzeros']:,}",
                    f"{run['compression']:.1f}x",
                    "yes" if run["test_error"] <= target and run["compression"] >= 12 else "NO",
                    f"{1000 * run['prune_step_seconds_median']:.1f}",
                ]
            )
        entry["step_time_90"] = pruning_step_time(baseline, 3 if options.quick else 15)
        results[name] = entry
    csr = csr_latency(options.quick)
    results["csr_4096"] = csr
    accuracy_table = markdown.table(
        ["model", "library", "dense error", "pruned error", "non-zeros", "compression", "target met", "prune step (ms, median)"], table_rows
    )
    step_table = markdown.table(
        ["model", "torchslim 90% step (ms)", "torch.nn.utils.prune 90% step (ms)"],
        [[n, f"{1000 * results[n]['step_time_90']['torchslim_s']:.1f}", f"{1000 * results[n]['step_time_90']['torch_s']:.1f}"] for n in TARGETS],
    )
    csr_table = markdown.table(
        ["batch", "dense (ms)", "CSR (ms)", "CSR speedup", "dense bytes", "CSR bytes"],
        [[r["batch"], f"{r['dense_ms']:.3f}", f"{r['csr_ms']:.3f}", f"{r['csr_speedup']:.2f}x", f"{r['dense_bytes']:,}", f"{r['csr_bytes']:,}"] for r in csr],
    )
    write(
        "pruning",
        "Pruning I: weight pruning on full MNIST, and CSR latency",
        results,
        [accuracy_table, step_table, csr_table],
        options,
        notes=[
            f"Iterative global magnitude (L1) pruning of the Linear/Conv weights to the sparsities {SPARSITIES}, fine-tuning after "
            f"each step ({FINETUNE}); the same schedule, seeds and fine-tuning for both libraries, so their masks coincide.",
            "Compression = parameters / non-zero parameters (biases included, unpruned). Han et al. 2015 report 12x for both nets.",
            "CSR: torch.sparse CSR matmul of a 4096x4096 Linear at 90% sparsity vs dense, 2 threads; medians of 3 alternating "
            "rounds of timed runs. A ratio below 1 means sparse is slower.",
        ],
    )


if __name__ == "__main__":
    main()
