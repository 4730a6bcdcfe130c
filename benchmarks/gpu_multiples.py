"""The channel multiple on CUDA: ResNet-56 and the MobileNetV2-style net pruned (all channel groups, l1) to about 2x
fewer MACs with kept counts rounded to 1, 4, 8 and 16, timed on the GPU in fp32 and bf16 at batch 1 and 256 (CUDA
events, medians). The measurement behind ``round_to="cuda"``. Random-init weights; needs a CUDA device."""

from __future__ import annotations

import copy
import sys

import torch

import torchslim as ts
from benchmarks.gpu import gpu_latency_ms
from benchmarks.harness import arguments, write
from benchmarks.structured import ratio_for_macs
from torchslim.report import markdown


def main() -> None:
    options = arguments(__doc__)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_multiples needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cudnn.benchmark = True
    example = torch.randn(1, 3, 32, 32)
    results: dict = {"device": torch.cuda.get_device_name()}
    rows = []
    for name in ("resnet56", "mobilenetv2"):
        torch.manual_seed(0)
        dense = ts.models.create(name).eval()
        keep_stem = {"conv1": 0.0} if name == "resnet56" else {}
        variants = {"dense": (dense, 1.0)}
        for multiple in (1, 4, 8, 16):
            _, model, achieved = ratio_for_macs(dense, example, 2.0, round_to=multiple, overrides=keep_stem)
            variants[f"round_to={multiple}"] = (model.eval(), achieved)
        for dtype in (torch.float32, torch.bfloat16):
            for batch in (1, 256):
                inputs = torch.randn(batch, 3, 32, 32, device="cuda", dtype=dtype)
                runs = 20 if options.quick else 100
                timed = {label: gpu_latency_ms(copy.deepcopy(model).cuda().to(dtype), inputs, runs=runs) for label, (model, _) in variants.items()}
                for label, (_, achieved) in variants.items():
                    if label == "dense":
                        continue
                    speedup = timed["dense"] / timed[label]
                    key = f"{name}/{str(dtype).split('.')[-1]}/b{batch}/{label}"
                    results[key] = {"macs_ratio": achieved, "ms": timed[label], "dense_ms": timed["dense"], "speedup": speedup}
                    rows.append([name, str(dtype).split(".")[-1], batch, label, f"{achieved:.2f}x", f"{timed[label]:.3f}", f"{speedup:.2f}x"])
                print(rows[-1], flush=True)
    table = markdown.table(["model", "dtype", "batch", "kept channels", "MACs ratio", "ms", "speedup"], rows)
    notes = [f"{results['device']}; torch {torch.__version__}; cuDNN autotuning on; CUDA events around each call, median of repeated runs."]
    write("gpu_multiples", "GPU: channel multiples of pruned nets", results, [table], options, notes)


if __name__ == "__main__":
    main()
