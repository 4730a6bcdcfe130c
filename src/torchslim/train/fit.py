"""``fit``: a seeded training loop with optimizer, learning-rate schedule, the task's loss, callbacks, and progress
(a bar on a terminal, one line per epoch elsewhere). Data is anything ``torchslim.data.as_source`` takes."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from torchslim.core.config import Config, check
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import model_device, train_mode
from torchslim.data.sources import DataSource, as_source
from torchslim.tasks.base import Task, resolve_task
from torchslim.train import distributed
from torchslim.train.evaluate import evaluate_source
from torchslim.train.progress import Progress, progress_mode

# A loss of the model and a batch (what a task gives; distillation supplies its own)
LossFunction = Callable[[nn.Module, Any], torch.Tensor]
# After each epoch: (epoch index, model, training state to resume from)
EpochHook = Callable[[int, nn.Module, dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How to train: optimizer, learning-rate schedule, epochs, batch size, seed.

    ``batch_size`` and shuffling apply to data torchslim batches itself; a user's DataLoader keeps its own.
    ``max_batches_per_epoch`` shortens epochs; ``eval_limit`` caps the evaluation examples (all by default).
    ``precision`` runs the forward pass under autocast: ``bf16`` or ``fp16`` (with loss scaling); weights and the
    optimizer stay fp32. Under ``torchrun`` the batch is the global batch, split across the processes, and
    ``parallel`` says how the model is spread over them: ``ddp`` replicates it, ``fsdp`` shards its weights,
    gradients and optimizer state (for models whose training state does not fit one device); ``auto`` takes the
    process's choice (``--parallel`` of a command), ``ddp`` unless set.

    Example:
        >>> TrainConfig.from_dict({"epochs": 2, "optimizer": "adam", "lr": 1e-3}).schedule
        'cosine'
    """

    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine", "step", "linear"] = "cosine"
    step_epochs: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    max_batches_per_epoch: int | None = None
    eval_every_epoch: bool = True
    eval_limit: int | None = None
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"

    def validate(self) -> None:
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclasses.dataclass
class TrainState:
    """What callbacks see: the model, optimizer, and where training stands."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    loss: float = float("nan")
    batch: Any = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class Callback:
    """Hooks into ``fit``. Override what you need; every hook receives the TrainState.

    ``after_backward`` runs between backward and the optimizer step (gradients are there: read or edit them);
    ``after_step`` runs after the optimizer step (re-apply masks, clamp values).
    """

    def on_train_start(self, state: TrainState) -> None: ...

    def on_epoch_start(self, state: TrainState) -> None: ...

    def on_batch_start(self, state: TrainState) -> None: ...

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        """A term added to the loss (sparsity regularization, for one)."""
        return None

    def after_backward(self, state: TrainState) -> None: ...

    def after_step(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


@dataclasses.dataclass
class FitHistory:
    """Per-epoch metrics of a ``fit`` run, and the final evaluation."""

    epochs: list[dict[str, Any]]
    final: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(parameters, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in parameters if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def learning_rate_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``step`` (linear warm-up, then the schedule)."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "linear":
        return max(0.0, 1 - progress)
    if config.schedule == "step":
        epoch = step / steps_per_epoch
        return config.gamma ** sum(1 for boundary in config.step_epochs if epoch >= boundary)
    return 1.0


@contextlib.contextmanager
def _one_example_batch(label: str, epoch: int, step: int) -> Iterator[None]:
    """torch's bare error for batch normalization given one example in training, said with the step and the fix."""
    try:
        yield
    except ValueError as error:
        if "Expected more than 1 value per channel when training" not in str(error):
            raise
        raise TorchslimError(
            f"{label}: a training batch of one example at epoch {epoch + 1}, step {step}, and the model's batch normalization cannot "
            f"train on one ({error}); give the DataLoader drop_last=True, or a batch size that leaves no single example over"
        ) from None


def _warn_unheld_zeros(model: nn.Module) -> None:
    from torchslim.pruning.apply import unheld_zeros

    found = unheld_zeros(model)
    if found:
        listed = ", ".join(f"{name}: {share:.0%} zeros" for name, share in list(found.items())[:4]) + (", ..." if len(found) > 4 else "")
        warnings.warn(
            f"training regrows the zeros of {len(found)} pruned layer(s) that hold no mask ({listed}); torchslim.pruning.hold_zeros(model) keeps them at zero",
            stacklevel=3,
        )


def fit(
    model: nn.Module,
    data: Any,
    config: TrainConfig | dict | None = None,
    task: str | Task | None = None,
    loss: LossFunction | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool | str | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    label: str = "train",
    evaluate_at_end: bool = True,
    reference: nn.Module | None = None,
    start_epoch: int = 0,
    on_epoch: EpochHook | None = None,
    resume_state: dict[str, Any] | None = None,
) -> FitHistory:
    """Train ``model`` in place on ``data`` (anything ``torchslim.data.as_source`` takes).

    The loss is the ``task``'s (chosen from the data when not named; ``reference`` is the model a fidelity task
    compares against), or ``loss(model, batch)`` when given. Progress shows as a bar on a terminal and one line per
    epoch elsewhere (``progress=False`` silences it). Returns the per-epoch history and the final evaluation.
    Runs are reproducible for a fixed ``config.seed``. Every submodule's train/eval mode is restored afterwards.

    ``on_epoch(epoch, model, training_state)`` runs after each epoch (for checkpoints); ``training_state`` holds the
    optimizer's state, the random generator's and the history. Passing it back as ``resume_state`` with
    ``start_epoch`` continues exactly where that epoch ended (the model must hold that epoch's weights).

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> model = ts.models.create("lenet-300-100", in_features=64)
        >>> history = fit(model, data, {"epochs": 3, "lr": 0.05}, progress=False)
        >>> history.final["accuracy"] > 0.5
        True
    """
    config = TrainConfig.coerce(config)
    _warn_unheld_zeros(model)
    seed_everything(config.seed)
    source = as_source(data, model)
    resolved = resolve_task(task, source, reference)
    loss_function = loss or (lambda m, batch: resolved.training_loss(m, batch, config.label_smoothing))
    own_optimizer = optimizer is None  # its state ends with this run
    optimizer = optimizer or make_optimizer(model.parameters(), config)
    base_rates = [group["lr"] for group in optimizer.param_groups]
    mode = progress_mode(progress if distributed.is_main() else False)
    precision = Precision(config.precision, model)
    steps_per_epoch = epoch_steps(source, config)
    state = TrainState(model, optimizer, config, total_steps=config.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    if resume_state is not None:
        _resume(state, resume_state, start_epoch, label)
    # after resuming: a sharded model's optimizer state is sharded along with it
    parallel = distributed.DataParallel(model, optimizer, data, distributed.strategy(config.parallel)) if distributed.world().distributed else None
    forward_model = parallel.wrapped if parallel is not None else model
    started = time.perf_counter()
    lines = Progress(label, config.epochs, mode, unit_total=config.epochs * steps_per_epoch if mode == "bar" else None)
    for callback in callbacks:
        callback.on_train_start(state)
    with train_mode(model):
        for epoch in range(start_epoch, config.epochs):
            state.epoch = epoch
            model.train()
            for callback in callbacks:
                callback.on_epoch_start(state)
            distributed.set_epoch(data, epoch)
            batches = source.batches("train", batch_size=config.batch_size, seed=config.seed + epoch, limit=steps_per_epoch)
            lines.update(description=f"{label} epoch {epoch + 1}/{config.epochs}")
            loss_sum, seen = 0.0, 0
            for batch in batches:
                factor = learning_rate_factor(config, state.step, steps_per_epoch)
                for group, rate in zip(optimizer.param_groups, base_rates):
                    group["lr"] = rate * factor
                state.batch = batch = parallel.batch(batch) if parallel is not None else batch
                for callback in callbacks:
                    callback.on_batch_start(state)
                with precision.autocast(), _one_example_batch(label, epoch, state.step):
                    value = loss_function(forward_model, batch)
                for callback in callbacks:
                    extra = callback.extra_loss(state)
                    if extra is not None:
                        value = value + extra
                # under torchrun every rank stops together (one rank alone would leave the others waiting)
                if not (parallel.all_finite(value) if parallel is not None else bool(torch.isfinite(value))):
                    if parallel is not None:  # every rank is here: hand back a whole model
                        parallel.finish()
                    raise TorchslimError(
                        f"{label}: the loss became {value.item()} at epoch {epoch + 1}, step {state.step}; lower "
                        f"the learning rate (lr={config.lr}) or check the data for NaN/Inf"
                    )
                optimizer.zero_grad(set_to_none=True)
                precision.backward(value * parallel.weight if parallel is not None else value, optimizer)
                if parallel is not None:
                    parallel.average_other_gradients()
                for callback in callbacks:
                    callback.after_backward(state)
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                precision.step(optimizer)
                for callback in callbacks:
                    callback.after_step(state)
                state.loss = value.item()
                loss_sum += state.loss
                seen += 1
                state.step += 1
                if lines.mode == "bar":
                    lines.update(completed=state.step, loss=state.loss, lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if seen == 0:
                raise TorchslimError(f"{label}: the training data gave no batches")
            metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": parallel.mean(loss_sum / seen) if parallel is not None else loss_sum / seen}
            if config.eval_every_epoch:
                test = evaluate_source(model, source, resolved, limit=config.eval_limit)
                metrics.update({f"test_{k}": v for k, v in test.items()})
            state.history.append(metrics)
            lines.step(**epoch_line(metrics, resolved.metric))
            for callback in callbacks:
                callback.on_epoch_end(state, metrics)
            if on_epoch is not None:
                with parallel.whole() if parallel is not None else contextlib.nullcontext():
                    on_epoch(epoch, model, {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "history": state.history})
    lines.close()
    if parallel is not None:
        parallel.finish(keep_optimizer_state=not own_optimizer)
    del parallel, forward_model  # release the DDP wrapper's hooks before the model is used alone
    for callback in callbacks:
        callback.on_train_end(state)
    final = evaluate_source(model, source, resolved, limit=config.eval_limit) if evaluate_at_end else {}
    return FitHistory(epochs=state.history, final=final, seconds=time.perf_counter() - started)


class Precision:
    """Autocast for the forward pass and, for fp16, a gradient scaler (gradients are unscaled before callbacks and
    clipping see them)."""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name = name
        self.device_type = model_device(model).type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)
        if self.dtype is torch.float16 and self.device_type == "cpu":
            raise TorchslimError("precision fp16 needs a CUDA device; on CPU use bf16 (or fp32)")
        self.scaler = torch.amp.GradScaler(self.device_type) if self.dtype is torch.float16 else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, value: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            value.backward()
            return
        self.scaler.scale(value).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # skipped when a gradient overflowed; the scale then shrinks
        self.scaler.update()


def _resume(state: TrainState, saved: dict[str, Any], start_epoch: int, label: str) -> None:
    """Put the optimizer, the random generator and the history back as they were after epoch ``start_epoch``."""
    try:
        state.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise TorchslimError(f"{label}: the saved training state does not fit this run ({type(error).__name__}: {error})") from None
    state.history = list(saved.get("history", []))
    state.step = start_epoch * state.steps_per_epoch


def epoch_line(metrics: dict[str, Any], metric: str) -> dict[str, Any]:
    """What an epoch's progress line shows: the training loss and the task's test metric (named ``test <metric>``
    when the metric's own name would clash with the training loss, e.g. a task whose metric is "loss")."""
    shown: dict[str, Any] = {"loss": metrics["train_loss"]}
    if f"test_{metric}" in metrics:
        shown[metric if metric not in shown else f"test_{metric}"] = metrics[f"test_{metric}"]
    return shown


def epoch_steps(source: DataSource, config: TrainConfig) -> int:
    """Optimizer steps in one epoch of ``source`` under ``config`` (a loader without a length is counted by one pass)."""
    known = source.batches_per_epoch(config.batch_size)
    if known is None:  # a loader without a length: count one pass
        known = sum(1 for _ in source.batches("train", batch_size=config.batch_size, seed=config.seed))
    if config.max_batches_per_epoch is not None:
        known = min(known, config.max_batches_per_epoch)
    return known
