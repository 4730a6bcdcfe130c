"""Structured pruning (channels physically removed): ResNet-56 on CIFAR-10-shaped input at about 2x fewer MACs,
measured CPU latency next to the MACs ratio, side by side with Torch-Pruning at the same ratio; and LeNet-5 on full
MNIST pruned to 2x and 4x fewer MACs, then fine-tuned.

ResNet-56 has option-A (zero-padding) shortcuts. torchslim prunes its residual streams too; Torch-Pruning's
defaults cannot follow the padding, so the like-for-like comparison prunes the channels inside each block (the
first conv's filters) in both libraries at the same ratio. ResNet-56 accuracy needs CIFAR-10 files (--cifar-root);
latency does not depend on the weights."""

from __future__ import annotations

import copy
import time
from statistics import median

import torch
from torch import nn

import torchslim as ts
from benchmarks.common import load_mnist, trained_baseline
from benchmarks.harness import arguments, write
from torchslim.measure import compare_latency
from torchslim.measure.counts import count_macs
from torchslim.pruning.structured import prune_channels
from torchslim.report import markdown


def ratio_for_macs(model: nn.Module, example: torch.Tensor, target: float, **config) -> tuple[float, nn.Module, float]:
    """The channel ratio whose pruned model has ``target`` times fewer MACs (bisection)."""
    low, high = 0.0, 0.95
    best = None
    for _ in range(14):
        ratio = (low + high) / 2
        result = prune_channels(model, {"ratio": ratio, **config}, example_input=example)
        achieved = result.report.stages[0].metrics["macs_ratio"]
        if best is None or abs(achieved - target) < abs(best[2] - target):
            best = (ratio, result.model, achieved)
        if achieved < target:
            low = ratio
        else:
            high = ratio
    return best


def torch_pruning_internal(model: nn.Module, example: torch.Tensor, ratio: float) -> tuple[nn.Module, float]:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    ignored = [m for n, m in model.named_modules() if n.endswith("conv2") or n in ("conv1", "linear")]
    started = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio, ignored_layers=ignored)
    pruner.step()
    return model, time.perf_counter() - started


def resnet56_part(quick: bool) -> tuple[dict, list[str]]:
    torch.manual_seed(0)
    dense = ts.models.create("resnet56").eval()
    example = torch.randn(1, 3, 32, 32)
    macs_dense = count_macs(dense, example)["total"]
    ts_seconds, tp_seconds = [], []
    for _ in range(1 if quick else 3):
        started = time.perf_counter()
        internal = prune_channels(dense, {"ratio": 0.5, "prune_residual": False, "overrides": {"conv1": 0.0}}, example_input=example).model
        ts_seconds.append(time.perf_counter() - started)
        tp_model, seconds = torch_pruning_internal(dense, example, 0.5)
        tp_seconds.append(seconds)
    # the stem conv keeps its channels (ratio 0) in every ResNet-56 row; the classifier's outputs are the model's output
    full_ratio, full, _ = ratio_for_macs(dense, example, 2.0, overrides={"conv1": 0.0})
    rounded_ratio, rounded, _ = ratio_for_macs(dense, example, 2.0, round_to=8, overrides={"conv1": 0.0})
    same_widths = [m.out_channels for m in internal.modules() if isinstance(m, nn.Conv2d)] == [
        m.out_channels for m in tp_model.modules() if isinstance(m, nn.Conv2d)
    ]
    models = {
        "dense": dense,
        "torchslim, block-internal channels (ratio 0.5)": internal,
        "Torch-Pruning, block-internal channels (ratio 0.5)": tp_model,
        f"torchslim, all channel groups (ratio {full_ratio:.3f})": full,
        f"torchslim, all channel groups, widths multiple of 8 (ratio {rounded_ratio:.3f})": rounded,
    }
    rows, results = (
        [],
        {
            "macs_dense": macs_dense,
            "same_architecture_as_torch_pruning": same_widths,
            "prune_seconds": {"torchslim": median(ts_seconds), "torch_pruning": median(tp_seconds)},
            "models": {},
        },
    )
    for backend in ("eager", "onnxruntime"):
        latency = compare_latency(models, example, batch_sizes=(1, 64), rounds=2 if quick else 7, runs=10 if quick else 30, warmup=5, backend=backend)
        for name, model in models.items():
            macs = count_macs(model, example)["total"]
            entry = {
                "macs": macs,
                "macs_ratio": macs_dense / macs,
                "parameters": ts.measure.count_parameters(model),
                "latency_ms": latency[name],
                "speedup_b1": latency["dense"][1] / latency[name][1],
                "speedup_b64": latency["dense"][64] / latency[name][64],
            }
            entry["speedup_over_macs_b1"] = entry["speedup_b1"] / entry["macs_ratio"]
            entry["speedup_over_macs_b64"] = entry["speedup_b64"] / entry["macs_ratio"]
            results["models"].setdefault(name, {})[backend] = entry
            rows.append(
                [
                    name,
                    backend,
                    f"{macs / 1e6:.1f} M",
                    f"{entry['macs_ratio']:.2f}x",
                    f"{entry['parameters']:,}",
                    f"{latency[name][1]:.2f} ms",
                    f"{entry['speedup_b1']:.2f}x",
                    f"{latency[name][64]:.1f} ms",
                    f"{entry['speedup_b64']:.2f}x",
                    f"{entry['speedup_over_macs_b1']:.2f} / {entry['speedup_over_macs_b64']:.2f}",
                ]
            )
    table = markdown.table(
        ["ResNet-56 (32x32 input)", "engine", "MACs", "MACs ratio", "params", "batch 1", "speedup", "batch 64", "speedup", "speedup / MACs ratio (b1 / b64)"],
        rows,
    )
    timing = markdown.table(
        ["library", "time to prune (median)"],
        [["torchslim (trace + score + remove)", f"{median(ts_seconds):.2f} s"], ["Torch-Pruning MetaPruner", f"{median(tp_seconds):.2f} s"]],
    )
    return results, [table, timing]


def lenet5_part(data, quick: bool) -> tuple[dict, list[str]]:
    baseline = trained_baseline("lenet-5", data, quick)
    example = data.example_input(1)
    base_metrics = ts.evaluate(baseline, data)
    rows = [
        [
            "dense",
            "-",
            f"{count_macs(baseline, example)['total'] / 1e6:.2f} M",
            "1.00x",
            f"{ts.measure.count_parameters(baseline):,}",
            "-",
            f"{100 * base_metrics['error']:.2f}%",
        ]
    ]
    results = {"baseline_error": base_metrics["error"], "pruned": []}
    finetune = {"epochs": 1 if quick else 3, "lr": 0.01, "batch_size": 64, "weight_decay": 5e-4, "eval_every_epoch": False}
    if quick:
        finetune["max_batches_per_epoch"] = 30
    for target in (2.0, 4.0):
        ratio, model, achieved = ratio_for_macs(baseline, example, target, overrides={"fc2": 0.0})
        after_prune = ts.evaluate(model, data)["error"]
        ts.train(model, data, finetune, inplace=True, progress=False)
        after = ts.evaluate(model, data)
        widths = f"conv {model.conv1.out_channels}/{model.conv2.out_channels}, fc {model.fc1.out_features}"
        results["pruned"].append(
            {
                "target": target,
                "ratio": ratio,
                "macs_ratio": achieved,
                "widths": widths,
                "error_after_prune": after_prune,
                "error": after["error"],
                "errors": after["errors"],
                "parameters": ts.measure.count_parameters(model),
            }
        )
        rows.append(
            [
                f"{target:.0f}x fewer MACs ({widths})",
                f"{ratio:.3f}",
                f"{count_macs(model, example)['total'] / 1e6:.2f} M",
                f"{achieved:.2f}x",
                f"{ts.measure.count_parameters(model):,}",
                f"{100 * after_prune:.2f}%",
                f"{100 * after['error']:.2f}%",
            ]
        )
    table = markdown.table(
        ["LeNet-5 on MNIST", "channel ratio", "MACs", "MACs ratio", "params", "test error after pruning", f"after {finetune['epochs']} epochs fine-tuning"],
        rows,
    )
    return results, [table]


def main() -> None:
    options = arguments(__doc__)
    resnet, resnet_tables = resnet56_part(options.quick)
    data = load_mnist(options.data_root, options.quick)
    lenet, lenet_tables = lenet5_part(data, options.quick)
    notes = [
        "Latency: 2 threads, median of per-round medians over interleaved rounds (every model timed in each round); eager "
        "PyTorch and ONNX Runtime (each model exported once, thread-pool spinning off)."
    ]
    for backend in ("eager", "onnxruntime"):
        full = next(v[backend] for k, v in resnet["models"].items() if k.startswith("torchslim, all channel groups, widths"))
        internal = resnet["models"]["torchslim, block-internal channels (ratio 0.5)"][backend]
        tp_entry = resnet["models"]["Torch-Pruning, block-internal channels (ratio 0.5)"][backend]
        notes += [
            f"{backend}: torchslim's block-internal model ({'the same' if resnet['same_architecture_as_torch_pruning'] else 'a different'} "
            f"architecture as Torch-Pruning's) runs at {tp_entry['latency_ms'][1] / internal['latency_ms'][1]:.2f}x / "
            f"{tp_entry['latency_ms'][64] / internal['latency_ms'][64]:.2f}x Torch-Pruning's model's speed (batch 1 / 64; >1 is faster); "
            f"speedup / MACs ratio {internal['speedup_over_macs_b1']:.2f} / {internal['speedup_over_macs_b64']:.2f}.",
            f"{backend}: all channel groups, widths rounded to multiples of 8 (residual streams through the option-A padding "
            f"included; stem conv and classifier protected): {full['macs_ratio']:.2f}x fewer MACs, {full['speedup_b1']:.2f}x / "
            f"{full['speedup_b64']:.2f}x faster "
            f"({full['speedup_over_macs_b1']:.2f} / {full['speedup_over_macs_b64']:.2f} of the MACs ratio; target >= 0.8).",
        ]
    notes += [
        "Widths that are not multiples of 8 (e.g. 10 / 19 / 38 channels) run far below their MACs in both engines (the "
        "unrounded row); round_to=8 keeps the kernels on their fast paths.",
        "ResNet-56 accuracy needs CIFAR-10 files, which this machine does not have; the weights here are untrained.",
        "LeNet-5: l1 filter / neuron norms, per-layer ratio found by bisection to the MACs target, classifier protected; "
        "fine-tuning with SGD lr 0.01 on the full training set.",
    ]
    write("structured", "Structured pruning: channels removed, measured", {"resnet56": resnet, "lenet5": lenet}, resnet_tables + lenet_tables, options, notes)


if __name__ == "__main__":
    main()
