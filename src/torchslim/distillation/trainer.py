"""``distill``: train a student from a teacher on outputs (soft targets at temperature T, or MSE) and on named
features (FitNets hints through learned adapters, or attention transfer), plus the task's own loss where the data
has labels.

Outputs may be tensors, tuples or Hugging Face ``ModelOutput``s (their logits, or hidden states for encoders), or a
dict of several outputs (two heads) under keys that name no prediction: each entry is matched to the teacher's, and
the terms add up. The output term is soft targets (``loss`` "kl") for classification and language modeling and the
outputs' mean squared error ("mse") for every other task (regression, fidelity, a custom task), unless ``loss`` names
one; positions the batch marks as padding (an ``attention_mask``, or the task's ignored label per position) are left
out of it. The teacher runs in eval mode under no_grad, once per batch; with ``cache_teacher`` its outputs over the (fixed,
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
from collections.abc import Mapping
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
from torchslim.tasks.classification import IGNORE, ClassificationTask
from torchslim.tasks.language import LanguageModelingTask
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
    """Distillation settings: ``loss`` "kl" (soft targets at temperature T, weight alpha), "mse" (outputs) or "auto"
    (kl for classification and language modeling, mse for any other task); ``features`` pairs for hint /
    attention-transfer terms; ``train`` the student's training run."""

    temperature: float = 4.0
    alpha: float = 0.9
    loss: str = "auto"
    features: tuple[FeaturePair, ...] = ()
    cache_teacher: bool = False
    train: TrainConfig = TrainConfig(epochs=10)

    def validate(self) -> None:
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.loss in ("auto", "kl", "mse"), f"loss must be 'auto', 'kl' or 'mse', got {self.loss!r}")
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


def output_loss_kind(config: DistillConfig, task: Task) -> str:
    """The output term ``config`` asks for: its ``loss``, or for "auto" soft targets ("kl") where the task scores class
    logits (classification, language modeling) and the outputs' mean squared error ("mse") for any other task: a
    softmax would ignore a shift of a regression output, or of an image's pixels, and learn it only up to that."""
    if config.loss != "auto":
        return config.loss
    return "kl" if isinstance(task, (ClassificationTask, LanguageModelingTask)) else "mse"


def distilled_outputs(output: Any, where: str) -> dict[str, torch.Tensor]:
    """The outputs distillation matches, by key: the one a task scores (see ``output_tensor``, under the key ""), or
    every floating-point tensor of a plain dict whose keys name no prediction (a model of two heads)."""
    try:
        return {"": output_tensor(output, where)}
    except TorchslimError:
        entries = (
            {str(key): value for key, value in output.items() if isinstance(value, torch.Tensor) and value.is_floating_point()}
            if isinstance(output, Mapping)
            else {}
        )
        if not entries:
            raise
        return entries


def kept_positions(output: torch.Tensor, attention_mask: Any, batch: Any, task: Task) -> torch.Tensor | None:
    """Per position of a sequence or dense output (its shape less the class axis), whether it is real: the batch's
    ``attention_mask``, or for classification a label that is not ignored (padded tokens, unlabeled pixels).
    None: every position counts (an output of one row per example, or nothing that marks padding)."""
    if output.dim() < 3:
        return None
    positions = tuple(class_axis(output).shape[:-1])
    if isinstance(attention_mask, torch.Tensor) and tuple(attention_mask.shape) == positions:
        return attention_mask.to(output.device) != 0
    targets = batch_targets(batch) if isinstance(task, ClassificationTask) else None
    if isinstance(targets, torch.Tensor) and tuple(targets.shape) == positions and not targets.is_floating_point():
        targets = targets.to(output.device)
        return (targets != IGNORE) & (targets != task.ignore_index)  # type: ignore[attr-defined]
    return None


def output_term(kind: str, student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """The output term of one output: soft targets ("kl") or mean squared error ("mse"), over the ``keep`` positions."""
    if keep is not None:
        student, teacher = class_axis(student)[keep], class_axis(teacher)[keep]
        if not student.numel():
            return student.sum()  # a batch of padding alone: nothing to match (zero, with a gradient path)
    if kind == "kl":
        return kl_soft_targets(student, teacher, temperature)
    return torch.nn.functional.mse_loss(student.float(), teacher.float().detach())


class _DistillLoss:
    """The loss for ``fit``: the output term against the teacher (run once per batch, or cached), the task's loss on
    labels weighted by 1 - alpha where the batch has labels, plus feature terms."""

    def __init__(self, teacher: nn.Module, config: DistillConfig, adapters: nn.ModuleDict, cache: _TeacherCache | None, task: Task, student: nn.Module) -> None:
        self.teacher, self.config, self.adapters, self.cache, self.task = teacher, config, adapters, cache, task
        self.student_features = FeatureCapture(student, [p.student for p in config.features], "student") if config.features else None
        self.teacher_features = FeatureCapture(teacher, [p.teacher for p in config.features], "teacher") if config.features else None
        self.teacher_calls = 0
        self.kind = output_loss_kind(config, task)

    def __call__(self, student: nn.Module, batch: Any) -> torch.Tensor:
        batch = move_to(batch, model_device(student))
        args, kwargs = model_inputs(batch, student)
        raw = student(*args, **kwargs)
        outputs = distilled_outputs(raw, "student output")
        if self.cache is not None:
            indices = batch_targets(batch).cpu()
            teacher_outputs = {"": self.cache.logits[indices].to(outputs[""].device)}
            batch = (args[0], self.cache.labels[indices].to(outputs[""].device))
        else:
            with torch.no_grad():
                taught, named = model_inputs(batch, self.teacher)  # each model by its own signature
                teacher_outputs = distilled_outputs(self.teacher(*taught, **named), "teacher output")
            self.teacher_calls += 1
        soft = sum(
            (
                output_term(
                    self.kind, value, teacher_outputs[key], kept_positions(value, kwargs.get("attention_mask"), batch, self.task), self.config.temperature
                )
                for key, value in outputs.items()
            ),
            torch.zeros((), device=next(iter(outputs.values())).device),
        )
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


def _check_compatible(student: nn.Module, teacher: nn.Module, example: Any, kind: str, config: DistillConfig) -> tuple[nn.ModuleDict, list[str]]:
    """Dry run on one batch: the outputs must agree in keys and shapes; builds the feature adapters. Returns them and
    the keys of the outputs matched ("" for a model's one scored output)."""
    captures = (
        [FeatureCapture(student, [p.student for p in config.features], "student"), FeatureCapture(teacher, [p.teacher for p in config.features], "teacher")]
        if config.features
        else []
    )
    try:
        with eval_mode(student), eval_mode(teacher), torch.no_grad():
            student_outs = distilled_outputs(call_model(student, example), "student output")
            teacher_outs = distilled_outputs(call_model(teacher, example), "teacher output")
        if sorted(student_outs) != sorted(teacher_outs):
            raise TorchslimError(
                f"distill: the student returns the outputs {sorted(student_outs)} and the teacher {sorted(teacher_outs)}: each output is matched to the "
                "teacher's of the same key, so both must return the same keys"
            )
        for key, student_out in student_outs.items():
            teacher_out, named = teacher_outs[key], f" {key!r}" if key else ""
            if student_out.shape != teacher_out.shape:
                raise TorchslimError(
                    f"teacher output{named} {tuple(teacher_out.shape)} and student output{named} {tuple(student_out.shape)} differ: "
                    f"distillation needs outputs of the same shape (the same classes or embedding width)"
                )
            if kind == "kl" and class_axis(student_out).shape[-1] < 2:
                raise TorchslimError(
                    f"distill: the output{named} has shape {tuple(student_out.shape)}, one value per example: soft targets (loss 'kl') over a single "
                    "output are always equal; use loss 'mse' (a regression output matched to the teacher's)"
                )
        adapters = nn.ModuleDict()
        for index, pair in enumerate(config.features):
            adapters[str(index)] = make_adapter(
                captures[0].outputs[pair.student], captures[1].outputs[pair.teacher], pair.kind, f"features[{index}] ({pair.student} -> {pair.teacher})"
            )
        return adapters.to(model_device(student)), list(student_outs)
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
    kind = output_loss_kind(config, resolved)
    adapters, keys = _check_compatible(trained, teacher, move_to(source.example(2), model_device(trained)), kind, config)
    cache = None
    if config.cache_teacher:
        if keys != [""]:
            raise ConfigError(f"cache_teacher holds one output per example; these models return {len(keys)} ({', '.join(map(repr, keys))})")
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
            f"teacher outputs {'cached once' if cache is not None else 'computed once per batch'}; {len(config.features)} feature pair(s); "
            f"task {resolved.name}",
            f"output term: {'soft targets (kl) at temperature ' + format(config.temperature, 'g') if kind == 'kl' else 'mean squared error (mse)'}"
            + (f" on each of {', '.join(map(repr, keys))}, added up" if keys != [""] else "")
            + (" (loss 'auto' for this task)" if config.loss == "auto" else ""),
        ],
    )
    report = Report.for_model(student, [stage])
    return Result(model=trained, report=report)
