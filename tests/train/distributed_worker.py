"""Run by tests/train/test_distributed.py, once alone and under ``torchrun`` with 2 processes (replicated with DDP,
and sharded with FSDP): fine-tuning, pruning with fine-tuning, distillation with a feature adapter, QAT, an
interrupted-then-resumed recipe, and a user's own model on the user's own DataLoaders (one with a DistributedSampler),
all on the embedded digits, and a pruned Hugging Face Llama fine-tuned on text. Each rank writes its final weights and
what it saw to ``<out>/rank<r>-of-<n>-<strategy>.*``."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path


def main(out: str, strategy: str) -> None:
    import torch
    from safetensors.torch import save_file

    import torchslim as ts
    from torchslim.pipeline import CompressInterrupted
    from torchslim.pipeline import stages as stages_module
    from torchslim.train import distributed, fit
    from torchslim.train.fit import Callback
    from torchslim.train.sharded import held_fraction

    class Held(Callback):  # the part of the weights this rank holds while it trains
        def __init__(self) -> None:
            self.seen: list[float] = []

        def after_step(self, state) -> None:
            self.seen.append(held_fraction(state.model))

    torch.set_num_threads(1)
    distributed.set_strategy(strategy)  # what --parallel sets for a command: every training run below
    current = distributed.init("cpu")
    data = ts.data.load("digits")
    tune = {"epochs": 1, "batch_size": 61, "lr": 0.02, "eval_every_epoch": False}
    torch.manual_seed(0)
    model = ts.models.create("lenet-300-100", in_features=64)
    held = Held()
    first = {"epochs": 2, "batch_size": 64, "lr": 0.05, "eval_every_epoch": False, "grad_clip": 5.0}
    history = fit(model, data, first, progress=False, evaluate_at_end=False, callbacks=[held])
    pruned = ts.prune(model, {"sparsity": [0.5, 0.8]}, data=data, finetune=tune, progress=False).model
    torch.manual_seed(1)
    student = ts.models.create("mlp", in_features=64, hidden=(32,))
    distilled = ts.distill(student, model, data, {"features": [{"student": "layers.0", "teacher": "fc1", "weight": 0.5}], "train": tune}, progress=False).model
    # QAT's rounding turns float summation-order differences into flipped codes over many steps: a few steps only
    qat = ts.quantize(
        model, {"method": "qat", "calibration_batches": 2, "export": False}, data=data, finetune={**tune, "max_batches_per_epoch": 4}, progress=False
    ).model
    recipe = {
        "name": "small",
        "stages": [{"prune": {"sparsity": 0.6, "finetune": tune}}, {"finetune": tune}, {"quantize": {"weights": {"scheme": "kmeans", "bits": 4}}}],
    }
    checkpoint = f"{out}/ckpt-{current.size}-{strategy}"
    original = stages_module.quantize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    stages_module.quantize = interrupted
    with contextlib.suppress(CompressInterrupted):
        ts.compress(model, recipe, data, checkpoint=checkpoint, latency=False, progress=False)
    stages_module.quantize = original
    distributed.barrier()  # in real use the resumed run is a new launch; here rank 0 must have written first
    resumed = ts.compress(model, recipe, data, checkpoint=checkpoint, resume=True, latency=False, progress=False).model
    distributed.barrier()
    # a user's own model (an activation held as a lambda) on the user's own DataLoaders: one in a fixed order (each
    # global batch split across the ranks), one sharded by a DistributedSampler (each rank reads its own examples)
    from torch.utils.data import DataLoader, TensorDataset
    from torch.utils.data.distributed import DistributedSampler

    class UserNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(64, 32)
            self.act = lambda x: torch.nn.functional.leaky_relu(x, 0.1)
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.act(self.body(x.flatten(1))))

    examples = TensorDataset(data.train.inputs, data.train.targets)
    torch.manual_seed(2)
    users = UserNet()
    fit(users, DataLoader(examples, batch_size=61), {**tune, "epochs": 2}, progress=False, evaluate_at_end=False)
    torch.manual_seed(3)
    sampled = UserNet()
    sampler = DistributedSampler(examples, num_replicas=current.size, rank=current.rank, seed=0)
    fit(sampled, DataLoader(examples, batch_size=32, sampler=sampler), {**tune, "epochs": 2}, progress=False, evaluate_at_end=False)
    # a head forward never calls (DDP must be told, or it waits for its gradient) beside BatchNorm (whose running
    # statistics each rank updates from its own half of a batch: rank 0's are taken at the end)

    class Unused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.norm = torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32)
            self.head, self.spare = torch.nn.Linear(32, 10), torch.nn.Linear(32, 5)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.body(x.flatten(1)))))

    torch.manual_seed(5)
    unused = ts.train(Unused(), DataLoader(examples, batch_size=64), {**tune, "epochs": 1}, progress=False).model
    # a Hugging Face Llama (tied embedding and head, grouped KV heads) pruned with fine-tuning by AdamW on text: one
    # FSDP unit per decoder layer under fsdp
    sys.path.insert(0, str(Path(__file__).parents[2]))
    from tests import zoo

    text = torch.tensor([min(b, 127) for b in Path(__file__).parents[2].joinpath("README.md").read_bytes()][: 40 * 64], dtype=torch.long)
    windows = [{"input_ids": part} for part in text.reshape(-1, 64).split(8)]
    torch.manual_seed(4)
    llama = ts.prune(
        zoo.llama(),
        {"sparsity": 0.5, "layers": {"include": ["*proj"]}},
        data=ts.Data(train=windows, eval=windows[:1]),
        task="language-modeling",
        finetune={"epochs": 1, "optimizer": "adamw", "lr": 1e-3, "eval_every_epoch": False},
        progress=False,
    ).model
    state = {}
    networks = (
        ("fit", model),
        ("prune", pruned),
        ("distill", distilled),
        ("qat", qat),
        ("resumed", resumed),
        ("user", users),
        ("sampled", sampled),
        ("unused", unused),
        ("llama", llama),
    )
    for prefix, network in networks:
        for key, value in network.state_dict().items():
            if value.is_floating_point() or value.dtype == torch.bool:
                state[f"{prefix}/{key}"] = value.detach().float().clone()
    name = f"{out}/rank{current.rank}-of-{current.size}-{strategy}"
    save_file(state, f"{name}.safetensors")
    summary = {
        "same_on_every_rank": distributed.same_on_every_rank(state.values()),
        "train_loss": history.epochs[-1]["train_loss"],
        "held_while_training": max(held.seen),
        "held_after": held_fraction(model),
    }
    with open(f"{name}.json", "w") as handle:
        json.dump(summary, handle)
    distributed.leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp")
