"""Quantization on full MNIST and on a ResNet-style net:
- accuracy of LeNet-300-100 and LeNet-5 at 8, 6, 4, 3, 2 bits: uniform (symmetric, per channel) vs k-means weight
  sharing (linear init), and k-means after centroid fine-tuning (the shape of Deep Compression's Fig. 7);
- SQNR of every weight scheme on the trained weights;
- static int8 in ONNX Runtime (QDQ, U8S8, per-channel, min-max calibration on 16 training batches) against ONNX
  Runtime fp32 in the same process: accuracy change and latency at batch 1 and 64, 2 threads."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import torchslim as ts
from benchmarks.common import load_mnist, trained_baseline
from benchmarks.harness import arguments, write
from torchslim.measure import compare_latency
from torchslim.quantization import QuantizedConv2d, QuantizedLinear, WeightScheme
from torchslim.quantization.onnx_static import fp32_onnx_module
from torchslim.quantization.primitives import sqnr_db
from torchslim.quantization.pt2e import compiled_fp32
from torchslim.report import markdown
from torchslim.train import fit

BITS = (8, 6, 4, 3, 2)
SQNR_SCHEMES = [
    ("uniform 8 per-tensor", {"scheme": "uniform", "bits": 8, "granularity": "tensor"}),
    ("uniform 8 per-channel", {"scheme": "uniform", "bits": 8}),
    ("uniform 8 affine per-channel", {"scheme": "uniform", "bits": 8, "symmetric": False}),
    ("uniform 4 per-channel", {"scheme": "uniform", "bits": 4}),
    ("uniform 4 group-100", {"scheme": "uniform", "bits": 4, "granularity": "group", "group_size": 100}),
    ("uniform 2 per-channel", {"scheme": "uniform", "bits": 2}),
    ("k-means 4 (linear init)", {"scheme": "kmeans", "bits": 4}),
    ("k-means 4 (density init)", {"scheme": "kmeans", "bits": 4, "kmeans_init": "density"}),
    ("k-means 4 (random init)", {"scheme": "kmeans", "bits": 4, "kmeans_init": "random"}),
    ("k-means 2", {"scheme": "kmeans", "bits": 2}),
    ("power-of-two 4", {"scheme": "pow2", "bits": 4}),
    ("ternary (TWN)", {"scheme": "ternary"}),
    ("binary", {"scheme": "binary"}),
    ("fp16", {"scheme": "fp16"}),
    ("bf16", {"scheme": "bf16"}),
]


def accuracy_sweep(name: str, model, data, quick: bool) -> list[dict]:
    rows = []
    for bits in BITS[:2] if quick else BITS:
        uniform = ts.quantize(model, {"weights": {"scheme": "uniform", "bits": bits}}).model
        kmeans = ts.quantize(model, {"weights": {"scheme": "kmeans", "bits": bits}}).model
        row = {"bits": bits, "uniform_error": ts.evaluate(uniform, data)["error"], "kmeans_error": ts.evaluate(kmeans, data)["error"]}
        # centroid fine-tuning: only the shared values (and biases) train; every weight keeps its cluster
        for parameter_name, parameter in kmeans.named_parameters():
            parameter.requires_grad_(parameter_name.endswith("codebook"))
        fit(
            kmeans,
            data,
            {"epochs": 1, "optimizer": "adam", "lr": 1e-3, "max_batches_per_epoch": 30 if quick else 400, "eval_every_epoch": False, "seed": bits},
            progress=False,
        )
        row["kmeans_finetuned_error"] = ts.evaluate(kmeans, data)["error"]
        rows.append(row)
    return rows


def sqnr_table(models: dict) -> list[dict]:
    rows = []
    for label, scheme in SQNR_SCHEMES:
        row = {"scheme": label}
        for model_name, model in models.items():
            values = []
            for layer_name, module in model.named_modules():
                if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                try:
                    quantized = (QuantizedLinear if isinstance(module, torch.nn.Linear) else QuantizedConv2d).from_float(
                        module, WeightScheme.from_dict(scheme), layer_name
                    )
                except ts.TorchslimError:
                    continue  # e.g. a group size that does not divide this layer
                values.append((module.weight.numel(), sqnr_db(module.weight, quantized.quantized.weight())))
            total = sum(n for n, _ in values)
            row[model_name] = sum(n * v for n, v in values) / total if total else None
        rows.append(row)
    return rows


def int8_latency(model, example: torch.Tensor, calibration_data, folder: Path, runs: int) -> tuple:
    """ONNX Runtime static int8 (``ts.quantize``, method onnxruntime: QDQ, U8S8, per-channel, min-max on 16 batches of
    ``calibration_data``) against the fp32 export, timed side by side (3 interleaved rounds)."""
    fp32 = fp32_onnx_module(model, example, folder / "fp32.onnx")
    int8 = ts.quantize(model, {"method": "onnxruntime", "mode": "static"}, data=calibration_data, example_input=example, path=folder / "int8.onnx").model
    result = {"fp32_bytes": (folder / "fp32.onnx").stat().st_size, "int8_bytes": (folder / "int8.onnx").stat().st_size}
    latency = compare_latency({"fp32": fp32, "int8": int8}, example, batch_sizes=(1, 64), rounds=3, runs=runs, warmup=10)
    for batch in (1, 64):
        fp32_ms, int8_ms = latency["fp32"][batch], latency["int8"][batch]
        result[f"batch_{batch}"] = {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms}
    return result, fp32, int8


def pt2e_latency(model, example: torch.Tensor, calibration_data, runs: int) -> tuple:
    """torchao PT2E int8 (``ts.quantize``, method pt2e: X86InductorQuantizer, inductor with freezing, 16 calibration
    batches) vs the same model compiled in fp32."""
    fp32 = compiled_fp32(model, example)
    int8 = ts.quantize(model, {"method": "pt2e", "calibration_batches": 16}, data=calibration_data, example_input=example).model
    result = {}
    for batch in (1, 64):
        batch_input = example[:1].expand(batch, *example.shape[1:]).contiguous()
        fp32.prepare(batch_input), int8.prepare(batch_input)  # compile this batch size (frozen) outside the timed runs
        latency = compare_latency({"fp32": fp32, "int8": int8}, example, batch_sizes=(batch,), rounds=3, runs=runs, warmup=5)
        fp32_ms, int8_ms = latency["fp32"][batch], latency["int8"][batch]
        result[f"batch_{batch}"] = {"fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms}
    return result, fp32, int8


def main() -> None:
    options = arguments(__doc__)
    data = load_mnist(options.data_root, options.quick)
    runs = 10 if options.quick else 100
    results: dict = {"accuracy": {}, "int8": {}}
    models = {name: trained_baseline(name, data, options.quick) for name in ("lenet-300-100", "lenet-5")}
    tables = []
    for name, model in models.items():
        rows = accuracy_sweep(name, model, data, options.quick)
        dense = ts.evaluate(model, data)["error"]
        results["accuracy"][name] = {"dense_error": dense, "rows": rows}
        tables.append(
            f"**{name}** (dense test error {100 * dense:.2f}%)\n\n"
            + markdown.table(
                ["bits", "uniform per-channel", "k-means", "k-means + centroid fine-tuning"],
                [[r["bits"], f"{100 * r['uniform_error']:.2f}%", f"{100 * r['kmeans_error']:.2f}%", f"{100 * r['kmeans_finetuned_error']:.2f}%"] for r in rows],
            )
        )
    sqnr = sqnr_table(models)
    results["sqnr_db"] = sqnr
    tables.append(
        "SQNR of the trained weights (dB, weighted by layer size)\n\n"
        + markdown.table(["scheme", *models], [[r["scheme"], *[f"{r[m]:.2f}" if r[m] is not None else "-" for m in models]] for r in sqnr])
    )
    int8_rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, model, example, calibration_data in (
            ("lenet-5", models["lenet-5"], data.example_input(1), data),
            ("resnet18-style", ts.models.create("resnet18-style").eval(), torch.randn(1, 3, 32, 32), None),
        ):
            if calibration_data is not None:
                batches = calibration_data  # shuffled training batches of 64
            else:  # no CIFAR-10 here: calibrate on random images, report latency and output SQNR only
                generator = torch.Generator().manual_seed(0)
                batches = [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(16)]
            # the ResNet-18-style net runs about a second per batch of 64: fewer runs keep the benchmark in minutes
            timing, fp32, int8 = int8_latency(model, example, batches, Path(folder) / name, runs if name == "lenet-5" else max(5, runs // 8))
            entry = dict(timing)
            if calibration_data is not None:
                entry["fp32_error"] = ts.evaluate(fp32, data)["error"]
                entry["int8_error"] = ts.evaluate(int8, data)["error"]
                change = f"{100 * (entry['int8_error'] - entry['fp32_error']):+.2f} points"
            else:
                probe = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
                entry["output_sqnr_db"] = sqnr_db(fp32(probe), int8(probe))
                change = f"output SQNR {entry['output_sqnr_db']:.1f} dB (no CIFAR-10 here)"
            results["int8"][name] = entry
            int8_rows.append(
                [
                    name,
                    change,
                    f"{entry['batch_1']['fp32_ms']:.3f}",
                    f"{entry['batch_1']['int8_ms']:.3f}",
                    f"{entry['batch_1']['speedup']:.2f}x",
                    f"{entry['batch_64']['fp32_ms']:.3f}",
                    f"{entry['batch_64']['int8_ms']:.3f}",
                    f"{entry['batch_64']['speedup']:.2f}x",
                    f"{entry['fp32_bytes']:,}",
                    f"{entry['int8_bytes']:,}",
                ]
            )
    pt2e_rows = []
    for name, model, example in (
        ("lenet-5", models["lenet-5"], data.example_input(1)),
        ("resnet18-style", ts.models.create("resnet18-style").eval(), torch.randn(1, 3, 32, 32)),
    ):
        if name == "lenet-5":
            batches = data  # shuffled training batches of 64
        else:
            generator = torch.Generator().manual_seed(0)
            batches = [torch.randn(16, 3, 32, 32, generator=generator) for _ in range(16)]
        timing, fp32, int8 = pt2e_latency(model, example, batches, runs if name == "lenet-5" else max(5, runs // 8))
        entry = dict(timing)
        if name == "lenet-5":
            entry["fp32_error"], entry["int8_error"] = ts.evaluate(fp32, data)["error"], ts.evaluate(int8, data)["error"]
            change = f"{100 * (entry['int8_error'] - entry['fp32_error']):+.2f} points"
        else:
            probe = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            entry["output_sqnr_db"] = sqnr_db(fp32(probe), int8(probe))
            change = f"output SQNR {entry['output_sqnr_db']:.1f} dB (no CIFAR-10 here)"
        results.setdefault("pt2e", {})[name] = entry
        pt2e_rows.append(
            [
                name,
                change,
                *[
                    f"{entry[f'batch_{b}'][k]:.3f}" if k != "speedup" else f"{entry[f'batch_{b}'][k]:.2f}x"
                    for b in (1, 64)
                    for k in ("fp32_ms", "int8_ms", "speedup")
                ],
            ]
        )
    tables.append(
        "torchao PT2E int8 (X86InductorQuantizer, torch.compile with freezing) vs torch.compile fp32 with freezing\n\n"
        + markdown.table(["model", "accuracy change", "fp32 b1 (ms)", "int8 b1 (ms)", "b1 speedup", "fp32 b64 (ms)", "int8 b64 (ms)", "b64 speedup"], pt2e_rows)
    )
    tables.append(
        "Static int8 in ONNX Runtime vs ONNX Runtime fp32 (2 threads, spinning off, medians of 3 alternating rounds)\n\n"
        + markdown.table(
            [
                "model",
                "accuracy change",
                "fp32 b1 (ms)",
                "int8 b1 (ms)",
                "b1 speedup",
                "fp32 b64 (ms)",
                "int8 b64 (ms)",
                "b64 speedup",
                "fp32 bytes",
                "int8 bytes",
            ],
            int8_rows,
        )
    )
    write(
        "quantization",
        "Quantization: uniform vs k-means, SQNR, and real int8 in ONNX Runtime",
        results,
        tables,
        options,
        notes=[
            "Weight-only schemes quantize every Linear/Conv weight; activations stay fp32 (simulation of the stored weights, dequantized in forward).",
            "Centroid fine-tuning trains only the codebooks (each centroid gets the summed gradients of its cluster), 400 batches of 128, "
            "Adam at lr 1e-3 (plain SGD on summed gradients needs a learning rate scaled down by the cluster sizes, else it diverges).",
            "The int8 path is ONNX Runtime's quantize_static driven by torchslim (QDQ, uint8 activations, int8 per-channel weights, min-max); "
            "the ResNet-18-style net is untrained (no CIFAR-10 on this machine), so its row shows speed and output fidelity only.",
        ],
    )


if __name__ == "__main__":
    main()
