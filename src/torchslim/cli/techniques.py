"""Commands for one technique each: ``prune``, ``quantize``, ``distill``."""

from __future__ import annotations

from pathlib import Path

import typer

from torchslim.cli.app import app, console
from torchslim.cli.basics import change_line, headline
from torchslim.cli.common import (
    DataArguments,
    RunOptions,
    WeightsArguments,
    load_model_arg,
    model_arguments,
    names,
    number_list,
    refuse_overwrite,
    with_data,
    with_run_options,
    with_weights,
    write_outputs,
)
from torchslim.core.errors import TorchslimError

WEIGHT_SCHEMES = ("uniform", "kmeans", "pow2", "binary", "ternary", "fp16", "bf16")
ENGINE_SCHEMES = {
    "int8-static": {"method": "onnxruntime", "mode": "static"},
    "int8-dynamic": {"method": "onnxruntime", "mode": "dynamic"},
    "int8-native": {"method": "native-int8"},
}


@app.command()
@with_data()
@with_run_options()
@with_weights()
def prune(
    source: DataArguments,
    run: RunOptions,
    weights: WeightsArguments,
    model: str = typer.Argument(..., help="A saved model file (.safetensors) or a registered model name."),
    out: Path = typer.Option(..., help="Where to write the pruned model (.safetensors or .tslim)."),
    sparsity: float | None = typer.Option(None, help="Fraction of the selected weights (with --structured: channels) to remove, in [0, 1)."),
    quality: float | None = typer.Option(None, help="Han et al.'s rule instead: prune |w| < quality x the layer's std."),
    importance: str = typer.Option(
        "l1", help="Criterion: l1, l2, gradient, taylor, random; --structured: l1, l2, bn_scale, mean_activation, apoz, taylor, random."
    ),
    scope: str = typer.Option("layer", help="layer (each layer / coupled set to the sparsity) or global (one ranking)."),
    include: str = typer.Option("*", help="Comma-separated layer patterns (glob, re:regex or type:Class)."),
    exclude: str = typer.Option("", help="Comma-separated layer patterns to leave alone."),
    steps: int = typer.Option(1, help="Iterative pruning: reach the sparsity in this many prune + fine-tune steps."),
    finetune_epochs: int = typer.Option(0, help="Fine-tuning epochs after each pruning step (after removal with --structured)."),
    lr: float = typer.Option(0.01, help="Fine-tuning learning rate."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    report: Path | None = typer.Option(None, help="Write the JSON report here."),
    force: bool = typer.Option(False, help="Overwrite --out / --report if they exist."),
    structured: bool = typer.Option(False, "--structured", help="Remove whole neurons, channels and heads (the model really shrinks)."),
    round_to: str = typer.Option("1", help="--structured: kept channel counts are multiples of this, or onnxruntime / eager / cuda (that engine's best)."),
    head_ratio: float = typer.Option(0.0, help="--structured: fraction of attention heads to remove."),
    protect: str | None = typer.Option(None, help="--structured: comma-separated layers whose output channels stay."),
    keep_residual: bool = typer.Option(False, help="--structured: leave channels joined by residual adds whole."),
) -> None:
    """Prune weights (unstructured; per layer or global, in steps with fine-tuning) or, with --structured, whole
    channels; evaluate and save."""
    import torchslim as ts
    from torchslim.pruning import make_permanent, schedule_sparsities
    from torchslim.report.console import print_report

    refuse_overwrite(out, report, force=force)
    if steps < 1:
        raise TorchslimError(f"--steps must be >= 1, got {steps}")
    dataset = source.load()
    network = run.place(load_model_arg(model, dataset, trust_factory, weights))
    baseline = ts.evaluate(network, dataset, task=source.task)
    layers = {"include": names(include) or ["*"], "exclude": names(exclude)}
    finetune = {"epochs": finetune_epochs, "lr": lr, "eval_every_epoch": False} if finetune_epochs > 0 else None
    if structured:
        if sparsity is None or quality is not None:
            raise TorchslimError("--structured takes --sparsity (the fraction of channels to remove), not --quality")
        config = {
            "ratio": sparsity,
            "scope": scope,
            "importance": importance,
            "round_to": int(round_to) if round_to.isdigit() else round_to,
            "head_ratio": head_ratio,
            "prune_residual": not keep_residual,
            "layers": layers,
            "overrides": {name: 0.0 for name in names(protect)},
        }
        result = ts.prune_channels(network, config, data=dataset, task=source.task, finetune=finetune)
    else:
        if (sparsity is None) == (quality is None):
            raise TorchslimError("give exactly one of --sparsity or --quality")
        steps_to = list(schedule_sparsities(sparsity, steps)) if sparsity is not None and steps > 1 else sparsity
        target = {"quality": quality} if quality is not None else {"sparsity": steps_to}
        result = ts.prune(network, {"importance": importance, "scope": scope, "layers": layers, **target}, data=dataset, task=source.task, finetune=finetune)
        make_permanent(result.model)
    stage = result.report.stages[0]
    stage.metrics.update(ts.evaluate(result.model, dataset, task=source.task))
    result.report.stages.insert(
        0,
        ts.Report().add_stage(
            "original",
            kind="baseline",
            metrics={**baseline, "parameters": ts.measure.count_parameters(network), "nonzeros": ts.measure.count_nonzeros(network)},
        ),
    )
    print_report(result.report, console)
    for note in stage.notes:
        console.print(f"  {note}")
    if structured:
        for row in stage.layers:
            console.print(f"  {row['name']:<32} {row['type']:<12} {row['before']:>14} -> {row['after']}")
        console.print(f"MACs {stage.metrics['macs_before']:,} -> {stage.metrics['macs']:,} ({stage.metrics['macs_ratio']:.2f}x fewer)")
    how = "channels removed" if structured else "zeros stored densely" if out.suffix == ".safetensors" else "sparse"
    write_outputs(result, out, report, lambda saved: f"pruned model written to {saved} ({saved.stat().st_size:,} bytes; {how})")
    run.finish(f"pruned model written to {out}: {change_line(baseline, stage.metrics)}", result.report, {"model": out, "report": report})


@app.command()
@with_data()
@with_run_options()
@with_weights()
def distill(
    source: DataArguments,
    run: RunOptions,
    weights: WeightsArguments,
    teacher: str = typer.Option(..., help="The teacher: a saved model file (.safetensors), a registered name, or package.module:callable with --weights."),
    student: str = typer.Option(..., help="The student: a saved model file, a registered name, or package.module:callable (trained from its initialization)."),
    student_args: str = typer.Option("{}", help="JSON constructor arguments of the student (a registered name or an import path), e.g. '{\"hidden\": [300]}'."),
    out: Path = typer.Option(..., help="Where to write the distilled student (.safetensors)."),
    temperature: float = typer.Option(4.0, help="Softmax temperature T of the soft targets."),
    alpha: float = typer.Option(0.9, help="Weight of the soft term; 1 - alpha weighs the task's loss on labels."),
    loss: str = typer.Option("auto", help="kl (soft targets), mse (outputs), or auto: kl for classification and language modeling, mse otherwise."),
    epochs: int = typer.Option(10, help="Training epochs."),
    lr: float = typer.Option(0.05, help="Learning rate."),
    batch_size: int = typer.Option(128, help="Batch size."),
    cache_teacher: bool = typer.Option(False, help="Compute the teacher's outputs once over the training data."),
    trust_factory: bool = typer.Option(False, help="Allow model files whose architecture is an import path."),
    report: Path | None = typer.Option(None, help="Write the JSON report here."),
    force: bool = typer.Option(False, help="Overwrite --out / --report if they exist."),
) -> None:
    """Distill a teacher into a student: soft targets at temperature T (or output MSE), then save the student."""
    import torchslim as ts
    from torchslim.report.console import print_report

    refuse_overwrite(out, report, force=force)
    kwargs = model_arguments(student_args, "--student-args")
    dataset = source.load()
    teacher_model = load_model_arg(teacher, dataset, trust_factory, weights)
    # a student trains from its initialization: an import path (or a registered name) is built with its arguments
    student_model = load_model_arg(student, dataset, trust_factory, untrained=True, kwargs=kwargs)
    config = {
        "temperature": temperature,
        "alpha": alpha,
        "loss": loss,
        "cache_teacher": cache_teacher,
        "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size},
    }
    result = ts.distill(run.place(student_model), run.place(teacher_model), dataset, config, task=source.task)
    print_report(result.report, console)
    metrics = result.report.stages[0].metrics
    if "teacher_error" in metrics:
        console.print(
            f"teacher error {100 * metrics['teacher_error']:.2f}% ({metrics['teacher_parameters']:,} params); "
            f"student error {100 * metrics['error']:.2f}% ({metrics['parameters']:,} params)"
        )
    write_outputs(result, out, report, lambda saved: f"student written to {saved}")
    run.finish(f"student written to {out}: {headline(metrics)}", result.report, {"model": out, "report": report})


@app.command()
@with_data()
@with_run_options()
@with_weights()
def quantize(
    source: DataArguments,
    run: RunOptions,
    weights: WeightsArguments,
    model: str = typer.Argument(..., help="A saved model file (.safetensors) or a registered model name."),
    out: Path = typer.Option(..., help="Output: .safetensors or .tslim for weight-only schemes, .onnx for int8 in ONNX Runtime."),
    scheme: str = typer.Option(
        "uniform",
        help="uniform, kmeans, pow2, binary, ternary, fp16, bf16; int8-static / int8-dynamic (ONNX Runtime; dynamic needs no data "
        "and gives a transformer's tokens each their own scale); "
        "int8-native (torchslim's own static int8: BN folded, torchslim observers, QDQ for ONNX Runtime).",
    ),
    bits: int = typer.Option(8, help="Bits per weight (uniform 1-16, kmeans 1-8, pow2 2-8)."),
    granularity: str = typer.Option("channel", help="Uniform grids: tensor, channel or group."),
    group_size: int = typer.Option(128, help="Group size along the input dimension (granularity group)."),
    asymmetric: bool = typer.Option(False, help="Affine (min-max) grid instead of symmetric."),
    layer_bits: str = typer.Option("", help="Mixed precision: comma-separated layer=bits, e.g. fc1=2,fc3=8."),
    calibration: str = typer.Option(
        "minmax", help="int8 calibration: minmax, entropy or percentile (int8-static); minmax, moving-average, percentile, mse or entropy (int8-native)."
    ),
    calibration_batches: int = typer.Option(16, help="int8 calibration batches."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    force: bool = typer.Option(False, help="Overwrite --out if it exists."),
) -> None:
    """Quantize weights (stored packed; reloads exactly) or produce a real int8 ONNX model, and evaluate it."""
    import torchslim as ts
    from torchslim.report.markdown import format_bytes

    refuse_overwrite(out, force=force)
    if scheme in ENGINE_SCHEMES:
        if out.suffix != ".onnx":
            raise TorchslimError(f"--out: {scheme} runs in ONNX Runtime, so the output must end in .onnx, got {out}")
        key = "observer" if scheme == "int8-native" else "calibration"
        config = {**ENGINE_SCHEMES[scheme], key: calibration, "calibration_batches": calibration_batches}
    elif scheme in WEIGHT_SCHEMES:
        grid = {"scheme": scheme, "bits": bits, "granularity": granularity, "group_size": group_size, "symmetric": not asymmetric}
        overrides = {}
        for item in names(layer_bits):
            name, _, value = item.partition("=")
            if not value.isdigit():
                raise TorchslimError(f"--layer-bits: expected layer=bits, got {item!r}")
            overrides[name] = {"bits": int(value)}
        config = {"method": "weight-only", "weights": grid, "overrides": overrides}
    else:
        raise TorchslimError(f"--scheme: unknown scheme {scheme!r}; valid: {', '.join(WEIGHT_SCHEMES + tuple(ENGINE_SCHEMES))}")
    dataset = source.load()
    network = run.place(load_model_arg(model, dataset, trust_factory, weights))
    before = ts.evaluate(network, dataset, task=source.task)
    result = ts.quantize(network, config, data=dataset)
    if not run.main:  # under torchrun, rank 0 writes
        return
    after = ts.evaluate(result.model, dataset, task=source.task)
    saved = ts.save(result.model, out)
    stage = result.report.stages[0]
    for row in stage.layers:
        console.print(
            f"  {row['name']:<24} {row['scheme']:<8} {row['bits']:>2} bits  SQNR {row['sqnr_db']:6.2f} dB  "
            f"{format_bytes(row['dense_bytes'])} -> {format_bytes(row['stored_bytes'])}"
        )
    console.print(f"quantized model written to {saved} ({format_bytes(saved.stat().st_size)}); runs in {stage.execution}")
    run.finish(f"quantized model written to {saved}: {change_line(before, after)}", result.report, {"model": saved}, before=before, after=after)


@app.command()
@with_data()
@with_run_options()
@with_weights()
def sensitivity(
    source: DataArguments,
    run: RunOptions,
    weights: WeightsArguments,
    model: str = typer.Argument(..., help="A saved model file (.safetensors) or a registered model name."),
    sparsities: str = typer.Option("0.5,0.8,0.9,0.95", help="Comma-separated sparsities to try on each layer alone ('' for none)."),
    bits: str = typer.Option("8,4,3,2", help="Comma-separated bit widths to try on each layer alone ('' for none)."),
    ranks: str = typer.Option("", help="Comma-separated ranks (integers) or shares of the full rank (fractions) to try."),
    eval_limit: int | None = typer.Option(None, help="Examples evaluated per measurement (default: the whole test split)."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    report: Path | None = typer.Option(None, help="Write the JSON report here."),
    plots: Path | None = typer.Option(None, help="Write one plot per technique here (PNG and SVG)."),
    force: bool = typer.Option(False, help="Overwrite --report if it exists."),
) -> None:
    """The task's metric with one layer compressed at a time, for every layer and every level: where compression is
    cheap and where it hurts."""
    import torchslim as ts
    from torchslim.compression.sensitivity import write_sensitivity_plots

    refuse_overwrite(report, force=force)
    config = {
        "sparsities": number_list(sparsities, "--sparsities"),
        "bits": number_list(bits, "--bits", int),
        "ranks": number_list(ranks, "--ranks"),
        "eval_limit": eval_limit,
    }
    dataset = source.load()
    network = run.place(load_model_arg(model, dataset, trust_factory, weights))
    result = ts.sensitivity(network, dataset, config, task=source.task)
    if not run.main:
        return
    stage = result.report.stages[0]
    metric = stage.metrics["metric"]
    for row in stage.layers:
        console.print(f"  {row['layer']:<24} {row['technique']:<9} {row['level']:>6}  {metric} {row[metric]:.4f} ({row['change']:+.4f})")
    outputs: dict[str, object] = {}
    if report is not None:
        result.report.save(report)
        outputs["report"] = report
    if plots is not None:
        outputs["plots"] = ", ".join(str(p) for p in write_sensitivity_plots(result.report, plots))
    worst = max(stage.layers, key=lambda row: abs(row["change"]))
    run.finish(
        f"{len(stage.layers)} measurements; baseline {metric} {stage.metrics[metric]:.4f}; largest change {worst['change']:+.4f} "
        f"({worst['layer']}, {worst['technique']} {worst['level']})",
        result.report,
        outputs,
    )
