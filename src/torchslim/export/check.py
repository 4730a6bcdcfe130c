"""What ``ts.export`` checks a written file on, and how it compares: the examples (the first example repeated to batch 1
and 3, or the example as it is; inputs of other values than the example's; each dynamic axis a quarter shorter), the
model's outputs as a file has them, and their differences."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.modes import eval_mode
from torchslim.export.signature import first_line, input_plan, output_layout, output_tensors, shorter_lengths
from torchslim.tasks.batches import call_model, repeat_example

OTHER_VALUES = "other values"  # the label of the check on inputs drawn at random like the example's
NEGATED = "negated"  # the label of the check on the example negated (a branch on a sign takes the other way)
APPROXIMATE_LEVELS = (2, 3, 4)  # ONNX Runtime's MatMulNBits levels whose arithmetic differs from PyTorch's: the check bounds the relative error


@dataclasses.dataclass
class Case:
    label: str  # "1", "3", "example", OTHER_VALUES, NEGATED or "<axis label> shorter: <shapes>"
    example: Any
    axis: str = ""  # for an axis made shorter: which inputs and axes, as a message names them


def reference(model: nn.Module, example: Any, set_eval: bool = True, decoded: bool = False) -> list[torch.Tensor]:
    """The model's outputs on ``example``, as the exported file has them (every tensor of a tuple, list or plain dict
    of them, nested or not; else the one a task reads), in eval mode unless ``set_eval`` is False (a loaded program has
    no modes); ``decoded``: weight-only layers without their integer kernels, as an ONNX file computes."""
    from torchslim.quantization.modules import decoded_weights

    with eval_mode(model) if set_eval else contextlib.nullcontext(), torch.no_grad(), decoded_weights() if decoded else contextlib.nullcontext():
        output = call_model(model, example)
    return [t.detach().float().cpu() for t in output_tensors(output, output_layout(output))]


def dropped_outputs(model: nn.Module, example: Any) -> str | None:
    """A note where the model returns a plain tuple, list or dict holding more than tensors (None, numbers, objects):
    the file has its first tensor only."""
    with eval_mode(model), torch.no_grad():
        output = call_model(model, example)
    if not isinstance(output, (tuple, list, dict)) or output_layout(output) is not None:
        return None
    entries = list(output.values()) if isinstance(output, dict) else list(output)
    others = sorted({type(value).__name__ for value in entries if not isinstance(value, torch.Tensor)})
    if not others:  # nested containers the layout does not rebuild: their tensors are exported all the same
        return None
    return (
        f"the model returns a {type(output).__name__} holding {', '.join(others)} besides tensors: the file has its first tensor only "
        "(return a tuple, list or dict of tensors, nested or not, to export every one)"
    )


def other_values(example: Any, seed: int = 0, negate: bool = False) -> Any:
    """``example`` with other values of the same shapes and types: each floating tensor drawn at random (seeded) with
    its mean and standard deviation (a constant one kept, a mask of ones say), or with ``negate`` negated; integer ids
    permuted among their positions (every id stays one the model knows); masks (integers of 0 and 1 only) and booleans
    as they are."""
    generator = torch.Generator().manual_seed(seed)

    def vary(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.numel() < 2 or value.dtype == torch.bool or value.is_complex():
            return value
        if value.is_floating_point() and negate:
            return -value
        if value.is_floating_point():
            values = value.detach().float().cpu()
            mean, std = values.mean(), values.std()
            if not (torch.isfinite(mean) and torch.isfinite(std)):
                return value
            drawn = torch.randn(value.shape, generator=generator) * std + mean
            return drawn.to(device=value.device, dtype=value.dtype)
        if bool(((value == 0) | (value == 1)).all()):
            return value
        order = torch.randperm(value.numel(), generator=generator).to(value.device)
        return value.flatten()[order].reshape(value.shape)

    if isinstance(example, Mapping):
        return {key: vary(value) for key, value in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(vary(value) for value in example)
    return vary(example)


def check_examples(model: nn.Module, example: Any, dynamic_batch: bool, dynamic_axes: Mapping[str, Any] | None, form: str, sequence: bool = True) -> list[Case]:
    """The cases a file is checked on: the first example repeated to batch 1 and 3 (or the example as it is); a batch
    of 2 (or the example's) of other values than the example's (a file traced on the example keeps the branch of any
    control flow on values it took there); and, for each dynamic axis besides the batch (an ONNX file's sequence, or
    one ``dynamic_axes`` names), the batch of 2 with that axis a quarter shorter in every input that shares it. The
    checks on other values are a batch of 2 (or the example's) drawn at random like the example, and the same batch
    negated: a file traced on the example keeps the branch of any control flow on values the example took."""
    cases = [Case(str(size), repeat_example(example, size)) for size in (1, 3)] if dynamic_batch else [Case("example", example)]
    base = repeat_example(example, 2) if dynamic_batch else example
    cases += [Case(OTHER_VALUES, other_values(base)), Case(NEGATED, other_values(base, seed=1, negate=True))]
    if form != "onnx" and not dynamic_axes:
        return cases
    names, _, axes = input_plan(example, dynamic_batch, form == "onnx" and sequence, dynamic_axes, model)
    labels = {label for entry in axes.values() for axis, label in entry.items() if axis != 0 or not dynamic_batch}
    for label in sorted(labels):
        cropped: dict[str, torch.Tensor] = {}
        where: list[str] = []
        given = dict(zip(names, input_plan(base, dynamic_batch, False, dynamic_axes)[1]))
        for name, tensor in given.items():
            for axis, axis_label in axes[name].items():
                if axis_label == label and tensor.shape[axis] >= 2:
                    length = tensor.shape[axis] - max(1, tensor.shape[axis] // 4)
                    cropped[name] = tensor.narrow(axis, 0, length).contiguous()
                    where.append(f"axis {axis} of input {name!r} ({tensor.shape[axis]} -> {length})")
                    if axis == 1:  # per-example lengths among the other inputs cut with the sequence
                        for other, value in given.items():
                            if other in cropped or axes[other].get(1):
                                continue
                            clamped = shorter_lengths(value, tensor.shape[1], length)
                            if clamped is not value:
                                cropped[other] = clamped
        if not cropped:
            continue
        lengths = sorted({tuple(t.shape) for t in cropped.values()})
        if isinstance(base, Mapping):
            varied: Any = {**base, **cropped}
        elif isinstance(base, tuple):
            varied = tuple(cropped.get(name, tensor) for name, tensor in zip(names, base))
        else:
            varied = cropped.get(names[0], base)
        cases.append(Case(f"{label} shorter: {', '.join(map(str, lengths))}", varied, ", ".join(where)))
    return cases


def where(label: str) -> str:
    """A check's label as the place it ran: "batch 3", "the example", "inputs of other values", "sequence shorter: (2, 48)"."""
    named = {"example": "the example", OTHER_VALUES: f"inputs of {OTHER_VALUES}", NEGATED: "the example negated"}
    return f"batch {label}" if label.isdigit() else named.get(label, label)


def difference(produced: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """``|produced - expected|`` elementwise: 0 where both are the same infinity or both NaN, infinite where only one
    is NaN or infinite."""
    gap = (produced - expected).abs()
    same = (produced == expected) | (produced.isnan() & expected.isnan())
    return torch.where(same, torch.zeros_like(gap), gap).nan_to_num(nan=float("inf"), posinf=float("inf"))


def largest_difference(produced: torch.Tensor, expected: torch.Tensor) -> float:
    return float(difference(produced, expected).max()) if expected.numel() else 0.0


def relative_error(produced: torch.Tensor, expected: torch.Tensor) -> float:
    """||produced - expected|| / ||expected|| (over the expected's finite values)."""
    if not expected.numel():
        return 0.0
    finite = expected.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return float(difference(produced, expected).norm() / finite.norm().clamp_min(1e-12))


def output_scale(tensors: list[torch.Tensor]) -> float:
    """The largest finite output magnitude (0 for none)."""
    return max((float(t[t.isfinite()].abs().max()) for t in tensors if t.isfinite().any()), default=0.0)


def default_tolerance(model: nn.Module) -> float:
    """The default bound on the largest difference per unit of output: 1e-4 for float32, 1e-2 for a model in float16
    or bfloat16 (their rounding steps are about 1e-3 and 8e-3) and for a PT2E int8 model (the exported graph and the
    compiled oneDNN kernels round a requantized activation differently: one step of 1/255 of its range)."""
    from torchslim.quantization.pt2e import CompiledModule

    if isinstance(model, CompiledModule):
        return 1e-2
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return 1e-2 if dtypes & {torch.float16, torch.bfloat16} else 1e-4


def tracer_note(found: list[warnings.WarningMessage], limit: int = 3) -> str:
    """Where the tracer turned values computed from the inputs into constants of the file (one line)."""
    places = list(dict.fromkeys(f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in found))  # a library's file from its package
    shown = ", ".join(places[:limit]) + (f" and {len(places) - limit} more" if len(places) > limit else "")
    message = str(found[0].message).split(". ")[0]
    return f"the tracer turned values computed from the inputs into constants of the file at {shown} ({message})"


class ExporterFailure(TorchslimError):
    """The exporter itself failed (nothing was written to check)."""


class SequenceFailure(TorchslimError):
    """The file exported with a dynamic sequence (chosen by torchslim, not asked for) fails at another length."""


def unrunnable(model: nn.Module, form: str, case: Case, error: Exception, sequence: bool, notes: list[str], example: Any) -> None:
    """The PyTorch model fails on a check's inputs: a note for inputs of other values (that check is left out), else an
    error that says which inputs (nothing is written)."""
    name, cause = type(model).__name__, first_line(error)
    if case.label in (OTHER_VALUES, NEGATED):
        notes.append(f"not checked on {where(case.label)}: {name} does not run on it ({cause})")
    elif case.label.startswith("sequence ") and sequence:
        raise SequenceFailure(f"export: {name} does not run with a sequence a quarter shorter ({case.axis}): {cause}")
    elif case.axis:
        raise TorchslimError(
            f"export: dynamic_axes: {name} does not run with {case.axis}: {cause}; that axis cannot take another size "
            "(a flatten into a Linear fixes it): leave it out of dynamic_axes"
        )
    elif case.label.isdigit() and _failure(model, example) is None:
        raise TorchslimError(
            f"export of {name} as {form} failed: {name} runs on the example but not on its first input repeated to batch {case.label} ({cause}); "
            "a model of one batch size exports with dynamic_batch=False"
        )
    else:
        cause = _failure(model, example) or cause
        raise TorchslimError(f"export of {name} as {form} failed: {name} does not run on the example ({cause}); give an example of its inputs")


def _failure(model: nn.Module, example: Any) -> str | None:
    """Why ``model`` does not run on ``example`` (None: it runs)."""
    try:
        reference(model, example)
    except Exception as error:
        return first_line(error)
    return None


def refuse_differences(form: str, measured: dict[str, float], allowed: float, accuracy_level: int, sequence: bool, found: list) -> None:
    """Raise where a check differs by more than ``allowed``, naming what the difference means."""
    worst = max(measured.values())
    if worst <= allowed:
        return
    approximate = accuracy_level in APPROXIMATE_LEVELS
    what = f"by a relative error of {worst:.3g} at accuracy level {accuracy_level}" if approximate else f"by {worst:.3g}"
    failing = [label for label, value in measured.items() if value > allowed]
    if sequence and all(label.startswith("sequence ") for label in failing):
        # only at another length, which torchslim chose to allow: the caller exports again with the length fixed
        raise SequenceFailure(f"export: the {form} file differs from the PyTorch model at another sequence length {what} (allowed {allowed:.3g})")
    if set(failing) <= {OTHER_VALUES, NEGATED} and not approximate:
        warned = f" ({tracer_note(found)})" if found else ""
        fix = "compute both branches with torch.where (or use torch.cond)" + (
            "" if form == "pt2" else ", or export as pt2 (torch.export names such control flow)"
        )
        raise TorchslimError(
            f"export: the {form} file matches the PyTorch model on the example but differs on {' and '.join(map(where, failing))} {what} "
            f"(allowed {allowed:.3g}): "
            f"the model has control flow that depends on its input values{warned}, and the file keeps the branch the example took, so "
            f"nothing was written; {fix}"
        )
    hint = (
        "a lower accuracy_level or a larger tolerance"
        if approximate
        else "onnx or pt2 for a traced model whose control flow depends on its inputs"
        if form == "torchscript"
        else "a larger tolerance where the difference is rounding (kernels of another engine sum in another order)"
    )
    raise TorchslimError(
        f"export: the {form} file differs from the PyTorch model {what} (allowed {allowed:.3g}; per check {measured}), so nothing was written; try {hint}"
    )


__all__ = [
    "APPROXIMATE_LEVELS",
    "NEGATED",
    "OTHER_VALUES",
    "Case",
    "ExporterFailure",
    "SequenceFailure",
    "check_examples",
    "default_tolerance",
    "difference",
    "dropped_outputs",
    "first_line",
    "largest_difference",
    "other_values",
    "output_scale",
    "reference",
    "refuse_differences",
    "relative_error",
    "tracer_note",
    "unrunnable",
    "where",
]
