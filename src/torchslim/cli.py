"""The ``torchslim`` command line: thin, it parses, calls the public verbs and prints.

Errors print one line (``error: ...``) and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="torchslim: make trained PyTorch models smaller and faster while keeping their accuracy.",
)
console = Console(width=None if sys.stdout.isatty() else 160)
STATE = {"debug": False}


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    STATE["debug"] = debug


def _int_list(text: str, option: str) -> list[int]:
    from torchslim.core.errors import TorchslimError

    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise TorchslimError(f"{option}: expected comma-separated integers like 1,64, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise TorchslimError(f"{option}: expected positive integers, got {text!r}")
    return values


def _refuse_overwrite(*paths: Optional[Path], force: bool) -> None:
    """Stop before any work when an output exists and --force was not given: nothing the user had is overwritten."""
    from torchslim.core.errors import TorchslimError

    for path in paths:
        if path is not None and path.exists() and not force:
            raise TorchslimError(f"{path} exists; refusing to overwrite it (pass --force)")


def _example_input(data) -> "object":
    if hasattr(data, "train_ids"):
        return data.test_ids[:64].unsqueeze(0)
    return data.example_input(1)


def _load_model_arg(model: str, data, trust_factory: bool, weights: Optional[Path], trust_weights: bool):
    """A registered model name (sized for the data), a saved .safetensors model file, or package.module:callable."""
    import torchslim as ts
    from torchslim.io.modelfile import build_from_spec, load_weights

    if model.endswith((".safetensors", ".tslim")) and Path(model).is_file():
        loaded = ts.load(model, trust_factory=trust_factory)
    elif ":" in model:
        loaded = build_from_spec({"factory": model, "kwargs": {}}, trust_factory=True, where="--model")
    else:
        loaded = ts.models.create_for(model, data)
    if weights is not None:
        from torchslim.io.modelfile import _load_into

        _load_into(loaded, load_weights(weights, trusted=trust_weights), str(weights))
    return loaded


@app.command("list")
def list_command(what: str = typer.Argument("all", help="models, datasets, backends or all")) -> None:
    """List registered models, datasets and latency backends with one line each."""
    from torchslim.core.errors import TorchslimError
    from torchslim.data import DATASETS
    from torchslim.measure.latency import BACKENDS
    from torchslim.models import MODELS

    tables = {"models": MODELS, "datasets": DATASETS, "backends": BACKENDS}
    if what != "all" and what not in tables:
        raise TorchslimError(f"unknown list {what!r}; choose from: all, {', '.join(tables)}")
    for title, registry in tables.items():
        if what in ("all", title):
            console.print(f"[bold]{title}[/bold]")
            for name in registry.names():
                console.print(f"  {name:<18} {registry.summary(name)}")


@app.command()
def train(
    model: str = typer.Option("lenet-300-100", help="Registered model name (see `torchslim list models`)."),
    data: str = typer.Option("mnist-sample", help="Dataset name (see `torchslim list datasets`); mnist-sample is embedded and offline."),
    data_root: Optional[Path] = typer.Option(None, help="Folder holding the dataset files (default: $TORCHSLIM_DATA or the cache)."),
    epochs: int = typer.Option(5, help="Training epochs."),
    lr: float = typer.Option(0.05, help="Base learning rate."),
    optimizer: str = typer.Option("sgd", help="sgd, adam or adamw."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    weight_decay: float = typer.Option(1e-4, help="Weight decay."),
    seed: int = typer.Option(0, help="Random seed (runs are reproducible)."),
    out: Optional[Path] = typer.Option(None, help="Write the trained model here (.safetensors with its architecture spec)."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON report here."),
    force: bool = typer.Option(False, help="Overwrite --out / --report if they exist."),
    threads: int = typer.Option(2, help="Threads for the latency measurement."),
) -> None:
    """Train a reference model on a dataset, then evaluate and profile it."""
    import torchslim as ts
    from torchslim.report.console import print_report

    _refuse_overwrite(out, report, force=force)
    ts.models.MODELS.get(model)
    dataset = ts.data.load(data, root=data_root, download=data_root is None)
    console.print(f"{data}: {len(getattr(dataset, 'train', getattr(dataset, 'train_ids', [])))} training examples")
    network = ts.models.create_for(model, dataset)
    config = {"epochs": epochs, "lr": lr, "optimizer": optimizer, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed}
    result = ts.train(network, dataset, config)
    for note in result.report.stages[0].notes:
        console.print(f"  {note}")
    profiled = ts.profile(result.model, _example_input(dataset), batch_sizes=(1, 64), threads=threads)
    stage = profiled.report.stages[0]
    stage.name, stage.kind = "trained", "train"
    for key in ("accuracy", "error", "loss", "examples"):
        stage.metrics[key] = result.report.stages[0].metrics[key]
    result.report.stages.append(stage)
    print_report(type(result.report)(model=result.report.model, stages=[stage], environment=result.report.environment))
    if out is not None:
        saved = ts.save(result.model, out)
        console.print(f"model written to {saved} ({saved.stat().st_size:,} bytes)")
    if report is not None:
        result.report.save(report)
        console.print(f"report written to {report}")


@app.command()
def evaluate(
    model: str = typer.Argument(..., help="A saved model file (.safetensors) or a registered model name."),
    data: str = typer.Option("mnist-sample", help="Dataset name."),
    data_root: Optional[Path] = typer.Option(None, help="Folder holding the dataset files."),
    weights: Optional[Path] = typer.Option(None, help="Weights to load into the model (.safetensors or .pt state_dict)."),
    trust_weights: bool = typer.Option(False, help="Allow unpickling a .pt that holds more than tensors (only files you made)."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    split: str = typer.Option("test", help="train or test."),
) -> None:
    """Evaluate a model on a dataset split: accuracy, error, loss."""
    import torchslim as ts

    dataset = ts.data.load(data, root=data_root, download=data_root is None)
    network = _load_model_arg(model, dataset, trust_factory, weights, trust_weights)
    metrics = ts.evaluate(network, dataset, split=split)
    console.print(
        f"{data} {split}: accuracy {100 * metrics['accuracy']:.2f}%  error {100 * metrics['error']:.2f}%  "
        f"({metrics['errors']} of {metrics['examples']})  loss {metrics['loss']:.4f}"
    )


@app.command()
def profile(
    model: str = typer.Argument(..., help="A saved model file (.safetensors) or a registered model name."),
    data: str = typer.Option("mnist-sample", help="Dataset whose input shape to use."),
    data_root: Optional[Path] = typer.Option(None, help="Folder holding the dataset files."),
    batch_sizes: str = typer.Option("1,64", help="Comma-separated batch sizes to time."),
    backends: str = typer.Option("eager", help="Comma-separated latency backends (see `torchslim list backends`)."),
    runs: int = typer.Option(50, help="Timed runs per batch size (after warm-up)."),
    threads: int = typer.Option(2, help="Thread count fixed while timing."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON report here."),
    layers: bool = typer.Option(False, help="Print the per-layer table too."),
) -> None:
    """Parameters, non-zeros, MACs, bytes and measured latency of a model."""
    import torchslim as ts
    from torchslim.report.console import print_report
    from torchslim.report.markdown import report_to_markdown

    dataset = ts.data.load(data, root=data_root, download=data_root is None)
    network = _load_model_arg(model, dataset, trust_factory, None, False)
    sizes = _int_list(batch_sizes, "--batch-sizes")
    result = ts.profile(network, _example_input(dataset), batch_sizes=sizes, backends=[b.strip() for b in backends.split(",")], runs=runs, threads=threads)
    print_report(result.report)
    for row in result.report.stages[0].metrics["latency"]:
        flag = "  BIMODAL" if row["bimodal"] else ""
        console.print(
            f"  {row['backend']:<8} batch {row['batch_size']:>4}: median {row['median_ms']:.3f} ms, "
            f"min {row['min_ms']:.3f}, p90 {row['p90_ms']:.3f} ({row['runs']} runs, {row['threads']} threads){flag}"
        )
    if layers:
        console.print(report_to_markdown(result.report))
    if report is not None:
        result.report.save(report)


@app.command()
def prune(
    model: str = typer.Argument(..., help="A saved model file (.safetensors) or a registered model name."),
    out: Path = typer.Option(..., help="Where to write the pruned model (.safetensors)."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of the selected weights to remove, in [0, 1)."),
    quality: Optional[float] = typer.Option(None, help="Han et al.'s rule instead: prune |w| < quality x the layer's std."),
    method: str = typer.Option("l1", help="Importance criterion: l1, l2, gradient, taylor, random."),
    scope: str = typer.Option("layer", help="layer (each layer to the sparsity) or global (one threshold)."),
    include: str = typer.Option("*", help="Comma-separated layer-name patterns (glob or re:regex)."),
    exclude: str = typer.Option("", help="Comma-separated layer-name patterns to leave alone."),
    steps: int = typer.Option(1, help="Iterative pruning: reach the sparsity in this many prune + fine-tune steps."),
    finetune_epochs: int = typer.Option(0, help="Fine-tuning epochs after each pruning step."),
    lr: float = typer.Option(0.01, help="Fine-tuning learning rate."),
    data: str = typer.Option("mnist-sample", help="Dataset for gradient criteria, fine-tuning and evaluation."),
    data_root: Optional[Path] = typer.Option(None, help="Folder holding the dataset files."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON report here."),
    force: bool = typer.Option(False, help="Overwrite --out / --report if they exist."),
    structured: bool = typer.Option(False, "--structured", help="Remove whole neurons, channels and heads (the model really shrinks); --sparsity is then the fraction of channels."),
    importance: str = typer.Option("l1", help="--structured: l1, l2, bn_scale, mean_activation, apoz, taylor or random."),
    round_to: int = typer.Option(1, help="--structured: kept channel counts are multiples of this."),
    head_ratio: float = typer.Option(0.0, help="--structured: fraction of attention heads to remove."),
    protect: Optional[str] = typer.Option(None, help="--structured: comma-separated layers whose outputs stay (default: first and last)."),
    keep_residual: bool = typer.Option(False, help="--structured: leave channels joined by residual adds whole."),
) -> None:
    """Prune weights (unstructured; per layer or global) or, with --structured, whole channels; optionally
    iteratively with fine-tuning, and save."""
    import torchslim as ts
    from torchslim.core.errors import TorchslimError
    from torchslim.pruning import iterative_prune, make_permanent, schedule_sparsities
    from torchslim.report.console import print_report

    _refuse_overwrite(out, report, force=force)
    if structured:
        from torchslim.pruning.structured import prune_channels
        from torchslim.train.fit import fit

        if sparsity is None or quality is not None:
            raise TorchslimError("--structured takes --sparsity (the fraction of channels to remove), not --quality")
        dataset = ts.data.load(data, root=data_root, download=data_root is None)
        network = _load_model_arg(model, dataset, trust_factory, None, False)
        baseline = ts.evaluate(network, dataset)
        config = {"ratio": sparsity, "scope": scope, "importance": importance if importance != "l1" else method,
                  "round_to": round_to, "head_ratio": head_ratio, "prune_residual": not keep_residual}
        if protect is not None:
            config["protect"] = [p for p in protect.split(",") if p]
        result = prune_channels(network, config, data=dataset)
        stage = result.report.stages[0]
        stage.metrics.update({f"{k}_after_prune": v for k, v in ts.evaluate(result.model, dataset).items() if k in ("accuracy", "error")})
        if finetune_epochs > 0:
            fit(result.model, dataset, {"epochs": finetune_epochs, "lr": lr, "eval_every_epoch": False})
        stage.metrics.update(ts.evaluate(result.model, dataset))
        result.report.stages.insert(0, ts.Report().add_stage("original", kind="baseline", metrics={
            **baseline, "parameters": ts.measure.count_parameters(network)}))
        print_report(result.report)
        for row in stage.layers:
            console.print(f"  {row['name']:<32} {row['type']:<12} {row['before']:>14} -> {row['after']}")
        for note in stage.notes:
            console.print(f"  [yellow]{note}[/yellow]")
        console.print(f"MACs {stage.metrics['macs_before']:,} -> {stage.metrics['macs']:,} ({stage.metrics['macs_ratio']:.2f}x fewer)")
        saved = ts.save(result.model, out)
        console.print(f"pruned model written to {saved} ({saved.stat().st_size:,} bytes; channels removed)")
        if report is not None:
            result.report.save(report)
        return
    if (sparsity is None) == (quality is None):
        raise TorchslimError("give exactly one of --sparsity or --quality")
    if steps < 1:
        raise TorchslimError(f"--steps must be >= 1, got {steps}")
    dataset = ts.data.load(data, root=data_root, download=data_root is None)
    network = _load_model_arg(model, dataset, trust_factory, None, False)
    layers = {"include": [p for p in include.split(",") if p], "exclude": [p for p in exclude.split(",") if p]}
    base = {"method": method, "scope": scope, "layers": layers}
    baseline = ts.evaluate(network, dataset)
    if quality is not None or steps == 1 and finetune_epochs == 0:
        target = {"quality": quality} if quality is not None else {"sparsity": sparsity}
        result = ts.prune(network, {**base, **target}, data=dataset)
        result.report.stages[0].metrics.update(ts.evaluate(result.model, dataset))
    else:
        config = {"sparsities": list(schedule_sparsities(sparsity, steps)), "prune": {**base, "sparsity": sparsity},
                  "finetune": {"epochs": max(1, finetune_epochs), "lr": lr}}
        result = iterative_prune(network, dataset, config)
    result.report.stages.insert(0, ts.Report().add_stage("original", kind="baseline", metrics={
        **baseline, "parameters": ts.measure.count_parameters(network), "nonzeros": ts.measure.count_nonzeros(network)}))
    make_permanent(result.model)
    print_report(result.report)
    saved = ts.save(result.model, out)
    console.print(f"pruned model written to {saved} ({saved.stat().st_size:,} bytes; zeros are stored densely)")
    if report is not None:
        result.report.save(report)


@app.command()
def distill(
    teacher: str = typer.Option(..., help="The teacher: a saved model file (.safetensors) or a registered model name."),
    student: str = typer.Option(..., help="The student: a saved model file or a registered model name."),
    student_args: str = typer.Option("{}", help='JSON arguments for a registered student, e.g. \'{"hidden": [300]}\'.'),
    out: Path = typer.Option(..., help="Where to write the distilled student (.safetensors)."),
    temperature: float = typer.Option(4.0, help="Softmax temperature T of the soft targets."),
    alpha: float = typer.Option(0.9, help="Weight of the soft term; 1 - alpha weighs the hard labels."),
    loss: str = typer.Option("kl", help="kl (soft targets) or mse (logits)."),
    epochs: int = typer.Option(10, help="Training epochs."),
    lr: float = typer.Option(0.05, help="Learning rate."),
    batch_size: int = typer.Option(128, help="Batch size."),
    cache_teacher: bool = typer.Option(False, help="Compute the teacher's logits once over the training data."),
    data: str = typer.Option("mnist-sample", help="Dataset name."),
    data_root: Optional[Path] = typer.Option(None, help="Folder holding the dataset files."),
    trust_factory: bool = typer.Option(False, help="Allow model files whose architecture is an import path."),
    report: Optional[Path] = typer.Option(None, help="Write the JSON report here."),
    force: bool = typer.Option(False, help="Overwrite --out / --report if they exist."),
) -> None:
    """Distill a teacher into a student: soft targets at temperature T (or logit MSE), then save the student."""
    import json

    import torchslim as ts
    from torchslim.core.errors import TorchslimError
    from torchslim.report.console import print_report

    _refuse_overwrite(out, report, force=force)
    try:
        kwargs = json.loads(student_args)
    except json.JSONDecodeError as error:
        raise TorchslimError(f"--student-args is not valid JSON ({error})") from None
    dataset = ts.data.load(data, root=data_root, download=data_root is None)
    teacher_model = _load_model_arg(teacher, dataset, trust_factory, None, False)
    if student.endswith(".safetensors"):
        student_model = _load_model_arg(student, dataset, trust_factory, None, False)
    else:
        student_model = ts.models.create_for(student, dataset, **kwargs)
    config = {"temperature": temperature, "alpha": alpha, "loss": loss, "cache_teacher": cache_teacher,
              "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size}}
    result = ts.distill(student_model, teacher_model, dataset, config)
    print_report(result.report)
    metrics = result.report.stages[0].metrics
    console.print(f"teacher error {100 * metrics['teacher_error']:.2f}% ({metrics['teacher_parameters']:,} params); "
                  f"student error {100 * metrics['error']:.2f}% ({metrics['parameters']:,} params)")
    saved = ts.save(result.model, out)
    console.print(f"student written to {saved}")
    if report is not None:
        result.report.save(report)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="A saved model file (.safetensors) or a registered model name."),
    out: Path = typer.Option(..., help="Output: .safetensors for weight-only schemes, .onnx for int8 in ONNX Runtime."),
    scheme: str = typer.Option("uniform", help="uniform, kmeans, pow2, binary, ternary, fp16, bf16; int8-static / int8-dynamic (ONNX Runtime's quantizer); int8-native (torchslim's own static int8: BN folded, torchslim observers, QDQ for ONNX Runtime)."),
    bits: int = typer.Option(8, help="Bits per weight (uniform 1-16, kmeans 1-8, pow2 2-8)."),
    granularity: str = typer.Option("channel", help="Uniform grids: tensor, channel or group."),
    group_size: int = typer.Option(128, help="Group size along the input dimension (granularity group)."),
    asymmetric: bool = typer.Option(False, help="Affine (min-max) grid instead of symmetric."),
    layer_bits: str = typer.Option("", help="Mixed precision: comma-separated layer=bits, e.g. fc1=2,fc3=8."),
    calibration: str = typer.Option("minmax", help="int8 calibration: minmax, entropy or percentile (int8-static); minmax, moving-average, percentile, mse or entropy (int8-native)."),
    calibration_batches: int = typer.Option(16, help="int8-static calibration batches."),
    data: str = typer.Option("mnist-sample", help="Dataset for calibration and evaluation."),
    data_root: Optional[Path] = typer.Option(None, help="Folder holding the dataset files."),
    trust_factory: bool = typer.Option(False, help="Allow a model file whose architecture is an import path."),
    force: bool = typer.Option(False, help="Overwrite --out if it exists."),
) -> None:
    """Quantize weights (stored packed; reloads exactly) or produce a real int8 ONNX model, and evaluate it."""
    import torchslim as ts
    from torchslim.core.errors import TorchslimError
    from torchslim.report.markdown import format_bytes

    _refuse_overwrite(out, force=force)
    dataset = ts.data.load(data, root=data_root, download=data_root is None)
    network = _load_model_arg(model, dataset, trust_factory, None, False)
    before = ts.evaluate(network, dataset)
    if scheme == "int8-native":
        from torchslim.export.onnx import OnnxModule
        from torchslim.quantization.observers import OBSERVERS
        from torchslim.quantization.qat import calibrate_observers, export_qat_onnx, fold_batchnorm, prepare_qat

        if calibration not in OBSERVERS:
            raise TorchslimError(f"--calibration: unknown observer {calibration!r}; valid: {', '.join(OBSERVERS.names())}")
        native = prepare_qat(fold_batchnorm(network), {"weight_scale": "observer"})
        batches = list(dataset.loader("train", batch_size=64, shuffle=True))[:calibration_batches]
        calibrate_observers(native, batches, calibration, calibration_batches)
        engine = OnnxModule(export_qat_onnx(native, dataset.example_input(1), out))
        after = ts.evaluate(engine, dataset)
        console.print(f"int8 QDQ model written to {out} ({format_bytes(out.stat().st_size)}); runs in ONNX Runtime")
    elif scheme in ("int8-static", "int8-dynamic"):
        from torchslim.quantization.onnx_static import onnx_int8_module

        config = {"mode": scheme.split("-")[1], "calibration": calibration, "calibration_batches": calibration_batches}
        batches = (inputs for inputs, _ in dataset.loader("train", batch_size=64, shuffle=True))
        engine = onnx_int8_module(network, dataset.example_input(1), batches, out, config)
        after = ts.evaluate(engine, dataset)
        console.print(f"int8 ONNX model written to {out} ({format_bytes(out.stat().st_size)}); runs in ONNX Runtime")
    else:
        schemes = {}
        for item in [part for part in layer_bits.split(",") if part]:
            name, _, value = item.partition("=")
            if not value.isdigit():
                raise TorchslimError(f"--layer-bits: expected layer=bits, got {item!r}")
            schemes[name] = {"scheme": scheme, "bits": int(value), "granularity": granularity, "group_size": group_size, "symmetric": not asymmetric}
        config = {"weights": {"scheme": scheme, "bits": bits, "granularity": granularity, "group_size": group_size, "symmetric": not asymmetric},
                  "layer_schemes": schemes}
        result = ts.quantize(network, config)
        after = ts.evaluate(result.model, dataset)
        saved = ts.save(result.model, out)
        for row in result.report.stages[0].layers:
            console.print(f"  {row['name']:<24} {row['scheme']:<8} {row['bits']:>2} bits  SQNR {row['sqnr_db']:6.2f} dB  "
                          f"{format_bytes(row['dense_bytes'])} -> {format_bytes(row['stored_bytes'])}")
        console.print(f"quantized model written to {saved} ({format_bytes(saved.stat().st_size)})")
    console.print(f"test error {100 * before['error']:.2f}% -> {100 * after['error']:.2f}%")


from torchslim import cli_pipeline  # noqa: E402,F401 - registers compress, recipes and inspect on the app


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: runs the app; user errors print one line unless --debug."""
    arguments = sys.argv[1:] if argv is None else argv
    debug = "--debug" in arguments
    try:
        code = app(args=arguments, standalone_mode=False)
        if isinstance(code, int):  # typer.Exit(n) inside a command comes back as its exit code
            return code
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as error:  # noqa: BLE001 - one clear line for any failure, traceback with --debug
        import click

        if isinstance(error, click.exceptions.Exit):
            return error.exit_code
        if isinstance(error, click.ClickException):
            error.show()
            return error.exit_code
        if debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
