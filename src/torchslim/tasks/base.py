"""A task: how a model is fed a batch, what loss trains it, and how it is judged (a primary metric and whether
higher is better). Fine-tuning, gradient and activation criteria, distillation, calibration and every stage's
evaluation go through one; nothing else in torchslim assumes cross-entropy or a tensor output.

Presets: ``classification`` (cross-entropy; accuracy / error), ``language-modeling`` (next-token loss;
perplexity), ``fidelity`` (agreement with the uncompressed model: cosine similarity and MSE of the outputs, for
unlabeled data such as sentence embeddings), and ``Task.custom`` for a user's own loss and evaluation.

Example:
    >>> import torch
    >>> from torch import nn
    >>> task = get_task("classification")
    >>> model = nn.Linear(4, 3)
    >>> batch = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    >>> float(task.loss(model, batch)) > 0
    True
    >>> sorted(task.evaluate(model, [batch]))[:3]
    ['accuracy', 'error', 'errors']
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode, model_device, model_precision
from torchslim.core.registry import Registry
from torchslim.tasks.batches import as_precision, model_inputs, move_to


class Task(abc.ABC):
    """How a model is trained and judged on a kind of data.

    Subclasses give ``loss_from(outputs, batch)`` and the running evaluation (``start``, ``update``, ``finish``);
    ``metric`` names the primary metric and ``higher_is_better`` its direction.
    """

    name = "task"
    metric = "loss"
    higher_is_better = False
    needs_targets = False

    def outputs(self, model: nn.Module, batch: Any) -> Any:
        """The model's output on a batch (moved to the model's device). A half-precision model gets its floating-point
        inputs in its own precision and gives its output in float32, where metrics and losses are computed."""
        args, kwargs = model_inputs(move_to(batch, model_device(model)), model)
        precision = model_precision(model)
        if precision == torch.float32:
            return model(*args, **kwargs)
        return as_precision(model(*as_precision(args, precision), **as_precision(kwargs, precision)), torch.float32)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The scalar training loss of ``model`` on ``batch``."""
        return self.loss_from(self.outputs(model, batch), move_to(batch, model_device(model)))

    def training_loss(self, model: nn.Module, batch: Any, label_smoothing: float = 0.0) -> torch.Tensor:
        """The loss fine-tuning minimizes (``label_smoothing`` applies where the task has labels to smooth)."""
        return self.loss(model, batch)

    @abc.abstractmethod
    def loss_from(self, outputs: Any, batch: Any) -> torch.Tensor:
        """The scalar loss of a model output on its batch."""

    @abc.abstractmethod
    def start(self) -> dict[str, float]:
        """Fresh running totals for an evaluation."""

    @abc.abstractmethod
    def update(self, totals: dict[str, float], outputs: Any, batch: Any) -> None:
        """Add one batch to the running totals."""

    @abc.abstractmethod
    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        """Metrics from the running totals; the primary metric among them."""

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, limit: int | None = None) -> dict[str, float]:
        """Metrics of ``model`` over ``batches`` (at most ``limit`` batches), in eval mode, every submodule's mode
        restored afterwards."""
        totals = self.start()
        seen = 0
        device = model_device(model)
        with eval_mode(model):
            for batch in batches:
                if limit is not None and seen >= limit:
                    break
                batch = move_to(batch, device)
                self.update(totals, self.outputs(model, batch), batch)
                seen += 1
        if seen == 0:
            raise TorchslimError(f"{self.name} evaluation got no batches (an empty split or loader)")
        return self.finish(totals)

    def better(self, a: float, b: float) -> bool:
        """Whether primary-metric value ``a`` is better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "metric": self.metric, "higher_is_better": self.higher_is_better}

    def with_reference(self, reference: nn.Module) -> Task:
        """The task bound to the uncompressed model, for tasks that compare against it (others return themselves)."""
        return self

    @staticmethod
    def classification(class_dim: int | None = None, ignore_index: int = -100) -> Task:
        """Cross-entropy on class labels; ``class_dim`` (1 or -1) names the output's class axis where the shapes
        leave it open (a (B, L, L) output against (B, L) targets is read as (B, T, classes) otherwise);
        ``ignore_index`` the label left out of loss and scores (-100; 255 for many segmentation masks)."""
        return TASKS.get("classification")(class_dim=class_dim, ignore_index=ignore_index)

    @staticmethod
    def custom(*args: Any, **kwargs: Any) -> Task:
        """A task from a user's own callables (see ``CustomTask``)."""
        return CustomTask(*args, **kwargs)


class CustomTask(Task):
    """A user's own task: ``loss(model, batch) -> scalar tensor`` and ``evaluate(model, batches) -> {metric: value,
    ...}`` (which must hold ``metric``; a ``loss`` entry as well lets the budgets and sensitivity rank layers by it),
    and whether higher is better. ``batches`` is read once: an iterator over the evaluation batches (those of the
    split asked for, up to its limit), not the list or loader the data came in; keep what a second pass needs."""

    def __init__(
        self,
        loss: Callable[[nn.Module, Any], torch.Tensor],
        evaluate: Callable[[nn.Module, Iterable], dict[str, float]],
        metric: str,
        higher_is_better: bool,
        name: str = "custom",
    ) -> None:
        self._loss, self._evaluate = loss, evaluate
        self.metric, self.higher_is_better, self.name = metric, higher_is_better, name

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return self._loss(model, move_to(batch, model_device(model)))

    def loss_from(self, outputs: Any, batch: Any) -> torch.Tensor:
        raise TorchslimError("a custom task computes its loss from the model and the batch; call loss(model, batch)")

    def start(self) -> dict[str, float]:
        return {}

    def update(self, totals: dict[str, float], outputs: Any, batch: Any) -> None:
        raise TorchslimError("a custom task evaluates through its own evaluate callable")

    def finish(self, totals: dict[str, float]) -> dict[str, float]:
        return totals

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, limit: int | None = None) -> dict[str, float]:
        if limit is not None:
            batches = _take(batches, limit)
        with eval_mode(model):
            metrics = dict(self._evaluate(model, batches))
        if self.metric not in metrics:
            raise TorchslimError(f"the custom task's evaluate returned {sorted(metrics)}, without its metric {self.metric!r}")
        return metrics


def _take(batches: Iterable, limit: int) -> Iterable:
    for index, batch in enumerate(batches):
        if index >= limit:
            return
        yield batch


TASKS: Registry[Callable[..., Task]] = Registry("task")


def resolve_task(task: str | Task | None, source: Any, reference: nn.Module | None = None) -> Task:
    """The task to train and judge by: the one named (bound to ``reference``, the uncompressed model, where it
    compares against it), or, with none named, from the data: language modeling for text, classification for
    labelled batches, fidelity to ``reference`` for unlabeled ones."""
    if task is None:
        if getattr(source, "kind", None) == "text":
            task = "language-modeling"
        elif source.has_targets():
            task = "classification"
        elif reference is not None:
            task = "fidelity"
        else:
            raise TorchslimError(
                "the data has no labels and no task was named (a mapping's labels go under one of labels, label, targets, target; a tuple's "
                "second entry): pass task='fidelity' (with the original model), 'language-modeling', or a Task of your own"
            )
    resolved = get_task(task)
    if reference is not None:
        resolved = resolved.with_reference(reference)
    elif isinstance(task, str) and task == "fidelity" and getattr(resolved, "reference", None) is None:
        raise TorchslimError("the fidelity task needs the original model to compare against")
    return resolved


def get_task(task: str | Task, **options: Any) -> Task:
    """A task object from a preset name (``classification``, ``language-modeling``, ``fidelity``) or a Task."""
    if isinstance(task, Task):
        return task
    if not isinstance(task, str):
        raise TorchslimError(f"task must be a preset name ({', '.join(TASKS.names())}) or a torchslim Task, got {type(task).__name__}")
    return TASKS.get(task)(**options)


__all__ = ["TASKS", "CustomTask", "Task", "get_task", "resolve_task"]
