"""Structured pruning speed against the channel multiple: ResNet-56 and the MobileNetV2-style net pruned (all channel
groups, l1) to 2x and 3x fewer MACs with kept counts rounded to 1, 4, 8 and 16 channels, and with ``round_to`` set
to the engine's name; measured speedup over the dense model and speedup / MACs ratio, in eager PyTorch and ONNX
Runtime, batch 1 and 64 (random-init weights: latency does not depend on the values). The table behind
``torchslim.pruning.structured.CHANNEL_MULTIPLES``. Next to them, Torch-Pruning's MetaPruner (l1) at the same MACs
ratio, unrounded and rounded to 16, timed in the same rounds."""

from __future__ import annotations

import copy

import torch
from torch import nn

import torchslim as ts
from benchmarks.harness import arguments, write
from benchmarks.structured import ratio_for_macs
from torchslim.measure import compare_latency
from torchslim.measure.counts import count_macs
from torchslim.pruning.structured import channel_multiple
from torchslim.report import markdown


def torch_pruning_for_macs(dense: nn.Module, example: torch.Tensor, target: float, round_to: int | None, internal: bool) -> tuple[nn.Module, float] | None:
    """Torch-Pruning's MetaPruner (l1, one uniform ratio) at ``target`` times fewer MACs (bisection on the ratio).
    ``internal``: only the channels inside residual blocks (its defaults break on option-A shortcuts)."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    dense_macs = count_macs(dense, example)["total"]
    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (low + high) / 2
        model = copy.deepcopy(dense)
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
        ignored = last + ([m for n, m in model.named_modules() if n.endswith("conv2") or n == "conv1"] if internal else [])
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio, ignored_layers=ignored, round_to=round_to
        )
        pruner.step()
        achieved = dense_macs / count_macs(model, example)["total"]
        if best is None or abs(achieved - target) < abs(best[1] - target):
            best = (model.eval(), achieved)
        low, high = (ratio, high) if achieved < target else (low, ratio)
    return best


def main() -> None:
    options = arguments(__doc__)
    example = torch.randn(1, 3, 32, 32)
    results: dict = {}
    rows = []
    targets = (2.0,) if options.quick else (2.0, 3.0)
    for name in ("resnet56", "mobilenetv2"):
        torch.manual_seed(0)
        dense = ts.models.create(name).eval()
        keep_stem = {"conv1": 0.0} if name == "resnet56" else {}
        for target in targets:
            variants: dict[str, tuple[torch.nn.Module, float, int]] = {}
            for multiple in (1, 4, 8, 16):
                _, model, achieved = ratio_for_macs(dense, example, target, round_to=multiple, overrides=keep_stem)
                variants[f"round_to={multiple}"] = (model.eval(), achieved, multiple)
            for multiple in (None, 16):
                found = torch_pruning_for_macs(dense, example, target, multiple, internal=name == "resnet56")
                if found is not None:
                    variants[f"Torch-Pruning{'' if multiple is None else f', round_to={multiple}'}"] = (found[0], found[1], multiple or 1)
            # the same graph with almost every channel gone: what the engine spends on the operators themselves
            floor = ts.prune_channels(dense, {"ratio": 0.95, "round_to": 1, "overrides": keep_stem}, example_input=example).model.eval()
            models = {"dense": dense, "floor": floor, **{label: model for label, (model, _, _) in variants.items()}}
            for backend in ("eager", "onnxruntime"):
                runs = 5 if options.quick else 20
                latency = compare_latency(models, example, batch_sizes=(1, 64), rounds=2 if options.quick else 5, runs=runs, warmup=5, backend=backend)
                shares = results.setdefault(name, {}).setdefault("floor_share", {}).setdefault(backend, {})
                shares[f"{target:g}x"] = {b: latency["floor"][b] / latency["dense"][b] for b in (1, 64)}
                for label, (_, achieved, multiple) in variants.items():
                    speedups = {batch: latency["dense"][batch] / latency[label][batch] for batch in (1, 64)}
                    # the speedup the MACs ratio allows when the floor's time does not shrink with the channels
                    attainable = {b: latency["dense"][b] / (latency["floor"][b] + (latency["dense"][b] - latency["floor"][b]) / achieved) for b in (1, 64)}
                    entry = {
                        "macs_ratio": achieved,
                        "multiple": multiple,
                        "latency_ms": latency[label],
                        "speedup": speedups,
                        "floor_ms": latency["floor"],
                        "attainable": attainable,
                    }
                    results.setdefault(name, {}).setdefault(f"{target:g}x", {}).setdefault(backend, {})[label] = entry
                    rows.append(
                        [
                            name,
                            f"{target:g}x",
                            backend,
                            label,
                            f"{achieved:.2f}x",
                            f"{speedups[1]:.2f}x",
                            f"{speedups[64]:.2f}x",
                            f"{speedups[1] / achieved:.2f} / {speedups[64] / achieved:.2f}",
                            f"{attainable[1]:.2f}x / {attainable[64]:.2f}x",
                            f"{speedups[1] / attainable[1]:.2f} / {speedups[64] / attainable[64]:.2f}",
                        ]
                    )
                print(rows[-1], flush=True)
    headers = ["model", "target", "engine", "kept channels", "MACs ratio", "speedup b1", "speedup b64", "speedup / MACs (b1 / b64)"]
    table = markdown.table([*headers, "attainable (b1 / b64)", "speedup / attainable (b1 / b64)"], rows)
    notes = [
        "Every channel group pruned by l1 (the stem conv of ResNet-56 kept whole), the ratio found by bisection for each multiple, so the "
        "achieved MACs ratio differs a little between rows; every model of a (net, target) timed in the same interleaved rounds.",
        "ResNet-56's first stage has 16 channels, which multiples of 16 cannot shrink: 1.76x fewer MACs is the most it reaches with them "
        "(the 3x rows with round_to=16 stop there).",
        "Torch-Pruning 1.6 MetaPruner, l1 magnitude, one ratio for every layer (the final classifier kept), bisected to the same MACs target. "
        "On ResNet-56 it prunes only the channels inside each residual block (the stem, each block's second conv and so the residual streams "
        "kept): its default grouping breaks on the option-A (zero-padded) shortcuts. torchslim prunes the residual streams as well.",
        "attainable: the speedup the MACs ratio would give if the time of the 'floor' model (the same graph with 95% of every prunable "
        "channel set removed, timed in the same rounds) were a fixed cost and the rest shrank with the MACs: dense / (floor + (dense - "
        "floor) / MACs ratio). Where it is far below the MACs ratio, the engine's time is in running the operators, not in their channels.",
        f"round_to='onnxruntime' and round_to='eager' stand for {channel_multiple('onnxruntime')} on this CPU (the vector unit's channel block: "
        "16 with AVX-512, 8 with AVX2).",
    ]
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        notes.append("Torch-Pruning is not installed here (pip install -e '.[bench]'): its rows are missing from this run.")
    for name, entry in results.items():
        for backend, by_target in entry["floor_share"].items():
            share = {b: sum(t[b] for t in by_target.values()) / len(by_target) for b in (1, 64)}
            notes.append(f"{name}, {backend}: the floor model takes {share[1]:.0%} of the dense model's time at batch 1 and {share[64]:.0%} at batch 64.")
    write("channel_multiples", "Structured pruning: channel multiples per engine", results, [table], options, notes)


if __name__ == "__main__":
    main()
