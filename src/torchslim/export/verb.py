"""``ts.export(model, format, example_input, path)``: a dense, pruned, factorized or quantized model written as
ONNX, a torch.export program (``.pt2``) or TorchScript, then loaded back from the file and checked against the
PyTorch model at two batch sizes (the batch dimension is dynamic unless ``dynamic_batch=False``).

- ``onnx``: the file ONNX Runtime runs (``export_onnx``); an int8 ONNX Runtime engine (what ``quantize`` returns for
  the static int8 methods) is written as it is.
- ``pt2``: ``torch.export.export`` with a dynamic batch, saved with ``torch.export.save``; reload with
  ``torch.export.load(path).module()``.
- ``torchscript``: ``torch.jit.trace``, saved with ``torch.jit.save``; reload with ``torch.jit.load``. Tracing
  records the path the example took: a model whose control flow depends on values exports wrongly, which the check
  catches.

Pruning masks are made permanent in the exported copy (the caller's model is not changed). The result's model is
the one loaded from the file; its report holds the file's bytes and the largest difference from PyTorch per batch
size. A difference over the tolerance removes the file and raises: no broken file is handed back.

Example:
    >>> import torch, torchslim as ts, tempfile, os
    >>> folder = tempfile.mkdtemp()
    >>> result = export(ts.models.create("lenet-5"), "pt2", torch.zeros(1, 1, 28, 28), os.path.join(folder, "lenet5.pt2"))
    >>> result.model(torch.zeros(5, 1, 28, 28)).shape
    torch.Size([5, 10])
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.files import refuse_overwrite
from torchslim.core.modes import eval_mode, model_device
from torchslim.core.report import Report, Result, Stage
from torchslim.export.onnx import KeywordInputs, OnnxModule, export_onnx
from torchslim.tasks.batches import call_model, output_tensor, repeat_example

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


def _reference(model: nn.Module, example: Any, set_eval: bool = True, decoded: bool = False) -> torch.Tensor:
    """The model's output on ``example`` (in eval mode unless ``set_eval`` is False: a loaded program has no modes;
    ``decoded``: weight-only layers without their integer kernels, as an ONNX file computes)."""
    from torchslim.quantization.modules import decoded_weights

    with eval_mode(model) if set_eval else contextlib.nullcontext(), torch.no_grad(), decoded_weights() if decoded else contextlib.nullcontext():
        return output_tensor(call_model(model, example)).detach().float().cpu()


def _prepared(model: nn.Module, form: str) -> nn.Module:
    """An eval-mode copy with pruning masks folded into plain weights (what every exporter can follow); for ONNX,
    weight-only quantized layers become the float layers they compute (ONNX has no bit unpacking of uint8 codes)."""
    from torchslim.core.selector import set_module
    from torchslim.pruning.apply import make_permanent, masks_of
    from torchslim.quantization.modules import float_equivalent

    prepared = copy.deepcopy(model)
    if masks_of(prepared):
        make_permanent(prepared)
    if form == "onnx":
        for name, module in list(prepared.named_modules()):
            plain = float_equivalent(module)
            if plain is not None:
                set_module(prepared, name, plain)
    return prepared.eval()


def _batch_shapes(args: tuple) -> tuple:
    """torch.export's dynamic_shapes: dimension 0 of every tensor input is the batch."""
    batch = torch.export.Dim.DYNAMIC  # whatever range the model allows (a CUDA convolution caps it at 65535)
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() > 0 else None for a in args)


def _write(model: nn.Module, form: str, example: Any, path: Path, dynamic_batch: bool) -> nn.Module:
    """Write ``model`` to ``path`` in ``form`` and return the module loaded back from the file."""
    if isinstance(model, OnnxModule):
        if form != "onnx":
            raise TorchslimError(f"export: {type(model).__name__} runs in ONNX Runtime (an int8 engine); it exports as onnx only, not {form}")
        model.save(path)
        return OnnxModule(path)
    prepared = _prepared(model, form)
    if form == "onnx":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(prepared, example, path, dynamic_batch=dynamic_batch)
        _int8_weights(path, _int8_layers(model))
        return OnnxModule(path)
    # a batch of two: exporters specialize a batch dimension of 1
    traced = repeat_example(example, 2) if dynamic_batch else example
    names: list[str] = []
    if isinstance(traced, Mapping):  # keyword inputs (a Hugging Face model): positional tensors, one output tensor
        names = [key for key, value in traced.items() if isinstance(value, torch.Tensor)]
        prepared = KeywordInputs(prepared, names).eval()
        traced = tuple(traced[key] for key in names)
    args = traced if isinstance(traced, tuple) else (traced,)
    loaded: nn.Module
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if form == "pt2":
            shapes: Any = _batch_shapes(args) if dynamic_batch else None
            if names and shapes is not None:  # KeywordInputs.forward(*tensors): one entry for the variadic argument
                shapes = (shapes,)
            program = torch.export.export(prepared, args, dynamic_shapes=shapes)
            torch.export.save(program, str(path))
            loaded = torch.export.load(str(path)).module()
        else:
            torch.jit.save(torch.jit.trace(prepared, args, strict=False, check_trace=False), str(path))
            loaded = torch.jit.load(str(path), map_location=model_device(prepared))
    return _ByName(loaded, names) if names else loaded


class _ByName(nn.Module):
    """A loaded program of positional tensors called with the model's keyword inputs (in the exported order)."""

    def __init__(self, program: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.program, self.names = program, list(names)

    def forward(self, *args: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        return self.program(*args, *(inputs[name] for name in self.names if name in inputs))


def _int8_layers(model: nn.Module) -> list[tuple[Any, Any]]:
    """(int8 codes, per-output-channel scales) as NumPy arrays of every weight-only layer stored as symmetric int8 per
    channel: the weights an ONNX file can keep as int8 behind a DequantizeLinear."""
    from torchslim.quantization.modules import QuantizedWeight

    found = []
    for module in model.modules():
        if not isinstance(module, QuantizedWeight) or module.scheme.scheme != "uniform" or module.bits != 8:
            continue
        spec = module.scheme.uniform_spec()
        if not spec.symmetric or spec.granularity != "channel" or getattr(module, "input_scale", None) is not None:
            continue
        codes = (module.codes().to(torch.int64).reshape(module.shape) + spec.code_range[0]).to(torch.int8)
        found.append((codes.cpu().numpy(), module.scale.detach().float().reshape(-1).cpu().numpy()))
    return found


def _int8_weights(path: Path, layers: list[tuple[Any, Any]]) -> None:
    """Replace each float weight of the ONNX file at ``path`` that is exactly an int8 layer's decoded weight (codes x
    scale, as the exporter wrote it, or transposed for a MatMul) by the int8 codes behind a DequantizeLinear: the same
    values, a quarter of the bytes. Weights changed by the export (BatchNorm folded into them) stay float."""
    if not layers:
        return
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    candidates = [(codes, scale, codes.astype(np.float32) * scale.reshape((-1,) + (1,) * (codes.ndim - 1))) for codes, scale in layers]
    model = onnx.load(str(path))
    graph = model.graph
    replaced = []
    for initializer in list(graph.initializer):
        if initializer.data_type != onnx.TensorProto.FLOAT or len(initializer.dims) < 2:
            continue
        value = numpy_helper.to_array(initializer)
        for codes, scale, decoded in candidates:
            axis = 0 if value.shape == decoded.shape and np.array_equal(value, decoded) else None
            if axis is None and codes.ndim == 2 and value.shape == decoded.T.shape and np.array_equal(value, decoded.T):
                axis, codes = 1, codes.T
            if axis is None:
                continue
            name = initializer.name
            graph.initializer.remove(initializer)
            graph.initializer.extend([numpy_helper.from_array(np.ascontiguousarray(codes), f"{name}_int8"), numpy_helper.from_array(scale, f"{name}_scale")])
            replaced.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name], name=f"{name}_dequantize", axis=axis))
            break
    if replaced:
        for node in reversed(replaced):
            graph.node.insert(0, node)
        onnx.save(model, str(path))


def export(
    model: nn.Module,
    format: str,
    example_input: Any,
    path: str | os.PathLike[str] | None = None,
    dynamic_batch: bool = True,
    tolerance: float | None = None,
    overwrite: bool = False,
) -> Result:
    """Export ``model`` as ``format`` ("onnx", "pt2" or "torchscript") to ``path`` (default: ``<class name>`` with
    the format's suffix), load the file back and check it against ``model`` on ``example_input``'s first example
    repeated to batch 1 and 3 (or on ``example_input`` as it is when ``dynamic_batch`` is False).

    ``tolerance`` bounds the largest absolute output difference; by default 1e-4 x the largest output magnitude
    (at least 1e-4). Returns the loaded model and a report with the file's size, the differences and the time taken.
    """
    if format not in FORMATS:
        raise TorchslimError(f"export: format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not isinstance(model, nn.Module):
        raise TorchslimError(f"export: expected an nn.Module, got {type(model).__name__}")
    path = Path(path) if path is not None else Path(f"{type(model).__name__.lower()}{FORMATS[format]}")
    refuse_overwrite(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside the target and moved there only once checked: a failed export leaves what was there alone
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        loaded, differences, allowed, seconds = _export_and_check(model, format, example_input, partial, dynamic_batch, tolerance)
        os.replace(partial, path)
    finally:
        _remove(partial)
    if isinstance(loaded, OnnxModule):
        loaded.path = str(path)
    worst = max(differences.values())
    metrics = {
        "format": format,
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "max_abs_difference": differences,
        "tolerance": allowed,
        "dynamic_batch": dynamic_batch,
        "seconds": seconds,
    }
    notes = [f"checked against PyTorch at batch sizes {', '.join(differences)}: largest difference {worst:.2e} (allowed {allowed:.2e})"]
    stage = Stage(name="export", kind="export", metrics=metrics, notes=notes, execution=_execution(format))
    return Result(model=loaded, report=Report.for_model(model, [stage]))


def _export_and_check(
    model: nn.Module, form: str, example_input: Any, path: Path, dynamic_batch: bool, tolerance: float | None
) -> tuple[nn.Module, dict[str, float], float, float]:
    """Write, reload and compare: (loaded model, largest difference per batch size, the tolerance, seconds)."""
    started = time.perf_counter()
    try:
        loaded = _write(model, form, example_input, path, dynamic_batch)
    except TorchslimError:
        raise
    except Exception as error:  # exporters raise many types; name the format, the model and the cause
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TorchslimError(f"export of {type(model).__name__} as {form} failed: {cause}") from error
    seconds = time.perf_counter() - started
    differences: dict[str, float] = {}
    allowed = tolerance
    for size in (1, 3) if dynamic_batch else (None,):
        example = example_input if size is None else repeat_example(example_input, size)
        expected = _reference(model, example, decoded=form == "onnx")
        try:
            produced = _reference(loaded, example, set_eval=False)
        except Exception as error:
            raise TorchslimError(f"export: the {form} file does not run at batch {size}: {str(error).strip().splitlines()[0]}") from error
        if produced.shape != expected.shape:
            raise TorchslimError(f"export: the {form} file gives outputs of shape {tuple(produced.shape)} where the model gives {tuple(expected.shape)}")
        if allowed is None:
            allowed = 1e-4 * max(1.0, float(expected.abs().max()))
        differences[str(size or "example")] = float((produced - expected).abs().max())
    assert allowed is not None
    worst = max(differences.values())
    if worst > allowed:
        raise TorchslimError(
            f"export: the {form} file differs from the PyTorch model by {worst:.3g} (allowed {allowed:.3g}; per batch size {differences}), "
            f"so nothing was written; a traced model whose control flow depends on its inputs needs onnx or pt2"
        )
    return loaded, differences, allowed, seconds


def _execution(form: str) -> str:
    return {"onnx": "ONNX Runtime (CPU)", "pt2": "torch.export program", "torchscript": "TorchScript"}[form]


def _remove(path: Path) -> None:
    if path.is_file():
        path.unlink()


__all__ = ["FORMATS", "export"]
