"""Network compression, measured: low-rank factorization of LeNet-300-100 and LeNet-5 on full MNIST at 2x and 4x
fewer parameters (SVD for Linear layers, Tucker-2 for convolutions; accuracy before and after fine-tuning, measured
latency against the dense model), and the latency change of activation substitution and of depth reduction on the
ResNet-20 and MobileNetV2-style nets (random-init weights: no CIFAR-10 on this machine, so only speed and output
fidelity are measured there)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import torchslim as ts
from benchmarks.common import load_mnist, trained_baseline
from benchmarks.harness import arguments, write
from torchslim.measure import compare_latency
from torchslim.measure.counts import count_macs
from torchslim.report import markdown

BACKENDS = ("eager", "onnxruntime")


def _latency(models: dict[str, nn.Module], example: torch.Tensor, quick: bool) -> dict[str, dict[str, dict[int, float]]]:
    return {
        backend: compare_latency(models, example, batch_sizes=(1, 64), rounds=2 if quick else 7, runs=10 if quick else 30, warmup=5, backend=backend)
        for backend in BACKENDS
    }


def factorization_part(data, quick: bool) -> tuple[dict, list[str], list[str]]:
    rows, results, notes = [], {}, []
    finetune = {"epochs": 1 if quick else 3, "lr": 0.01, "batch_size": 64, "weight_decay": 1e-4, "eval_every_epoch": False}
    if quick:
        finetune["max_batches_per_epoch"] = 30
    for name in ("lenet-300-100", "lenet-5"):
        dense = trained_baseline(name, data, quick).eval()
        example = data.example_input(1)
        dense_error = ts.evaluate(dense, data)["error"]
        models = {"dense": dense}
        entries = {}
        targets = [(2, "parameters"), (4, "parameters")] + ([(2, "macs")] if name == "lenet-5" else [])
        for target, by in targets:
            result = ts.factorize(dense, {"ratio": 1 / target, "by": by}, data=data)
            stage = result.report.stages[0]
            before_tuning = stage.metrics["error"]
            ts.train(result.model, data, finetune, inplace=True, progress=False)
            model = result.model.eval()
            key = f"{target}x fewer {by}"
            models[key] = model
            entries[key] = {
                "parameters": ts.measure.count_parameters(model),
                "parameter_ratio": ts.measure.count_parameters(dense) / ts.measure.count_parameters(model),
                "macs_ratio": count_macs(dense, example)["total"] / count_macs(model, example)["total"],
                "error_factorized": before_tuning,
                "error": ts.evaluate(model, data)["error"],
                "layers": [{k: row[k] for k in ("name", "form", "rank", "energy_kept", "weight_error")} for row in stage.layers],
                "left_whole": [note for note in stage.notes if "left whole" in note],
            }
        latency = _latency(models, data.example_input(1), quick)
        results[name] = {"dense_error": dense_error, "parameters": ts.measure.count_parameters(dense), "factorized": entries, "latency_ms": latency}
        rows.append(
            [name, "dense", f"{ts.measure.count_parameters(dense):,}", "1.00x", "1.00x", "-", f"{100 * dense_error:.2f}%", "", "1.00x / 1.00x", "1.00x / 1.00x"]
        )
        for key, entry in entries.items():
            speed = {backend: [latency[backend]["dense"][b] / latency[backend][key][b] for b in (1, 64)] for backend in BACKENDS}
            entry["speedup"] = speed
            ranks = ", ".join(f"{layer['name']} {layer['rank']}" for layer in entry["layers"])
            rows.append(
                [
                    name,
                    key,
                    f"{entry['parameters']:,}",
                    f"{entry['parameter_ratio']:.2f}x",
                    f"{entry['macs_ratio']:.2f}x",
                    f"{100 * entry['error_factorized']:.2f}%",
                    f"{100 * entry['error']:.2f}%",
                    ranks,
                    f"{speed['eager'][0]:.2f}x / {speed['eager'][1]:.2f}x",
                    f"{speed['onnxruntime'][0]:.2f}x / {speed['onnxruntime'][1]:.2f}x",
                ]
            )
            for backend in BACKENDS:
                for index, batch in enumerate((1, 64)):
                    if speed[backend][index] < 1.0:
                        notes.append(
                            f"{name} at {key} ({entry['macs_ratio']:.2f}x fewer MACs) runs slower than dense in {backend} "
                            f"at batch {batch} ({speed[backend][index]:.2f}x): two thin matmuls / convolutions cost more calls than they save at this size"
                        )
    table = markdown.table(
        [
            "model",
            "factorized",
            "params",
            "params ratio",
            "MACs ratio",
            "error, factorized",
            f"error, +{finetune['epochs']} epochs",
            "ranks",
            "eager speedup b1 / b64",
            "ONNX Runtime speedup b1 / b64",
        ],
        rows,
    )
    return results, [table], notes


def _silu(model: nn.Module) -> nn.Module:
    """The MobileNetV2-style net with SiLU in place of ReLU6 (an EfficientNet-style activation)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.ReLU6):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, nn.SiLU())
    return model


def _fidelity(model: nn.Module, reference: nn.Module, inputs: torch.Tensor) -> float:
    """Cosine of the outputs' deviations from their batch mean (a random-init net's logits are mostly its bias)."""
    with torch.no_grad():
        ours, theirs = model.eval()(inputs).flatten(1), reference.eval()(inputs).flatten(1)
        return float(torch.nn.functional.cosine_similarity(ours - ours.mean(0), theirs - theirs.mean(0)).mean())


def architecture_part(quick: bool) -> tuple[dict, list[str], list[str]]:
    torch.manual_seed(0)
    example = torch.randn(1, 3, 32, 32)
    inputs = torch.randn(64, 3, 32, 32)
    calibration = [torch.randn(32, 3, 32, 32) for _ in range(2 if quick else 4)]
    mobilenet = ts.models.create("mobilenetv2").eval()
    silu = _silu(mobilenet)
    resnet = ts.models.create("resnet20").eval()
    variants = {
        "MobileNetV2 (ReLU6)": (mobilenet, {"MobileNetV2, ReLU6 -> ReLU": ts.substitute_activations(mobilenet, {"to": "relu"}, example_input=example).model}),
        "MobileNetV2 with SiLU": (
            silu,
            {
                "MobileNetV2, SiLU -> ReLU": ts.substitute_activations(silu, {"to": "relu"}, example_input=example).model,
                "MobileNetV2, SiLU -> Hardswish": ts.substitute_activations(silu, {"to": "hard"}, example_input=example).model,
            },
        ),
    }
    for label, network in (("ResNet-20", resnet), ("MobileNetV2 (ReLU6)", mobilenet)):
        candidates = ts.compression.depth.candidate_blocks(network, example)
        count = max(1, len(candidates) // 3)
        removed = ts.remove_blocks(network, {"count": count, "calibration_batches": len(calibration)}, data=calibration, task="fidelity")
        key = f"{label}, {count} of {len(candidates)} blocks removed"
        variants.setdefault(label, (network, {}))[1][key] = removed.model
    rows, results = [], {}
    for label, (base, changed) in variants.items():
        models = {"base": base, **changed}
        latency = _latency(models, example, quick)
        for name, model in changed.items():
            speed = {backend: [latency[backend]["base"][b] / latency[backend][name][b] for b in (1, 64)] for backend in BACKENDS}
            macs = count_macs(base, example)["total"] / count_macs(model, example)["total"]
            fidelity = _fidelity(model, base, inputs)
            results[name] = {
                "base": label,
                "speedup": speed,
                "macs_ratio": macs,
                "output_cosine": fidelity,
                "latency_ms": {b: latency[b][name] for b in BACKENDS},
            }
            rows.append(
                [
                    name,
                    f"{macs:.2f}x",
                    f"{fidelity:.3f}",
                    f"{latency['eager']['base'][1]:.2f} -> {latency['eager'][name][1]:.2f} ms",
                    f"{speed['eager'][0]:.2f}x / {speed['eager'][1]:.2f}x",
                    f"{latency['onnxruntime']['base'][1]:.2f} -> {latency['onnxruntime'][name][1]:.2f} ms",
                    f"{speed['onnxruntime'][0]:.2f}x / {speed['onnxruntime'][1]:.2f}x",
                ]
            )
    table = markdown.table(
        [
            "change (random-init weights)",
            "MACs ratio",
            "output cosine to the base (centered), no fine-tuning",
            "eager b1",
            "eager speedup b1 / b64",
            "ONNX Runtime b1",
            "ONNX Runtime speedup b1 / b64",
        ],
        rows,
    )
    notes = [
        "Activation substitution and depth: random-init weights (no CIFAR-10 here), so accuracy is not measured; the output cosine "
        "to the unchanged net on random inputs shows how far each change moves the function before any fine-tuning.",
        "Blocks to remove were scored by the fidelity loss to the unchanged net on random calibration inputs when bypassed.",
    ]
    return results, [table], notes


def main() -> None:
    options = arguments(__doc__)
    data = load_mnist(options.data_root, options.quick)
    factorization, factorization_tables, factorization_notes = factorization_part(data, options.quick)
    architecture, architecture_tables, architecture_notes = architecture_part(options.quick)
    notes = [
        "Factorization: ts.factorize with a parameter ratio of 1/2 and 1/4 of the Linear / Conv2d weights, allocated greedily "
        "(least relative energy lost per weight saved); then SGD fine-tuning; latency: 2 threads, median of per-round medians "
        "over interleaved rounds, each model exported once for ONNX Runtime.",
        *factorization_notes,
        *architecture_notes,
    ]
    write(
        "network",
        "Network compression: factorization, activations, depth",
        {"factorization": factorization, "architecture": architecture},
        factorization_tables + architecture_tables,
        options,
        notes,
    )


if __name__ == "__main__":
    main()
