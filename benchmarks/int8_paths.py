"""Static int8 paths side by side on one model, all executed by ONNX Runtime (QDQ, U8S8, per-channel int8 weights):
torchslim's own post-training quantization (BatchNorm folded, torchslim observers calibrate the activations, exported
as QDQ) against ONNX Runtime's own quantize_static (min-max), with the fp32 export as the reference.
LeNet-5 on full MNIST (accuracy and latency), the ResNet-18-style net and ResNet-56 (latency and output SQNR against
the fp32 model on held-out random images; random-init weights, no CIFAR-10 here)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import torchslim as ts
from benchmarks.common import load_mnist, trained_baseline
from benchmarks.harness import arguments, write
from torchslim.measure import compare_latency
from torchslim.quantization.onnx_static import fp32_onnx_module
from torchslim.quantization.primitives import sqnr_db
from torchslim.report import markdown


def _seeded(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return ts.models.create(name).eval()


def main() -> None:
    options = arguments(__doc__)
    data = load_mnist(options.data_root, options.quick)
    results, rows = {}, []
    generator = torch.Generator().manual_seed(0)
    random_batches = [(torch.randn(16, 3, 32, 32, generator=generator), None) for _ in range(16)]
    # calibration: LeNet-5 on 16 shuffled training batches of 64 (the quantize verb's calibration batches), the
    # ResNet-18-style net on 16 batches of random images (no CIFAR-10 here)
    cases = [
        ("lenet-5", trained_baseline("lenet-5", data, options.quick), data.example_input(1), data),
        ("resnet18-style", _seeded("resnet18-style"), torch.randn(1, 3, 32, 32), random_batches),
        ("resnet56", _seeded("resnet56"), torch.randn(1, 3, 32, 32), random_batches),
    ]
    with tempfile.TemporaryDirectory() as folder:
        for name, model, example, calibration in cases:
            engines = {"fp32": fp32_onnx_module(model, example, Path(folder) / f"{name}-fp32.onnx")}
            for label, config, suffix in (
                ("torchslim PTQ (mse observer)", {"method": "native-int8", "observer": "mse", "calibration_batches": 16}, "native-mse"),
                ("torchslim PTQ (percentile observer)", {"method": "native-int8", "observer": "percentile", "calibration_batches": 16}, "native-pct"),
                ("ORT quantize_static (min-max)", {"method": "onnxruntime", "mode": "static", "calibration": "minmax", "calibration_batches": 16}, "ort"),
            ):
                path = Path(folder) / f"{name}-{suffix}.onnx"
                engines[label] = ts.quantize(model, config, data=calibration, example_input=example, path=path).model
            entry = {}
            for label, engine in engines.items():
                row = {"bytes": Path(engine.path).stat().st_size}
                if name == "lenet-5":
                    row["errors"] = ts.evaluate(engine, data)["errors"]
                else:
                    probe = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
                    row["output_sqnr_db"] = sqnr_db(engines["fp32"](probe), engine(probe)) if label != "fp32" else float("inf")
                entry[label] = row
            runs = 10 if options.quick else (100 if name == "lenet-5" else 12)
            # interleaved rounds: every engine timed in each round, so drift hits all alike
            latency = compare_latency(engines, example, batch_sizes=(1, 64), rounds=3, runs=runs, warmup=5)
            for label in engines:
                for batch in (1, 64):
                    entry[label][f"batch_{batch}_ms"] = latency[label][batch]
            for label in engines:
                entry[label]["speedup_b1"] = entry["fp32"]["batch_1_ms"] / entry[label]["batch_1_ms"]
                entry[label]["speedup_b64"] = entry["fp32"]["batch_64_ms"] / entry[label]["batch_64_ms"]
                quality = (
                    f"{entry[label]['errors']} errors"
                    if "errors" in entry[label]
                    else ("reference" if label == "fp32" else f"output SQNR {entry[label]['output_sqnr_db']:.1f} dB")
                )
                rows.append(
                    [
                        name,
                        label,
                        quality,
                        f"{entry[label]['batch_1_ms']:.3f}",
                        f"{entry[label]['speedup_b1']:.2f}x",
                        f"{entry[label]['batch_64_ms']:.3f}",
                        f"{entry[label]['speedup_b64']:.2f}x",
                        f"{entry[label]['bytes']:,}",
                    ]
                )
            results[name] = entry
    table = markdown.table(["model", "engine", "quality", "b1 (ms)", "b1 vs fp32", "b64 (ms)", "b64 vs fp32", "file bytes"], rows)
    write(
        "int8_paths",
        "Static int8: torchslim's own PTQ vs ONNX Runtime's quantize_static",
        results,
        [table],
        options,
        notes=[
            "Both int8 models are QDQ files run by ONNX Runtime (2 threads, spinning off); medians of 3 alternating rounds.",
            "torchslim PTQ: BatchNorm folded by the export, per-channel symmetric int8 weights, every uint8 activation range from "
            "torchslim's observer (MSE or 99.99th percentile) over 16 batches, the Q/DQ pairs placed by ONNX Runtime's quantizer: "
            "convolutions, residual adds, pooling and the classifier run as QLinearConv / QLinearAdd / QLinearGlobalAveragePool / "
            "QGemm in the optimized graph (tests/quantization/test_qat_pt2e.py checks it). With the min-max observer the file "
            "equals quantize_static's exactly. LeNet-5 errors are out of 10,000 test images (fp32: the baseline).",
        ],
    )


if __name__ == "__main__":
    main()
