"""What an int8 ONNX file records about how it was made, in its metadata: the products a static calibration kept
float (and why), and what the checked float export it was quantized from noted. The float export itself is written and
checked here as ``ts.export`` checks a file, so a model whose control flow depends on its input values is refused
instead of quantized with the example's branch baked in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from torchslim.core.errors import TorchslimError

FLOAT_PRODUCTS_KEY = "torchslim.float_products"  # metadata of a static int8 file: the products kept float, by name
EXPORT_NOTES_KEY = "torchslim.export_notes"  # metadata of an int8 file: what its float export's check noted


QUANTIZED_EXPORT = "quantize: int8 in ONNX Runtime quantizes the model's float ONNX export, and that export failed its check"


def checked_float_export(model: nn.Module, example_input: Any, path: Path, failure: str = QUANTIZED_EXPORT) -> tuple[Path, list[str]]:
    """The float ONNX file the quantizer starts from, written and checked as ``ts.export`` checks (batch sizes, inputs
    of other values and the example negated, shorter sequences): a model whose control flow depends on its input
    values would otherwise be quantized with the example's branch baked in. Returns the file and the export's notes
    (tracer warnings, a fixed sequence length) for the report."""
    from torchslim.export.verb import export

    try:
        exported = export(model, "onnx", example_input, path, overwrite=True)
    except TorchslimError as error:
        raise TorchslimError(f"{failure}: {error}") from None
    return path, list(exported.report.stages[0].notes[1:])  # the first note is the differences the check measured


def add_metadata(path: Path, key: str, value: Any) -> None:
    """Record ``value`` (as JSON) under ``key`` in the file's metadata (``_metadata`` reads it back)."""
    import json

    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key = key
    entry.value = json.dumps(value)
    onnx.save(model, str(path))


def _metadata(model_bytes: bytes, key: str) -> Any:
    import json

    import onnx

    for entry in onnx.load_from_string(model_bytes).metadata_props:
        if entry.key == key:
            return json.loads(entry.value)
    return None


def note_float_products(path: Path, kept: dict[str, float], threshold: float) -> None:
    """Record in the file's metadata which products stayed float and why (``float_products`` reads it back)."""
    add_metadata(path, FLOAT_PRODUCTS_KEY, {"threshold_db": threshold, "products": {name: round(db, 2) for name, db in kept.items()}})


def float_products(model_bytes: bytes) -> dict[str, Any] | None:
    """What a static int8 file records of the products it kept float: {"threshold_db", "products": {name: SQNR dB}};
    None when it records nothing (no check was made)."""
    found = _metadata(model_bytes, FLOAT_PRODUCTS_KEY)
    return dict(found) if found is not None else None


def export_notes(model_bytes: bytes) -> list[str]:
    """What the float export an int8 file was quantized from noted (tracer warnings, a fixed sequence length)."""
    return list(_metadata(model_bytes, EXPORT_NOTES_KEY) or [])


__all__ = ["EXPORT_NOTES_KEY", "FLOAT_PRODUCTS_KEY", "add_metadata", "checked_float_export", "export_notes", "float_products", "note_float_products"]
