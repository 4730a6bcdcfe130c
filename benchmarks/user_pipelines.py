"""The user's own data pipeline and task, measured: (1) a language-model recipe on the character transformer trained
on Tiny Shakespeare and fed by a DataLoader, perplexity after each stage (prune 50% + fine-tune, k-means 4 bits,
distill from the original), with bytes and latency; (2) a folder of images: the full MNIST sets written as PNG files
in class folders, LeNet-5 trained from the folder with the user's own normalization (pixels / 255, no mean) through
prune + fine-tune + quantize, accuracy per stage next to the same run on the in-memory set; (3) the cost of a
DataLoader: one fine-tuning stage fed by a DataLoader against the in-memory path at the same batch size, timed in
interleaved rounds."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, TensorDataset

import torchslim as ts
from benchmarks.harness import arguments, write
from torchslim.report.markdown import format_bytes, table
from torchslim.train import fit


class Windows(Dataset):
    """Random windows of a token stream (input, next-token target), as a user's text Dataset would give them."""

    def __init__(self, ids: torch.Tensor, block: int, count: int, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids, self.block = ids, block
        self.starts = torch.randint(0, len(ids) - block - 1, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int):
        start = int(self.starts[index])
        return self.ids[start : start + self.block], self.ids[start + 1 : start + self.block + 1]


def language_model(root: Path, quick: bool) -> tuple[dict, list[str]]:
    text = ts.data.load("shakespeare", root=root / "text", download=False)
    block = 64
    windows = 2000 if quick else 16000
    train = DataLoader(Windows(text.train_ids, block, windows), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    starts = range(0, len(text.test_ids) - block - 1, block)
    test_windows = [(text.test_ids[s : s + block], text.test_ids[s + 1 : s + block + 1]) for s in starts][: 200 if quick else None]
    evaluation = DataLoader(test_windows, batch_size=64)
    data = ts.Data(train=train, eval=evaluation)
    torch.manual_seed(0)
    model = ts.models.create("char-transformer", vocab_size=text.vocab_size, block_size=block, layers=4, embed_dim=128, heads=4)
    started = time.perf_counter()
    model = ts.train(
        model,
        data,
        {"epochs": 1 if quick else 4, "optimizer": "adamw", "lr": 3e-3, "batch_size": 32, "weight_decay": 0.01, "eval_every_epoch": False},
        progress=False,
    ).model
    train_seconds = time.perf_counter() - started
    finetune = {"epochs": 1, "optimizer": "adamw", "lr": 1e-3, "eval_every_epoch": False, **({"max_batches_per_epoch": 20} if quick else {})}
    recipe = {
        "name": "lm",
        "stages": [
            {"prune": {"sparsity": 0.5, "scope": "layer", "layers": {"include": ["type:Linear"], "exclude": ["head"]}, "finetune": finetune}},
            {"quantize": {"weights": {"scheme": "kmeans", "bits": 4}}},
            {"distill": {"teacher": "original", "temperature": 2.0, "alpha": 0.5, "train": {**finetune, "lr": 5e-4}}},
            {"encode": {}},
        ],
    }
    result = ts.compress(model, recipe, data, task="language-modeling", latency=True, progress=False)
    rows, stages = [], []
    for stage in result.report.stages:
        m = stage.metrics
        stages.append(
            {k: m.get(k) for k in ("perplexity", "bits_per_token", "nonzeros", "stored_bytes", "compression", "latency_median_ms", "seconds")}
            | {"name": stage.name}
        )
        rows.append(
            [
                stage.name,
                f"{m['perplexity']:.3f}",
                f"{m['bits_per_token']:.3f}",
                f"{m['nonzeros']:,}",
                format_bytes(m["stored_bytes"]),
                f"{m['compression']:.1f}x",
                f"{m['latency_median_ms']:.2f}",
            ]
        )
    headers = ["stage", "test perplexity", "bits / char", "non-zeros", "bytes", "vs dense", "latency b1 (ms)"]
    result_table = "Character transformer (4 layers, 128 wide) on Tiny Shakespeare, fed by DataLoaders\n\n" + table(headers, rows)
    return {"train_seconds": train_seconds, "stages": stages, "test_windows": len(test_windows)}, [result_table]


def write_png_folder(data, folder: Path) -> None:
    from PIL import Image

    for split, part in (("train", data.train), ("test", data.test)):
        pixels = (part.inputs[:, 0] * 255).round().to(torch.uint8).numpy()
        for index, (image, label) in enumerate(zip(pixels, part.targets.tolist())):
            target = folder / split / str(label)
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(image)).save(target / f"{index:05d}.png")


def image_folder(root: Path, quick: bool) -> tuple[dict, list[str]]:
    raw = ts.data.load("mnist", root=root / "mnist", download=False, normalize=None)
    if quick:
        raw = raw.subset(train=6000, test=2000)
    results, columns = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "mnist-png"
        started = time.perf_counter()
        write_png_folder(raw, folder)
        results["png_write_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        from_folder = ts.data.load(folder, normalize=None)  # pixels / 255, no mean: the user's own normalization
        results["folder_read_seconds"] = time.perf_counter() - started
    order = torch.argsort(raw.train.targets, stable=True)  # the folder lists images class by class, each class in file order
    results["identical_pixels"] = bool(
        torch.equal(from_folder.train.inputs, raw.train.inputs[order]) and torch.equal(from_folder.train.targets, raw.train.targets[order])
    )
    train = {"epochs": 1 if quick else 4, "lr": 0.02, "batch_size": 64, "weight_decay": 5e-4, "eval_every_epoch": False}
    recipe = {
        "name": "folder",
        "stages": [
            {"prune": {"sparsity": [0.5, 0.8], "scope": "global", "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 64, "eval_every_epoch": False}}},
            {"quantize": {"weights": {"scheme": "kmeans", "bits": 5}, "overrides": {"type:Conv2d": {"bits": 8}}}},
            {"encode": {}},
        ],
    }
    for label, data in (("image folder", from_folder), ("in-memory set", raw)):
        torch.manual_seed(0)
        model = ts.train(ts.models.create("lenet-5"), data, train, progress=False).model
        result = ts.compress(model, recipe, data, latency=False, progress=False)
        columns[label] = [(s.name, s.metrics["accuracy"], s.metrics["errors"], s.metrics["stored_bytes"]) for s in result.report.stages]
        results[label] = [{"stage": n, "accuracy": a, "errors": e, "bytes": b} for n, a, e, b in columns[label]]
    rows = [
        [name, f"{100 * a:.2f}% ({e})", f"{100 * columns['in-memory set'][i][1]:.2f}% ({columns['in-memory set'][i][2]})", format_bytes(b)]
        for i, (name, a, e, b) in enumerate(columns["image folder"])
    ]
    result_table = f"LeNet-5 from a folder of {len(raw.train) + len(raw.test):,} MNIST PNG files (pixels / 255, no mean subtraction)\n\n" + table(
        ["stage", "accuracy (errors), image folder", "accuracy (errors), in-memory set", "bytes"], rows
    )
    return results, [result_table]


def loader_overhead(root: Path, quick: bool) -> tuple[dict, list[str]]:
    data = ts.data.load("mnist", root=root / "mnist", download=False)
    if quick:
        data = data.subset(train=6000, test=1000)
    batch = 64
    dataset = TensorDataset(data.train.inputs, data.train.targets)
    feeds = {
        "in-memory set (torchslim batches)": data,
        "DataLoader, default (per-item)": DataLoader(dataset, batch_size=batch, shuffle=True),
        "DataLoader, batched sampler": DataLoader(dataset, sampler=BatchSampler(RandomSampler(dataset), batch, drop_last=False), batch_size=None),
    }
    config = {"epochs": 1, "lr": 0.01, "batch_size": batch, "eval_every_epoch": False, **({"max_batches_per_epoch": 40} if quick else {})}
    seconds: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(3 if quick else 5):  # interleaved rounds: drift on a shared machine hits every feed alike
        for name, feed in feeds.items():
            torch.manual_seed(0)
            model = ts.models.create("lenet-5")
            started = time.perf_counter()
            fit(model, feed, config, progress=False, evaluate_at_end=False)  # the stage's training alone
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    base = medians["in-memory set (torchslim batches)"]
    results = {name: {"median_seconds": value, "ratio_to_in_memory": value / base} for name, value in medians.items()}
    rows = [[name, f"{value:.2f} s", f"{value / base:.3f}x"] for name, value in medians.items()]
    result_table = f"One fine-tuning epoch of LeNet-5 on MNIST, batch {batch}, same steps (median of interleaved rounds)\n\n" + table(
        ["fed by", "stage time", "vs in-memory"], rows
    )
    return results, [result_table]


def main() -> None:
    options = arguments(__doc__)
    lm, lm_tables = language_model(options.data_root, options.quick)
    folder, folder_tables = image_folder(options.data_root, options.quick)
    overhead, overhead_tables = loader_overhead(options.data_root, options.quick)
    notes = [
        "Perplexity is over the last 10% of the text in consecutive 64-character windows; the prune stage prunes every Linear but the "
        "output head to 50% per layer, with one epoch of fine-tuning; the distill stage trains the quantized model's codebooks and biases "
        "against the uncompressed original (T 2, alpha 0.5).",
        "Image folder: the PNG files hold MNIST's own pixels, so the folder's tensors equal the in-memory set's, class by class "
        f"({'identical' if folder['identical_pixels'] else 'NOT identical'}); the folder lists the training images in class order, so "
        "the same seed draws other batches and the two columns differ by training noise only.",
        "The per-item DataLoader pays for indexing and collating 64 items per batch in Python; a batched sampler hands whole batches over, "
        "as torchslim's in-memory batches do. torchslim adds nothing of its own to either path.",
    ]
    write(
        "user_pipelines",
        "The user's own data pipelines: DataLoaders, image folders, a language model",
        {"language_model": lm, "image_folder": folder, "loader_overhead": overhead},
        lm_tables + folder_tables + overhead_tables,
        options,
        notes,
    )


if __name__ == "__main__":
    main()
