"""``distill``: train a student from a teacher on outputs (soft targets at temperature T, or MSE) and on named
features (FitNets hints through learned adapters, or attention transfer), plus the task's own loss where the data
has labels.

Outputs may be tensors, tuples or Hugging Face ``ModelOutput``s (their logits, or hidden states for encoders). The
teacher runs in eval mode under no_grad, once per batch; with ``cache_teacher`` its outputs over the (fixed,
un-augmented) training split of an in-memory dataset are computed once and looked up by example.

Example:
    >>> import torchslim as ts
    >>> data = ts.data.load("digits")
    >>> teacher = ts.train(ts.models.create_for("mlp", data, hidden=(256,)), data, {"epochs": 3}, progress=False).model
    >>> student = ts.models.create_for("mlp", data, hidden=(16,))
    >>> result = ts.distill(student, teacher, data, {"temperature": 4.0, "alpha": 0.9, "train": {"epochs": 2}}, progress=False)
    >>> result.report.stages[0].name
    'distill'
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from torchslim.core.checks import check_model
from torchslim.core.config import Config, ConfigError, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode, model_device
from torchslim.core.report import Report, Result, Stage
from torchslim.data.datasets import Dataset, Split
from torchslim.data.sources import DatasetSource, as_source
from torchslim.distillation.losses import attention_transfer_loss, class_axis, hint_loss, kl_soft_targets
from torchslim.measure.counts import count_nonzeros, count_parameters
from torchslim.tasks.base import CustomTask, Task, resolve_task
from torchslim.tasks.batches import batch_targets, call_model, model_inputs, move_to, output_tensor
from torchslim.train.evaluate import evaluate_source
from torchslim.train.fit import EpochHook, TrainConfig, fit, make_optimizer


@dataclasses.dataclass(frozen=True)
class FeaturePair(Config):
    """Match the output of ``student`` module to that of ``teacher`` module (names as in named_modules)."""

    student: str
    teacher: str
    kind: str = "hint"
    weight: float = 1.0

    def validate(self) -> None:
        check(self.kind in ("hint", "attention"), f"feature kind must be 'hint' or 'attention', got {self.kind!r}")
        check(self.weight >= 0, f"feature weight must be >= 0, got {self.weight}")


@dataclasses.dataclass(frozen=True)
class DistillConfig(Config):
    """Distillation settings: ``loss`` "kl" (soft targets at temperature T, weight alpha) or "mse" (logits);
    ``features`` pairs for hint / attention-transfer terms; ``train`` the student's training run."""

    temperature: float = 4.0
    alpha: float = 0.9
    loss: str = "kl"
    features: tuple[FeaturePair, ...] = ()
    cache_teacher: bool = False
    train: TrainConfig = TrainConfig(epochs=10)

    def validate(self) -> None:
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.loss in ("kl", "mse"), f"loss must be 'kl' or 'mse', got {self.loss!r}")
        check(not (self.cache_teacher and self.features), "cache_teacher holds logits only: it cannot be combined with features")


class FeatureCapture:
    """Forward hooks that keep the latest output of named modules."""

    def __init__(self, model: nn.Module, names: list[str], role: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            available = ", ".join(n for n in modules if n)
            raise TorchslimError(f"{role} has no layer named {missing[0]!r}; its layers: {available}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def make_adapter(student_feature: torch.Tensor, teacher_feature: torch.Tensor, kind: str, where: str) -> nn.Module:
    """A learned map from the student's feature width to the teacher's (identity when they already agree)."""
    if kind == "attention":
        if student_feature.shape[2:] != teacher_feature.shape[2:]:
            raise TorchslimError(
                f"{where}: attention transfer needs equal spatial sizes, got {tuple(student_feature.shape[2:])} and {tuple(teacher_feature.shape[2:])}"
            )
        return nn.Identity()
    if student_feature.shape == teacher_feature.shape:
        return nn.Identity()
    if student_feature.dim() == 4 and teacher_feature.dim() == 4 and student_feature.shape[2:] == teacher_feature.shape[2:]:
        return nn.Conv2d(student_feature.shape[1], teacher_feature.shape[1], 1, bias=False)
    if student_feature.dim() == teacher_feature.dim() and student_feature.shape[:-1] == teacher_feature.shape[:-1]:
        return nn.Linear(student_feature.shape[-1], teacher_feature.shape[-1], bias=False)
    raise TorchslimError(f"{where}: cannot adapt student feature {tuple(student_feature.shape)} to teacher feature {tuple(teacher_feature.shape)}")


class _TeacherCache:
    """Teacher outputs over the whole training split, computed once; the training split's targets become indices."""

    def __init__(self, teacher: nn.Module, data: Dataset, batch_size: int = 1000) -> None:
        outputs = []
        with eval_mode(teacher), torch.no_grad():
            for start in range(0, len(data.train), batch_size):
                batch = data.train.inputs[start : start + batch_size].to(model_device(teacher))
                outputs.append(output_tensor(teacher(batch), "teacher output").cpu())
        self.logits = torch.cat(outputs)
        self.labels = data.train.targets
        indexed = Split(data.train.inputs, torch.arange(len(data.train)))
        self.data = dataclasses.replace(data, train=indexed)


class _DistillLoss:
    """The loss for ``fit``: the output term against the teacher (run once per batch, or cached), the task's loss on
    labels weighted by 1 - alpha where the batch has labels, plus feature terms."""

    def __init__(self, teacher: nn.Module, config: DistillConfig, adapters: nn.ModuleDict, cache: _TeacherCache | None, task: Task, student: nn.Module) -> None:
        self.teacher, self.config, self.adapters, self.cache, self.task = teacher, config, adapters, cache, task
        self.student_features = FeatureCapture(student, [p.student for p in config.features], "student") if config.features else None
        self.teacher_features = FeatureCapture(teacher, [p.teacher for p in config.features], "teacher") if config.features else None
        self.teacher_calls = 0

    def __call__(self, student: nn.Module, batch: Any) -> torch.Tensor:
        batch = move_to(batch, model_device(student))
        args, kwargs = model_inputs(batch, student)
        raw = student(*args, **kwargs)
        outputs = output_tensor(raw, "student output")
        if self.cache is not None:
            indices = batch_targets(batch).cpu()
            teacher_outputs = self.cache.logits[indices].to(outputs.device)
            batch = (args[0], self.cache.labels[indices].to(outputs.device))
        else:
            with torch.no_grad():
                taught, named = model_inputs(batch, self.teacher)  # each model by its own signature
                teacher_outputs = output_tensor(self.teacher(*taught, **named), "teacher output")
            self.teacher_calls += 1
        if self.config.loss == "kl":
            soft = kl_soft_targets(outputs, teacher_outputs, self.config.temperature)
        else:
            soft = torch.nn.functional.mse_loss(outputs.float(), teacher_outputs.float())
        loss = soft
        if self.config.alpha < 1.0 and isinstance(self.task, CustomTask):
            # a user's own task computes its loss from the model and the batch (a second forward pass)
            loss = (1.0 - self.config.alpha) * self.task.loss(student, batch) + self.config.alpha * soft
        elif self.config.alpha < 1.0 and self.task.needs_targets and batch_targets(batch) is not None:
            loss = (1.0 - self.config.alpha) * self.task.loss_from(raw, batch) + self.config.alpha * soft
        for index, pair in enumerate(self.config.features):
            assert self.student_features is not None and self.teacher_features is not None
            student_feature = self.adapters[str(index)](self.student_features.outputs[pair.student])
            teacher_feature = self.teacher_features.outputs[pair.teacher]
            term = hint_loss if pair.kind == "hint" else attention_transfer_loss
            loss = loss + pair.weight * term(student_feature, teacher_feature)
        return loss

    def remove(self) -> None:
        for capture in (self.student_features, self.teacher_features):
            if capture is not None:
                capture.remove()


def _check_compatible(student: nn.Module, teacher: nn.Module, example: Any, config: DistillConfig) -> nn.ModuleDict:
    """Dry run on one batch: output shapes must agree; builds the feature adapters."""
    captures = (
        [FeatureCapture(student, [p.student for p in config.features], "student"), FeatureCapture(teacher, [p.teacher for p in config.features], "teacher")]
        if config.features
        else []
    )
    try:
        with eval_mode(student), eval_mode(teacher), torch.no_grad():
            student_out = output_tensor(call_model(student, example), "student output")
            teacher_out = output_tensor(call_model(teacher, example), "teacher output")
        if student_out.shape != teacher_out.shape:
            raise TorchslimError(
                f"teacher output {tuple(teacher_out.shape)} and student output {tuple(student_out.shape)} differ: "
                f"distillation needs outputs of the same shape (the same classes or embedding width)"
            )
        if config.loss == "kl" and class_axis(student_out).shape[-1] < 2:
            raise TorchslimError(
                f"distill: the outputs have shape {tuple(student_out.shape)}, one value per example: soft targets (loss 'kl') over a single "
                "output are always equal; use loss 'mse' (a regression output matched to the teacher's)"
            )
        adapters = nn.ModuleDict()
        for index, pair in enumerate(config.features):
            adapters[str(index)] = make_adapter(
                captures[0].outputs[pair.student], captures[1].outputs[pair.teacher], pair.kind, f"features[{index}] ({pair.student} -> {pair.teacher})"
            )
        return adapters.to(model_device(student))
    finally:
        for capture in captures:
            capture.remove()


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    config: DistillConfig | dict | None = None,
    task: str | Task | None = None,
    inplace: bool = False,
    progress: bool | str | None = None,
    start_epoch: int = 0,
    on_epoch: EpochHook | None = None,
    resume_state: dict[str, Any] | None = None,
) -> Result:
    """Train ``student`` (a copy, unless ``inplace``) to match ``teacher`` on ``data`` (anything
    ``torchslim.data.as_source`` takes; labels are used where the batches have them); the teacher is not changed.
    ``on_epoch``, ``start_epoch`` and ``resume_state`` checkpoint and resume between epochs as in ``fit`` (the
    state includes the feature adapters).

    Works as a recovery step too: pass a pruned or quantized model as the student and its uncompressed original as
    the teacher (masks stay in force while training). The report compares student and teacher by the ``task``'s
    metric (fidelity to the teacher for unlabeled data).
    """
    config = DistillConfig.coerce(config, where="distill")
    check_model(student, "distill (student)", float32=True, copies=not inplace)
    check_model(teacher, "distill (teacher)", float32=True)
    trained = student if inplace else copy_model(student)
    source = as_source(data, trained)
    resolved = resolve_task(task, source, teacher)
    adapters = _check_compatible(trained, teacher, move_to(source.example(2), model_device(trained)), config)
    cache = None
    if config.cache_teacher:
        if not isinstance(source, DatasetSource):
            raise ConfigError("cache_teacher holds the outputs of an in-memory dataset's training split; this data is a loader")
        if source.dataset.augment is not None:
            raise ConfigError("cache_teacher needs fixed training data, but this dataset augments its batches")
        cache = _TeacherCache(teacher, source.dataset)
    loss = _DistillLoss(teacher, config, adapters, cache, resolved, trained)
    optimizer = make_optimizer(list(trained.parameters()) + list(adapters.parameters()), config.train)
    if resume_state is not None and "adapters" in resume_state:
        try:
            adapters.load_state_dict(resume_state["adapters"])
        except (RuntimeError, TypeError, KeyError) as error:
            raise TorchslimError(f"distill: the saved feature adapters do not fit this run ({error})") from None

    def epoch_done(epoch: int, model: nn.Module, state: dict[str, Any]) -> None:
        if on_epoch is not None:
            on_epoch(epoch, model, {**state, "adapters": dict(adapters.state_dict())})

    try:
        with eval_mode(teacher):
            history = fit(
                trained,
                cache.data if cache is not None else source,
                config.train.replace(eval_every_epoch=False),
                task=resolved,
                loss=loss,
                optimizer=optimizer,
                progress=progress,
                label="distill",
                evaluate_at_end=False,
                start_epoch=start_epoch,
                on_epoch=epoch_done,
                resume_state=resume_state,
            )
    finally:
        loss.remove()
    final = evaluate_source(trained, source, resolved)
    teacher_metrics = evaluate_source(teacher, source, resolved)
    metrics: dict[str, Any] = {
        **final,
        **{f"teacher_{key}": value for key, value in teacher_metrics.items() if key in (resolved.metric, "error", "accuracy")},
        "parameters": count_parameters(trained),
        "nonzeros": count_nonzeros(trained),
        "teacher_parameters": count_parameters(teacher),
        "teacher_calls": loss.teacher_calls,
        "train_seconds": history.seconds,
    }
    if not source.separate_eval:  # without evaluation data apart, the metrics are the training data's (as train says)
        metrics["evaluated_on"] = "training data"
    stage = Stage(
        name="distill",
        kind="distill",
        metrics=metrics,
        config=config.to_dict(),
        notes=[
            f"teacher outputs {'cached once' if cache is not None else 'computed once per batch'}; {len(config.features)} feature pair(s); task {resolved.name}"
        ],
    )
    report = Report.for_model(student, [stage])
    return Result(model=trained, report=report)
