"""Deep Compression, Table 1 (Han et al. 2016) on full MNIST: LeNet-300-100 1070 KB -> <= 27 KB (>= 40x) at
<= 1.64% test error and LeNet-5 1720 KB -> <= 44 KB (>= 39x) at <= 0.80%, by the built-in ``deep-compression``
recipe (iterative global magnitude pruning with fine-tuning, k-means weight sharing with 8-bit convolutions and
5-bit fully connected layers, centroid fine-tuning, sparse relative indices, entropy coding). Sizes are bytes of
the .tslim file on disk; the ratio is reported after each stage (pruning, +quantization, +entropy coding), and each
stream's order-0 entropy bound next to its coded size."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import torchslim as ts
from benchmarks.common import load_mnist, trained_baseline
from benchmarks.harness import RESULTS, arguments, write
from torchslim.codec import inspect_tslim
from torchslim.pipeline import Recipe, RecipeStage, load_recipe
from torchslim.report import markdown
from torchslim.train.fit import TrainConfig

PAPER = {"lenet-300-100": {"kb": 27, "ratio": 40, "error": 0.0164}, "lenet-5": {"kb": 44, "ratio": 39, "error": 0.0080}}
PRUNING = {  # the schedules and fine-tuning of benchmarks/pruning.py
    "lenet-300-100": {
        "sparsity": [0.5, 0.7, 0.8, 0.87, 0.9, 0.92],
        "finetune": {"epochs": 4, "lr": 0.02, "batch_size": 64, "weight_decay": 1e-4, "eval_every_epoch": False},
    },
    "lenet-5": {
        "sparsity": [0.5, 0.75, 0.875, 0.925],
        "finetune": {"epochs": 2, "lr": 0.005, "batch_size": 64, "weight_decay": 5e-4, "eval_every_epoch": False},
    },
}


# LeNet-300-100 sits at the paper's 1.64% right after pruning; a longer, gentler fine-tuning after the last pruning
# step gives the quantization some room
FINAL_FINETUNE = {"lenet-300-100": {"epochs": 10, "lr": 0.005, "batch_size": 64, "weight_decay": 1e-4, "eval_every_epoch": False}}


def recipe_for(name: str, quick: bool):
    recipe = load_recipe("deep-compression")
    prune = dict(PRUNING[name])
    quantize_finetune = recipe.stages[1].finetune.to_dict()
    if quick:
        prune["finetune"] = dict(prune["finetune"], epochs=1, max_batches_per_epoch=30)
        quantize_finetune["max_batches_per_epoch"] = 30
    recipe = recipe.with_stage(0, **prune).with_stage(1, finetune=quantize_finetune)
    if name in FINAL_FINETUNE:
        finetune = dict(FINAL_FINETUNE[name], **({"epochs": 1, "max_batches_per_epoch": 30} if quick else {}))
        stages = list(recipe.stages)
        stages.insert(1, RecipeStage("finetune", TrainConfig.from_dict(finetune)))
        recipe = Recipe(name=recipe.name, description=recipe.description, stages=tuple(stages))
    return recipe


def run(name: str, data, quick: bool, folder: Path) -> dict:
    """Compress ``name`` by its recipe and write the .tslim file (and its report) into ``folder``."""
    baseline = trained_baseline(name, data, quick)
    recipe = recipe_for(name, quick)
    with tempfile.TemporaryDirectory() as scratch:
        result = ts.compress(baseline, recipe, data, checkpoint=Path(scratch) / "checkpoint", progress=False)
    path = folder / f"{name}-deep-compression{'-quick' if quick else ''}.tslim"
    result.save(path)
    loaded = ts.load(path)
    reference = result.model.state_dict()
    exact = all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    loaded_metrics = ts.evaluate(loaded, data)
    stages = [
        {
            "stage": s.name,
            **{k: s.metrics.get(k) for k in ("error", "errors", "nonzeros", "stored_bytes", "bytes_as", "compression", "latency_median_ms", "seconds")},
            "notes": s.notes,
        }
        for s in result.report.stages
    ]
    inspected = inspect_tslim(path)
    return {
        "stages": stages,
        "file_bytes": path.stat().st_size,
        "file_error": loaded_metrics["error"],
        "file_errors": loaded_metrics["errors"],
        "reload_exact": exact,
        "header_bytes": inspected["header_bytes"],
        "tensors": inspected["tensors"],
        "recipe": recipe.to_dict(),
    }


def main() -> None:
    options = arguments(__doc__)
    data = load_mnist(options.data_root, options.quick)
    results, tables, notes = {}, [], []
    summary_rows = []
    with tempfile.TemporaryDirectory() as scratch:
        # --no-write leaves results/ alone: the .tslim files then go to this temporary folder
        folder = Path(scratch) if options.no_write else RESULTS
        outcomes = {name: run(name, data, options.quick, folder) for name in ("lenet-300-100", "lenet-5")}
    for name, outcome in outcomes.items():
        results[name] = outcome
        stages = outcome["stages"]
        rows = [
            [
                s["stage"],
                f"{100 * s['error']:.2f}%",
                f"{s['nonzeros']:,}",
                f"{s['stored_bytes'] / 1000:.1f} KB",
                s["bytes_as"],
                f"{s['compression']:.1f}x",
                "-" if s["seconds"] is None else f"{s['seconds']:.0f} s",
            ]
            for s in stages
        ]
        tables.append(f"**{name}**\n\n" + markdown.table(["stage", "test error", "non-zeros", "bytes", "stored as", "vs dense fp32", "stage time"], rows))
        stream_rows = []
        for tensor in outcome["tensors"]:
            for stream in tensor["streams"]:
                bound = stream.get("entropy_bytes")
                stream_rows.append(
                    [
                        tensor["name"],
                        tensor["encoding"],
                        tensor["index_bits"] or "-",
                        tensor["bits"] or "-",
                        stream["role"],
                        stream["coder"],
                        stream.get("symbols", "-"),
                        f"{stream['bytes']:,}",
                        "-" if bound is None else f"{bound:,.0f}",
                    ]
                )
        stream_rows.append(["header (spec, encodings, checksums)", "zlib JSON", "-", "-", "-", "-", "-", f"{outcome['header_bytes']:,}", "-"])
        tables.append(
            f"**{name}: streams of the .tslim file** ({outcome['file_bytes']:,} bytes)\n\n"
            + markdown.table(["tensor", "encoding", "index bits", "code bits", "stream", "coder", "symbols", "bytes", "entropy bound (bytes)"], stream_rows)
        )
        dense = stages[0]["stored_bytes"]
        paper = PAPER[name]
        summary_rows.append(
            [
                name,
                f"{dense / 1000:.0f} KB",
                f"{outcome['file_bytes'] / 1000:.1f} KB",
                f"{dense / outcome['file_bytes']:.1f}x",
                f"{100 * outcome['file_error']:.2f}%",
                f"{paper['kb']} KB, {paper['ratio']}x, {100 * paper['error']:.2f}%",
                "yes" if outcome["reload_exact"] else "NO",
            ]
        )
    tables.insert(
        0, markdown.table(["model", "dense fp32", ".tslim file", "ratio", "test error (file reloaded)", "Deep Compression paper", "reload exact"], summary_rows)
    )
    notes += [
        "One `ts.compress(model, recipe, data)` run per model, from the trained baselines of benchmarks/baseline.py; the recipe is the built-in "
        "`deep-compression` with the pruning schedule and fine-tuning of benchmarks/pruning.py; for LeNet-300-100 a fine-tuning stage "
        "(10 epochs, SGD lr 0.005) follows the last pruning step. Test error on the 10,000 MNIST test images.",
        "'bytes' after the pruning and quantization stages is the .tslim file those weights would make with fixed-width codes (relative "
        "indices and codebook indices bit-packed, no entropy coding); after encode it is the entropy-coded file (each stream Huffman, ANS or "
        "packed, whichever is smallest, tables included). The dense size counts every weight and bias as fp32 (the paper's 1070 / 1720 KB).",
        "The final row's file is written, loaded back with `ts.load`, its state compared tensor by tensor with the compressed model (exact), "
        "and evaluated again.",
        "Entropy bound: the stream's order-0 empirical entropy x symbols / 8; Huffman is within a fraction of a bit per symbol of it and ANS "
        "closer, before the code tables.",
    ]
    write("deep_compression", "Deep Compression (Table 1): pruning + k-means weight sharing + entropy coding", results, tables, options, notes)


if __name__ == "__main__":
    main()
