"""``ts.export(model, format, example_input, path)``: a dense, pruned, factorized or quantized model written as
ONNX, a torch.export program (``.pt2``) or TorchScript, then loaded back from the file and checked against the
PyTorch model at two batch sizes (the batch dimension is dynamic unless ``dynamic_batch=False``).

- ``onnx``: the file ONNX Runtime runs (``export_onnx``); an int8 ONNX Runtime engine (what ``quantize`` returns for
  the static int8 methods) is written as it is. Weight-only layers keep their codes where ONNX Runtime can run them:
  int8 per channel behind a DequantizeLinear, other uniform codes of at most 8 bits as MatMulNBits (its int4 / int8 kernels)
  and, for an embedding, as GatherBlockQuantized (a tied LM head and its embedding read one copy of the codes). A weight the
  exporter writes twice, as itself and transposed (an embedding tied to the LM head), is stored once.
- ``pt2``: ``torch.export.export`` with a dynamic batch, saved with ``torch.export.save``; reload with
  ``torch.export.load(path).module()``.
- ``torchscript``: ``torch.jit.trace``, saved with ``torch.jit.save``; reload with ``torch.jit.load``. Tracing
  records the path the example took: a model whose control flow depends on values exports wrongly, which the check on
  inputs of other values catches.

Pruning masks are made permanent in the exported copy (the caller's model is not changed). The result's model is
the one loaded from the file; its report holds the file's bytes and the largest difference from PyTorch per check
(batch sizes, inputs of other values, shorter axes). A difference over the tolerance removes the file and raises: no
broken file is handed back.

Example:
    >>> import torch, torchslim as ts, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> result = export(ts.models.create("lenet-5"), "pt2", torch.zeros(1, 1, 28, 28), os.path.join(folder, "lenet5.pt2"))
    >>> result.model(torch.zeros(5, 1, 28, 28)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.checks import norm_hooks, remove_norm_hook, unwrapped
from torchslim.core.copying import copy_model
from torchslim.core.errors import TorchslimError
from torchslim.core.files import refuse_overwrite
from torchslim.core.modes import eval_mode, model_device
from torchslim.core.report import Report, Result, Stage
from torchslim.export.check import (
    APPROXIMATE_LEVELS,
    ExporterFailure,
    SequenceFailure,
    check_examples,
    default_tolerance,
    dropped_outputs,
    first_line,
    largest_difference,
    output_scale,
    reference,
    refuse_differences,
    relative_error,
    tracer_note,
    unrunnable,
    where,
)
from torchslim.export.onnx import (
    KeywordInputs,
    MainOutput,
    OnnxExporterError,
    OnnxModule,
    Positional,
    ViewsAsList,
    as_called,
    export_onnx,
    input_plan,
    output_layout,
    positional_module,
    tracer_warnings,
)
from torchslim.export.onnx_weights import rewrite_weights, set_accuracy_level
from torchslim.tasks.batches import repeat_example

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # ONNX Runtime's MatMulNBits: as written, float32, float16, bfloat16, int8 activations


def _prepared(model: nn.Module, form: str) -> nn.Module:
    """An eval-mode copy with pruning masks folded into plain weights (what every exporter can follow); for ONNX,
    weight-only quantized layers become the float layers they compute (ONNX has no bit unpacking of uint8 codes)."""
    from torchslim.core.selector import set_module
    from torchslim.pruning.apply import fold_parametrizations, make_permanent, masks_of
    from torchslim.quantization.modules import float_equivalent

    prepared = _plain_copy(model)
    if masks_of(prepared):
        make_permanent(prepared)
    with eval_mode(prepared):
        fold_parametrizations(prepared)  # weight_norm, spectral_norm (its stored vectors, no power iteration), a user's own
    if form == "onnx":
        for name, module in list(prepared.named_modules()):
            plain = float_equivalent(module)
            if plain is not None:
                set_module(prepared, name, plain)
    return prepared.eval()


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy in which torch's hook-based weight_norm / spectral_norm are folded into plain weights (the weight
    they compute now; a deep copy of the model as it is would fail on the computed weight)."""
    hooked = norm_hooks(model)
    memo: dict[int, Any] = {id(getattr(module, hook.name)): getattr(module, hook.name).detach().clone() for _, module, hook in hooked}
    copied = copy_model(model, memo)
    for _, module, hook in norm_hooks(copied):  # the copy's own hooks, folded
        remove_norm_hook(module, hook)
    return copied


def _batch_shapes(args: tuple, axes: dict[str, dict[int, str]] | None = None, names: list[str] | None = None, batch: bool = True) -> tuple:
    """torch.export's dynamic_shapes: dimension 0 of every tensor input is the batch (where ``batch``), and the axes
    ``axes`` names per input (of ``names``, in order) are dynamic as well."""
    dynamic = torch.export.Dim.DYNAMIC  # whatever range the model allows (a CUDA convolution caps it at 65535)
    shapes = []
    for index, a in enumerate(args):
        more = set((axes or {}).get(names[index], {}) if names and index < len(names) else {}) | ({0} if batch else set())
        shapes.append({axis: dynamic for axis in more} if isinstance(a, torch.Tensor) and a.dim() > 0 and more else None)
    return tuple(shapes)


def _write(
    model: nn.Module,
    form: str,
    example: Any,
    path: Path,
    dynamic_batch: bool,
    accuracy_level: int = 0,
    dynamic_axes: Mapping[str, Any] | None = None,
    sequence: bool = True,
    exporter: str = "torchscript",
    found: list[warnings.WarningMessage] | None = None,
) -> tuple[nn.Module, int]:
    """Write ``model`` to ``path`` in ``form``: (the module loaded back from the file, how many MatMulNBits it has);
    the tracer's warnings that values became constants of the file go to ``found``."""
    import onnx

    found = [] if found is None else found
    if isinstance(model, OnnxModule):
        if form != "onnx":
            raise TorchslimError(f"export: {type(model).__name__} runs in ONNX Runtime (an int8 engine); it exports as onnx only, not {form}")
        proto = onnx.load_from_string(model.onnx_bytes)
        products = set_accuracy_level(proto, accuracy_level)
        if products and accuracy_level:
            onnx.save(proto, str(path))
        else:
            model.save(path)
        return OnnxModule(path), products
    prepared = _prepared(model, form)
    if form == "onnx":
        export_onnx(prepared, example, path, dynamic_batch=dynamic_batch, dynamic_sequence=sequence, dynamic_axes=dynamic_axes, exporter=exporter, warned=found)
        proto = onnx.load(str(path))  # the weight passes edit one loaded copy; the file is written once, if changed
        edits = rewrite_weights(proto, model)
        products = set_accuracy_level(proto, accuracy_level)
        if edits or (products and accuracy_level):
            onnx.save(proto, str(path))
        return OnnxModule(path), products
    # a batch of two: exporters specialize a batch dimension of 1
    traced = repeat_example(example, 2) if dynamic_batch else example
    inputs, _, axes = input_plan(example, dynamic_batch, False, dynamic_axes)
    names: list[str] = []
    if isinstance(traced, Mapping):  # keyword inputs (a Hugging Face model): positional tensors, the outputs the model has
        names = [key for key, value in traced.items() if isinstance(value, torch.Tensor)]
        prepared = KeywordInputs(prepared, names).eval()
        traced = tuple(traced[key] for key in names)
    args = traced if isinstance(traced, tuple) else (traced,)
    if not names:
        prepared = positional_module(prepared, len(args))
        if form == "torchscript" and _traces_badly(prepared, args):
            prepared = MainOutput(prepared).eval()
    loaded: nn.Module
    with torch.no_grad(), tracer_warnings(found):
        if form == "pt2":
            shapes: Any = _batch_shapes(args, axes, inputs, dynamic_batch) if dynamic_batch or dynamic_axes else None
            if isinstance(prepared, (KeywordInputs, ViewsAsList, Positional)) and shapes is not None:  # forward(*tensors): one entry for the variadic argument
                shapes = (shapes,)
            program = torch.export.export(prepared, args, dynamic_shapes=shapes)
            torch.export.save(program, str(path))
            loaded = torch.export.load(str(path)).module()
        else:
            torch.jit.save(torch.jit.trace(prepared, args, strict=False, check_trace=False), str(path))
            loaded = torch.jit.load(str(path), map_location=model_device(prepared))
    return (_ByName(loaded, names) if names else loaded), 0


def _traces_badly(model: nn.Module, args: tuple) -> bool:
    """Whether ``model``'s output is something a trace returns otherwise than the model (a Hugging Face ModelOutput
    becomes a dict of every tensor) or not at all (a tuple holding None)."""
    with torch.no_grad():
        output = model(*args)
    return not isinstance(output, torch.Tensor) and output_layout(output) is None


class _ByName(nn.Module):
    """A loaded program of positional tensors called with the model's keyword inputs (in the exported order)."""

    def __init__(self, program: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.program, self.names = program, list(names)

    def forward(self, *args: torch.Tensor, **inputs: torch.Tensor) -> Any:
        return self.program(*args, *(inputs[name] for name in self.names if name in inputs))


def export(
    model: nn.Module,
    format: str,
    example_input: Any,
    path: str | os.PathLike[str] | None = None,
    dynamic_batch: bool = True,
    tolerance: float | None = None,
    overwrite: bool = False,
    accuracy_level: int = 0,
    dynamic_axes: Mapping[str, Any] | None = None,
) -> Result:
    """Export ``model`` as ``format`` ("onnx", "pt2" or "torchscript") to ``path`` (default: ``<class name>`` with
    the format's suffix), load the file back and check it against ``model`` on ``example_input``'s first example
    repeated to batch 1 and 3 (or on ``example_input`` as it is when ``dynamic_batch`` is False), and on inputs of the
    same shapes with other values (floating tensors drawn at random with the example's mean and deviation, and the
    example negated; integer ids permuted, masks kept): a file traced on the example keeps the branch of any control
    flow on values the example took, which the check refuses by name. The tracer's warnings that values became
    constants are in the notes.

    ``tolerance`` bounds the largest absolute output difference; by default 1e-4 x the largest output magnitude
    over the checks (at least 1e-4). Returns the loaded model and a report with the file's size, the differences and
    the time taken.

    ``accuracy_level`` (onnx only) is ONNX Runtime's setting for its MatMulNBits kernels: 0 (as written: float
    arithmetic, matches PyTorch), 1 (float32), 2 (float16), 3 (bfloat16) or 4 (activations quantized to int8 per
    block inside the kernel: the fastest form on x86 CPUs, an 8-bit weight's product several times faster). Levels 2 to
    4 change the arithmetic, so the check bounds the relative error ||file - PyTorch|| / ||PyTorch|| over the output
    instead (``tolerance``, default 0.1; a broken file is off by about 1).

    ``dynamic_axes`` (onnx and pt2): axes of any size besides the batch, per input name (``input``, ``input_1``, ...
    for positional inputs, the keywords of a mapping): ``{"input": {2: "length"}}`` or ``{"input": [2]}``. An ONNX file
    also takes token ids (integer inputs) and keyword inputs of any sequence length. Each such axis is checked with
    inputs a quarter shorter than the example. A model returning a tuple, list or plain dict of tensors exports every
    one of them, each checked; the loaded ONNX model returns the same structure.
    """
    if format not in FORMATS:
        raise TorchslimError(f"export: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(model, nn.Module):
        raise TorchslimError(f"export: expected an nn.Module, got {type(model).__name__}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise TorchslimError(
            f"export: accuracy_level must be one of {', '.join(map(str, ACCURACY_LEVELS))} (ONNX Runtime's MatMulNBits levels), got {accuracy_level!r}"
        )
    if dynamic_axes and format == "torchscript":
        raise TorchslimError("export: dynamic_axes applies to onnx and pt2; a TorchScript trace keeps the shapes of its example")
    if accuracy_level and format != "onnx":
        raise TorchslimError(f"export: accuracy_level sets ONNX Runtime's MatMulNBits kernels; it applies to onnx only, not {format}")
    model = unwrapped(model)  # a compiled or DataParallel model: the module it holds
    _refuse_compiled(model, format)
    path = Path(path) if path is not None else Path(f"{type(model).__name__.lower()}{FORMATS[format]}")
    if path.is_dir():
        raise TorchslimError(f"export: {path} is a directory; give the file to write, such as {path / (type(model).__name__.lower() + FORMATS[format])}")
    refuse_overwrite(path, overwrite)
    example_input = as_called(model, example_input)
    if isinstance(example_input, list) and all(isinstance(t, torch.Tensor) for t in example_input):
        example_input = tuple(example_input)  # several inputs given as a list: as a tuple (a list-taking forward still gets a list)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and moved there only once checked: a failed export leaves what was there alone
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    sequence_notes: list[str] = []
    # token ids and keyword inputs: an ONNX file takes any sequence length; a pt2 program is asked for one too, and
    # keeps the example's where torch.export cannot give it
    keyed = isinstance(example_input, dict)
    sequences = {name: t.shape[1] for name, t in _named_inputs(example_input) if t.dim() in (2, 3) and (keyed or not t.is_floating_point())}
    fixed = format == "pt2" and bool(sequences) and not dynamic_axes
    automatic = False
    try:
        check: _Check | None = None
        if fixed:
            asked = {name: {1: "length"} for name in sequences}
            try:
                check = _with_sequence(model, format, example_input, partial, dynamic_batch, tolerance, accuracy_level, asked, sequence_notes)
                dynamic_axes, fixed, automatic = asked, False, True
            except TorchslimError as failure:
                sequence_notes.append(f"a program of any sequence length failed ({str(failure).splitlines()[0][:200]})")
        if check is None:
            check = _with_sequence(model, format, example_input, partial, dynamic_batch, tolerance, accuracy_level, dynamic_axes, sequence_notes)
        os.replace(partial, path)
    finally:
        _remove(partial)
    loaded = check.loaded
    if isinstance(loaded, OnnxModule):
        loaded.path = str(path)
    metrics = {
        "format": format,
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "max_abs_difference": check.differences,
        "relative_error": check.relative,
        "tolerance": check.allowed,
        "tolerance_bounds": "relative error" if accuracy_level in APPROXIMATE_LEVELS else "largest absolute difference",
        "dynamic_batch": dynamic_batch,
        **({"dynamic_axes": {name: dict(axes) if isinstance(axes, Mapping) else list(axes) for name, axes in dynamic_axes.items()}} if dynamic_axes else {}),
        "seconds": check.seconds,
    }
    measured = check.relative if accuracy_level in APPROXIMATE_LEVELS else check.differences
    notes = [
        f"checked against PyTorch at {', '.join(map(where, check.differences))}: {metrics['tolerance_bounds']} {max(measured.values()):.2e} "
        f"(allowed {check.allowed:.2e})"
    ]
    if format == "onnx" and accuracy_level:
        metrics["accuracy_level"] = accuracy_level
        notes.append(
            f"{check.products} MatMulNBits at accuracy level {accuracy_level}"
            if check.products
            else f"accuracy_level {accuracy_level} has no effect: the file has no MatMulNBits (no weight-only layer of at most 8 bits it could hold)"
        )
    notes += check.notes + sequence_notes
    if fixed:
        shared = ", ".join(f"{name!r}: {{1: 'length'}}" for name in sequences)
        length = max(sequences.values())
        notes.append(f"the sequence length is the example's ({length}): dynamic_axes={{{shared}}} asks for any length where torch.export allows it")
    elif automatic:
        notes.append(f"any sequence length ({', '.join(sequences)}: axis 1), checked at a shorter one")
    if format == "pt2" and keyed:
        notes.append(
            f"the program takes the example's tensors by position, in this order: {', '.join(name for name, _ in _named_inputs(example_input))} "
            "(torch.export.load(path).module()(*tensors)); the model returned here takes them by name"
        )
    metrics["exporter"] = check.exporter
    stage = Stage(name="export", kind="export", metrics=metrics, notes=notes, execution=_execution(format))
    return Result(model=loaded, report=Report.for_model(model, [stage]))


def _named_inputs(example: Any) -> list[tuple[str, torch.Tensor]]:
    """The example's tensors by the names dynamic_axes takes: a mapping's keys, else input, input_1, ..."""
    if isinstance(example, dict):
        return [(name, value) for name, value in example.items() if isinstance(value, torch.Tensor)]
    values = example if isinstance(example, (tuple, list)) else (example,)
    return [("input" if index == 0 else f"input_{index}", value) for index, value in enumerate(values) if isinstance(value, torch.Tensor)]


def _refuse_compiled(model: nn.Module, form: str) -> None:
    """A PT2E int8 model runs as a graph torch.compile lowered to int8 kernels: torch.export follows it, a trace cannot
    (it would capture the compiled graph's weights as constants)."""
    from torchslim.quantization.pt2e import CompiledModule

    if isinstance(model, CompiledModule) and form != "pt2":
        raise TorchslimError(
            f"export: {type(model).__name__} is a PT2E int8 model compiled by torch.compile; export it as pt2 (a torch.export program of its int8 "
            f"graph), not {form}. For an int8 ONNX file, quantize with method 'onnxruntime' instead"
        )


def _with_sequence(
    model: nn.Module,
    form: str,
    example: Any,
    path: Path,
    dynamic_batch: bool,
    tolerance: float | None,
    accuracy_level: int,
    dynamic_axes: Mapping[str, Any] | None,
    notes: list[str],
) -> _Check:
    """``_export_and_check`` with a dynamic sequence for token ids and keyword inputs: by the TorchScript exporter; where
    that file fails at another length (it baked the length into a reshape, as torch's own attention makes it do), by
    the torch.export-based exporter; where that fails too, with the example's length (the notes say which). Where the
    TorchScript exporter itself fails (an operator it has no conversion for, a forward it cannot call), the
    torch.export-based exporter writes the file."""
    try:
        return _export_and_check(model, form, example, path, dynamic_batch, tolerance, accuracy_level, dynamic_axes)
    except SequenceFailure as failure:
        notes.append(f"the TorchScript exporter's file failed at another sequence length ({failure})")
    except ExporterFailure as failure:
        if form != "onnx" or isinstance(model, OnnxModule):
            raise
        try:  # torch.export's exporter may convert what the TorchScript one cannot
            check = _export_and_check(model, form, example, path, dynamic_batch, tolerance, accuracy_level, dynamic_axes, exporter="dynamo")
        except TorchslimError as second:
            raise TorchslimError(f"{failure}; the torch.export-based exporter failed too: {str(second).splitlines()[0]}") from failure
        notes.append(f"the TorchScript exporter failed ({str(failure).split(': ', 1)[-1]}); the file is the torch.export-based exporter's")
        return check
    try:
        return _export_and_check(model, form, example, path, dynamic_batch, tolerance, accuracy_level, dynamic_axes, exporter="dynamo")
    except TorchslimError as failure:
        notes.append(f"the torch.export-based exporter's file failed too ({str(failure).splitlines()[0]}): the sequence length stays the example's")
    return _export_and_check(model, form, example, path, dynamic_batch, tolerance, accuracy_level, dynamic_axes, sequence=False)


@dataclasses.dataclass
class _Check:
    loaded: nn.Module
    differences: dict[str, float]  # largest absolute difference per check
    relative: dict[str, float]  # ||file - PyTorch|| / ||PyTorch|| per check
    allowed: float
    seconds: float
    products: int  # MatMulNBits in an ONNX file
    exporter: str  # what wrote the file: "torchscript" or "dynamo" for ONNX, else the format
    notes: list[str]  # what the report should say besides the differences


def _export_and_check(
    model: nn.Module,
    form: str,
    example_input: Any,
    path: Path,
    dynamic_batch: bool,
    tolerance: float | None,
    accuracy_level: int = 0,
    dynamic_axes: Mapping[str, Any] | None = None,
    sequence: bool = True,
    exporter: str = "torchscript",
) -> _Check:
    """Write, reload and compare with the PyTorch model on each check (``check_examples``): the model's outputs come
    first, so an axis it cannot vary is named before anything is written; ``sequence``: token ids and keyword inputs
    of any sequence length (``SequenceFailure`` where that fails); ``exporter``: the ONNX exporter ("torchscript" or
    "dynamo")."""
    name = type(model).__name__
    notes: list[str] = []
    cases = check_examples(model, example_input, dynamic_batch, dynamic_axes, form, sequence)
    expected: dict[str, list[torch.Tensor]] = {}
    for case in cases:
        try:
            expected[case.label] = reference(model, case.example, decoded=form == "onnx")
        except Exception as error:
            unrunnable(model, form, case, error, sequence, notes, example_input)
    started = time.perf_counter()
    found: list[warnings.WarningMessage] = []
    try:
        loaded, products = _write(model, form, example_input, path, dynamic_batch, accuracy_level, dynamic_axes, sequence, exporter, found)
    except OnnxExporterError as error:  # the exporter itself: the torch.export-based one may do better
        raise ExporterFailure(f"export of {name} as {form} failed: {str(error).split(': ', 1)[-1]}") from error
    except TorchslimError:
        raise
    except Exception as error:  # exporters raise many types; name the format, the model and the cause
        cause = first_line(error)
        if form == "onnx" and "NOT_IMPLEMENTED" in cause and any(p.dtype == torch.bfloat16 for p in model.parameters()):
            cause += "; ONNX Runtime's CPU engine has no bfloat16 kernel for it: export model.float() (or model.half())"
        if "data-dependent" in cause:  # torch.export on an `if` over a tensor's value
            cause += "; the model has control flow that depends on its input values: compute both branches with torch.where (or use torch.cond)"
        raise ExporterFailure(f"export of {name} as {form} failed: {cause}") from error
    seconds = time.perf_counter() - started
    differences: dict[str, float] = {}
    relative: dict[str, float] = {}
    approximate = accuracy_level in APPROXIMATE_LEVELS
    scale = 0.0
    for case in cases:
        label = case.label
        if label not in expected:
            continue
        failed = SequenceFailure if label.startswith("sequence ") and sequence else TorchslimError
        try:
            produced = reference(loaded, case.example, set_eval=False)
        except Exception as error:
            raise failed(f"export: the {form} file does not run on {where(label)}: {first_line(error)}") from error
        shapes = [tuple(t.shape) for t in produced], [tuple(t.shape) for t in expected[label]]
        if shapes[0] != shapes[1]:
            raise failed(f"export: the {form} file gives outputs of shapes {shapes[0]} where the model gives {shapes[1]} (on {where(label)})")
        differences[label] = max(largest_difference(p, e) for p, e in zip(produced, expected[label]))
        relative[label] = max(relative_error(p, e) for p, e in zip(produced, expected[label]))
        scale = max(scale, output_scale(expected[label]))
    # relative to the output's scale over every check, and to the precision a half-precision model computes in
    allowed = (0.1 if approximate else default_tolerance(model) * max(1.0, scale)) if tolerance is None else tolerance
    measured = relative if approximate else differences
    refuse_differences(form, measured, allowed, accuracy_level, sequence, found)
    if found:
        notes.append(f"{tracer_note(found)}; the file matched PyTorch on inputs of other values too, but check it on inputs that take other branches")
    dropped = dropped_outputs(model, cases[0].example)
    return _Check(loaded, differences, relative, allowed, seconds, products, exporter if form == "onnx" else form, notes + ([dropped] if dropped else []))


def _execution(form: str) -> str:
    return {"onnx": "ONNX Runtime (CPU)", "pt2": "torch.export program", "torchscript": "TorchScript"}[form]


def _remove(path: Path) -> None:
    if path.is_file():
        path.unlink()


__all__ = ["ACCURACY_LEVELS", "FORMATS", "export"]
