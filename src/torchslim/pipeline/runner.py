"""Run a recipe: each stage in order, an evaluation after every stage, a checkpoint after every stage.

``compress(model, recipe, data)`` never changes the model it is given. The report holds, per stage: accuracy and
error on the test split, parameters and non-zeros (quantized weights counted as the weights they stand for), MACs,
bytes and the compression ratio against dense fp32, measured latency (eager, batch 1) and the stage's wall time.

Bytes are what the model would take on disk at that point: dense fp32 for the original; for later stages the
.tslim file with fixed-width codes (sparse relative indices and packed codebook indices, no entropy coding), and
after ``encode`` the entropy-coded .tslim file itself. So the three ratios of Deep Compression's Table 1 (pruning,
+quantization, +Huffman coding) read off one report.

With ``checkpoint=folder`` the model and the report are saved after each stage; ``resume=True`` continues after
the last completed stage (the recipe must be the same), and an interrupted run (Ctrl-C) leaves the last
completed stage's checkpoint usable.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from torchslim.codec.tslim import encode_model, save_tslim
from torchslim.core.errors import TorchslimError
from torchslim.core.report import Report, Result, Stage, write_atomic
from torchslim.measure.counts import count_macs
from torchslim.pipeline.recipe import EncodeStage, ExportStage, Recipe, RecipeStage, load_recipe
from torchslim.pruning.apply import make_permanent, masks_of, set_mask
from torchslim.train.evaluate import evaluate

PROGRESS = "progress.json"


class CompressInterrupted(TorchslimError):
    """A run stopped by Ctrl-C; the message says where its last checkpoint is."""


@dataclasses.dataclass
class CompressResult(Result):
    """The compressed model, the per-stage report, the recipe, and files a stage wrote (e.g. ONNX)."""

    recipe: Recipe | None = None
    files: dict[str, Path] = dataclasses.field(default_factory=dict)

    def encode_settings(self) -> EncodeStage:
        stages = [s.config for s in (self.recipe.stages if self.recipe else ()) if s.kind == "encode"]
        return stages[-1] if stages else EncodeStage()

    def save(self, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """A ``.tslim`` path writes the compressed file (with the recipe's encode settings); any other path the
        safetensors model file. The report is written beside it as ``<path>.report.json``."""
        path = Path(path)
        if path.suffix != ".tslim":
            return super().save(path)
        settings = self.encode_settings()
        save_tslim(self.model, path, coders=settings.coders, overwrite=overwrite,
                   metadata={"recipe": self.recipe.name if self.recipe else None, "stages": [s.name for s in self.report.stages]})
        self.report.save(path.with_suffix(path.suffix + ".report.json"))
        return path


def logical_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the forward pass uses it, with weight-only quantized weights given back as the weight
    tensor they encode (their codebooks and scales are not counted as weights)."""
    from torchslim.measure.weights import effective_weights
    from torchslim.quantization.modules import QuantizedWeight

    out = effective_weights(model)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedWeight):
            for key in [k for k in out if k.startswith(f"{name}.")]:
                del out[key]
            parent = name.rpartition(".")[0]
            with torch.no_grad():
                out[f"{parent}.weight" if parent else "weight"] = module.weight().detach()
    return out


def _bytes(model: nn.Module, kind: str, encode: EncodeStage | None) -> tuple[int, str]:
    if kind == "baseline":
        return sum(t.numel() * 4 for t in logical_weights(model).values() if t.is_floating_point()), "dense fp32"
    if encode is not None:
        return len(encode_model(model, coders=encode.coders, index_bits=encode.index_bits)), ".tslim, entropy-coded"
    return len(encode_model(model, coders=("packed",))), ".tslim, fixed-width codes"


def measure_stage(model: nn.Module, data: Any, kind: str, baseline_bytes: int | None, encode: EncodeStage | None = None,
                  latency: bool = True, threads: int = 2, evaluate_limit: int | None = None, engine: nn.Module | None = None,
                  stored: tuple[int, str] | None = None) -> dict[str, Any]:
    """The numbers recorded after a stage. ``engine`` (e.g. an ONNX Runtime module) is what runs: accuracy and latency
    are measured on it, counts on ``model``; ``stored`` gives the bytes of a file the stage wrote."""
    from torchslim.measure.latency import measure_latency

    runner = engine if engine is not None else model
    metrics: dict[str, Any] = dict(evaluate(runner, data, limit=evaluate_limit))
    weights = logical_weights(model)
    metrics["parameters"] = sum(t.numel() for t in weights.values())
    metrics["nonzeros"] = sum(int(torch.count_nonzero(t)) for t in weights.values())
    example = data.example_input(1)
    metrics["macs"] = int(count_macs(model, example)["total"])
    size, how = stored if stored is not None else _bytes(model, kind, encode)
    metrics["stored_bytes"], metrics["bytes_as"] = size, how
    metrics["compression"] = (baseline_bytes or size) / size
    if latency:
        result = measure_latency(runner, example, batch_sizes=(1,), runs=30, warmup=5, threads=threads)[0]
        metrics["latency_median_ms"] = result.median_ms
    return metrics


# -- stages ------------------------------------------------------------------------------------------------------

def _prune(model: nn.Module, stage: Any, data: Any, context: dict[str, Any], progress: bool | None) -> list[str]:
    from torchslim.pruning.unstructured import PruneConfig, prune_in_place
    from torchslim.train.fit import fit

    notes = []
    for index, sparsity in enumerate(stage.sparsities):
        config = PruneConfig(method=stage.method, scope=stage.scope, sparsity=sparsity, layers=stage.layers)
        prune_in_place(model, config, data)
        note = f"sparsity {sparsity:.3f}: test error {100 * evaluate(model, data)['error']:.2f}% after pruning"
        if stage.finetune is not None:
            fit(model, data, stage.finetune.replace(seed=stage.finetune.seed + index), progress=progress)
            note += f", {100 * evaluate(model, data)['error']:.2f}% after fine-tuning"
        notes.append(note)
    return notes


def _prune_channels(model: nn.Module, stage: Any, data: Any, progress: bool | None) -> tuple[nn.Module, nn.Module, list[str], str]:
    from torchslim.pruning.structured import prune_channels
    from torchslim.train.fit import fit

    make_permanent(model)
    result = prune_channels(model, stage.structured_config(), data=data)
    metrics = result.report.stages[0].metrics
    notes = [f"{metrics['groups_removed']} channel groups and {metrics['heads_removed']} heads removed: MACs "
             f"{metrics['macs_before']:,} -> {metrics['macs']:,} ({metrics['macs_ratio']:.2f}x fewer)"]
    notes += result.report.stages[0].notes
    notes.append(f"test error {100 * evaluate(result.model, data)['error']:.2f}% right after removal")
    if stage.finetune is not None:
        fit(result.model, data, stage.finetune, progress=progress)
    return result.model, result.model, notes, "eager, smaller dense layers"


def _finetune(model: nn.Module, stage: Any, data: Any, context: dict[str, Any], progress: bool | None) -> list[str]:
    from torchslim.train.fit import fit

    history = fit(model, data, stage, progress=progress)
    return [f"{len(history.epochs)} epochs, {history.seconds:.1f} s"]


def _quantize(model: nn.Module, stage: Any, data: Any, context: dict[str, Any], progress: bool | None) -> tuple[nn.Module, list[str]]:
    from torchslim.quantization.weight_only import WeightOnlyConfig, quantize_weights
    from torchslim.train.fit import fit

    config = WeightOnlyConfig(weights=stage.weights, type_schemes=stage.type_schemes, layer_schemes=stage.layer_schemes, layers=stage.layers)
    result = quantize_weights(model, config, inplace=True)
    rows = result.report.stages[0].layers
    notes = [f"{row['name']}: {row['scheme']} {row['bits']} bits, SQNR {row['sqnr_db']:.1f} dB" for row in rows]
    if stage.finetune is not None:
        before = evaluate(result.model, data)["error"]
        fit(result.model, data, stage.finetune, progress=progress)
        notes.append(f"centroid fine-tuning: test error {100 * before:.2f}% -> {100 * evaluate(result.model, data)['error']:.2f}%")
    return result.model, notes


def _distill(model: nn.Module, stage: Any, data: Any, context: dict[str, Any], progress: bool | None) -> list[str]:
    from torchslim.distillation.trainer import distill

    if stage.teacher == "original":
        teacher = context["original"]
    else:
        from torchslim.io.modelfile import load_model

        teacher = load_model(stage.teacher, trust_factory=context.get("trust_factory", False))
    result = distill(model, teacher, data, stage.distill_config(), inplace=True, progress=progress)
    metrics = result.report.stages[0].metrics
    return [f"teacher error {100 * metrics['teacher_error']:.2f}%, student error {100 * metrics['error']:.2f}%"]


def _export(model: nn.Module, stage: ExportStage, data: Any, context: dict[str, Any]) -> tuple[nn.Module, Path, list[str]]:
    from torchslim.export.onnx import OnnxModule, export_onnx
    from torchslim.quantization.onnx_static import quantize_onnx

    path = context["export_path"]
    example = data.example_input(1)
    plain = copy.deepcopy(model)
    make_permanent(plain)
    if stage.int8 is None:
        export_onnx(plain, example, path)
        note = "fp32 ONNX"
    else:
        batches = (inputs for inputs, _ in data.loader("train", batch_size=stage.int8.batch_size, shuffle=True, seed=0))
        quantize_onnx(plain, example, batches, path, stage.int8)
        note = f"int8 ONNX ({stage.int8.mode}, {stage.int8.calibration} calibration, {stage.int8.activations} activations)"
    return OnnxModule(path, threads=context.get("threads", 2)), Path(path), [f"{note} written to {path}"]


# -- checkpoints -------------------------------------------------------------------------------------------------

ORIGINAL = "original.safetensors"


def _save_checkpoint(folder: Path, index: int, model: nn.Module, recipe: Recipe, report: Report, original: nn.Module) -> None:
    from torchslim.io.modelfile import save_model

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / ORIGINAL).exists():  # the starting model: a resumed run distills from the same teacher
        save_model(original, folder / ORIGINAL)
    name = f"stage-{index:02d}.safetensors"
    save_model(model, folder / name)
    progress = {"recipe": recipe.to_dict(), "completed": index, "model_file": name,
                "masked": sorted(masks_of(model)), "report": report.to_dict()}
    write_atomic(folder / PROGRESS, json.dumps(progress, indent=1).encode())
    for old in folder.glob("stage-*.safetensors"):  # only the latest stage is kept
        if old.name != name:
            old.unlink()


def checkpoint_original(folder: str | os.PathLike[str], trust_factory: bool = False) -> nn.Module:
    """The model a checkpointed run started from."""
    from torchslim.io.modelfile import load_model

    return load_model(Path(folder) / ORIGINAL, trust_factory=trust_factory)


def _load_checkpoint(folder: Path, recipe: Recipe, trust_factory: bool) -> tuple[nn.Module, Report, int]:
    from torchslim.io.modelfile import load_model

    progress = json.loads((folder / PROGRESS).read_text())
    if progress.get("recipe") != recipe.to_dict():
        raise TorchslimError(f"{folder}: the checkpoint was made by a different recipe ({progress.get('recipe', {}).get('name')!r} "
                             f"with other settings); run with the same recipe, or remove the folder to start over")
    model = load_model(folder / progress["model_file"], trust_factory=trust_factory)
    for name in progress["masked"]:
        module = model.get_submodule(name)
        set_mask(module, module.weight.detach() != 0)  # pruned weights are exactly zero in the saved file
    return model, Report.from_dict(progress["report"]), int(progress["completed"])


def checkpoint_status(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What a checkpoint folder holds (recipe name, stages completed), or None when it holds none."""
    path = Path(folder) / PROGRESS
    if not path.is_file():
        return None
    progress = json.loads(path.read_text())
    return {"recipe": progress["recipe"]["name"], "completed": progress["completed"], "stages": len(progress["recipe"]["stages"])}


# -- the runner --------------------------------------------------------------------------------------------------

def compress(
    model: nn.Module,
    recipe: str | Path | Mapping[str, Any] | Recipe,
    data: Any,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    export_path: str | os.PathLike[str] | None = None,
    latency: bool = True,
    threads: int = 2,
    progress: bool | None = None,
    trust_factory: bool = False,
    on_stage: Callable[[Stage], None] | None = None,
) -> CompressResult:
    """Run ``recipe`` (a built-in name, a YAML path, a mapping or a Recipe) on a copy of ``model``.

    Example:
        >>> import torchslim as ts
        >>> data = ts.data.load("digits")
        >>> model = ts.train(ts.models.create_for("lenet-300-100", data), data, {"epochs": 10}).model
        >>> recipe = {"name": "demo", "stages": [{"prune": {"sparsities": [0.8]}}, {"quantize": {}}, {"encode": {}}]}
        >>> result = compress(model, recipe, data, latency=False)
        >>> [s.name for s in result.report.stages]
        ['baseline', '1 prune', '2 quantize', '3 encode']
        >>> result.report.stages[-1].metrics["compression"] > 10
        True
    """
    recipe = load_recipe(recipe)
    if not hasattr(data, "loader") or not hasattr(data, "example_input"):
        raise TorchslimError("compress needs a torchslim Dataset (ts.data.load(...)) for fine-tuning and evaluation")
    folder = Path(checkpoint) if checkpoint is not None else None
    if folder is not None and not resume and (folder / PROGRESS).exists():
        status = checkpoint_status(folder)
        raise TorchslimError(f"{folder} holds a checkpoint of recipe {status['recipe']!r} ({status['completed']} of "
                             f"{status['stages']} stages done); resume it (--resume) or remove the folder")
    if resume and folder is None:
        raise TorchslimError("resume needs the checkpoint folder of the run to continue")
    if any(s.kind == "export" for s in recipe.stages) and export_path is None:
        raise TorchslimError(f"recipe {recipe.name!r} exports to ONNX: give export_path (CLI: --out model.onnx)")
    original = copy.deepcopy(model).eval()
    context = {"original": original, "threads": threads, "trust_factory": trust_factory, "export_path": export_path}
    files: dict[str, Path] = {}
    started_at = 0
    if resume and folder is not None and (folder / PROGRESS).exists():
        current, report, started_at = _load_checkpoint(folder, recipe, trust_factory)
        if (folder / ORIGINAL).exists():
            context["original"] = checkpoint_original(folder, trust_factory).eval()
        baseline_bytes = report.stages[0].metrics["stored_bytes"]
    else:
        current = copy.deepcopy(model)
        report = Report.for_model(model)
        baseline = Stage(name="baseline", kind="baseline", metrics=measure_stage(current, data, "baseline", None, latency=latency, threads=threads))
        baseline_bytes = baseline.metrics["stored_bytes"]
        report.stages.append(baseline)
        if on_stage:
            on_stage(baseline)
    for index, stage in enumerate(recipe.stages, start=1):
        if index <= started_at:
            continue
        began = time.perf_counter()
        try:
            current, engine, notes, execution = _run_stage(current, stage, data, context, progress, files)
        except KeyboardInterrupt:
            if folder is not None and started_at >= 1:
                where = f"the checkpoint after stage {started_at} is in {folder}; run again with --resume to continue"
            else:
                where = "no stage had completed, so no checkpoint was written"
            raise CompressInterrupted(f"interrupted during stage {index} ({stage.kind}); {where}") from None
        seconds = time.perf_counter() - began
        encode = stage.config if stage.kind == "encode" else None
        stored = (files["onnx"].stat().st_size, "ONNX file") if stage.kind == "export" else None
        metrics = measure_stage(current, data, stage.kind, baseline_bytes, encode=encode, latency=latency, threads=threads,
                                engine=engine if engine is not current else None, stored=stored)
        metrics["seconds"] = round(seconds, 2)
        record = Stage(name=f"{index} {stage.kind}", kind=stage.kind, metrics=metrics, notes=notes, execution=execution,
                       config=stage.config.to_dict())
        report.stages.append(record)
        if on_stage:
            on_stage(record)
        if folder is not None:
            _save_checkpoint(folder, index, current, recipe, report, original)
        started_at = index
    make_permanent(current)
    current.eval()
    return CompressResult(model=current, report=report, recipe=recipe, files=files)


def _run_stage(model: nn.Module, stage: RecipeStage, data: Any, context: dict[str, Any], progress: bool | None,
               files: dict[str, Path]) -> tuple[nn.Module, nn.Module, list[str], str]:
    """(model after the stage, the module that runs it, notes, how it executes)."""
    kind, config = stage.kind, stage.config
    if kind == "prune":
        return model, model, _prune(model, config, data, context, progress), "eager, pruned weights masked to zero"
    if kind == "prune-channels":
        return _prune_channels(model, config, data, progress)
    if kind == "finetune":
        return model, model, _finetune(model, config, data, context, progress), "eager"
    if kind == "quantize":
        quantized, notes = _quantize(model, config, data, context, progress)
        return quantized, quantized, notes, "eager, weights dequantized from codes"
    if kind == "distill":
        return model, model, _distill(model, config, data, context, progress), "eager"
    if kind == "encode":
        return model, model, [], "eager (as rebuilt from .tslim)"
    if kind == "export":
        engine, path, notes = _export(model, config, data, context)
        files["onnx"] = path
        return model, engine, notes, "ONNX Runtime"
    raise TorchslimError(f"unknown stage kind {kind!r}")


__all__ = ["CompressInterrupted", "CompressResult", "checkpoint_original", "checkpoint_status", "compress", "logical_weights", "measure_stage"]
