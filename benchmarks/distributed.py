"""Data-parallel fine-tuning: LeNet-5 trained on full MNIST by 1 process (2 threads) and by 2 processes under torchrun
(1 thread each, gloo), same global batch, same seed: examples per second and final test accuracy side by side.

On this 2-core machine both runs use the same two cores, so this measures what data parallelism costs (gradient
all-reduce, the batch split) rather than what more machines buy; on several machines or GPUs each process brings
its own. The run launches itself under torchrun (``--worker`` is the per-process part)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ROOT, SHARED_DATA


def worker(options: argparse.Namespace) -> None:
    import torch

    import torchslim as ts
    from torchslim.train import distributed, fit

    current = distributed.init("cpu")
    torch.set_num_threads(options.threads)
    data = ts.data.load("mnist", root=options.data_root / "mnist", download=False)
    if options.quick:
        data = data.subset(train=6000, test=2000)
    torch.manual_seed(0)
    model = ts.models.create("lenet-5")
    config = {"epochs": options.epochs, "batch_size": 128, "lr": 0.02, "weight_decay": 5e-4, "eval_every_epoch": False, "warmup_epochs": 0.5}
    started = time.perf_counter()
    history = fit(model, data, config, progress=False, evaluate_at_end=False)
    seconds = time.perf_counter() - started
    accuracy = ts.evaluate(model, data)["accuracy"]
    same = distributed.same_on_every_rank([p.detach() for p in model.parameters()])
    if current.main:
        result = {
            "processes": current.size,
            "threads_per_process": options.threads,
            "epochs": options.epochs,
            "train_examples": len(data.train),
            "seconds": seconds,
            "examples_per_s": options.epochs * len(data.train) / seconds,
            "accuracy": accuracy,
            "final_train_loss": history.epochs[-1]["train_loss"],
            "weights_identical_on_every_rank": same,
        }
        Path(options.out).write_text(json.dumps(result))
    distributed.leave()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    options = parser.parse_args()
    options.epochs = options.epochs or (1 if options.quick else 3)
    if options.worker:
        worker(options)
        return
    from benchmarks.harness import write
    from torchslim.report import markdown

    runs = []
    folder = Path(tempfile.mkdtemp(prefix="torchslim-ddp-"))
    for processes in (1, 2):
        out = folder / f"{processes}.json"
        threads = 2 // processes
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", "-m", "benchmarks.distributed", "--worker"]
        command += ["--threads", str(threads), "--epochs", str(options.epochs), "--out", str(out), "--data-root", str(options.data_root)]
        command += ["--quick"] if options.quick else []
        subprocess.run(command, cwd=ROOT, env=environment, check=True)
        runs.append(json.loads(out.read_text()))
        print(runs[-1], flush=True)
    table = markdown.table(
        ["processes", "threads each", "epochs", "examples/s", "vs 1 process", "test accuracy", "identical on every rank"],
        [
            [
                r["processes"],
                r["threads_per_process"],
                r["epochs"],
                f"{r['examples_per_s']:,.0f}",
                f"{r['examples_per_s'] / runs[0]['examples_per_s']:.2f}x",
                f"{100 * r['accuracy']:.2f}%",
                "yes" if r["weights_identical_on_every_rank"] else "no",
            ]
            for r in runs
        ],
    )
    notes = [
        "Same global batch (128), seed and schedule; under torchrun each process takes its half of every batch and DDP averages the gradients.",
        "Both runs share the same 2 cores: the ratio is the cost of data parallelism here, not the gain of more hardware.",
    ]
    options.threads = 2
    write("distributed", "Data-parallel fine-tuning (torchrun, gloo)", {"runs": runs}, [table], options, notes)


if __name__ == "__main__":
    main()
