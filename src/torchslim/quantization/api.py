"""``quantize``: one verb for every quantization method, chosen by the config's type (or a mapping's ``method``).

- ``weight-only`` (default, ``WeightOnlyConfig``): eager PyTorch, weights stored packed and dequantized (uniform 1-16
  bits, k-means, power-of-two, binary, ternary, fp16/bf16); ``finetune`` trains the k-means centroids;
- ``onnxruntime`` (``OnnxInt8Config``): ONNX Runtime int8 (static QDQ U8S8 calibrated by ONNX Runtime, or dynamic);
- ``native-int8`` (``NativeInt8Config``): ONNX Runtime int8 from torchslim's own static quantization (BatchNorm
  folded, torchslim observers, QDQ);
- ``pt2e`` (``Pt2eConfig``): torchao PT2E int8, compiled by inductor with freezing;
- ``qat`` (``QATConfig``): fake-quant training with ``finetune``, then ONNX Runtime int8 (QDQ).

Each returns a ``Result`` whose model runs (engines are wrapped as modules) and whose report says what executes.

Example:
    >>> import torchslim as ts
    >>> result = ts.quantize(ts.models.create("lenet-300-100"), {"method": "weight-only", "weights": {"bits": 4}})
    >>> result.report.stages[0].execution
    'weights stored quantized, dequantized in eager forward'
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.core.checks import check_model
from torchslim.core.config import Config, ConfigError, check
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.files import refuse_overwrite
from torchslim.core.memory import release_freed_memory
from torchslim.core.registry import Registry
from torchslim.core.report import Report, Result, Stage
from torchslim.data.sources import DataSource, as_source
from torchslim.export.onnx import OnnxModule
from torchslim.quantization.observers import OBSERVERS
from torchslim.quantization.onnx_notes import export_notes, float_products
from torchslim.quantization.onnx_static import OnnxInt8Config, quantize_onnx
from torchslim.quantization.qat import QATConfig, calibrate_qat, export_qat_onnx, left_float, prepare_qat
from torchslim.quantization.weight_only import WeightOnlyConfig, quantize_weights, uncovered_note
from torchslim.tasks.base import Task, resolve_task
from torchslim.train.fit import TrainConfig, fit


@dataclasses.dataclass(frozen=True)
class NativeInt8Config(Config):
    """torchslim's own post-training static int8: BatchNorm folded, activation ranges from a torchslim ``observer``
    (minmax, moving-average, percentile, mse, entropy) over ``calibration_batches`` batches, exported as a QDQ ONNX
    model (uint8 activations, int8 per-channel weights) that ONNX Runtime runs with integer kernels."""

    method: str = "native-int8"
    observer: str = "minmax"
    calibration_batches: int = 16
    batch_size: int = 64

    def validate(self) -> None:
        check(self.method == "native-int8", f"method must be 'native-int8' for NativeInt8Config, got {self.method!r}")
        check(self.observer in OBSERVERS, f"observer must be one of {', '.join(OBSERVERS.names())}, got {self.observer!r}")
        check(self.calibration_batches >= 1, f"calibration_batches must be >= 1, got {self.calibration_batches}")


@dataclasses.dataclass(frozen=True)
class Pt2eConfig(Config):
    """Static int8 through torchao's PT2E flow (X86InductorQuantizer), compiled by inductor with freezing."""

    method: str = "pt2e"
    calibration_batches: int = 16
    batch_size: int = 64

    def validate(self) -> None:
        check(self.method == "pt2e", f"method must be 'pt2e' for Pt2eConfig, got {self.method!r}")
        check(self.calibration_batches >= 1, f"calibration_batches must be >= 1, got {self.calibration_batches}")


@dataclasses.dataclass(frozen=True)
class Method:
    """A quantization method: its config type, the function that applies it, whether it calibrates on data, and
    whether (for a given config) it hands back an engine instead of a model (``engine``), one that runs an ONNX
    file it writes (``onnx``)."""

    config: type[Config]
    apply: Callable[..., tuple[nn.Module, Stage]]
    needs_data: Callable[[Config], bool]
    engine: Callable[[Config], bool] = lambda config: False
    onnx: Callable[[Config], bool] = lambda config: False


METHODS: Registry[Method] = Registry("quantization method")


def quantization_method(
    name: str,
    config: type[Config],
    needs_data: bool | Callable[[Config], bool],
    engine: Callable[[Config], bool] = lambda config: False,
    onnx: Callable[[Config], bool] | None = None,
) -> Callable:
    """Register ``apply(model, config, context) -> (model, report stage)`` as quantization method ``name``."""

    def add(function: Callable[..., tuple[nn.Module, Stage]]) -> Callable[..., tuple[nn.Module, Stage]]:
        calibrates = needs_data if callable(needs_data) else (lambda typed: needs_data)
        METHODS.register(name, (config.__doc__ or "").strip())(Method(config, function, calibrates, engine, onnx or engine))
        return function

    return add


def method_of(config: Config) -> Method:
    """The registered method a typed config belongs to."""
    return next(METHODS.get(name) for name in METHODS.names() if isinstance(config, METHODS.get(name).config))


def calibration(context: _Context, batch_size: int, count: int) -> Any:
    """Up to ``count`` batches of ``batch_size`` from the training data, for a method that calibrates."""
    return _take(_calibration(context, batch_size), count)


def quantize_config(config: Any, where: str = "quantize") -> Config:
    """A typed quantization config from a typed one, a mapping (``method`` picks the type; default weight-only) or None."""
    if config is None:
        return WeightOnlyConfig()
    for name in METHODS.names():
        if isinstance(config, METHODS.get(name).config):
            return config
    if not isinstance(config, Mapping):
        raise ConfigError(f"{where}: expected a quantization config or a mapping, got {type(config).__name__}")
    method = config.get("method", "weight-only")
    if method not in METHODS:
        raise ConfigError(f"{where}.method: unknown quantization method {method!r}; valid: {', '.join(METHODS.names())}")
    return METHODS.get(method).config.from_dict(config, where=where)


@dataclasses.dataclass
class _Context:
    source: DataSource | None
    task: Task | None
    finetune: TrainConfig | None
    example: Any
    progress: bool | str | None
    threads: int
    path: Path | None


def _calibration(context: _Context, batch_size: int) -> Any:
    if context.source is None:
        raise ConfigError("this quantization method calibrates on data: pass data=...")
    return context.source.batches("train", batch_size=batch_size, shuffle=True, seed=0)


def _output_path(context: _Context, folder: str) -> Path:
    return context.path if context.path is not None else Path(folder) / "model.onnx"


@quantization_method("weight-only", WeightOnlyConfig, needs_data=False)
def _weight_only(model: nn.Module, config: WeightOnlyConfig, context: _Context) -> tuple[nn.Module, Stage]:
    stage = quantize_weights(model, config, inplace=True).report.stages[0]
    if context.finetune is not None:
        if context.source is None or context.task is None:
            raise ConfigError("centroid fine-tuning needs data")
        metric = context.task.metric
        before = context.task.evaluate(model, context.source.batches("eval", shuffle=False))[metric]
        fit(model, context.source, context.finetune, task=context.task, progress=context.progress, label="quantize fine-tune", evaluate_at_end=False)
        after = context.task.evaluate(model, context.source.batches("eval", shuffle=False))[metric]
        stage.notes.append(f"codebook fine-tuning: {metric} {before:.4g} -> {after:.4g}")
    return model, stage


def _onnxruntime_calibrates(config: Config) -> bool:
    """Static int8 and SmoothQuant's migration read data; dynamic int8 alone does not."""
    return isinstance(config, OnnxInt8Config) and (config.mode == "static" or config.smooth is not None)


@quantization_method("onnxruntime", OnnxInt8Config, needs_data=_onnxruntime_calibrates, engine=lambda config: True)
def _onnxruntime(model: nn.Module, config: OnnxInt8Config, context: _Context) -> tuple[nn.Module, Stage]:
    batches = _calibration(context, config.batch_size) if config.mode == "static" else None
    with tempfile.TemporaryDirectory() as folder:
        path = quantize_onnx(model, context.example, batches, _output_path(context, folder), config)
        engine = OnnxModule(path, threads=context.threads)
    notes = []
    seven = ", 7-bit weights: this CPU has no VNNI" if config.weights_on_7_bits() else ""
    if config.mode == "static":
        calibrated = f"torchslim's {config.observer} observer" if config.observer is not None else f"{config.calibration} calibration"
        how = f"static int8 ({calibrated}, {config.activations} activations{seven})"
        if config.observer is None and config.calibration == "entropy":
            notes.append(
                "ONNX Runtime's entropy calibration, as quantize_static runs it, has a histogram of 128 bins for 128 levels: the only threshold "
                "it can choose is the largest value, so these ranges are min-max's; observer: entropy searches the KL threshold (torchslim's)"
            )
        kept = float_products(engine.onnx_bytes)
        if kept is not None:
            products = kept["products"]
            named = ", ".join(f"{name} ({db:.1f} dB)" for name, db in sorted(products.items(), key=lambda item: item[1])[:6])
            notes.append(
                f"{len(products)} product{'' if len(products) == 1 else 's'} kept float: inputs whose tokens, rounded to one grid per tensor, "
                f"keep a median SQNR below {kept['threshold_db']:g} dB" + (f" (lowest: {named}{', ...' if len(products) > 6 else ''})" if products else "")
            )
    else:
        how = f"dynamic int8 ({'per-token' if config.uses_per_token(isinstance(context.example, dict)) else 'per-tensor'} activation scales{seven})"
        convolutions = _dynamic_convolutions(engine.onnx_bytes)
        if convolutions:
            notes.append(
                f"{convolutions} convolution{'' if convolutions == 1 else 's'} as ConvInteger: ONNX Runtime's dynamic quantizer gives a convolution "
                "one weight scale per tensor, whatever per_channel says (static int8 quantizes them per channel, and runs faster on CPU)"
            )
    return engine, _stage([f"ONNX Runtime quantizer: {how}", *notes, *export_notes(engine.onnx_bytes)], f"ONNX Runtime, {how}", engine)


@quantization_method("native-int8", NativeInt8Config, needs_data=True, engine=lambda config: True)
def _native_int8(model: nn.Module, config: NativeInt8Config, context: _Context) -> tuple[nn.Module, Stage]:
    batches = list(_take(_calibration(context, config.batch_size), config.calibration_batches))
    settings = OnnxInt8Config(calibration_batches=config.calibration_batches, batch_size=config.batch_size, observer=config.observer)
    with tempfile.TemporaryDirectory() as folder:
        engine = OnnxModule(quantize_onnx(model, context.example, batches, _output_path(context, folder), settings), threads=context.threads)
    return engine, _stage(
        [
            f"BatchNorm folded; every activation range from torchslim's {config.observer} observer over {len(batches)} batches; "
            "Q/DQ pairs placed by ONNX Runtime's quantizer (convolutions, matrix products, residual adds, concatenations, pooling)",
            *export_notes(engine.onnx_bytes),
        ],
        f"ONNX Runtime, static int8 QDQ ({config.observer} calibration by torchslim)",
        engine,
    )


@quantization_method("pt2e", Pt2eConfig, needs_data=True, engine=lambda config: True, onnx=lambda config: False)
def _pt2e(model: nn.Module, config: Pt2eConfig, context: _Context) -> tuple[nn.Module, Stage]:
    from torchslim.quantization.pt2e import pt2e_int8

    compiled = pt2e_int8(model, context.example, _calibration(context, config.batch_size), config.calibration_batches)
    return compiled, _stage(["X86InductorQuantizer defaults"], "torch.compile (inductor, freezing), PT2E int8")


@quantization_method("qat", QATConfig, needs_data=True, engine=lambda config: bool(getattr(config, "export", False)))
def _qat(model: nn.Module, config: QATConfig, context: _Context) -> tuple[nn.Module, Stage]:
    mode = model.training
    trained = prepare_qat(model, config, inplace=True).train(mode)  # the fake-quant modules take the model's mode (eval: ranges frozen)
    calibrate_qat(trained, _calibration(context, 64), config.calibration_batches)
    count = sum(1 for m in trained.modules() if hasattr(m, "fake"))
    seven = any(getattr(m, "fake", None) is not None and m.fake.qmax < 127 for m in trained.modules())
    why = ("this CPU has no VNNI" if config.reduce_range is None else "reduce_range") if seven else ""
    notes = [f"{count} layer{'' if count == 1 else 's'} fake-quantized ({config.weight_scale} weight scales{f', 7-bit weights: {why}' if seven else ''})"]
    left = left_float(trained)
    if left:
        notes.append(f"left in float: {', '.join(left[:8])}{f' and {len(left) - 8} more' if len(left) > 8 else ''} (QAT covers plain nn.Linear and nn.Conv2d)")
    outside = uncovered_note(trained, lambda m: isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)), "left in float", "weight layer")
    if outside:  # weights no layer holds (a mixture of experts' fused experts, an attention's in_proj_weight)
        notes.append(outside)
    if context.finetune is not None:
        assert context.source is not None
        history = fit(trained, context.source, context.finetune, task=context.task, progress=context.progress, label="qat", evaluate_at_end=False)
        notes.append(f"trained {len(history.epochs)} epochs with fake quantization ({history.seconds:.1f} s)")
        trained.train(mode)
    if not config.export:
        return trained, _stage(notes, "simulated (fake-quant) in eager PyTorch")
    with tempfile.TemporaryDirectory() as folder:
        engine = OnnxModule(export_qat_onnx(trained, context.example, _output_path(context, folder)), threads=context.threads)
    return engine, _stage(notes, "ONNX Runtime, int8 QDQ from quantization-aware training", engine)


def _dynamic_convolutions(onnx_bytes: bytes) -> int:
    """How many ConvInteger nodes (dynamic int8 convolutions) an ONNX file holds."""
    import onnx

    return sum(node.op_type == "ConvInteger" for node in onnx.load_from_string(onnx_bytes).graph.node)


def _stage(notes: list[str], execution: str, engine: OnnxModule | None = None) -> Stage:
    metrics = {"onnx_bytes": len(engine.onnx_bytes)} if engine is not None else {}
    return Stage(name="quantize", kind="quantize", metrics=metrics, notes=notes, execution=execution)


def _take(batches: Any, count: int) -> Any:
    for index, batch in enumerate(batches):
        if index >= count:
            return
        yield batch


def quantize(
    model: nn.Module,
    config: Any = None,
    data: Any = None,
    task: str | Task | None = None,
    finetune: TrainConfig | dict | None = None,
    inplace: bool = False,
    example_input: Any = None,
    path: str | Path | None = None,
    threads: int = 2,
    progress: bool | str | None = None,
    overwrite: bool = False,
) -> Result:
    """Quantize ``model`` by the method its ``config`` names (see this module's table); the caller's model is left
    as it was unless ``inplace`` (weight-only and QAT change it; engine methods never do).

    ``data`` (anything ``torchslim.data.as_source`` takes) calibrates and, with ``finetune``, trains (k-means
    centroids; QAT). ``example_input`` (default: from the data) fixes the exported input shape; ``path`` keeps the
    ONNX file an engine method writes (an existing file there is refused unless ``overwrite``).
    """
    typed = quantize_config(config)
    check_model(model, "quantize", float32=True, copies=True)
    if path is not None:
        refuse_overwrite(path, overwrite)
    method = next(name for name in METHODS.names() if isinstance(typed, METHODS.get(name).config))
    entry = METHODS.get(method)
    if entry.needs_data(typed) and data is None:
        raise ConfigError(f"quantize: method {method!r} calibrates on data: pass data=...")
    target = model if inplace else copy_model(model)
    source = as_source(data, target) if data is not None else None
    tuning = TrainConfig.coerce(finetune, where="quantize.finetune") if finetune is not None else None
    resolved = resolve_task(task, source, model) if source is not None and tuning is not None else None
    example = example_input if example_input is not None else (source.example(1) if source is not None else None)
    if entry.onnx(typed) and example is None:
        raise ConfigError(f"quantize: method {method!r} exports the model: pass example_input=... or data=...")
    context = _Context(source, resolved, tuning, example, progress, threads, Path(path) if path is not None else None)
    started = time.perf_counter()
    try:
        quantized, stage = entry.apply(target, typed, context)
    except ImportError as error:
        raise TorchslimError(f"quantize method {method!r} needs a package that is not installed ({error})") from None
    stage.metrics["seconds"] = time.perf_counter() - started
    stage.config = typed.to_dict()
    release_freed_memory()  # float layers the quantized ones replaced
    return Result(model=quantized, report=Report.for_model(model, [stage]))


__all__ = ["METHODS", "NativeInt8Config", "Pt2eConfig", "calibration", "method_of", "quantization_method", "quantize", "quantize_config"]
