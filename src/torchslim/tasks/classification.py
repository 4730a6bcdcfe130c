"""Classification: cross-entropy on class labels; accuracy and error. Sequence outputs (B, T, classes) with
targets (B, T) are scored per position (token classification); targets of -100 are ignored (or of the value
``ignore_index`` names, such as a segmentation mask's 255).

Example:
    >>> import torch
    >>> task = ClassificationTask()
    >>> logits, targets = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0])
    >>> totals = task.start(); task.update(totals, logits, (None, targets)); task.finish(totals)["accuracy"]
    0.5
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from torchslim.core.errors import TorchslimError
from torchslim.tasks.base import TASKS, Task
from torchslim.tasks.batches import TARGET_KEYS, batch_targets, output_tensor

IGNORE = -100


def flat_logits_and_targets(outputs: Any, batch: Any, task: str, class_dim: int | None = None, ignore_index: int = IGNORE) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, classes) and integer targets (N,) of a batch, with checks that name what is wrong. ``class_dim``:
    the output's class axis (1 or -1); by default read from the targets' shape: (B, classes) and (B, T, classes)
    against (B, T) targets on the last axis, (B, classes, H, W) against (B, H, W) on dim 1, and a (B, L, L) output,
    which fits both, on the last (token classification; pass ``class_dim=1`` for a Conv1d's (B, classes, L)).
    Targets equal to ``ignore_index`` come back as -100, the value every score skips."""
    logits = output_tensor(outputs)
    targets = batch_targets(batch)
    if targets is None:
        raise TorchslimError(
            f"{task}: the batches carry no labels; give (inputs, labels) batches or mappings with the labels under one of "
            f"{', '.join(TARGET_KEYS)}, or use the 'fidelity' task for unlabeled data"
        )
    if not isinstance(targets, torch.Tensor):
        targets = torch.as_tensor(targets)
    targets = targets.to(logits.device)
    if logits.dim() < 2:
        raise TorchslimError(f"{task}: the model output has shape {tuple(logits.shape)}; expected logits (batch, classes)")
    channels_first = logits.dim() > 2 and targets.dim() == logits.dim() - 1 and targets.shape == logits.shape[:1] + logits.shape[2:]
    if class_dim is not None and logits.dim() > 2:
        channels_first = class_dim == 1
    elif channels_first and logits.dim() == 3 and targets.shape == logits.shape[:-1]:
        channels_first = False  # (B, T, classes) with T == classes: token classification, the common case
    if channels_first:
        logits = logits.movedim(1, -1)  # (B, classes, H, W) dense predictions (segmentation): classes on dim 1
    logits = logits.reshape(-1, logits.shape[-1])
    if targets.dim() >= 2 and targets.shape[-1] == logits.shape[-1] >= 2 and targets.numel() == logits.numel():
        hot = targets.reshape(-1, logits.shape[-1])
        if bool(((hot == 0) | (hot == 1)).all()) and bool((hot.sum(dim=-1) == 1).all()):
            targets = hot.argmax(dim=-1)  # one-hot labels: the class each row marks
        else:
            raise TorchslimError(
                f"{task}: the targets have shape {tuple(targets.shape)}, one value per output, but are not one-hot (soft labels, or "
                "regression values); give class indices, or a custom task (torchslim.Task.custom) for a loss on soft labels or a regression"
            )
    fractional = targets[targets != targets.round()] if targets.is_floating_point() else targets[:0]
    if fractional.numel():
        # regression values read as labels would all but vanish into class 0 (0.7 -> 0): a loss of 0 that trains nothing
        raise TorchslimError(
            f"{task}: the batches' targets are fractional numbers (e.g. {float(fractional[0]):g}),"
            " not class labels; for regression or any other loss, pass task=Task.custom(loss, evaluate, metric, higher_is_better)"
            " (torchslim.Task.custom), or task='fidelity' to match the original model's outputs"
        )
    if logits.shape[-1] < 2:
        raise TorchslimError(f"{task}: the model has {logits.shape[-1]} output per example; classification needs one logit per class (2 or more)")
    targets = targets.reshape(-1).long()
    if logits.shape[0] != targets.shape[0]:
        raise TorchslimError(f"{task}: {logits.shape[0]} predictions but {targets.shape[0]} labels in the batch")
    if ignore_index != IGNORE:
        targets = targets.masked_fill(targets == ignore_index, IGNORE)
    try:
        check_range(targets, logits.shape[-1], f"{task}: label", "classes")
    except TorchslimError as error:
        if ignore_index == IGNORE and int(targets.max()) == 255:  # the value segmentation datasets mark unlabeled pixels with
            raise TorchslimError(f"{error}; if 255 marks examples to leave out, pass task=Task.classification(ignore_index=255)") from None
        raise
    return logits, targets


def check_range(values: torch.Tensor, size: int, what: str, of: str) -> None:
    """Refuse integer ``values`` (other than the ignored -100) outside [0, size), naming the first bad one."""
    valid = values[values != IGNORE]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= size):
        bad = int(valid.max()) if int(valid.max()) >= size else int(valid.min())
        raise TorchslimError(f"{what} {bad} is outside the model's {size} {of} (valid: 0 to {size - 1})")


def add_scores(totals: dict[str, float], logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Add summed cross-entropy, correct predictions and the count of scored positions (targets of -100 skipped)."""
    keep = targets != IGNORE
    logits, targets = logits[keep], targets[keep]
    totals["loss_sum"] += F.cross_entropy(logits.float(), targets, reduction="sum").item()
    totals["correct"] += (logits.argmax(dim=-1) == targets).sum().item()
    totals["count"] += targets.numel()


class ClassificationTask(Task):
    """Cross-entropy on labels; accuracy (primary), error, mean loss, example and error counts."""

    name = "classification"
    metric = "accuracy"
    higher_is_better = True
    needs_targets = True

    def __init__(self, class_dim: int | None = None, ignore_index: int = IGNORE) -> None:
        """``class_dim``: the output's class axis where targets would fit two (1 for (B, classes, L) dense
        predictions whose length equals the class count); read from the shapes by default. ``ignore_index``: the
        label of examples (pixels, tokens) left out of the loss and the scores, -100 by default."""
        if class_dim not in (None, 1, -1):
            raise TorchslimError(f"classification: class_dim must be 1 or -1 (or None: read from the shapes), got {class_dim!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TorchslimError(f"classification: ignore_index must be an integer label, got {ignore_index!r}")
        self.class_dim, self.ignore_index = class_dim, ignore_index

    def loss_from(self, outputs: Any, batch: Any) -> torch.Tensor:
        logits, targets = flat_logits_and_targets(outputs, batch, self.name, self.class_dim, self.ignore_index)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)

    def training_loss(self, model: Any, batch: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        if not label_smoothing:
            return self.loss(model, batch)
        logits, targets = flat_logits_and_targets(self.outputs(model, batch), batch, self.name, self.class_dim, self.ignore_index)
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, label_smoothing=label_smoothing)

    def start(self) -> dict[str, float]:
        return {"correct": 0.0, "count": 0.0, "loss_sum": 0.0}

    def update(self, totals: dict[str, float], outputs: Any, batch: Any) -> None:
        add_scores(totals, *flat_logits_and_targets(outputs, batch, self.name, self.class_dim, self.ignore_index))

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        count = int(totals["count"])
        if count == 0:
            raise TorchslimError("classification evaluation got no labelled examples")
        accuracy = totals["correct"] / count
        loss = totals["loss_sum"] / count
        return {"accuracy": accuracy, "error": 1 - accuracy, "loss": loss, "examples": count, "errors": count - int(totals["correct"])}


TASKS.register("classification", "cross-entropy on labels; accuracy and error")(ClassificationTask)

__all__ = ["ClassificationTask", "flat_logits_and_targets"]
