"""``fit``: a seeded training loop with optimizer, learning-rate schedule, loss, callbacks and progress bars."""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from torchslim.core.config import Config, check
from torchslim.train.evaluate import evaluate
from torchslim.train.modes import model_device, train_mode

LossFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """How to train: optimizer, learning-rate schedule, epochs, batch size, seed.

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
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
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
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
        )
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


def default_loss(config: TrainConfig) -> LossFunction:
    def loss(outputs: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if outputs.dim() == 3:  # (B, T, V)
            outputs, targets = outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)
        return F.cross_entropy(outputs, targets, label_smoothing=config.label_smoothing)

    return loss


def _train_batches(data: Any, config: TrainConfig, epoch: int, block_size: int = 64):
    if hasattr(data, "train_ids"):  # text: windows as long as the model's context
        batches = config.max_batches_per_epoch or 200
        return data.loader("train", batch_size=config.batch_size, block_size=block_size, batches=batches, seed=config.seed + epoch)
    if hasattr(data, "loader"):
        return data.loader("train", batch_size=config.batch_size, seed=config.seed + epoch)
    return data


def fit(
    model: nn.Module,
    data: Any,
    config: TrainConfig | dict | None = None,
    loss: LossFunction | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> FitHistory:
    """Train ``model`` in place on ``data`` (a Dataset, TextDataset, or an iterable of (inputs, targets) batches).

    ``loss(outputs, targets, inputs)`` defaults to cross-entropy. Progress bars show on a terminal only (or force
    with ``progress``). Returns the per-epoch history and the final test metrics. Runs are reproducible for a
    fixed ``config.seed``. The model's train/eval mode is restored afterwards.

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> model = ts.models.create("lenet-300-100", in_features=64)
        >>> history = fit(model, data, {"epochs": 1, "lr": 0.05})
        >>> history.final["accuracy"] > 0.5
        True
    """
    config = TrainConfig.coerce(config)
    seed_everything(config.seed)
    device = model_device(model)
    loss_function = loss or default_loss(config)
    optimizer = optimizer or make_optimizer(model.parameters(), config)
    base_rates = [group["lr"] for group in optimizer.param_groups]
    show = sys.stderr.isatty() if progress is None else progress
    block_size = getattr(model, "block_size", 64)
    first = _train_batches(data, config, 0, block_size)
    steps_per_epoch = len(first) if hasattr(first, "__len__") else (config.max_batches_per_epoch or 200)
    if config.max_batches_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, config.max_batches_per_epoch)
    state = TrainState(model, optimizer, config, total_steps=config.epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch)
    started = time.perf_counter()
    for callback in callbacks:
        callback.on_train_start(state)
    with train_mode(model):
        for epoch in range(config.epochs):
            state.epoch = epoch
            model.train()
            for callback in callbacks:
                callback.on_epoch_start(state)
            batches = first if epoch == 0 else _train_batches(data, config, epoch, block_size)
            bar = _progress(batches, steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", show)
            loss_sum, seen = 0.0, 0
            for index, (inputs, targets) in enumerate(bar):
                if index >= steps_per_epoch:
                    break
                inputs, targets = inputs.to(device), targets.to(device)
                factor = learning_rate_factor(config, state.step, steps_per_epoch)
                for group, rate in zip(optimizer.param_groups, base_rates):
                    group["lr"] = rate * factor
                state.inputs, state.targets = inputs, targets
                for callback in callbacks:
                    callback.on_batch_start(state)
                outputs = model(inputs)
                value = loss_function(outputs, targets, inputs)
                for callback in callbacks:
                    extra = callback.extra_loss(state)
                    if extra is not None:
                        value = value + extra
                if not torch.isfinite(value):
                    raise FloatingPointError(f"loss became {value.item()} at epoch {epoch + 1}, step {state.step}")
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                for callback in callbacks:
                    callback.after_backward(state)
                if config.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                for callback in callbacks:
                    callback.after_step(state)
                state.loss = value.item()
                loss_sum += state.loss * len(targets)
                seen += len(targets)
                state.step += 1
                if show and hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{state.loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, seen)}
            if config.eval_every_epoch and hasattr(data, "loader"):
                test = evaluate(model, data, limit=config.eval_limit)
                metrics.update({f"test_{k}": v for k, v in test.items()})
            state.history.append(metrics)
            for callback in callbacks:
                callback.on_epoch_end(state, metrics)
    for callback in callbacks:
        callback.on_train_end(state)
    final = evaluate(model, data, limit=config.eval_limit) if hasattr(data, "loader") else {}
    return FitHistory(epochs=state.history, final=final, seconds=time.perf_counter() - started)


def _progress(iterable, total: int, description: str, show: bool):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False, file=sys.stderr)
