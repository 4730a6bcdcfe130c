"""Commands for recipes and compressed files: ``compress`` (run a recipe), ``report`` (a run's report as HTML and
Markdown), ``recipes`` (list the built-ins) and ``inspect`` (a .tslim file's encodings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from torchslim.cli.app import app, console
from torchslim.cli.basics import headline
from torchslim.cli.common import DataArguments, RunOptions, example_input, load_model_arg, model_arguments, refuse_overwrite, with_data, with_run_options
from torchslim.core.errors import TorchslimError


def report_paths(json_path: Path, html: Path | None = None) -> tuple[Path, Path]:
    """The HTML report of a run's JSON report (``a.tslim.report.json`` -> ``a.tslim.report.html``) and its Markdown twin."""
    name = json_path.name
    html = html or json_path.with_name((name[: -len(".json")] if name.endswith(".json") else name) + ".html")
    return html, html.with_suffix(".md")


@app.command()
@with_data()
@with_run_options(threads=2)
def compress(
    source: DataArguments,
    run: RunOptions,
    model: str = typer.Option("lenet-300-100", help="Registered model name, a saved model file (.safetensors / .tslim), or package.module:callable."),
    weights: Path | None = typer.Option(
        None, help="Trained weights for --model (.safetensors or a .pt state_dict). Without them a registered model is trained first."
    ),
    model_args: str = typer.Option("{}", help="The model's constructor arguments (an import path or a registered name) as JSON."),
    recipe: str = typer.Option("deep-compression", help="A built-in recipe (see `torchslim recipes`) or a recipe .yaml file."),
    out: Path | None = typer.Option(
        None, help="The compressed file: .tslim (or .onnx for recipes that end in an int8 engine). Default: <model>-<recipe>.tslim."
    ),
    report: Path | None = typer.Option(None, help="Also write the JSON report here (default: <out>.report.json)."),
    train_epochs: int = typer.Option(10, help="Epochs of training when a registered model comes without --weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its checkpoint (<out>.ckpt/)."),
    keep_checkpoint: bool = typer.Option(False, help="Keep the <out>.ckpt/ folder after a successful run."),
    latency: bool = typer.Option(True, help="Measure eager batch-1 latency of every stage (all timed together at the end)."),
    no_report: bool = typer.Option(False, "--no-report", help="Do not write the HTML and Markdown report beside the output."),
    target_size: str | None = typer.Option(
        None, help="Instead of --recipe: fit the .tslim file into this size (e.g. 20KB, 20KiB), per-layer sparsity and bits chosen from sensitivity."
    ),
    target_macs: float | None = typer.Option(
        None,
        help="Instead of --recipe: remove channels (and factorize layers by SVD) until MACs are at most this fraction "
        "of the model's (0.25: 4x fewer), per set from sensitivity.",
    ),
    target_latency: str | None = typer.Option(
        None,
        help="Instead of --recipe: remove channels (and factorize layers by SVD) until latency on --backend is at "
        "most this fraction of the model's (0.5 or 0.5x), measured.",
    ),
    backend: str = typer.Option("eager", help="With --target-latency: eager or onnxruntime, where latency is measured (batch 1)."),
    remove_blocks: bool | None = typer.Option(
        None,
        "--remove-blocks/--keep-blocks",
        help="With --target-macs / --target-latency: whether residual blocks may be removed as well as channels (default: for latency budgets).",
    ),
    uniform: bool = typer.Option(
        False, "--uniform", help="With a --target-*: one setting for every layer or channel set (the baseline an automatic allocation must beat)."
    ),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    trust_weights: bool = typer.Option(False, help="Allow unpickling a .pt that holds more than tensors (only files you made)."),
    force: bool = typer.Option(False, help="Overwrite --out / --report if they exist."),
) -> None:
    """Run a compression recipe (default: Deep Compression on LeNet-300-100 and the embedded MNIST sample) and
    print the per-stage table; writes the compressed file."""
    import torchslim as ts
    from torchslim.pipeline import Checkpoint, CompressInterrupted, checkpoint_original, checkpoint_status, load_recipe
    from torchslim.report.console import print_report
    from torchslim.report.markdown import format_bytes

    budget = None
    given = (("--target-size", target_size), ("--target-macs", target_macs), ("--target-latency", target_latency))
    targets = [name for name, value in given if value is not None]
    if len(targets) > 1:
        raise TorchslimError(f"give one budget at a time, got {' and '.join(targets)}")
    if targets and resume:
        raise TorchslimError(f"--resume: a {targets[0]} run has no checkpoints; run it again")
    speed: dict[str, Any] | None = None
    if target_size is not None:
        from torchslim.compression.budget import parse_size

        budget = parse_size(target_size)
        name = f"budget-{target_size}"
    elif target_macs is not None:
        speed, name = {"target_macs": target_macs}, f"macs-{target_macs:g}"
    elif target_latency is not None:
        text = target_latency.strip().lower().removesuffix("x")
        try:
            fraction = float(text)
        except ValueError:
            raise TorchslimError(f"--target-latency: expected a fraction of the model's latency like 0.5 or 0.5x, got {target_latency!r}") from None
        speed, name = {"target_latency": fraction, "backend": backend}, f"latency-{fraction:g}-{backend}"
    if speed is not None:
        from torchslim.compression.speed_budget import SpeedBudgetConfig

        depth = {} if remove_blocks is None else {"depth": remove_blocks}
        speed = SpeedBudgetConfig.coerce({**speed, "uniform": uniform, "threads": run.threads or 2, **depth}, where="compress").to_dict()
    plan = load_recipe(recipe) if not targets else load_recipe({"name": f"{name}{'-uniform' if uniform else ''}", "stages": [{"encode": {}}]})
    exports = any(stage.writes_onnx for stage in plan.stages)
    compiled = any(stage.kind == "quantize" and stage.terminal and not stage.writes_onnx for stage in plan.stages)  # PT2E int8
    stem = Path(model).stem if model.endswith((".safetensors", ".tslim")) or Path(model).is_dir() else model.replace(":", "-").replace(".", "-")
    out = out or Path(f"{stem}-{plan.name}{'.onnx' if exports else '.pt2' if compiled else '.tslim'}")
    if exports and out.suffix != ".onnx":
        raise TorchslimError(f"--out: recipe {plan.name!r} ends in an ONNX Runtime engine, so the output must end in .onnx, got {out}")
    if compiled and out.suffix != ".pt2":
        raise TorchslimError(
            f"--out: recipe {plan.name!r} ends in a PT2E int8 model, written as its torch.export program: the output must end in .pt2, got {out}"
        )
    if not exports and not compiled and out.suffix != ".tslim":
        raise TorchslimError(f"--out: recipe {plan.name!r} writes a .tslim file, got {out}")
    beside = out.with_suffix(out.suffix + ".report.json")  # the compressed file's own report, written beside it
    report = report or beside
    checkpoint = out.with_suffix(out.suffix + ".ckpt")
    # an import path the user names here is the only one trusted: never one taken from a file or a checkpoint
    trusted: bool | str = True if trust_factory else (model if ":" in model else False)
    pages = () if no_report else report_paths(beside)
    refuse_overwrite(out, report, beside, *pages, force=force)  # before any work, resumed or not
    if not resume:
        Checkpoint(checkpoint).check()  # a folder torchslim did not make is refused now, before any work
        status = checkpoint_status(checkpoint)
        if status is not None:
            raise TorchslimError(
                f"{checkpoint} holds an unfinished run of {status['recipe']!r} ({status['completed']} of {status['stages']} "
                f"stages done): pass --resume to continue it, or remove the folder"
            )
    elif checkpoint_status(checkpoint) is None:
        raise TorchslimError(f"--resume: no checkpoint in {checkpoint} to continue")
    dataset = source.load()
    if resume:  # the run continues from its checkpoint, which holds the model it started from
        try:
            network = checkpoint_original(checkpoint, trust_factory=trusted)
        except TorchslimError as error:
            if "trust_factory" not in str(error) or not isinstance(trusted, str):
                raise
            raise TorchslimError(
                f"--resume: the checkpoint in {checkpoint} was not started from --model {model}: {str(error).split(': ', 1)[-1]}; resume with "
                "the --model the run started with"
            ) from None
    elif weights is None and ":" in model:
        raise TorchslimError(f"--model {model}: an import-path model needs --weights (its trained state)")
    else:
        network = run.place(load_model_arg(model, dataset, trust_factory, weights, trust_weights, kwargs=model_arguments(model_args)))
        if weights is None and model in ts.models.MODELS:  # a registered architecture comes untrained
            console.print(f"no --weights given: training {model} on {source.name} for {train_epochs} epochs first")
            network = ts.train(
                network, dataset, {"epochs": train_epochs, "lr": 0.05, "batch_size": 64, "weight_decay": 1e-4, "eval_every_epoch": False}, task=source.task
            ).model

    def show(stage) -> None:
        metrics = stage.metrics
        console.print(
            f"  {stage.name:<12} {headline(metrics)}  non-zeros {metrics['nonzeros']:>10,}  "
            f"{format_bytes(metrics['stored_bytes']):>11} ({metrics['bytes_as']}, {metrics['compression']:.1f}x)"
        )

    if budget is not None:
        from torchslim.compression.budget import auto_compress

        console.print(f"fitting {network.__class__.__name__} into {budget:,} bytes: sensitivity of every layer, then allocation")
        result = auto_compress(network, dataset, {"target_size": budget, "uniform": uniform}, task=source.task)
        for stage in result.report.stages:
            show(stage)
        allocation = result.report.artifacts["allocation"]
        for row in allocation["layers"]:
            shape = f"rank {row['rank']}" if row.get("rank") else f"sparsity {row['sparsity']:.2f}"
            console.print(f"  {row['layer']:<24} {shape:<15} {row['bits']:>2} bits  ~{row['predicted_bytes']:,} bytes")
    elif speed is not None:
        from torchslim.compression.speed_budget import auto_narrow

        what = f"{speed['target_macs']:g} of its MACs" if speed["target_macs"] else f"{speed['target_latency']:g} of its latency on {speed['backend']}"
        console.print(f"narrowing {network.__class__.__name__} to {what}: sensitivity and cost of every channel set, then allocation")
        result = auto_narrow(network, dataset, speed, task=source.task)
        allocation = result.report.artifacts["allocation"]
        for row in allocation["sets"]:
            console.print(f"  {row['set'][:48]:<48} {row['channels']:>5} channels  {100 * row['ratio']:5.1f}% removed")
        for row in allocation["factorized"]:
            console.print(f"  {row['layer'][:48]:<48} factorized by SVD to rank {row['rank']}" if row["rank"] else f"  {row['layer'][:48]:<48} left whole")
        for line in result.report.stages[-1].notes[-1:]:
            console.print(f"  {line}")
    else:
        console.print(f"recipe {plan.name}: {' -> '.join(stage.kind for stage in plan.stages)}  (checkpoints in {checkpoint})")
        try:
            result = ts.compress(
                network,
                plan,
                dataset,
                task=source.task,
                checkpoint=checkpoint,
                resume=resume,
                export_path=out if exports else None,
                latency=latency,
                threads=run.threads,
                trust_factory=trusted,
                on_stage=show,
                overwrite=True,  # --force was checked above
            )
        except CompressInterrupted as error:
            console.print(f"[yellow]{error}[/yellow]", soft_wrap=True)
            raise typer.Exit(130) from None
    if not run.main:  # under torchrun every rank ran the recipe; rank 0 writes
        return
    print_report(result.report, console)
    if exports:
        result.report.save(report)
        final = f"ONNX model written to {out} ({format_bytes(out.stat().st_size)})"
    elif compiled:
        ts.export(result.model, "pt2", example_input(dataset), out, overwrite=True)  # --force was checked above
        result.report.save(report)
        final = f"PT2E int8 program written to {out} ({format_bytes(out.stat().st_size)}); load it with torch.export.load"
    else:
        result.save(out, overwrite=force)
        if report != beside:
            result.report.save(report)
        loaded = ts.load(out, trust_factory=trusted)
        check = ts.evaluate(loaded, dataset, task=source.task)
        final = f"compressed model written to {out} ({format_bytes(out.stat().st_size)}); reloaded from the file: {' '.join(headline(check).split())}"
    outputs = {"model": out, "report": report}
    if pages:
        from torchslim.report.html import write_report

        written = write_report(result.report, pages[0])
        outputs.update(html=written["html"], markdown=written["markdown"])
        console.print(f"report written to {report}, {written['html']} and {written['markdown']}")
    else:
        console.print(f"report written to {report}")
    if not keep_checkpoint:
        left = Checkpoint(checkpoint).remove()
        if left:
            console.print(f"[yellow]{checkpoint} kept: it holds files torchslim did not write ({', '.join(left[:5])})[/yellow]")
    run.finish(final, result.report, outputs)


@app.command("report")
def report_command(
    path: Path = typer.Argument(..., help="A run's JSON report (e.g. model.tslim.report.json, written by compress)."),
    out: Path | None = typer.Option(None, help="The HTML file (default: the JSON's name with .html); the Markdown goes beside it as .md."),
    markdown: bool = typer.Option(True, help="Also write the Markdown version (plots as PNG files in <name>_files/)."),
    force: bool = typer.Option(False, help="Overwrite the HTML / Markdown if they exist."),
) -> None:
    """Render a run's JSON report as one self-contained HTML page (plots embedded; no network, no JavaScript) and
    the same content as Markdown."""
    import json

    from torchslim.core.report import Report
    from torchslim.report.html import write_report

    if not path.is_file():
        raise TorchslimError(f"{path}: no such report file")
    html, md = report_paths(path, out)
    if html.suffix != ".html":
        raise TorchslimError(f"--out: the HTML report must end in .html, got {html}")
    refuse_overwrite(html, md if markdown else None, force=force)
    try:
        loaded = Report.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError, AttributeError) as error:
        raise TorchslimError(f"{path}: not a torchslim report ({type(error).__name__}: {error})") from None
    if not loaded.stages:
        raise TorchslimError(f"{path}: the report has no stages to show")
    written = write_report(loaded, html, markdown=markdown)
    console.print(f"report written to {written['html']}" + (f" and {written['markdown']}" if "markdown" in written else ""))


@app.command()
def recipes() -> None:
    """List the built-in recipes with one line each."""
    from torchslim.pipeline import builtin_recipes, load_recipe

    for name in builtin_recipes():
        plan = load_recipe(name)
        console.print(f"  {name:<18} {' -> '.join(stage.kind for stage in plan.stages):<32} {plan.description}", soft_wrap=True)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A .tslim file."),
    streams: bool = typer.Option(True, help="Show each stream's coder, bytes and entropy bound."),
) -> None:
    """Each tensor's encoding and bytes in a .tslim file (checksums verified)."""
    from rich.table import Table

    from torchslim.codec import inspect_tslim

    info = inspect_tslim(path)
    spec = info["spec"]
    console.print(f"{path}: {info['bytes']:,} bytes; architecture {spec.get('name') or spec.get('factory')}; header {info['header_bytes']:,} bytes")
    if info["metadata"]:
        console.print(f"  metadata: {info['metadata']}")
    table = Table()
    for column in ("tensor", "shape", "encoding", "index bits", "code bits", "bytes", "bits / element") + (
        ("streams (coder: bytes / entropy bound)",) if streams else ()
    ):
        table.add_column(column, justify="left" if column in ("tensor", "encoding") or column.startswith("streams") else "right")
    for row in info["tensors"]:
        cells = [
            row["name"],
            "x".join(str(d) for d in row["shape"]) or "scalar",
            row["encoding"],
            str(row["index_bits"] or "-"),
            str(row["bits"] or "-"),
            f"{row['bytes']:,}",
            f"{8 * row['bytes'] / max(1, row['elements']):.2f}",
        ]
        if streams:
            cells.append(
                "; ".join(
                    f"{s['role']} {s['coder']}: {s['bytes']:,}" + (f" / {s['entropy_bytes']:,.0f}" if "entropy_bytes" in s else "") for s in row["streams"]
                )
            )
        table.add_row(*cells)
    console.print(table)
