"""Run a recipe: each stage in order, an evaluation after every stage, a checkpoint after every stage (and every
step inside a multi-step stage).

``compress(model, recipe, data)`` never changes the model it is given. The report holds, per stage: the task's
metrics on the evaluation data (accuracy and error for classification, perplexity for language models, cosine
similarity to the original for unlabeled data), parameters and non-zeros (quantized weights counted as the weights
they stand for), MACs, bytes and the compression ratio against dense fp32, measured latency (eager, batch 1; the
engine's, where a stage produced one) and the stage's wall time, plus per-layer rows (weights and channels kept,
bits, MACs) and histograms of the largest layers' weights.

Latencies in one report are comparable: every stage's model is kept and all are timed together at the end of the
run, in interleaved rounds (same threads, same load), not each as its stage finishes.

Bytes are what the model would take on disk at that point: dense fp32 for the original; for later stages the
.tslim file with fixed-width codes (sparse relative indices and packed codebook indices, no entropy coding), or
the artifact a stage wrote (the entropy-coded .tslim after ``encode``, the ONNX file after an int8 stage). So the
three ratios of Deep Compression's Table 1 (pruning, +quantization, +Huffman coding) read off one report.

The runner knows no stage kind: each is a handler registered in ``pipeline.stages``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.codec.reader import inspect_tslim
from torchslim.codec.tslim import encode_model, save_tslim
from torchslim.core.checks import check_model
from torchslim.core.copying import copy_model
from torchslim.core.environment import environment
from torchslim.core.errors import TorchslimError
from torchslim.core.files import refuse_overwrite
from torchslim.core.report import Report, Result, Stage
from torchslim.core.spec import sizing_spec
from torchslim.data.sources import DataSource, as_source
from torchslim.io.modelfile import file_spec
from torchslim.measure.counts import fp32_weight_bytes
from torchslim.measure.latency import interleaved_latency, percentile
from torchslim.measure.layers import histogram_ranges, largest_layers, layer_rows, weight_histograms
from torchslim.measure.profile import measure_model
from torchslim.pipeline.checkpoints import Checkpoint
from torchslim.pipeline.recipe import STAGES, Recipe, RecipeStage, load_recipe
from torchslim.pipeline.stages import EncodeConfig, StageContext, StageOutcome
from torchslim.pruning.apply import make_permanent
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.evaluate import evaluate_source
from torchslim.train.progress import stage as progress_stage


class CompressInterrupted(TorchslimError):
    """A run stopped by Ctrl-C; the message says where its last checkpoint is."""


@dataclasses.dataclass
class CompressResult(Result):
    """The compressed model (the int8 engine, where the recipe ends in one: an ONNX Runtime session or a compiled
    PT2E model), the per-stage report, the recipe, files a stage wrote (e.g. ONNX), and ``float_model``: the float
    model the engine was made from (the compressed model itself where there is no engine)."""

    recipe: Recipe | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    float_model: nn.Module | None = None

    def save(self, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """As ``Result.save``; a ``.tslim`` file is written with the recipe's encode settings and its name in the
        file's metadata."""
        path = Path(path)
        if path.suffix == ".tslim" and self.float_model is not None and self.model is not self.float_model:
            raise TorchslimError(
                f"{path}: the recipe ends in an int8 engine ({type(self.model).__name__}), which a .tslim file does not hold: save it as "
                ".onnx (an ONNX Runtime engine), export a PT2E model with ts.export(result.model, 'pt2', example), or save "
                "result.float_model, the float model it was made from"
            )
        if path.suffix != ".tslim":
            return super().save(path, overwrite=overwrite)
        report_path = path.with_suffix(path.suffix + ".report.json")
        refuse_overwrite(report_path, overwrite)
        encode = [s.config for s in (self.recipe.stages if self.recipe else ()) if isinstance(s.config, EncodeConfig)]
        settings = encode[-1] if encode else EncodeConfig()
        save_tslim(
            self.model,
            path,
            coders=settings.coders,
            index_bits=settings.index_bits,
            overwrite=overwrite,
            metadata=tslim_metadata(self.recipe, [s.name for s in self.report.stages]),
        )
        info = inspect_tslim(path)
        self.report.artifacts["tslim"] = {key: info[key] for key in ("bytes", "header_bytes", "tensors")} | {"file": path.name}
        self.report.save(report_path)
        return path


def stage_name(index: int, stage: RecipeStage) -> str:
    """A recipe stage's name in the report (and in its .tslim file's metadata): "2 prune"."""
    return f"{index} {stage.kind}"


def tslim_metadata(recipe: Recipe | None, stages: list[str]) -> dict[str, Any]:
    """What a recipe's .tslim file records beside the model (the encode stage measures the file with it)."""
    return {"recipe": recipe.name if recipe else None, "stages": stages}


def _check_same_data(original: nn.Module, source: Any, task: Any, report: Report, folder: Path) -> None:
    """A resumed run must see the data it started on: the original model is evaluated again, and its metric and the
    examples it was measured on must be the checkpoint's baseline (a report of two datasets reads as one run)."""
    recorded = report.stages[0].metrics if report.stages else {}
    now = evaluate_source(original, source, task)
    keys = [key for key in ("examples", task.metric) if key in recorded and key in now]
    differ = [key for key in keys if not math.isclose(float(now[key]), float(recorded[key]), rel_tol=1e-4, abs_tol=1e-9)]
    if differ:
        shown = ", ".join(f"{key} {recorded[key]:.6g} then, {now[key]:.6g} now" for key in differ)
        raise TorchslimError(f"{folder}: the checkpointed run started on other data (the original model's {shown}); resume with the same data (--data)")


def measure_stage(
    model: nn.Module, source: DataSource, task: Task, outcome: StageOutcome | None, baseline_bytes: int | None, latency: bool = True, threads: int | None = 2
) -> dict[str, Any]:
    """The numbers recorded after a stage: the task's metrics of what runs (and the name of its own, ``task_metric``) (the engine a stage produced, or the
    model), counts of the model (``measure.measure_model``), the bytes it would take (or that the stage wrote), and
    the ratio against the dense baseline."""
    engine = outcome.engine if outcome is not None and outcome.engine is not None else model
    metrics: dict[str, Any] = dict(evaluate_source(engine, source, task))
    metrics["task_metric"] = task.metric  # the report's headline where it is a user's own metric
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


# Models above this many fp32 weight bytes are timed as each stage finishes instead of kept for the final rounds.
KEEP_FOR_TIMING = 1 << 30


def describe_layers(stage: Stage, model: nn.Module, example: Any, ranges: dict[str, float]) -> None:
    """Per-layer rows and weight histograms of the model after ``stage``; ``sparse_macs`` (the MACs the non-zeros
    alone would need) joins the stage's metrics when it differs from the MACs that execute."""
    stage.layers = layer_rows(model, example)
    stage.histograms = weight_histograms(model, ranges)
    # what the rows' zeros save, off the MACs that execute: modules with no row (an nn.MultiheadAttention's products,
    # whose weight is no layer's) count in full
    saved = sum(row["macs"] - row["sparse_macs"] for row in stage.layers if "sparse_macs" in row and "macs" in row)
    if stage.layers and saved > 0 and "macs" in stage.metrics:
        stage.metrics["sparse_macs"] = stage.metrics["macs"] - saved


def time_stages(report: Report, models: dict[str, nn.Module], example: Any, threads: int | None, rounds: int = 7, runs: int = 15) -> None:
    """Time every kept stage model together (``interleaved_latency``): median, p10 and p90 of all its runs, batch 1.
    A stage whose model was not kept (finished before a resumed run began) is named in a note."""
    samples = interleaved_latency(models, example, batch_sizes=(1,), rounds=rounds, runs=runs, warmup=3, threads=threads)
    for stage in report.stages:
        stage.metrics.pop("latency_median_ms", None)
        if stage.name not in samples:
            stage.notes.append("latency not measured: this stage finished before the run was resumed")
            continue
        values = sorted(v for per_round in samples[stage.name][1] for v in per_round)
        stage.metrics.update(
            latency_median_ms=percentile(values, 0.5),
            latency_p10_ms=percentile(values, 0.1),
            latency_p90_ms=percentile(values, 0.9),
            latency_runs=len(values),
        )


def compress(
    model: nn.Module,
    recipe: str | Path | Mapping[str, Any] | Recipe,
    data: Any,
    task: str | Task | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    export_path: str | os.PathLike[str] | None = None,
    latency: bool = True,
    threads: int | None = 2,
    progress: bool | str | None = None,
    trust_factory: bool | str = False,
    on_stage: Callable[[Stage], None] | None = None,
    overwrite: bool = False,
) -> CompressResult:
    """Run ``recipe`` (a built-in name, a YAML path, a mapping or a Recipe) on a copy of ``model``, with ``data``
    (anything ``torchslim.data.as_source`` takes) and its ``task`` (chosen from the data when not named).

    With ``checkpoint=folder`` the run saves after each stage, each pruning step and each training epoch (with the
    optimizer's state, so a resumed run trains as the uninterrupted one would); ``resume=True`` continues
    after the last of them (the recipe must be the same); Ctrl-C raises ``CompressInterrupted`` naming the
    checkpoint. ``export_path`` is the ONNX file of a stage that writes one (an existing file there is refused
    before any work unless ``overwrite``). ``trust_factory``: True, or the one
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
    threads = threads if threads is not None else torch.get_num_threads()
    check_model(model, "compress", float32=True, copies=True)
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
    if any(stage.writes_onnx for stage in recipe.stages):
        if export_path is None:
            raise TorchslimError(f"recipe {recipe.name!r} writes an ONNX file: give export_path (CLI: --out model.onnx)")
        refuse_overwrite(export_path, overwrite)
    original = copy_model(model).eval()
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
    if resumed and store is not None:
        _check_same_data(original, source, resolved, report, store.folder)
    example = source.example(1)
    ranges = histogram_ranges(original, largest_layers(layer_rows(original)))
    keep = latency and fp32_weight_bytes(original) <= KEEP_FOR_TIMING  # every stage's model kept for the final timing
    if not resumed:
        current = copy_model(model)
        report = Report.for_model(model)
        baseline = Stage(name="baseline", kind="baseline", metrics=measure_stage(current, source, resolved, None, None, latency and not keep, threads))
        describe_layers(baseline, current, example, ranges)
        report.stages.append(baseline)
        if on_stage:
            on_stage(baseline)
    report.recipe, report.environment = recipe.to_dict(), environment()
    baseline_bytes = report.stages[0].metrics["stored_bytes"]
    timed: dict[str, nn.Module] = {"baseline": original} if keep else {}
    files: dict[str, Path] = {}
    engine: nn.Module | None = None  # what runs the last stage's model, where that stage made an engine
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
                tslim_metadata=tslim_metadata(recipe, ["baseline"] + [stage_name(i, s) for i, s in enumerate(recipe.stages, start=1)]),
            ),
        )
        files.update(outcome.files)
        engine = outcome.engine
        record = Stage(name=stage_name(index, stage), kind=stage.kind, notes=outcome.notes, execution=outcome.execution, config=stage.to_dict()[stage.kind])
        record.metrics = measure_stage(current, source, resolved, outcome, baseline_bytes, latency and not keep, threads)
        record.metrics["seconds"] = round(outcome.seconds, 2)
        describe_layers(record, current, example, ranges)
        if keep:
            timed[record.name] = outcome.engine if outcome.engine is not None else copy_model(current)
        report.stages.append(record)
        if on_stage:
            on_stage(record)
        if store is not None:
            store.save(recipe, report, current, original, completed=index)
    if keep:
        time_stages(report, timed, example, threads)
    elif latency:
        report.stages[0].notes.append(
            f"latencies measured as each stage finished: the model is above {KEEP_FOR_TIMING >> 30} GiB, so stage copies were not kept"
        )
    make_permanent(current)
    current.eval()
    return CompressResult(model=engine if engine is not None else current, report=report, recipe=recipe, files=files, float_model=current)


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
        if store is None and index > 1:
            done_stages = f"stages 1 to {index - 1}" if index > 2 else "stage 1"
            return f"{done_stages} had completed, but no checkpoint folder was given (checkpoint=...), so nothing was kept"
        return "no stage had completed, so no checkpoint was written"

    began = time.perf_counter()
    try:
        with progress_stage(stage_name(index, stage)):
            outcome = STAGES.get(stage.kind).run(context, stage)
    except KeyboardInterrupt:
        raise CompressInterrupted(f"interrupted during stage {index} ({stage.kind}); {kept()}") from None
    except TorchslimError as error:  # e.g. the loss became NaN: the last good checkpoint stays
        error.args = (f"stage {index} ({stage.kind}) stopped: {error}; {kept()}",)
        raise
    outcome.seconds = time.perf_counter() - began
    return outcome.model, outcome


__all__ = ["CompressInterrupted", "CompressResult", "compress", "measure_stage"]
