"""The stage kinds recipes are made of, each a thin call of its public verb.

A handler ``run(context, stage) -> StageOutcome`` gets the model as it stands (``context.model``, changed in place or
replaced), the data source, the task, the original model and the run's settings, and returns the model after the
stage, what executes it (an engine such as an ONNX Runtime session, where the stage produced one), notes, how it
executes, and the bytes of the artifact it wrote, where it wrote one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.codec.entropy import CODERS
from torchslim.codec.tslim import encode_model
from torchslim.compression.activations import ActivationConfig, substitute_activations
from torchslim.compression.depth import DepthConfig, remove_blocks
from torchslim.compression.factorize import FactorizeConfig, factorize
from torchslim.compression.width import NarrowConfig, narrow
from torchslim.core.config import Config, check
from torchslim.core.copying import copy_model
from torchslim.core.spec import sizing_spec
from torchslim.data.sources import DataSource
from torchslim.distillation.trainer import DistillConfig, distill
from torchslim.export.onnx import OnnxModule
from torchslim.io.modelfile import load_model
from torchslim.pipeline.recipe import RecipeStage, register_stage
from torchslim.pruning.apply import make_permanent
from torchslim.pruning.structured import StructuredConfig, prune_channels
from torchslim.pruning.unstructured import PruneConfig, prune
from torchslim.pruning.variational import VariationalConfig, sparsify_variational
from torchslim.quantization.api import NativeInt8Config, method_of, quantize, quantize_config
from torchslim.quantization.onnx_notes import checked_float_export
from torchslim.quantization.onnx_static import OnnxInt8Config
from torchslim.tasks.base import Task
from torchslim.train.fit import TrainConfig, fit


@dataclasses.dataclass
class StageContext:
    """What a stage handler works with."""

    model: nn.Module
    source: DataSource
    task: Task
    original: nn.Module
    threads: int = 2
    progress: bool | str | None = None
    trust_factory: bool | str = False
    export_path: Path | None = None
    resume_step: int = 0
    resume_training: dict[str, Any] | None = None
    on_step: Callable[..., None] | None = None
    tslim_metadata: dict[str, Any] | None = None  # what the recipe's .tslim file records beside the model

    def verb_options(self, stage: RecipeStage) -> dict[str, Any]:
        """The keyword arguments every verb a stage calls takes: data, task, the stage's fine-tuning, progress."""
        return {"data": self.source, "task": self.task, "finetune": stage.finetune, "progress": self.progress}


@dataclasses.dataclass
class StageOutcome:
    """The model after a stage, what runs it (``engine``, default the model), notes, how it executes, and the bytes
    of the artifact it wrote (``stored``: (bytes, what they are)), if any."""

    model: nn.Module
    notes: list[str]
    execution: str
    engine: nn.Module | None = None
    stored: tuple[int, str] | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0


@register_stage("prune", PruneConfig, finetune=True)
def run_prune(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Unstructured pruning, in the config's steps, fine-tuned after each step (torchslim.prune)."""
    assert isinstance(stage.config, PruneConfig)
    result = prune(context.model, stage.config, inplace=True, start_step=context.resume_step, on_step=context.on_step, **context.verb_options(stage))
    return StageOutcome(result.model, result.report.stages[0].notes, "eager, pruned weights masked to zero")


@register_stage("variational-dropout", VariationalConfig, finetune=True)
def run_variational(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Sparse variational dropout: the stage's finetune trains per-weight noise, the weights it made pure noise are
    masked (torchslim.pruning.sparsify_variational); each layer's sparsity is learned."""
    assert isinstance(stage.config, VariationalConfig)
    options = context.verb_options(stage)
    result = sparsify_variational(
        context.model, options["data"], stage.config, options["finetune"], options["task"], inplace=True, progress=options["progress"]
    )
    return StageOutcome(result.model, result.report.stages[0].notes, "eager, pruned weights masked to zero")


@register_stage("prune-channels", StructuredConfig, finetune=True)
def run_prune_channels(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Structured pruning: channels, neurons and heads removed, then fine-tuned (torchslim.prune_channels)."""
    assert isinstance(stage.config, StructuredConfig)
    make_permanent(context.model)
    result = prune_channels(context.model, stage.config, **context.verb_options(stage))
    metrics = result.report.stages[0].metrics
    notes = [
        f"MACs {metrics['macs_before']:,} -> {metrics['macs']:,} ({metrics['macs_ratio']:.2f}x fewer), "
        f"{metrics['groups_removed']} channel groups and {metrics['heads_removed']} heads removed"
    ] + result.report.stages[0].notes
    return StageOutcome(result.model, notes, "eager, smaller dense layers")


@register_stage("factorize", FactorizeConfig, finetune=True)
def run_factorize(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Low-rank factorization: Linear layers by SVD, convolutions by SVD or Tucker-2, then fine-tuned (torchslim.factorize)."""
    assert isinstance(stage.config, FactorizeConfig)
    make_permanent(context.model)
    result = factorize(context.model, stage.config, **context.verb_options(stage))
    metrics = result.report.stages[0].metrics
    summary = f"{metrics['layers_factorized']} layers factorized: parameters {metrics['parameters_before']:,} -> {metrics['parameters']:,}"
    if "macs" in metrics:
        summary += f", MACs {metrics['macs_before']:,} -> {metrics['macs']:,}"
    return StageOutcome(result.model, [summary] + result.report.stages[0].notes, "eager, factorized dense layers")


@register_stage("activations", ActivationConfig, finetune=True)
def run_activations(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Activation substitution: smooth activations by ReLU or their hard variants, then fine-tuned (torchslim.substitute_activations)."""
    assert isinstance(stage.config, ActivationConfig)
    result = substitute_activations(context.model, stage.config, threads=context.threads, **context.verb_options(stage))
    replaced = [f"{row['name']}: {row['before']} -> {row['after']}" for row in result.report.stages[0].layers]
    return StageOutcome(result.model, replaced + result.report.stages[0].notes, "eager")


@register_stage("depth", DepthConfig, finetune=True)
def run_depth(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Depth reduction: the residual blocks whose bypass raises the loss least removed, then fine-tuned (torchslim.remove_blocks)."""
    assert isinstance(stage.config, DepthConfig)
    make_permanent(context.model)
    result = remove_blocks(context.model, stage.config, **context.verb_options(stage))
    metrics = result.report.stages[0].metrics
    return StageOutcome(
        result.model, [f"removed {', '.join(metrics['removed'])} of {metrics['candidates']} blocks"] + result.report.stages[0].notes, "eager, blocks removed"
    )


@register_stage("narrow", NarrowConfig)
def run_narrow(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Width scaling: every coupled set of channels scaled by a multiplier, largest-norm channels kept (torchslim.narrow); follow with distill."""
    assert isinstance(stage.config, NarrowConfig)
    make_permanent(context.model)
    config = stage.config
    result = narrow(context.model, config, data=context.source)
    metrics = result.report.stages[0].metrics
    notes = [f"MACs {metrics['macs_before']:,} -> {metrics['macs']:,} ({metrics['macs_ratio']:.2f}x fewer)"] + result.report.stages[0].notes
    return StageOutcome(result.model, notes, "eager, smaller dense layers")


@register_stage("finetune", TrainConfig)
def run_finetune(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Training with every mask in force (torchslim.train)."""
    assert isinstance(stage.config, TrainConfig)
    history = fit(
        context.model,
        context.source,
        stage.config,
        task=context.task,
        progress=context.progress,
        label="finetune",
        evaluate_at_end=False,
        reference=context.original,
        start_epoch=context.resume_step,
        on_epoch=context.on_step,
        resume_state=context.resume_training,
    )
    return StageOutcome(context.model, [f"{len(history.epochs)} epochs, {history.seconds:.1f} s"], "eager")


def _engine_method(config: Config) -> bool:
    """Whether a quantization method hands back an engine (ONNX Runtime, compiled PT2E) instead of a model."""
    return method_of(config).engine(config)


def _onnx_method(config: Config) -> bool:
    return method_of(config).onnx(config)


@register_stage("quantize", quantize_config, finetune=True, terminal=_engine_method, writes_onnx=_onnx_method)
def run_quantize(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Quantization by any method (torchslim.quantize); weight-only stores codes, int8 methods produce an engine
    (then the stage must end the recipe)."""
    example = context.source.example(1)
    result = quantize(
        context.model,
        stage.config,
        inplace=True,
        example_input=example,
        path=context.export_path,
        threads=context.threads,
        overwrite=True,
        **context.verb_options(stage),
    )
    report = result.report.stages[0]
    if isinstance(result.model, OnnxModule):  # an engine: the float model stays for counting, the engine runs
        files = {"onnx": context.export_path} if context.export_path is not None else {}
        return StageOutcome(context.model, report.notes, report.execution, engine=result.model, stored=(len(result.model.onnx_bytes), "ONNX file"), files=files)
    if _engine_method(stage.config):  # compiled in memory: nothing written, the float model is what is stored
        return StageOutcome(context.model, report.notes, report.execution, engine=result.model)
    return StageOutcome(result.model, report.notes, report.execution)


@dataclasses.dataclass(frozen=True)
class DistillOptions(Config):
    """The distill stage's teacher: ``original`` (the model the recipe started from) or a saved model file."""

    teacher: str = "original"


@register_stage("distill", DistillConfig, options=DistillOptions)
def run_distill(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """Training against a teacher: the original model or a saved one (torchslim.distill)."""
    teacher_name = getattr(stage.options, "teacher", "original")
    teacher = context.original if teacher_name == "original" else load_model(teacher_name, trust_factory=context.trust_factory)
    assert isinstance(stage.config, DistillConfig)
    result = distill(
        context.model,
        teacher,
        context.source,
        stage.config,
        task=context.task,
        inplace=True,
        progress=context.progress,
        start_epoch=context.resume_step,
        on_epoch=context.on_step,
        resume_state=context.resume_training,
    )
    metrics = result.report.stages[0].metrics
    metric = context.task.metric
    return StageOutcome(
        context.model, [f"teacher {metric} {metrics.get('teacher_' + metric, float('nan')):.4g}, student {metric} {metrics[metric]:.4g}"], "eager"
    )


@dataclasses.dataclass(frozen=True)
class EncodeConfig(Config):
    """Write the model as a .tslim file: sparse relative indices and codebook codes, each stream coded with the
    smallest of ``coders`` (``packed`` fixed-width bits, ``huffman``, ``ans``)."""

    coders: tuple[str, ...] = CODERS
    index_bits: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)

    def validate(self) -> None:
        check(len(self.coders) > 0, "coders must name at least one coder")
        for coder in self.coders:
            check(coder in CODERS, f"unknown coder {coder!r}; valid: {', '.join(CODERS)}")
        check(len(self.index_bits) > 0 and all(1 <= b <= 16 for b in self.index_bits), f"index_bits must be between 1 and 16, got {list(self.index_bits)}")


@register_stage("encode", EncodeConfig, terminal=True)
def run_encode(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """The .tslim file: entropy-coded sparse indices and codes."""
    assert isinstance(stage.config, EncodeConfig)
    size = len(
        encode_model(
            context.model, coders=stage.config.coders, index_bits=stage.config.index_bits, spec=sizing_spec(context.model), metadata=context.tslim_metadata
        )
    )
    return StageOutcome(context.model, [], "eager (as rebuilt from .tslim)", stored=(size, ".tslim, entropy-coded"))


@dataclasses.dataclass(frozen=True)
class ExportConfig(Config):
    """Export to ONNX and run in ONNX Runtime: fp32 (``int8: null``) or int8 (``int8: {mode: static, ...}`` through
    ONNX Runtime's quantizer, or ``{method: native-int8, ...}`` for torchslim's own); the evaluation after this stage
    runs the exported file."""

    format: str = "onnx"
    int8: OnnxInt8Config | NativeInt8Config | None = None

    def validate(self) -> None:
        check(self.format == "onnx", f"format must be 'onnx', got {self.format!r}")


@register_stage("export", ExportConfig, terminal=True, writes_onnx=True)
def run_export(context: StageContext, stage: RecipeStage) -> StageOutcome:
    """An ONNX file (fp32, or int8 through torchslim.quantize) run by ONNX Runtime."""
    assert isinstance(stage.config, ExportConfig) and context.export_path is not None
    plain = make_permanent(copy_model(context.model))
    engine: nn.Module
    if stage.config.int8 is None:
        path, noted = checked_float_export(plain, context.source.example(1), context.export_path, "export stage: the fp32 ONNX file failed its check")
        engine = OnnxModule(path, threads=context.threads)
        notes = ["fp32 ONNX", *noted]
    else:
        result = quantize(
            plain,
            stage.config.int8,
            context.source,
            context.task,
            example_input=context.source.example(1),
            path=context.export_path,
            threads=context.threads,
            overwrite=True,
        )
        engine, notes = result.model, result.report.stages[0].notes
    notes = notes + [f"written to {context.export_path}"]
    return StageOutcome(
        context.model, notes, "ONNX Runtime", engine=engine, stored=(context.export_path.stat().st_size, "ONNX file"), files={"onnx": context.export_path}
    )


__all__ = ["DistillOptions", "EncodeConfig", "ExportConfig", "StageContext", "StageOutcome"]
