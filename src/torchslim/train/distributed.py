"""Data-parallel training under ``torchrun``: one process per device, gradients averaged with
DistributedDataParallel (gloo on CPU, NCCL on CUDA).

Launch any script or command that trains (``fit``, and through it every fine-tuning stage: prune, quantize / QAT,
distill, factorize, compress) with ``torchrun``; torchslim sees ``WORLD_SIZE`` and:

- joins the process group once (``init``), on ``cuda:LOCAL_RANK`` when the model is on CUDA, else on CPU with gloo;
- wraps the model in ``DistributedDataParallel`` for the training steps only (state is broadcast from rank 0 when
  the wrap is made, so weights, masks and observers start identical on every rank);
- splits every training batch across the ranks (rank ``r`` keeps its ``r``-th slice along the first dimension), so
  the global batch is the batch one process would see and a run on N processes follows the one-process run;
  a user's ``DataLoader`` with a ``DistributedSampler`` is already sharded and is used as it is (``set_epoch`` is
  called for each epoch);
- averages the gradients of trained parameters outside the model (distillation adapters) as well;
- with ``parallel: fsdp`` in the training config (or ``--parallel fsdp`` for a command) shards the model's weights,
  gradients and optimizer state across the ranks instead of replicating them (``torchslim.train.sharded``);
- shows progress and writes files on rank 0 only (``is_main``).

Example (two processes on one machine; the multi-node form is in README.md)::

    torchrun --standalone --nproc-per-node 2 -m torchslim train --model lenet-5 --data mnist --epochs 2 --out lenet5.safetensors
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.tasks.batches import KeyedBatch, batch_size_of
from torchslim.train.sharded import Sharded

# how the model is spread over the processes: replicated (DistributedDataParallel) or sharded (FSDP2)
STRATEGIES = ("ddp", "fsdp")
_strategy = "ddp"


def set_strategy(name: str) -> None:
    """The strategy of every training run in this process whose config says ``parallel: auto`` (what
    ``--parallel`` sets for a command)."""
    global _strategy
    _strategy = _known(name)


def _known(name: str) -> str:
    if name not in STRATEGIES:
        raise TorchslimError(f"unknown parallel strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return name


def strategy(chosen: str = "auto") -> str:
    """The strategy a training run uses: its config's choice, or the process's (``set_strategy``) for ``auto``."""
    return _strategy if chosen == "auto" else chosen


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> World:
    """The world ``torchrun`` (or any launcher setting RANK / WORLD_SIZE / LOCAL_RANK) started this process in."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise TorchslimError(f"the launcher's environment is not understood (RANK / WORLD_SIZE / LOCAL_RANK): {error}") from None
    if size < 1 or not 0 <= rank < size:
        raise TorchslimError(f"the launcher's environment says rank {rank} of {size} processes")
    return World(rank, size, local)


def world() -> World:
    """The current world: the launched one once the process group is up, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), launched().local_rank)
    return World()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return world().main


def init(device: str | torch.device = "cpu") -> World:
    """Join the process group when launched with more than one process (gloo on CPU, NCCL on CUDA); a no-op in a
    single process or when already joined. Returns the world."""
    launch = launched()
    if not launch.distributed or (dist.is_available() and dist.is_initialized()):
        return world()
    if not dist.is_available():
        raise TorchslimError("this PyTorch build has no torch.distributed; run with one process")
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo")
    atexit.register(_leave)
    return world()


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave() -> None:
    """At the end of a successful run: wait for every rank, then leave the group. Rank 0 hosts the group's store, so
    a rank still tearing down when rank 0 has exited can abort. (A failing run only leaves, at exit: a barrier there
    would wait for ranks that may never come.)"""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if world().distributed:
        dist.barrier()


def shard_batch(batch: Any, current: World) -> Any:
    """Rank ``current.rank``'s slice of a global batch: every tensor (and list) split along its first dimension into
    ``current.size`` near-equal parts; other values are kept whole."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return batch
        if batch.shape[0] < current.size:
            raise TorchslimError(
                f"a training batch of {batch.shape[0]} examples cannot be split across {current.size} processes; use a batch size of at least "
                f"{current.size} (a loader's last batch: drop_last=True)"
            )
        return torch.tensor_split(batch, current.size)[current.rank]
    if isinstance(batch, dict):
        shards = {key: shard_batch(value, current) for key, value in batch.items()}
        return batch.rebuilt(shards) if isinstance(batch, KeyedBatch) else shards
    if isinstance(batch, tuple):
        return tuple(shard_batch(value, current) for value in batch)
    if isinstance(batch, list):
        if batch and all(isinstance(value, torch.Tensor) for value in batch):
            return [shard_batch(value, current) for value in batch]
        bounds = torch.tensor_split(torch.arange(len(batch)), current.size)[current.rank]
        return batch[int(bounds[0]) : int(bounds[-1]) + 1] if len(bounds) else []
    return batch


def _has_unused_parameters(model: nn.Module, data: Any) -> bool:
    """Whether a trainable parameter gets no gradient from a forward pass on an example of ``data`` (a head the
    forward never calls), on any rank."""
    from torchslim.core.modes import eval_mode
    from torchslim.tasks.batches import call_model, move_to

    example = data.example(2) if callable(getattr(data, "example", None)) else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    unused = 0.0
    if example is not None and trainable:
        device = trainable[0].device
        with eval_mode(model), torch.enable_grad():
            output = call_model(model, move_to(example, device))
            leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
            if leaves:
                grads = torch.autograd.grad(torch.stack([t.float().sum() for t in leaves]).sum(), trainable, allow_unused=True)
                unused = float(any(g is None for g in grads))
        flag = torch.tensor([unused], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        unused = float(flag.item())
    return unused > 0


def _distributed_sampler(data: Any) -> Any:
    """The DistributedSampler of the user's training loader (as given, or inside the data source made of it, as its
    ``sampler`` or its ``batch_sampler``'s), or None."""
    from torch.utils.data.distributed import DistributedSampler

    seen: list[Any] = []
    pending = [data]
    while pending:
        item = pending.pop(0)
        if item is None or any(item is other for other in seen):
            continue
        seen.append(item)
        for sampler in (getattr(item, "sampler", None), getattr(getattr(item, "batch_sampler", None), "sampler", None)):
            if isinstance(sampler, DistributedSampler):
                return sampler
        pending += [getattr(item, key, None) for key in ("loader", "train", "inner")]  # a source of sources: its training side
    return None


def presharded(data: Any) -> bool:
    """Whether the user's data is a loader that already gives each rank its own examples (a DistributedSampler)."""
    return _distributed_sampler(data) is not None


def set_epoch(data: Any, epoch: int) -> None:
    """Tell a user's DistributedSampler which epoch starts (its shuffling depends on it)."""
    sampler = _distributed_sampler(data)
    if sampler is not None:
        sampler.set_epoch(epoch)


class DataParallel:
    """What ``fit`` uses while training on several processes: the DDP-wrapped model for the forward pass, the batch
    slicer, and the averaging of gradients the wrapper does not own."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data: Any, strategy: str = "ddp") -> None:
        strategy = _known(strategy)
        self.world = world()
        self.presharded = presharded(data)
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if not any(p.requires_grad for p in model.parameters()):
            raise TorchslimError("distributed training: the model has no trainable parameters")
        self.device = device
        owned = {id(p) for p in model.parameters()}
        self.weight = 1.0
        self.others = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in owned]
        for parameter in self.others:  # start identical
            dist.broadcast(parameter.data, 0)
        self.sharding: Sharded | None = None
        if strategy == "fsdp":
            self.sharding = Sharded(model, optimizer)
            self.wrapped: nn.Module = model
        else:
            from torch.nn.parallel import DistributedDataParallel

            unused = _has_unused_parameters(model, data)  # a head forward never calls: DDP must be told, or its reduction waits
            self.wrapped = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=unused)

    @contextlib.contextmanager
    def whole(self) -> Iterator[None]:
        """The model as a plain module for a while (a checkpoint between epochs): released and sharded again after."""
        if self.sharding is None:
            yield
            return
        self.sharding.release()
        yield
        self.sharding.shard()

    def finish(self, keep_optimizer_state: bool = True) -> None:
        """After the last step: a sharded model becomes the plain module it was, with its full weights on every rank
        (and the optimizer's full state, unless it is not wanted: gathering it costs what sharding saved)."""
        if self.sharding is not None:
            if not keep_optimizer_state:
                self.sharding.optimizer.state.clear()
            self.sharding.release()
            self.sharding = None
        # buffers (BatchNorm's running statistics) each rank updated from its own part of the batches: rank 0's everywhere
        module = self.wrapped.module if isinstance(getattr(self.wrapped, "module", None), nn.Module) else self.wrapped
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)

    def batch(self, batch: Any) -> Any:
        """This rank's part of the batch. ``weight`` becomes the factor that makes the gradients DDP averages equal
        those of the whole batch when the parts are unequal (a last batch of 29 split 15 + 14)."""
        if self.presharded:
            self.weight = 1.0
            return batch
        part = shard_batch(batch, self.world)
        whole, mine = batch_size_of(batch), batch_size_of(part)
        self.weight = mine * self.world.size / whole if mine != whole else 1.0  # equal when nothing was split
        return part

    def average_other_gradients(self) -> None:
        for parameter in self.others:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            dist.all_reduce(parameter.grad)
            parameter.grad /= self.world.size

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (one small all-reduce)."""
        flag = torch.isfinite(value.detach()).to(torch.float32).reshape(1).to(self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def mean(self, value: float) -> float:
        """A scalar averaged over the ranks (the logged loss)."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world.size


def global_range(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The minimum of ``low`` and maximum of ``high`` over all ranks (an observer's range of the global batch); the
    values themselves in a single process."""
    if not world().distributed:
        return low, high
    low, high = low.clone(), high.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    return low, high


def same_on_every_rank(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every rank holds the same values (checks weights and masks after distributed training)."""
    current = world()
    if not current.distributed:
        return True
    for tensor in tensors:
        local = tensor.detach().to(torch.float64).reshape(-1)
        reference = local.clone()
        dist.broadcast(reference, 0)
        differs = torch.tensor([0.0 if torch.equal(local, reference) else 1.0], dtype=torch.float64, device=local.device)
        dist.all_reduce(differs)
        if differs.item() > 0:
            return False
    return True


__all__ = [
    "STRATEGIES",
    "DataParallel",
    "World",
    "barrier",
    "global_range",
    "init",
    "is_main",
    "launched",
    "leave",
    "presharded",
    "same_on_every_rank",
    "set_epoch",
    "set_strategy",
    "shard_batch",
    "strategy",
    "world",
]
