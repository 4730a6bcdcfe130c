"""Deep Compression pushed with sparse variational dropout on full MNIST: LeNet-300-100 and LeNet-5 from the trained
baselines, each layer's sparsity learned by variational dropout (Molchanov et al. 2017) instead of a magnitude
schedule a person picked, then k-means weight sharing with centroid fine-tuning and entropy coding into a .tslim file.
Reported: the non-zero ratio next to the published ones (Dynamic Network Surgery, Sparse VD), and the file's bytes
against the dense fp32 model next to the targets (LeNet-300-100 >= 80x at <= 1.64% error, LeNet-5 >= 200x at
<= 0.80%)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

import torchslim as ts
from benchmarks.common import load_mnist, trained_baseline
from benchmarks.harness import arguments, only_rows, write
from torchslim.report import markdown

TARGETS = {"lenet-300-100": {"error": 0.0164, "bytes_ratio": 80, "nonzero_ratio": 60}, "lenet-5": {"error": 0.0080, "bytes_ratio": 200, "nonzero_ratio": 150}}
# (model, KL weight, epochs of variational dropout, epochs of fine-tuning after, "finetune" or "distill" for that
# fine-tuning, k-means bits, the share of variational dropout's data term taken from the dense model's soft targets,
# train_clip: weights past the threshold left out while training, as the authors train; optionally the sparsity target:
# at least that share of the weights masked at the end, the highest log alpha first, or a mapping of that target
# ("sparsity"), the learning-rate schedule ("schedule", cosine by default) and the epochs the KL weight rises over
# ("warmup_epochs", 1 by default), and the model the distillation after it learns from ("teacher": a registry name whose
# trained baseline is the teacher; the dense model the recipe started from by default), that distillation's learning
# rate ("distill_lr", 3e-4 by default), and how the k-means centroids are trained ("centroids": "finetune", 3 epochs on
# the labels by default, or "distill", 5 epochs of distillation from the same teacher at 1e-4))
RUNS = [
    ("lenet-300-100", 1.0, 20, 0, "finetune", 4, 0.0, False),
    ("lenet-300-100", 0.4, 30, 5, "finetune", 4, 0.0, False),
    ("lenet-300-100", 0.6, 40, 15, "distill", 5, 0.0, False),
    ("lenet-300-100", 1.0, 40, 15, "distill", 5, 0.9, False),
    ("lenet-300-100", 3.0, 40, 15, "distill", 5, 0.9, False),
    ("lenet-300-100", 1.0, 40, 15, "distill", 5, 0.0, True),
    ("lenet-300-100", 0.6, 40, 15, "distill", 5, 0.0, True),
    ("lenet-300-100", 0.3, 40, 15, "distill", 5, 0.0, True),
    ("lenet-5", 1.0, 20, 3, "finetune", 4, 0.0, False),
    ("lenet-5", 0.8, 30, 10, "distill", 4, 0.0, False),
    ("lenet-5", 0.8, 30, 25, "distill", 4, 0.0, False),
    ("lenet-5", 1.0, 100, 10, "distill", 4, 0.0, False),
    ("lenet-5", 0.5, 30, 10, "distill", 4, 0.0, True),
    ("lenet-5", 0.25, 30, 10, "distill", 4, 0.0, True),
    ("lenet-5", 0.25, 30, 25, "distill", 4, 0.0, True),
    ("lenet-300-100", 0.3, 40, 25, "distill", 5, 0.0, True, 1 - 1 / 60),
    ("lenet-5", 0.25, 30, 25, "distill", 4, 0.0, True, 1 - 1 / 150),
    ("lenet-5", 0.5, 100, 25, "distill", 4, 0.0, True, {"schedule": "linear", "warmup_epochs": 15}),
    ("lenet-300-100", 0.5, 100, 25, "distill", 5, 0.0, True, {"schedule": "linear", "warmup_epochs": 15}),
    ("lenet-300-100", 0.35, 100, 25, "distill", 5, 0.0, True, {"schedule": "linear", "warmup_epochs": 15}),
    ("lenet-300-100", 0.5, 100, 25, "distill", 5, 0.0, True, {"schedule": "linear", "warmup_epochs": 15, "teacher": "lenet-5"}),
    (
        "lenet-300-100",
        0.5,
        100,
        25,
        "distill",
        6,
        0.0,
        True,
        {"schedule": "linear", "warmup_epochs": 15, "teacher": "lenet-5", "distill_lr": 1e-3, "centroids": "distill"},
    ),
]
PUBLISHED = {  # non-zero ratios (weights kept over all weights), test error
    "lenet-300-100": "Dynamic Network Surgery 56x at 1.99%; Sparse VD 68x at 1.92%; Deep Compression 12x at 1.58%",
    "lenet-5": "Dynamic Network Surgery 111x at 0.91%; Sparse VD 280x at 0.75%; Deep Compression 12x at 0.74%",
}


def _options(target: float | dict | None) -> dict:
    return dict(target) if isinstance(target, dict) else {"sparsity": target}


def recipe(
    kl_weight: float,
    epochs: int,
    tune_epochs: int,
    tuning: str,
    bits: int,
    teacher: float,
    clip: bool,
    quick: bool,
    target: float | dict | None = None,
    teacher_file: Path | None = None,
) -> dict:
    options = _options(target)
    schedule, sparsity, warmup = options.get("schedule", "cosine"), options.get("sparsity"), options.get("warmup_epochs", 1.0)
    train = {"epochs": 1 if quick else epochs, "optimizer": "adam", "lr": 1e-3, "schedule": schedule, "batch_size": 100, "eval_every_epoch": False}
    tune = {"epochs": 1 if quick else tune_epochs, "optimizer": "adam", "lr": 1e-4, "schedule": "cosine", "eval_every_epoch": False}
    taught = {"teacher": str(teacher_file)} if teacher_file else {}
    if tuning == "distill":  # soft targets of the dense model the recipe started from (T 4, alpha 0.9)
        tune.update(lr=options.get("distill_lr", 3e-4), batch_size=100)
        tuned = {"distill": {"temperature": 4.0, "alpha": 0.9, "train": tune, **taught}}
    else:
        tuned = {"finetune": tune}
    centroids = {"epochs": 1 if quick else 3, "optimizer": "adam", "lr": 1e-4, "eval_every_epoch": False}
    distilled = {"epochs": 1 if quick else 5, "optimizer": "adam", "lr": 1e-4, "batch_size": 100, "schedule": "cosine", "eval_every_epoch": False}
    if quick:
        for run in (train, tune, centroids, distilled):
            run["max_batches_per_epoch"] = 40
    if options.get("centroids") == "distill":  # the centroids (and biases) trained by distillation after k-means
        shared = [{"quantize": {"weights": {"scheme": "kmeans", "bits": bits}}}, {"distill": {"temperature": 4.0, "alpha": 0.9, "train": distilled, **taught}}]
    else:
        shared = [{"quantize": {"weights": {"scheme": "kmeans", "bits": bits}, "finetune": centroids}}]
    return {
        "name": "variational-deep-compression",
        "stages": [
            {
                "variational-dropout": {
                    "kl_weight": kl_weight,
                    "distill_alpha": teacher,
                    "train_clip": clip,
                    "sparsity": sparsity,
                    "warmup_epochs": 1 if quick else warmup,
                    "finetune": train,
                }
            },
            *([tuned] if tune_epochs else []),
            *shared,
            {"encode": {}},
        ],
    }


def _label(
    name: str, kl_weight: float, epochs: int, tune_epochs: int, tuning: str, bits: int, teacher: float, clip: bool = False, target: float | dict | None = None
) -> str:
    options = _options(target)
    source = f"the trained {options['teacher'].upper().replace('LENET', 'LeNet')}" if "teacher" in options else "the dense model"
    rate = f" at {options['distill_lr']:g}" if "distill_lr" in options else ""
    after = f" + {tune_epochs} of {f'distillation from {source}{rate}' if tuning == 'distill' else 'fine-tuning'}" if tune_epochs else ""
    data_term = f" (data term {teacher:g} soft targets of the dense model)" if teacher else ""
    sparsity = options.get("sparsity")
    cut = f", cut to 1 weight in {1 / (1 - sparsity):.0f} by log alpha" if sparsity else ""
    if "schedule" in options:
        cut += f", learning rate {options['schedule']} to 0" if options["schedule"] == "linear" else f", {options['schedule']} learning rate"
    if "warmup_epochs" in options:
        cut += f", KL weight rising over {options['warmup_epochs']:g} epochs"
    centroids = f" (centroids distilled from {source}, 5 epochs)" if options.get("centroids") == "distill" else ""
    return f"KL weight {kl_weight:g}, {epochs} epochs{data_term}{', train_clip' if clip else ''}{cut}{after}, {bits}-bit k-means{centroids}"


def _row(entry: dict) -> list[str]:
    settings = TARGETS[entry["model"]]
    error, kept, weights = entry["error"], entry["weights_kept"], entry["weights"]
    bytes_met = error <= settings["error"] and entry["bytes_ratio"] >= settings["bytes_ratio"]
    nonzero_met = error <= settings["error"] and entry["nonzero_ratio"] >= settings["nonzero_ratio"]
    return [
        entry["model"],
        entry["run"],
        f"{100 * entry['dense_error']:.2f}%",
        next((f"{100 * e:.2f}%" for name, e in entry.get("stage_errors", {}).items() if "variational" in name and e is not None), "-"),
        f"{100 * error:.2f}%",
        f"{entry['nonzero_ratio']:.0f}x ({kept:,} of {weights:,})",
        f"{entry['file_bytes'] / 1000:.1f} KB",
        f"{entry['bytes_ratio']:.0f}x",
        f"bytes >= {settings['bytes_ratio']}x at <= {100 * settings['error']:.2f}%: {'met' if bytes_met else 'not met'}"
        f"; non-zero >= {settings['nonzero_ratio']}x at the same error: {'met' if nonzero_met else 'not met'}",
        PUBLISHED[entry["model"]],
    ]


def main() -> None:
    only = only_rows([_label(*run) for run in RUNS])
    options = arguments(__doc__)
    data = load_mnist(options.data_root, options.quick)
    previous = json.loads((Path(__file__).parent / "results" / "variational.json").read_text())["results"] if only else {}
    known = {f"{run[0]}: {_label(*run)}" for run in RUNS}
    results: dict = {key: entry for key, entry in previous.items() if key in known}  # the rows kept, the new ones added as they finish
    for run in RUNS[:1] + RUNS[-1:] if options.quick else RUNS:
        name, kl_weight, epochs, tune_epochs, tuning, bits, teacher, clip, *target = run
        sparsity = target[0] if target else None  # the target, or a mapping of it and the training's options
        label = _label(*run)
        if only and label not in only and f"{name}: {label}" in previous:
            continue  # kept from the last saved results
        dense = trained_baseline(name, data, options.quick)
        dense_error = ts.evaluate(dense, data)["error"]
        parameters = sum(p.numel() for p in dense.parameters())
        with tempfile.TemporaryDirectory() as folder:
            teacher_name = _options(sparsity).get("teacher")
            teacher_file = ts.save(trained_baseline(teacher_name, data, options.quick), Path(folder) / "teacher.safetensors") if teacher_name else None
            torch.manual_seed(0)
            started = time.perf_counter()
            plan = recipe(kl_weight, epochs, tune_epochs, tuning, bits, teacher, clip, options.quick, sparsity, teacher_file)
            result = ts.compress(dense, plan, data, latency=False, progress=False)
            seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{name}.tslim"
            result.save(path)
            file_bytes = path.stat().st_size
            error = ts.evaluate(ts.load(path), data)["error"]
        dense_bytes = 4 * parameters
        nonzeros = result.report.stages[-1].metrics["nonzeros"]
        final_layers = result.report.stages[-1].layers
        weights = sum(int(row["weights"]) for row in final_layers)
        kept = sum(int(row["nonzeros"]) for row in final_layers)
        entry = {
            "model": name,
            "run": label,
            "dense_error": dense_error,
            "error": error,
            "file_bytes": file_bytes,
            "dense_bytes": dense_bytes,
            "bytes_ratio": dense_bytes / file_bytes,
            "weights": weights,
            "weights_kept": kept,
            "nonzero_ratio": weights / max(1, kept),
            "nonzeros_with_biases": nonzeros,
            "per_layer": [{"name": row["name"], "weights": row["weights"], "sparsity": 1 - row["kept"]} for row in result.report.stages[1].layers],
            "stage_errors": {stage.name: stage.metrics.get("error") for stage in result.report.stages},
            "seconds": seconds,
        }
        results[f"{name}: {label}"] = entry
        print(_row(entry), flush=True)
        _write(results, options)  # after every row: a run stopped later keeps the rows it finished
    _write(results, options)


def _write(results: dict, options) -> None:
    """The results file and the BENCHMARKS.md section, rows in the order of ``RUNS``."""
    entries = [results[key] for key in (f"{run[0]}: {_label(*run)}" for run in RUNS) if key in results]
    rows = [_row(entry) for entry in entries]
    stage_rows = [
        [entry["model"], entry["run"], row["name"], f"{row['weights']:,}", f"{100 * row['sparsity']:.2f}%"] for entry in entries for row in entry["per_layer"]
    ]
    table = markdown.table(
        [
            "model",
            "run",
            "dense error",
            "after variational dropout (float)",
            "error (file reloaded)",
            "non-zero ratio (weights)",
            ".tslim file",
            "vs dense fp32",
            "targets",
            "published",
        ],
        rows,
    )
    layers = markdown.table(["model", "run", "layer", "weights", "sparsity learned"], stage_rows)
    notes = [
        "Recipe: variational-dropout (Adam 1e-3, cosine unless said, batch 100; the KL weight rising over the first epoch unless said; log alpha > 3 masked; "
        "where said, its data term 0.9 soft targets of the dense model at T 4 and 0.1 labels; with train_clip, weights past the threshold "
        "left out of the sampled pre-activations while training, as the authors train LeNets; where a cut is said, the weights of highest "
        "log alpha masked past the threshold until that share of weights is left, over all layers together), "
        "optionally plain fine-tuning of the kept weights (Adam 1e-4, cosine) or distillation from the dense model (T 4, alpha 0.9, "
        "Adam 3e-4, cosine; masks held), k-means per layer with three epochs of centroid fine-tuning "
        "(Adam 1e-4), entropy coding. A KL weight below 1 keeps more weights for accuracy. From the trained baselines of "
        "benchmarks/baseline.py; test error on the 10,000 MNIST test images, the .tslim file written and loaded back.",
        "Non-zero ratio: weights of the Linear / Conv2d layers over those kept (biases left out, as the papers count); the file holds the "
        "biases in fp32 as well.",
    ]
    write("variational", "Deep Compression pushed: sparse variational dropout + k-means + coding", results, [table, layers], options, notes)


if __name__ == "__main__":
    main()
