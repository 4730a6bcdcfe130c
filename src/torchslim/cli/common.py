"""Helpers the command groups share: reading models, data and lists from the command line."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

import torch
import typer

from torchslim.cli.app import console
from torchslim.core.errors import TorchslimError
from torchslim.core.files import check_writable

DATA_HELP = "A dataset name (see `torchslim list datasets`; mnist-sample is embedded and offline) or a folder of images in class subfolders."
DATA_ROOT = typer.Option(None, help="Folder holding the dataset files (default: $TORCHSLIM_DATA or the cache).")
NO_VERIFY = typer.Option(False, "--no-verify", help="Accept your own copy of a dataset's files without comparing checksums.")
NORMALIZE = typer.Option("dataset", help="Input standardization: 'dataset' (the set's mean/std), 'none', or MEAN:STD (comma-separated per channel).")
SCALE = typer.Option(1 / 255, help="Pixel scale before standardization (1/255 gives [0, 1]; Caffe models use 0.00390625 = 1/256).")
TASK = typer.Option(None, help="classification, language-modeling or fidelity (default: from the data).")


@dataclasses.dataclass(frozen=True)
class DataArguments:
    """The data options of a command: ``--data`` (a name or an image folder), ``--data-root``, ``--no-verify``,
    ``--normalize``, ``--scale`` and ``--task``."""

    name: str
    root: Path | None = None
    no_verify: bool = False
    normalize: str = "dataset"
    scale: float = 1 / 255
    task: str | None = None

    def load(self) -> Any:
        return load_data(self.name, self.root, self.no_verify, self.normalize, self.scale)


def _with_options(name: str, options: list[tuple[str, Any, Any]], make: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command a group of options; it receives them as one object, ``name=make(*values)``."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = get_type_hints(command)
        own = [
            parameter.replace(annotation=hints.get(parameter.name, parameter.annotation))
            for parameter in inspect.signature(command).parameters.values()
            if parameter.name != name
        ]
        added = [inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation) for option, annotation, default in options]

        @functools.wraps(command)
        def run(**values: Any) -> Any:
            group = make(*(values.pop(option) for option, _, _ in options))
            return command(**{name: group}, **values)

        parameters = own + added
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer must see the new signature, not the command's
        return run

    return decorate


def with_data(default: str = "mnist-sample") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the data options; it receives them as ``source: DataArguments``."""
    options = [
        ("data", str, typer.Option(default, help=DATA_HELP)),
        ("data_root", Path | None, DATA_ROOT),
        ("no_verify", bool, NO_VERIFY),
        ("normalize", str, NORMALIZE),
        ("scale", float, SCALE),
        ("task", str | None, TASK),
    ]
    return _with_options("source", options, DataArguments)


def check_device(text: str) -> torch.device:
    """``--device``: cpu, cuda or cuda:N, refused when this machine does not have it."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise TorchslimError(f"--device: {text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise TorchslimError(f"--device: {text!r}: torchslim runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TorchslimError(f"--device {text}: this machine has no CUDA device (torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TorchslimError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The options every long command has: ``--seed``, ``--threads``, ``--device``, ``--json`` (print the
    machine-readable result instead of tables), ``--quiet`` (print only errors and the final line) and ``--parallel``
    (under torchrun: ddp or fsdp for every training run)."""

    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    json: bool = False
    quiet: bool = False
    parallel: str = "ddp"

    def start(self) -> None:
        """Apply the options before any work: seeds, thread count, the device check, what prints."""
        import random

        import numpy

        from torchslim.train.progress import quiet

        if self.threads is not None:
            if self.threads < 1:
                raise TorchslimError(f"--threads must be >= 1, got {self.threads}")
            torch.set_num_threads(self.threads)
        check_device(self.device)
        from torchslim.train import distributed

        distributed.set_strategy(self.parallel)
        world = distributed.init(self.device)  # under torchrun: join the group; rank r runs on cuda:r for --device cuda
        random.seed(self.seed)
        numpy.random.seed(self.seed)
        torch.manual_seed(self.seed)
        console.quiet = self.quiet or self.json or not world.main
        quiet(self.quiet or not world.main)
        if self.quiet or self.json or not world.main:
            warnings.filterwarnings("ignore")

    @property
    def main(self) -> bool:
        """True in a single process and on rank 0 under torchrun: the process that prints and writes files."""
        from torchslim.train import distributed

        return distributed.is_main()

    def place(self, model: Any) -> Any:
        """The model on the chosen device (tensors of each batch follow the model)."""
        return model.to(self.device) if self.device != "cpu" and isinstance(model, torch.nn.Module) else model

    def finish(self, line: str, report: Any = None, outputs: dict[str, Any] | None = None, **extra: Any) -> None:
        """The command's final line; with --json instead one JSON object: the line, files written, extra values and
        the report. Prints nothing on ranks other than 0."""
        if not self.main:
            return
        if self.json:
            result = {"result": line, "outputs": {key: str(value) for key, value in (outputs or {}).items()}, **extra}
            if report is not None:
                result["report"] = report.to_dict()
            sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        elif self.quiet:
            sys.stdout.write(line + "\n")
        else:
            console.print(line, soft_wrap=True)


@dataclasses.dataclass
class WeightsArguments:
    """``--weights`` (a state dict for the model named) and ``--trust-weights``."""

    path: Path | None = None
    trusted: bool = False
    factory_trained: bool = False
    model_args: str = "{}"


def with_weights() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command ``--weights`` and ``--trust-weights``; it receives them as ``weights: WeightsArguments``."""
    options = [
        ("weights", Path | None, typer.Option(None, help="Weights to load into the model (.safetensors or .pt state_dict); an import-path model needs them.")),
        ("trust_weights", bool, typer.Option(False, help="Allow unpickling a .pt that holds more than tensors (only files you made).")),
        ("factory_trained", bool, typer.Option(False, help="The import path builds the trained model itself (it loads its own checkpoint): no --weights.")),
        (
            "model_args",
            str,
            typer.Option("{}", help="The model's constructor arguments (an import path or a registered name) as JSON, e.g. '{\"width\": 32}'."),
        ),
    ]
    return _with_options("weights", options, WeightsArguments)


def with_run_options(threads: int | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a long command ``--seed``, ``--threads``, ``--device``, ``--json`` and ``--quiet``; it receives them,
    already applied, as ``run: RunOptions``."""
    options = [
        ("seed", int, typer.Option(0, help="Random seed of everything the command draws (runs are reproducible).")),
        ("threads", int | None, typer.Option(threads, help="Threads for computing and timing (default: torch's default for this machine).")),
        ("device", str, typer.Option("cpu", help="cpu, cuda or cuda:N: where the model runs.")),
        ("json", bool, typer.Option(False, "--json", help="Print the machine-readable result (JSON) instead of tables.")),
        ("quiet", bool, typer.Option(False, "--quiet", "-q", help="Print only errors and the final line.")),
        ("parallel", str, typer.Option("ddp", help="Under torchrun: ddp replicates the model per process; fsdp shards weights, gradients, optimizer state.")),
    ]

    def make(*values: Any) -> RunOptions:
        run = RunOptions(*values)
        run.start()
        return run

    return _with_options("run", options, make)


def number_list(text: str, option: str, cast: type = float) -> list[Any]:
    """Comma-separated numbers (``cast`` each); empty entries dropped, so '' is an empty list."""
    try:
        return [cast(part) for part in text.split(",") if part.strip()]
    except ValueError:
        kind = "integers like 1,64" if cast is int else "numbers like 0.5,0.9"
        raise TorchslimError(f"{option}: expected comma-separated {kind}, got {text!r}") from None


def int_list(text: str, option: str) -> list[int]:
    values = number_list(text, option, int)
    if not values or any(v < 1 for v in values):
        raise TorchslimError(f"{option}: expected positive integers, got {text!r}")
    return values


def names(text: str | None) -> list[str]:
    """Comma-separated names, empty entries dropped."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def write_outputs(result: Any, out: Path | None, report: Path | None, describe: Callable[[Path], str]) -> None:
    """Write a verb's model to ``out`` and its report to ``report`` (either may be None), saying what was written;
    ``describe(path)`` is the line for the model file. Under torchrun only rank 0 writes."""
    import torchslim as ts
    from torchslim.train import distributed

    if not distributed.is_main():
        return
    if out is not None:
        console.print(describe(ts.save(result.model, out)))
    if report is not None:
        result.report.save(report)
        console.print(f"report written to {report}")


def refuse_overwrite(*paths: Path | None, force: bool) -> None:
    """Stop before any work when an output exists and --force was not given (nothing the user had is overwritten), or
    when it could not be written at all (the error comes now, not after the work)."""
    for path in paths:
        if path is None:
            continue
        if path.exists() and not force:
            raise TorchslimError(f"{path} exists; refusing to overwrite it (pass --force)")
        check_writable(path)


def _normalization(text: str) -> Any:
    if text == "dataset":
        return "dataset"
    if text.lower() == "none":
        return None
    mean, sep, std = text.partition(":")
    try:
        values = (tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(",")))
    except ValueError:
        values = ((), ())
    if not sep or not values[0] or len(values[0]) != len(values[1]):
        raise TorchslimError(f"--normalize: expected 'dataset', 'none' or MEAN:STD such as 0.1307:0.3081, got {text!r}")
    return values


def load_data(name: str, root: Path | None = None, no_verify: bool = False, normalize: str = "dataset", scale: float = 1 / 255) -> Any:
    """A dataset by name, or a folder of images, with the user's preprocessing."""
    import torchslim as ts

    return ts.data.load(name, root=root, download=root is None, normalize=_normalization(normalize), scale=scale, verify=not no_verify)


def example_input(data: Any) -> Any:
    from torchslim.data.sources import as_source

    return as_source(data).example(1)


MODEL_FILES = (".safetensors", ".tslim", ".onnx", ".pt", ".pth", ".bin", ".ckpt")


def model_arguments(text: str, option: str = "--model-args") -> dict[str, Any]:
    """Constructor arguments given as a JSON object on the command line."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise TorchslimError(f"{option} is not valid JSON ({error}): give an object such as '{{\"width\": 32}}'") from None
    if not isinstance(value, dict):
        raise TorchslimError(f"{option}: expected a JSON object of constructor arguments, got {text!r}")
    return value


def load_model_arg(
    model: str,
    data: Any,
    trust_factory: bool,
    weights: Path | WeightsArguments | None = None,
    trust_weights: bool = False,
    untrained: bool = False,
    kwargs: dict[str, Any] | None = None,
) -> Any:
    """A registered model name (sized for the data), a saved model file, a Hugging Face model folder, or
    package.module:callable with ``weights`` (refused without them unless ``untrained`` will do: a freshly built model
    would be compressed and written as if it were the user's); ``kwargs`` (or ``--model-args``) are the constructor
    arguments of an import path or a registered name."""
    if isinstance(weights, WeightsArguments):
        untrained = untrained or weights.factory_trained
        kwargs = {**model_arguments(weights.model_args), **(kwargs or {})}
        weights, trust_weights = weights.path, weights.trusted
    kwargs = kwargs or {}
    import_path = ":" in model and not Path(model).exists()
    module_part = model.rpartition(":")[0]
    if import_path and (module_part.endswith(".py") or "/" in module_part or "\\" in module_part):
        raise TorchslimError(
            f"--model {model}: a model is named by an importable module, not a file path: package.module:callable with the folder "
            f"that holds it on PYTHONPATH (for {module_part}: PYTHONPATH={Path(module_part).parent or '.'} and --model "
            f"{Path(module_part).stem}:{model.rpartition(':')[2]})"
        )
    if not import_path and model.lower().endswith(MODEL_FILES) and not Path(model).exists():
        raise TorchslimError(f"{model}: no such file")
    if import_path and weights is None and not untrained:
        raise TorchslimError(
            f"{model}: an import-path model is built with fresh random weights; pass its trained state with --weights "
            "(a .safetensors or .pt state dict), --factory-trained where the callable loads its own checkpoint, or save the trained "
            "model with torchslim.save(model, 'model.safetensors') and name that file"
        )
    import torchslim as ts
    from torchslim.io.modelfile import build_from_spec, load_huggingface, load_state, load_weights

    if kwargs and not import_path and Path(model).exists():
        raise TorchslimError(f"--model-args: {model} is a saved model, built as saved; constructor arguments go with an import path or a registered name")
    if Path(model).is_dir():
        loaded = load_huggingface(model)
    elif model.endswith((".safetensors", ".tslim")) and Path(model).is_file():
        loaded = ts.load(model, trust_factory=trust_factory)
    elif import_path:
        try:
            loaded = build_from_spec({"factory": model, "kwargs": kwargs}, trust_factory=True, where="--model")
        except TorchslimError as error:
            if "missing" in str(error) and "required" in str(error) and "argument" in str(error):
                raise TorchslimError(f"{error}; give them as JSON with --model-args, e.g. --model-args '{{\"width\": 32}}'") from None
            raise
    elif Path(model).is_file():
        raise TorchslimError(
            f"{model}: not a model file torchslim reads (.safetensors or .tslim files it wrote, .onnx, a Hugging Face folder); for a "
            "model saved with torch.save, build it with --model package.module:build and pass its state dict with --weights (a pickled "
            "whole model is not unpickled), or save it with torchslim.save(model, 'model.safetensors') in Python"
        )
    else:
        created = ts.models.create_for(model, data, **kwargs)
        if weights is not None:
            load_state(created, load_weights(weights, trusted=trust_weights), str(weights), cast=True)
        return created
    if weights is not None:
        load_state(loaded, load_weights(weights, trusted=trust_weights), str(weights), cast=True)
    if data is not None and (import_path or model.endswith((".safetensors", ".tslim"))):
        _check_runs_on(loaded, model, data)  # a user's model (a file torchslim wrote, or their class): named before any work
    return loaded


def _check_runs_on(loaded: Any, model: str, data: Any) -> None:
    """A model of the user's that does not run on the data's examples (the default data set, say) is named before
    any work, with the input it was given."""
    import torch

    from torchslim.core.errors import TorchslimError
    from torchslim.tasks.batches import run_failure

    if any(p.is_floating_point() and p.dtype != torch.float32 for p in loaded.parameters()):
        return  # the task casts its inputs to a half-precision model's dtype; a bare call would not
    example = example_input(data)
    failure = run_failure(loaded, example)
    if failure is not None:
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        name = getattr(data, "name", None) or "the data"
        raise TorchslimError(f"{model} does not run on the examples of {name} (input {shape}): {failure}; give --data with this model's inputs")
