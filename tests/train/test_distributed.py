"""Data-parallel training under torchrun: two CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import torchslim as ts
from torchslim.core.errors import TorchslimError
from torchslim.train.distributed import World, presharded, shard_batch

WORKER = Path(__file__).with_name("distributed_worker.py")
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="this PyTorch build has no gloo backend")


def _launch(arguments: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    environment["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *arguments]
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_a_batch_is_split_along_its_first_dimension_into_near_equal_parts():
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "labels": torch.arange(5), "names": ["a", "b", "c", "d", "e"], "scale": 2.0}
    first, second = (shard_batch(batch, World(rank, 2)) for rank in (0, 1))
    assert first["labels"].tolist() == [0, 1, 2] and second["labels"].tolist() == [3, 4]
    assert first["names"] == ["a", "b", "c"] and second["names"] == ["d", "e"]
    assert torch.equal(torch.cat([first["input_ids"], second["input_ids"]]), batch["input_ids"]) and first["scale"] == 2.0
    inputs, targets = shard_batch((torch.zeros(4, 3), torch.arange(4)), World(1, 2))
    assert inputs.shape == (2, 3) and targets.tolist() == [2, 3]
    with pytest.raises(TorchslimError, match="batch of 1 examples cannot be split across 2 processes"):
        shard_batch((torch.zeros(1, 3),), World(0, 2))


def test_a_loader_with_a_distributed_sampler_counts_as_already_sharded():
    dataset = TensorDataset(torch.zeros(8, 2), torch.zeros(8))
    assert presharded(DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0)))
    assert not presharded(DataLoader(dataset, batch_size=4))
    # through the data source a verb makes of it (ts.train passed that, and each rank's shard was split again), with
    # evaluation data beside it, and as a batch sampler's sampler
    from torch.utils.data import BatchSampler

    from torchslim.data.sources import as_source

    loader = DataLoader(dataset, sampler=DistributedSampler(dataset, num_replicas=2, rank=0), batch_size=2)
    assert presharded(as_source(loader)) and presharded(as_source(ts.Data(train=loader, eval=(torch.zeros(2, 2), torch.zeros(2)))))
    batched = BatchSampler(DistributedSampler(dataset, num_replicas=2, rank=0), batch_size=2, drop_last=False)
    assert presharded(DataLoader(dataset, batch_sampler=batched))


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The worker's results in one process: what every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("alone")
    subprocess.run([sys.executable, str(WORKER), str(out)], check=True, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return load_file(out / "rank0-of-1-ddp.safetensors")


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one_with_the_same_global_batch(alone, strategy, tmp_path):
    """Fine-tuning, pruning with fine-tuning, distillation with a feature adapter, QAT, a recipe interrupted and
    resumed from its checkpoint, a user's own model (with a lambda) on their own DataLoader, and a pruned Hugging Face
    Llama with tied weights: identical on both ranks, and equal to one process within float summation order, whether
    the model is replicated (ddp) or sharded (fsdp: each rank holds half the weights while it trains, and the whole
    model again afterwards). A user's loader with a DistributedSampler trains identically on both ranks."""
    _launch([str(WORKER), str(tmp_path), strategy], 2, tmp_path)
    ranks = [load_file(tmp_path / f"rank{rank}-of-2-{strategy}.safetensors") for rank in (0, 1)]
    assert alone.keys() == ranks[0].keys() == ranks[1].keys()
    assert {key.split("/")[0] for key in alone} == {"fit", "prune", "distill", "qat", "resumed", "user", "sampled", "unused", "llama"}
    assert any(".mask" in key for key in alone)  # masks are compared too
    for key, value in alone.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between the ranks"
        if key.startswith("sampled/"):  # a DistributedSampler gives each process other examples than one process sees
            continue
        if key.startswith("unused/"):  # BatchNorm normalizes each rank's half of a batch by its own statistics
            continue
        # QAT's rounding turns summation-order differences into flipped codes: a looser bound for it
        tolerance = 1e-3 if key.startswith("qat/") else 1e-5
        assert torch.allclose(value, ranks[0][key], atol=tolerance, rtol=0), f"{key}: {(value - ranks[0][key]).abs().max():.2e} from one process"
    summaries = [json.loads((tmp_path / f"rank{rank}-of-2-{strategy}.json").read_text()) for rank in (0, 1)]
    assert all(summary["same_on_every_rank"] for summary in summaries)
    assert summaries[0]["train_loss"] == summaries[1]["train_loss"]  # the logged loss is the mean over the ranks
    # lenet-300-100's 266,610 weights split in two halves (each tensor's rows halved; 10-row ones evenly)
    assert all(summary["held_while_training"] == (0.5 if strategy == "fsdp" else 1.0) for summary in summaries)
    assert all(summary["held_after"] == 1.0 for summary in summaries)


@needs_gloo
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_cli_prints_and_writes_once(strategy, tmp_path):
    done = _launch(
        ["-m", "torchslim", "train", "--model", "lenet-300-100", "--data", "digits", "--epochs", "1", "--out", "model.safetensors", "--threads", "1"]
        + ["--parallel", strategy],
        2,
        tmp_path,
    )
    assert done.stdout.count("trained lenet-300-100") == 1, done.stdout
    assert (tmp_path / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors"]


def test_fsdp_units_are_a_models_blocks_never_nested():
    from tests import zoo
    from torchslim.train.sharded import shard_units

    llama = zoo.llama()
    assert shard_units(llama) == list(llama.model.layers)  # the decoder layers Hugging Face names as not to be split
    resnet = zoo.resnet20()
    units = shard_units(resnet)
    assert len(units) == 9 and all(type(unit).__name__ == "CifarBlock" for unit in units)  # the members of each stage's Sequential
    assert shard_units(ts.models.create("lenet-300-100")) == []  # no blocks: the whole model is the root unit


def test_an_unknown_parallel_strategy_is_refused():
    from torchslim.train import distributed

    with pytest.raises(TorchslimError, match="unknown parallel strategy 'zero3'; valid: ddp, fsdp"):
        distributed.set_strategy("zero3")
    assert distributed.strategy("fsdp") == "fsdp" and distributed.strategy() == "ddp"
