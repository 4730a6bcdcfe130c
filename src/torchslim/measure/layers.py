"""Per-layer facts a report draws: how many weights and output channels each layer keeps, at how many bits, the
MACs it executes and the MACs its non-zeros alone would need, and histograms of its weights.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> rows = layer_rows(model, torch.zeros(1, 4))
    >>> [(row["name"], row["out"], row["bits"], row["macs"]) for row in rows]
    [('0', 3, 32, 12), ('2', 2, 32, 6)]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.core.selector import module_type_name
from torchslim.measure.counts import count_macs

BINS = 60


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a layer computes with (masked, decoded), or None for modules without a matrix or kernel."""
    parametrized = "weight" in (getattr(module, "parametrizations", None) or {})
    declared = isinstance(getattr(type(module), "weight", None), property) or "weight" in dict(module.named_parameters(recurse=False))
    if not (declared or parametrized):
        return None
    try:
        weight = module.weight
    except Exception:  # a layer whose weight cannot be read (e.g. an ONNX engine's stand-in)
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or not weight.is_floating_point():
        return None
    return weight.detach()


def _bits(module: nn.Module, weight: torch.Tensor) -> int:
    """Bits per stored weight: the quantized code width, 16 for a half-precision store, else the tensor's width."""
    quantized = getattr(module, "quantized", None)
    if quantized is not None:
        bits = getattr(quantized, "bits", None)
        return int(bits) if bits is not None else 16
    return torch.finfo(weight.dtype).bits


def _centroids(module: nn.Module) -> list[float]:
    """The shared values of a k-means / power-of-two codebook layer (at most 256), else none."""
    quantized = getattr(module, "quantized", None)
    codebook = getattr(quantized, "codebook", None) if quantized is not None else None
    if not isinstance(codebook, torch.Tensor) or codebook.numel() > 256:
        return []
    return sorted(float(v) for v in codebook.detach().flatten().unique())


@torch.no_grad()
def layer_rows(model: nn.Module, example_input: Any | None = None) -> list[dict[str, Any]]:
    """One row per layer with a weight matrix or kernel: name, type, output channels (``out``) and inputs (``in``),
    weights, non-zeros, fraction kept, bits per weight, MACs per example and ``sparse_macs`` (the MACs its non-zeros
    alone would need: MACs x fraction kept)."""
    macs = {row["name"]: row["macs"] for row in count_macs(model, example_input)["layers"]} if example_input is not None else {}
    rows = []
    for name, module in model.named_modules():
        weight = _weight(module)
        if weight is None:
            continue
        count = weight.numel()
        nonzeros = int(torch.count_nonzero(weight))
        row: dict[str, Any] = {
            "name": name or "(root)",
            "type": module_type_name(module),
            "out": int(weight.shape[0]),
            "in": int(weight[0].numel()),
            "weights": count,
            "nonzeros": nonzeros,
            "kept": round(nonzeros / count, 4) if count else 0.0,
            "bits": _bits(module, weight),
        }
        if name in macs:
            row["macs"] = int(macs[name])
            row["sparse_macs"] = int(round(macs[name] * nonzeros / count)) if count else 0
        rows.append(row)
    return rows


def largest_layers(rows: list[dict[str, Any]], count: int = 4) -> list[str]:
    """The names of the ``count`` layers with the most weights, in the model's order."""
    chosen = {row["name"] for row in sorted(rows, key=lambda row: -row["weights"])[:count]}
    return [row["name"] for row in rows if row["name"] in chosen]


@torch.no_grad()
def weight_histograms(model: nn.Module, ranges: dict[str, float], bins: int = BINS) -> list[dict[str, Any]]:
    """Histograms of the non-zero weights of the layers named in ``ranges`` ({name: r}, counted over [-r, r] in
    ``bins`` bins, values outside in the end bins), with each layer's count of zeros and its codebook's centroids.
    Layers a later stage no longer has are left out."""
    modules = dict(model.named_modules())
    out = []
    for name, limit in ranges.items():
        module = modules.get("" if name == "(root)" else name)
        weight = _weight(module) if module is not None else None
        if weight is None:
            continue
        values = weight.float().flatten()
        nonzero = values[values != 0].clamp(-limit, limit)
        counts = torch.histc(nonzero, bins=bins, min=-limit, max=limit) if nonzero.numel() else torch.zeros(bins)
        out.append(
            {
                "layer": name,
                "range": limit,
                "counts": [int(c) for c in counts.tolist()],
                "zeros": int(values.numel() - nonzero.numel()),
                "centroids": _centroids(module) if module is not None else [],
            }
        )
    return out


@torch.no_grad()
def histogram_ranges(model: nn.Module, names: list[str]) -> dict[str, float]:
    """{layer: largest |weight|} for ``names``: the fixed range every stage's histogram of that layer uses."""
    modules = dict(model.named_modules())
    ranges = {}
    for name in names:
        weight = _weight(modules["" if name == "(root)" else name])
        if weight is not None:
            ranges[name] = float(weight.abs().max()) or 1.0
    return ranges


__all__ = ["histogram_ranges", "largest_layers", "layer_rows", "weight_histograms"]
