"""Commands about models as they are: ``list``, ``train``, ``evaluate``, ``profile``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from torchslim.cli.app import app, console
from torchslim.cli.common import (
    DataArguments,
    RunOptions,
    WeightsArguments,
    example_input,
    int_list,
    load_model_arg,
    model_arguments,
    refuse_overwrite,
    with_data,
    with_run_options,
    with_weights,
    write_outputs,
)
from torchslim.core.errors import TorchslimError


def describe_metrics(metrics: dict[str, Any]) -> str:
    """One line of evaluation metrics: accuracy / error for classification, else each number."""
    if "accuracy" in metrics and "errors" in metrics:
        return (
            f"accuracy {100 * metrics['accuracy']:.2f}%  error {100 * metrics['error']:.2f}%  "
            f"({metrics['errors']} of {metrics['examples']})  loss {metrics['loss']:.4f}"
        )
    return "  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in metrics.items())


def headline(metrics: dict[str, Any]) -> str:
    """The one number a person looks at first: test error for classification, else the task's metric."""
    if "errors" in metrics:
        return f"test error {100 * metrics['error']:6.2f}%"
    return next(f"{key} {metrics[key]:.4g}" for key in ("perplexity", "cosine", "loss") if key in metrics)


def change_line(before: dict[str, Any], after: dict[str, Any]) -> str:
    """How the headline metric moved: ``test error 1.20% -> 1.35%``."""
    if "errors" in before and "errors" in after:
        return f"test error {100 * before['error']:.2f}% -> {100 * after['error']:.2f}%"
    key = next(k for k in ("perplexity", "cosine", "loss") if k in before and k in after)
    return f"{key} {before[key]:.4g} -> {after[key]:.4g}"


@app.command("list")
def list_command(what: str = typer.Argument("all", help="models, datasets, backends, tasks, stages, quantization or all")) -> None:
    """List the registries: models, datasets, latency backends, tasks, recipe stage kinds, quantization methods."""
    from torchslim.data import DATASETS
    from torchslim.measure.latency import BACKENDS
    from torchslim.models import MODELS
    from torchslim.pipeline import STAGES
    from torchslim.quantization import METHODS
    from torchslim.tasks import TASKS

    tables: dict[str, Any] = {"models": MODELS, "datasets": DATASETS, "backends": BACKENDS, "tasks": TASKS, "stages": STAGES, "quantization": METHODS}
    if what != "all" and what not in tables:
        raise TorchslimError(f"unknown list {what!r}; choose from: all, {', '.join(tables)}")
    for title, registry in tables.items():
        if what in ("all", title):
            console.print(f"[bold]{title}[/bold]")
            for name in registry.names():
                console.print(f"  {name:<18} {registry.summary(name)}", soft_wrap=True)


@app.command()
@with_data()
@with_run_options()
def train(
    source: DataArguments,
    run: RunOptions,
    model: str = typer.Option("lenet-300-100", help="Registered model name (see `torchslim list models`)."),
    epochs: int = typer.Option(5, help="Training epochs."),
    lr: float = typer.Option(0.05, help="Base learning rate."),
    optimizer: str = typer.Option("sgd", help="sgd, adam or adamw."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    weight_decay: float = typer.Option(1e-4, help="Weight decay."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 (CUDA): the forward pass under autocast; weights stay fp32."),
    out: Path | None = typer.Option(None, help="Write the trained model here (.safetensors with its architecture spec)."),
    report: Path | None = typer.Option(None, help="Write the JSON report here."),
    force: bool = typer.Option(False, help="Overwrite --out / --report if they exist."),
) -> None:
    """Train a reference model on a dataset, then evaluate and profile it. Under ``torchrun`` the processes train
    together (DistributedDataParallel; --batch-size is the global batch) and rank 0 prints and writes."""
    import torchslim as ts
    from torchslim.report.console import print_report

    refuse_overwrite(out, report, force=force)
    ts.models.MODELS.get(model)
    dataset = source.load()
    console.print(f"{source.name}: {len(getattr(dataset, 'train', getattr(dataset, 'train_ids', [])))} training examples")
    network = run.place(ts.models.create_for(model, dataset))
    config = {
        "epochs": epochs,
        "lr": lr,
        "optimizer": optimizer,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "seed": run.seed,
        "precision": precision,
    }
    result = ts.train(network, dataset, config)
    for note in result.report.stages[0].notes:
        console.print(f"  {note}")
    profiled = ts.profile(result.model, example_input(dataset), batch_sizes=(1, 64), threads=run.threads)
    stage = profiled.report.stages[0]
    stage.name, stage.kind = "trained", "train"
    stage.metrics.update({k: v for k, v in result.report.stages[0].metrics.items() if k in ("accuracy", "error", "errors", "loss", "examples", "perplexity")})
    result.report.stages.append(stage)
    print_report(type(result.report)(model=result.report.model, stages=[stage], environment=result.report.environment), console)
    write_outputs(result, out, report, lambda saved: f"model written to {saved} ({saved.stat().st_size:,} bytes)")
    run.finish(f"trained {model}: {headline(stage.metrics)}" + (f"; written to {out}" if out else ""), result.report, {"model": out, "report": report})


@app.command()
@with_data()
@with_run_options()
def evaluate(
    source: DataArguments,
    run: RunOptions,
    model: str = typer.Argument(..., help="A saved model file (.safetensors / .tslim / .onnx), a registered name, or package.module:callable with --weights."),
    weights: Path | None = typer.Option(None, help="Weights to load into the model (.safetensors or .pt state_dict)."),
    trust_weights: bool = typer.Option(False, help="Allow unpickling a .pt that holds more than tensors (only files you made)."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    model_args: str = typer.Option("{}", help="The model's constructor arguments (an import path or a registered name) as JSON."),
    split: str = typer.Option("test", help="train or test."),
) -> None:
    """Evaluate a model on a dataset split by its task: accuracy and error, perplexity, or cosine similarity."""
    import torchslim as ts

    dataset = source.load()
    kwargs = model_arguments(model_args)
    network = ts.load(model) if model.endswith(".onnx") else run.place(load_model_arg(model, dataset, trust_factory, weights, trust_weights, kwargs=kwargs))
    metrics = ts.evaluate(network, dataset, task=source.task, split=split)
    run.finish(f"{source.name} {split}: {describe_metrics(metrics)}", metrics=metrics)


@app.command()
@with_data()
@with_run_options(threads=2)
@with_weights()
def profile(
    source: DataArguments,
    run: RunOptions,
    weights: WeightsArguments,
    model: str = typer.Argument(..., help="A saved model file (.safetensors) or a registered model name."),
    batch_sizes: str = typer.Option("1,64", help="Comma-separated batch sizes to time."),
    backends: str = typer.Option("eager", help="Comma-separated latency backends (see `torchslim list backends`)."),
    runs: int = typer.Option(50, help="Timed runs per batch size (after warm-up)."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    report: Path | None = typer.Option(None, help="Write the JSON report here."),
    layers: bool = typer.Option(False, help="Print the per-layer table too."),
) -> None:
    """Parameters, non-zeros, MACs, bytes and measured latency of a model."""
    import torchslim as ts
    from torchslim.report.console import print_report

    dataset = source.load()
    network = run.place(load_model_arg(model, dataset, trust_factory, weights, untrained=True))
    sizes = int_list(batch_sizes, "--batch-sizes")
    result = ts.profile(network, example_input(dataset), batch_sizes=sizes, backends=[b.strip() for b in backends.split(",")], runs=runs, threads=run.threads)
    print_report(result.report, console)
    for row in result.report.stages[0].metrics["latency"]:
        flag = "  BIMODAL" if row["bimodal"] else ""
        console.print(
            f"  {row['backend']:<8} batch {row['batch_size']:>4}: median {row['median_ms']:.3f} ms, "
            f"min {row['min_ms']:.3f}, p90 {row['p90_ms']:.3f} ({row['runs']} runs, {row['threads']} threads){flag}"
        )
    if layers:
        console.print(result.report.to_markdown())
    if report is not None:
        result.report.save(report)
    first = result.report.stages[0].metrics["latency"][0]
    run.finish(f"{model}: {first['backend']} batch {first['batch_size']} median {first['median_ms']:.3f} ms", result.report, {"report": report})


def parse_dynamic_axes(values: list[str]) -> dict[str, list[int]] | None:
    """``["input:2", "input_1:1"]`` as ``{"input": [2], "input_1": [1]}`` (None for none); a malformed entry is named."""
    axes: dict[str, list[int]] = {}
    for value in values:
        name, _, axis = value.rpartition(":")
        if not name or not axis.lstrip("-").isdigit():
            raise TorchslimError(f"--dynamic-axis takes INPUT:AXIS (e.g. input:2), got {value!r}")
        axes.setdefault(name, []).append(int(axis))
    return axes or None


@app.command("export")
@with_data()
@with_run_options()
@with_weights()
def export_command(
    source: DataArguments,
    run: RunOptions,
    weights: WeightsArguments,
    model: str = typer.Argument(..., help="A saved model file (.safetensors / .tslim / .onnx) or a registered model name."),
    format: str = typer.Option("onnx", "--format", help="onnx, pt2 (torch.export) or torchscript."),
    out: Path | None = typer.Option(None, help="The exported file (default: <model>.<onnx|pt2|pt>)."),
    static_batch: bool = typer.Option(False, "--static-batch", help="Fix the batch size to the example's instead of a dynamic batch."),
    dynamic_axis: list[str] = typer.Option(
        [], "--dynamic-axis", help="onnx / pt2: an input axis of any size besides the batch, as INPUT:AXIS (input:2 for a signal's length); repeatable."
    ),
    accuracy_level: int = typer.Option(
        0,
        "--accuracy-level",
        help="onnx: MatMulNBits accuracy level of weight-only layers (0 as written; 4: int8 activations, fastest on CPU, checked by relative error).",
    ),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    force: bool = typer.Option(False, help="Overwrite --out if it exists."),
) -> None:
    """Export a model (dense, pruned, factorized or quantized) as ONNX, a torch.export program or TorchScript; the
    file is loaded back and checked against PyTorch on the data's first example at batch 1 and 3."""
    import torchslim as ts
    from torchslim.export.verb import FORMATS

    if format not in FORMATS:
        raise TorchslimError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    stem = Path(model).stem if Path(model).suffix else model.replace(":", "-")
    out = out or Path(f"{stem}{FORMATS[format]}")
    refuse_overwrite(out, force=force)
    dataset = source.load()
    network = ts.load(model) if model.endswith(".onnx") else run.place(load_model_arg(model, dataset, trust_factory, weights))
    axes = parse_dynamic_axes(dynamic_axis)
    result = ts.export(
        network, format, example_input(dataset), out, dynamic_batch=not static_batch, overwrite=force, accuracy_level=accuracy_level, dynamic_axes=axes
    )
    metrics = result.report.stages[0].metrics
    worst = max(metrics["max_abs_difference"].values())
    line = f"{format} written to {out} ({metrics['file_bytes']:,} bytes); loaded back: largest difference from PyTorch {worst:.2e}"
    if accuracy_level:
        line += f", relative error {max(metrics['relative_error'].values()):.2e} ({result.report.stages[0].notes[-1]})"
    run.finish(line, result.report, {"model": out})
