"""Data-parallel fine-tuning: LeNet-5 trained on full MNIST by 1 process (2 threads) and by 2 processes under torchrun
(1 thread each, gloo), same global batch, same seed: examples per second and final test accuracy side by side.
Then the memory of one process while a Llama-architecture causal LM (37.5M parameters, random init) fine-tunes with
AdamW on Tiny Shakespeare bytes under torchrun with 2 processes, replicated (DDP) against sharded (FSDP).

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


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(options: argparse.Namespace) -> None:
    """One rank of the memory comparison: the resident memory of this process after each training step."""
    import torch
    import transformers

    import torchslim as ts
    from torchslim.train import distributed, fit
    from torchslim.train.fit import Callback
    from torchslim.train.sharded import held_fraction

    distributed.set_strategy(options.strategy)
    current = distributed.init("cpu")
    torch.set_num_threads(options.threads)
    text_file = options.data_root / "text" / "tinyshakespeare.txt"
    text = text_file.read_bytes() if text_file.is_file() else (ROOT / "README.md").read_bytes() * 4
    length, batch, steps = 128, 8, 3 if options.quick else 8
    codes = torch.tensor(list(text[: length * batch * steps]), dtype=torch.long).reshape(-1, length)
    data = ts.Data(train=[{"input_ids": part} for part in codes.split(batch)], eval=[{"input_ids": codes[:batch]}])
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=640, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=10, num_key_value_heads=5
    )
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())

    class Probe(Callback):
        def __init__(self) -> None:
            self.resident, self.held, self.times = 0, 1.0, []

        def on_batch_start(self, state) -> None:
            self.started = time.perf_counter()

        def after_step(self, state) -> None:
            self.times.append(time.perf_counter() - self.started)
            self.resident = max(self.resident, _resident_bytes())
            self.held = held_fraction(state.model)

    probe = Probe()
    before = _resident_bytes()
    train = {"epochs": 1, "optimizer": "adamw", "lr": 3e-4, "eval_every_epoch": False}
    history = fit(model, data, train, task="language-modeling", callbacks=[probe], progress=False, evaluate_at_end=False)
    import resource

    resident = torch.tensor([float(probe.resident)])
    peak = torch.tensor([float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)])
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(resident, op=torch.distributed.ReduceOp.MAX)
    checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    if current.main:
        result = {
            "strategy": options.strategy,
            "processes": current.size,
            "parameters": parameters,
            "weights_mib": parameters * 4 / 2**20,
            "held_fraction": probe.held,
            "resident_before_mib": before / 2**20,
            "resident_training_mib": float(resident.item()) / 2**20,
            "peak_mib": float(peak.item()) / 2**20,
            "step_seconds": sorted(probe.times)[len(probe.times) // 2],
            "train_loss": history.epochs[-1]["train_loss"],
            "weights_checksum": checksum,
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
    parser.add_argument("--strategy", default="", help=argparse.SUPPRESS)
    options = parser.parse_args()
    options.epochs = options.epochs or (1 if options.quick else 3)
    if options.worker:
        (memory_worker if options.strategy else worker)(options)
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
    memory = []
    for strategy in ("ddp", "fsdp"):
        out = folder / f"memory-{strategy}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "benchmarks.distributed", "--worker"]
        command += ["--threads", "1", "--strategy", strategy, "--out", str(out), "--data-root", str(options.data_root)]
        command += ["--quick"] if options.quick else []
        # large blocks always mapped and handed back when freed, so resident memory follows what is alive
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
        subprocess.run(command, cwd=ROOT, env=environment, check=True)
        memory.append(json.loads(out.read_text()))
        print(memory[-1], flush=True)
    memory_table = markdown.table(
        ["parallel", "weights held per process", "resident after each step (max)", "vs ddp", "peak resident", "vs ddp", "median step", "final train loss"],
        [
            [
                r["strategy"],
                f"{100 * r['held_fraction']:.0f}% ({r['held_fraction'] * r['weights_mib']:.0f} MiB)",
                f"{r['resident_training_mib']:.0f} MiB",
                f"{r['resident_training_mib'] / memory[0]['resident_training_mib']:.2f}x",
                f"{r['peak_mib']:.0f} MiB",
                f"{r['peak_mib'] / memory[0]['peak_mib']:.2f}x",
                f"{r['step_seconds']:.2f} s",
                f"{r['train_loss']:.4f}",
            ]
            for r in memory
        ],
    )
    notes = [
        "Same global batch (128), seed and schedule; under torchrun each process takes its half of every batch and DDP averages the gradients.",
        "Both runs share the same 2 cores: the ratio is the cost of data parallelism here, not the gain of more hardware.",
        f"Memory: a Llama-architecture causal LM of {memory[0]['parameters'] / 1e6:.1f}M parameters ({memory[0]['weights_mib']:.0f} MiB of fp32 weights; "
        "8 decoder layers of width 640, tied embedding and head, random init) fine-tuned with AdamW on Tiny Shakespeare bytes, global batch 8 x 128 tokens, "
        "2 processes of 1 thread. Resident memory is the larger of the two processes', read after every optimizer step (weights, gradients, AdamW's "
        "two moments, the Python runtime) and at its peak (activations and, under fsdp, a unit's gathered weights included); "
        f"{memory[0]['resident_before_mib']:.0f} MiB before training with the whole model built. glibc is told to map large blocks and hand them back "
        "when freed (MALLOC_MMAP_THRESHOLD_), so resident memory follows what is alive.",
        "Under fsdp each decoder layer is one FSDP unit; a unit's full weights exist only while it runs. The trained weights of the two runs "
        + ("agree" if abs(memory[0]["weights_checksum"] - memory[1]["weights_checksum"]) <= 1e-6 * memory[0]["weights_checksum"] else "differ")
        + f" (sum of |w|: {memory[0]['weights_checksum']:.4f} vs {memory[1]['weights_checksum']:.4f}).",
    ]
    options.threads = 2
    write("distributed", "Data-parallel fine-tuning (torchrun, gloo)", {"runs": runs, "memory": memory}, [table, memory_table], options, notes)


if __name__ == "__main__":
    main()
