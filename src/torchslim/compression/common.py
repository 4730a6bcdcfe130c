"""What the network-compression verbs share: the options every one of them takes, and the run that changes a copy
of the model, evaluates it before and after, and fine-tunes it."""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

from torch import nn

from torchslim.core.checks import check_model
from torchslim.core.config import ConfigError
from torchslim.core.copying import copy_model
from torchslim.data.sources import DataSource, as_source
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.evaluate import evaluate_source
from torchslim.train.fit import TrainConfig, fit


class TransformOptions(TypedDict, total=False):
    """The keyword options of ``factorize`` and ``substitute_activations``: ``data`` (anything
    ``torchslim.data.as_source`` takes; evaluation before and after, fine-tuning), ``example_input`` (for MAC counts
    and traced forwards without data), ``task``, ``finetune`` (a training config; needs data), ``inplace`` (change the
    given model instead of a copy), ``progress``."""

    data: Any
    example_input: Any
    task: str | Task | None
    finetune: TrainConfig | dict | None
    inplace: bool
    progress: bool | str | None


@dataclasses.dataclass
class Transforming:
    """One run of a verb that changes a model's structure: the caller's model, the one being changed (a copy unless
    ``inplace``), the data, an example input, the task and the fine-tuning."""

    verb: str
    model: nn.Module
    target: nn.Module
    data: Any
    source: DataSource | None
    example: Any
    task: Task | None
    tuning: TrainConfig | None
    progress: bool | str | None

    @classmethod
    def start(cls, verb: str, model: nn.Module, options: TransformOptions) -> Transforming:
        unknown = sorted(set(options) - set(TransformOptions.__annotations__))
        if unknown:
            raise TypeError(f"{verb}() got unexpected keyword argument(s) {', '.join(unknown)}; it takes {', '.join(TransformOptions.__annotations__)}")
        check_model(model, verb, float32=True, copies=True)
        data, finetune = options.get("data"), options.get("finetune")
        tuning = TrainConfig.coerce(finetune, where=f"{verb}.finetune") if finetune is not None else None
        if tuning is not None and data is None:
            raise ConfigError(f"{verb}: fine-tuning needs data")
        source = as_source(data, model) if data is not None else None
        example = options.get("example_input")
        if example is None and source is not None:
            example = source.example(1)
        task = resolve_task(options.get("task"), source, model) if source is not None else None
        target = model if options.get("inplace", False) else copy_model(model)
        return cls(verb, model, target, data, source, example, task, tuning, options.get("progress"))

    def evaluate(self, suffix: str = "") -> dict[str, Any]:
        """The task's metrics of the model being changed (floats, keys with ``suffix``); none without data."""
        if self.source is None or self.task is None:
            return {}
        metrics = evaluate_source(self.target, self.source, self.task)
        return {f"{key}{suffix}": value for key, value in metrics.items() if isinstance(value, float) or not suffix}

    def finetune(self) -> list[str]:
        """Fine-tune the changed model when asked; the note it leaves."""
        if self.tuning is None:
            return []
        history = fit(
            self.target,
            self.data,
            self.tuning,
            task=self.task,
            progress=self.progress,
            label=f"{self.verb} fine-tune",
            evaluate_at_end=False,
            reference=self.model,
        )
        return [f"fine-tuned {len(history.epochs)} epochs ({history.seconds:.1f} s)"]


def other_weights_note(model: nn.Module, layers: Any, left: str) -> str | None:
    """Under the default selection, a note naming the weights of modules that are no Linear, Conv2d or GPT-2 Conv1D
    (a Conv1d, a ConvTranspose2d, an embedding): what a Linear / Conv2d technique leaves as it was (``left``)."""
    from torchslim.core.selector import LayerSelector, is_conv1d
    from torchslim.quantization.weight_only import uncovered_note

    if LayerSelector.coerce(layers) != LayerSelector():
        return None  # a selection the caller made says what it takes
    return uncovered_note(model, lambda m: isinstance(m, (nn.Linear, nn.Conv2d)) or is_conv1d(m), left, "Linear, Conv2d or Conv1D layer")


__all__ = ["TransformOptions", "Transforming", "other_weights_note"]
