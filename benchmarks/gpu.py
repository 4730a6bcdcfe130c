"""On a CUDA device: fine-tuning throughput in fp32 / bf16 / fp16 autocast, and inference latency of dense and
structurally pruned (2x fewer MACs) ResNet-56 and MobileNetV2-style nets in eager fp32, eager bf16 and
``torch.compile``, batch 1 and 256.

Inputs are random CIFAR-10-shaped tensors and the weights are random-init: speed does not depend on the values (the
accuracy side of these methods is measured on CPU in the other benchmarks). Timed with CUDA events, median of
repeated runs after warm-up, all variants of one model in one process. Needs a CUDA device; exits saying so
elsewhere."""

from __future__ import annotations

import copy
import sys
import time
from statistics import median

import torch
from torch import nn

import torchslim as ts
from benchmarks.harness import arguments, write
from torchslim.measure.counts import count_macs
from torchslim.pruning.structured import prune_channels
from torchslim.report import markdown
from torchslim.train import fit


def gpu_latency_ms(model: nn.Module, example: torch.Tensor, runs: int, warmup: int = 10) -> float:
    """Median milliseconds of one forward pass (CUDA events around each call)."""
    with torch.no_grad():
        for _ in range(warmup):
            model(example)
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(example)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return median(times)


def training_throughput(name: str, precision: str, batch: int, steps: int) -> float:
    """Examples per second of ``fit`` (forward, backward, SGD step, host-to-device copy of each batch)."""
    torch.manual_seed(0)
    model = ts.models.create(name).cuda()
    inputs, targets = torch.randn(batch * steps, 3, 32, 32), torch.randint(0, 10, (batch * steps,))
    config = {"epochs": 1, "batch_size": batch, "lr": 0.05, "eval_every_epoch": False, "precision": precision, "max_batches_per_epoch": 3}
    fit(model, (inputs, targets), config, progress=False, evaluate_at_end=False)  # warm-up (cuDNN autotuning)
    seconds = []
    for _ in range(3):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fit(model, (inputs, targets), {**config, "max_batches_per_epoch": steps}, progress=False, evaluate_at_end=False)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return batch * steps / median(seconds)


def main() -> None:
    options = arguments(__doc__)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    quick = options.quick
    device_name = torch.cuda.get_device_name()
    results: dict = {"device": device_name, "training": [], "inference": []}
    for name in ("resnet56", "mobilenetv2"):
        for precision in ("fp32", "bf16", "fp16"):
            rate = training_throughput(name, precision, batch=256, steps=5 if quick else 20)
            results["training"].append({"model": name, "precision": precision, "examples_per_s": rate})
            print(name, precision, f"{rate:,.0f} examples/s", flush=True)
    for name in ("resnet56", "mobilenetv2"):
        torch.manual_seed(0)
        dense = ts.models.create(name).eval()
        example = torch.randn(1, 3, 32, 32)
        pruned = prune_channels(dense, {"ratio": 0.3, "round_to": 8}, example_input=example).model.eval()
        macs = count_macs(dense, example)["total"] / count_macs(pruned, example)["total"]
        for batch in (1, 256):
            inputs = torch.randn(batch, 3, 32, 32, device="cuda")
            row = {"model": name, "batch": batch, "macs_ratio": macs}
            for label, model in (("dense", dense), ("pruned", pruned)):
                on_gpu = copy.deepcopy(model).cuda()
                row[f"{label}_fp32_ms"] = gpu_latency_ms(on_gpu, inputs, runs=20 if quick else 100)
                row[f"{label}_bf16_ms"] = gpu_latency_ms(copy.deepcopy(on_gpu).to(torch.bfloat16), inputs.to(torch.bfloat16), runs=20 if quick else 100)
                compiled = torch.compile(on_gpu)
                row[f"{label}_compiled_ms"] = gpu_latency_ms(compiled, inputs, runs=20 if quick else 100, warmup=3)
            row["pruned_speedup_fp32"] = row["dense_fp32_ms"] / row["pruned_fp32_ms"]
            row["pruned_speedup_compiled"] = row["dense_compiled_ms"] / row["pruned_compiled_ms"]
            results["inference"].append(row)
            print(row, flush=True)
    fp32_rate = {r["model"]: r["examples_per_s"] for r in results["training"] if r["precision"] == "fp32"}
    training = markdown.table(
        ["model", "precision", "examples/s", "vs fp32"],
        [[r["model"], r["precision"], f"{r['examples_per_s']:,.0f}", f"{r['examples_per_s'] / fp32_rate[r['model']]:.2f}x"] for r in results["training"]],
    )
    inference = markdown.table(
        [
            "model",
            "batch",
            "MACs ratio",
            "dense fp32 ms",
            "pruned fp32 ms",
            "speedup",
            "dense bf16 ms",
            "dense compiled ms",
            "pruned compiled ms",
            "speedup compiled",
        ],
        [
            [
                r["model"],
                r["batch"],
                f"{r['macs_ratio']:.2f}x",
                f"{r['dense_fp32_ms']:.3f}",
                f"{r['pruned_fp32_ms']:.3f}",
                f"{r['pruned_speedup_fp32']:.2f}x",
                f"{r['dense_bf16_ms']:.3f}",
                f"{r['dense_compiled_ms']:.3f}",
                f"{r['pruned_compiled_ms']:.3f}",
                f"{r['pruned_speedup_compiled']:.2f}x",
            ]
            for r in results["inference"]
        ],
    )
    notes = [
        f"{device_name}; torch {torch.__version__}; random-init weights and random CIFAR-10-shaped inputs (speed only).",
        "Training: `fit` with batch 256 and SGD, examples/s including the host-to-device copy of each batch; median of 3 epochs.",
        "Inference: CUDA events around each call, median of repeated runs; pruned = 30% of the channels of every coupled set removed, counts rounded to 8.",
    ]
    write("gpu", "GPU: training precision and inference of dense and pruned nets", results, [training, inference], options, notes)


if __name__ == "__main__":
    main()
