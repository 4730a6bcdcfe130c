"""Run a recipe: each stage in order, an evaluation after every stage, a checkpoint after every stage (and every
step inside a multi-step stage).

``compress(model, recipe, data)`` never changes the model it is given. The report holds, per stage: the task's
metrics on the evaluation data (accuracy and error for classification, perplexity for language models, cosine
similarity to the original for unlabeled data), parameters and non-zeros (quantized weights counted as the weights
they stand for), MACs, bytes and the compression ratio against dense fp32, measured latency (eager, batch 1; the
engine's, where a stage produced one) and the stage's wall time.

Bytes are what the model would take on disk at that point: dense fp32 for the original; for later stages the
.tslim file with fixed-width codes (sparse relative indices and packed codebook indices, no entropy coding), or
the artifact a stage wrote (the entropy-coded .tslim after ``encode``, the ONNX file after an int8 stage). So the
three ratios of Deep Compression's Table 1 (pruning, +quantization, +Huffman coding) read off one report.

The runner knows no stage kind: each is a handler registered in ``pipeline.stages``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.codec.tslim import encode_model, save_tslim
from torchslim.core.checks import check_model
from torchslim.core.errors import TorchslimError
from torchslim.core.files import refuse_overwrite
from torchslim.core.report import Report, Result, Stage
from torchslim.core.spec import sizing_spec
from torchslim.data.sources import DataSource, as_source
from torchslim.io.modelfile import file_spec
from torchslim.measure.counts import fp32_weight_bytes
from torchslim.measure.profile import measure_model
from torchslim.pipeline.checkpoints import Checkpoint
from torchslim.pipeline.recipe import STAGES, Recipe, RecipeStage, load_recipe
from torchslim.pipeline.stages import EncodeConfig, StageContext, StageOutcome
from torchslim.pruning.apply import make_permanent
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.evaluate import evaluate_source


class CompressInterrupted(TorchslimError):
    """A run stopped by Ctrl-C; the message says where its last checkpoint is."""


@dataclasses.dataclass
class CompressResult(Result):
    """The compressed model, the per-stage report, the recipe, and files a stage wrote (e.g. ONNX)."""

    recipe: Recipe | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)

    def save(self, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """As ``Result.save``; a ``.tslim`` file is written with the recipe's encode settings and its name in the
        file's metadata."""
        path = Path(path)
        if path.suffix != ".tslim":
            return super().save(path, overwrite=overwrite)
        report_path = path.with_suffix(path.suffix + ".report.json")
        refuse_overwrite(report_path, overwrite)
        encode = [s.config for s in (self.recipe.stages if self.recipe else ()) if isinstance(s.config, EncodeConfig)]
        coders = encode[-1].coders if encode else EncodeConfig().coders
        save_tslim(
            self.model,
            path,
            coders=coders,
            overwrite=overwrite,
            metadata={"recipe": self.recipe.name if self.recipe else None, "stages": [s.name for s in self.report.stages]},
        )
        self.report.save(report_path)
        return path


def measure_stage(
    model: nn.Module, source: DataSource, task: Task, outcome: StageOutcome | None, baseline_bytes: int | None, latency: bool = True, threads: int = 2
) -> dict[str, Any]:
    """The numbers recorded after a stage: the task's metrics of what runs (the engine a stage produced, or the
    model), counts of the model (``measure.measure_model``), the bytes it would take (or that the stage wrote), and
    the ratio against the dense baseline."""
    engine = outcome.engine if outcome is not None and outcome.engine is not None else model
    metrics: dict[str, Any] = dict(evaluate_source(engine, source, task))
    metrics.update(measure_model(model, source.example(1), engine=engine, latency=latency, threads=threads))
    if outcome is None:
        size, how = fp32_weight_bytes(model), "dense fp32"
    elif outcome.stored is not None:
        size, how = outcome.stored
    else:
        size, how = len(encode_model(model, coders=("packed",), spec=sizing_spec(model))), ".tslim, fixed-width codes"
    metrics["stored_bytes"], metrics["bytes_as"] = size, how
    metrics["compression"] = (baseline_bytes or size) / size
    return metrics


def compress(
    model: nn.Module,
    recipe: str | Path | Mapping[str, Any] | Recipe,
    data: Any,
    task: str | Task | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    export_path: str | os.PathLike[str] | None = None,
    latency: bool = True,
    threads: int = 2,
    progress: bool | str | None = None,
    trust_factory: bool | str = False,
    on_stage: Callable[[Stage], None] | None = None,
) -> CompressResult:
    """Run ``recipe`` (a built-in name, a YAML path, a mapping or a Recipe) on a copy of ``model``, with ``data``
    (anything ``torchslim.data.as_source`` takes) and its ``task`` (chosen from the data when not named).

    With ``checkpoint=folder`` the run saves after each stage, each pruning step and each training epoch (with the
    optimizer's state, so a resumed run trains as the uninterrupted one would); ``resume=True`` continues
    after the last of them (the recipe must be the same); Ctrl-C raises ``CompressInterrupted`` naming the
    checkpoint. ``export_path`` is the ONNX file of a stage that writes one. ``trust_factory``: True, or the one
    import path a checkpoint's model may be built from.

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> model = ts.train(ts.models.create_for("lenet-300-100", data), data, {"epochs": 10}, progress=False).model
        >>> recipe = {"name": "demo", "stages": [{"prune": {"sparsity": 0.8}}, {"quantize": {}}, {"encode": {}}]}
        >>> result = compress(model, recipe, data, latency=False, progress=False)
        >>> [s.name for s in result.report.stages]
        ['baseline', '1 prune', '2 quantize', '3 encode']
        >>> result.report.stages[-1].metrics["compression"] > 10
        True
    """
    recipe = load_recipe(recipe)
    check_model(model, "compress", float32=True)
    source = as_source(data, model)
    store = Checkpoint(checkpoint) if checkpoint is not None else None
    if store is not None and not resume and store.status() is not None:
        status = store.status()
        raise TorchslimError(
            f"{store.folder} holds a checkpoint of recipe {status['recipe']!r} ({status['completed']} of "
            f"{status['stages']} stages done); resume it (--resume) or remove the folder"
        )
    if resume and store is None:
        raise TorchslimError("resume needs the checkpoint folder of the run to continue")
    if any(stage.writes_onnx for stage in recipe.stages) and export_path is None:
        raise TorchslimError(f"recipe {recipe.name!r} writes an ONNX file: give export_path (CLI: --out model.onnx)")
    original = copy.deepcopy(model).eval()
    completed, step = 0, 0
    training: dict[str, Any] | None = None
    resumed = resume and store is not None and store.status() is not None
    if resumed and store is not None:
        current, report, completed, step, training = store.load(recipe, trust_factory)
        original = store.original(trust_factory).eval()
    elif store is not None:
        file_spec(original, f"checkpoint {store.folder}")  # a model checkpoints cannot rebuild is named now, not after a stage
        store.check()
    resolved = resolve_task(task, source, original)
    if not resumed:
        current = copy.deepcopy(model)
        report = Report.for_model(model)
        baseline = Stage(name="baseline", kind="baseline", metrics=measure_stage(current, source, resolved, None, None, latency, threads))
        report.stages.append(baseline)
        if on_stage:
            on_stage(baseline)
    baseline_bytes = report.stages[0].metrics["stored_bytes"]
    files: dict[str, Path] = {}
    for index, stage in enumerate(recipe.stages, start=1):
        if index <= completed:
            continue
        current, outcome = _run(
            store,
            recipe,
            report,
            original,
            index,
            stage,
            StageContext(
                model=current,
                source=source,
                task=resolved,
                original=original,
                threads=threads,
                progress=progress,
                trust_factory=trust_factory,
                export_path=Path(export_path) if export_path is not None else None,
                resume_step=step if index == completed + 1 else 0,
                resume_training=training if index == completed + 1 else None,
            ),
        )
        files.update(outcome.files)
        record = Stage(name=f"{index} {stage.kind}", kind=stage.kind, notes=outcome.notes, execution=outcome.execution, config=stage.to_dict()[stage.kind])
        record.metrics = measure_stage(current, source, resolved, outcome, baseline_bytes, latency, threads)
        record.metrics["seconds"] = round(outcome.seconds, 2)
        report.stages.append(record)
        if on_stage:
            on_stage(record)
        if store is not None:
            store.save(recipe, report, current, original, completed=index)
    make_permanent(current)
    current.eval()
    return CompressResult(model=current, report=report, recipe=recipe, files=files)


def _run(
    store: Checkpoint | None, recipe: Recipe, report: Report, original: nn.Module, index: int, stage: RecipeStage, context: StageContext
) -> tuple[nn.Module, StageOutcome]:
    """One stage, timed, with a checkpoint after each of its steps; Ctrl-C becomes ``CompressInterrupted``."""
    done = {"step": context.resume_step}
    if store is not None:

        def on_step(step: int, model: nn.Module, training: dict[str, Any] | None = None) -> None:
            store.save(recipe, report, model, original, completed=index - 1, step=step + 1, training=training)
            done["step"] = step + 1

        context.on_step = on_step

    def kept() -> str:
        if store is not None and (index > 1 or done["step"] > 0):
            parts = ([f"stage {index - 1}"] if index > 1 else []) + ([f"step {done['step']} of stage {index}"] if done["step"] else [])
            return f"the checkpoint after {' and '.join(parts)} is in {store.folder}; run again with --resume to continue"
        return "no stage had completed, so no checkpoint was written"

    began = time.perf_counter()
    try:
        outcome = STAGES.get(stage.kind).run(context, stage)
    except KeyboardInterrupt:
        raise CompressInterrupted(f"interrupted during stage {index} ({stage.kind}); {kept()}") from None
    except TorchslimError as error:  # e.g. the loss became NaN: the last good checkpoint stays
        error.args = (f"stage {index} ({stage.kind}) stopped: {error}; {kept()}",)
        raise
    outcome.seconds = time.perf_counter() - began
    return outcome.model, outcome


__all__ = ["CompressInterrupted", "CompressResult", "compress", "measure_stage"]
