"""AWQ (Lin et al. 2023), activation-aware weight quantization: input channels that carry large activations matter
most, so before rounding, each group of layers reading one tensor gets per-input-channel scales s = mean|x|^a /
mean|w|^(1-a) (normalized), with the exponent a searched on a grid for the smallest output error of the rounded
layers on calibration tokens. The scaled weights are rounded to nearest; the inverse scale is folded into the
normalization before (or kept as the layers' input scale). Block by block, like GPTQ.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from torchslim.llm.blocks import block_layers, forward_inputs
from torchslim.llm.scaling import fold_scale, input_groups, oriented_weight
from torchslim.quantization.formats import WeightScheme
from torchslim.quantization.modules import from_codes
from torchslim.quantization.primitives import compute_qparams, dequantize, quantize

SAMPLE_TOKENS = 4096


def round_codes(weight: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, zero point) of ``weight`` rounded to nearest on the scheme's grid."""
    spec = scheme.uniform_spec()
    scale, zero = compute_qparams(weight, spec, "AWQ")
    return quantize(weight, scale, zero, spec), scale, zero


def search_scale(x: torch.Tensor, weight: torch.Tensor, scheme: WeightScheme, grid: int) -> tuple[torch.Tensor, float, float]:
    """(scale, output error with it, output error without) for input sample ``x`` (tokens, in) and the group's
    stacked ``weight`` (out, in)."""
    spec = scheme.uniform_spec()
    reference = x @ weight.T
    x_mean = x.abs().mean(0).clamp(min=1e-8)
    w_mean = (weight.abs() / weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)).mean(0).clamp(min=1e-8)

    def error(scale: torch.Tensor) -> float:
        scaled = weight * scale
        s, z = compute_qparams(scaled, spec, "AWQ")
        rounded = dequantize(quantize(scaled, s, z, spec), s, z, spec) / scale
        return float((x @ rounded.T - reference).pow(2).mean())

    plain = error(torch.ones_like(x_mean))
    best, best_error = torch.ones_like(x_mean), plain
    for step in range(1, grid):
        ratio = step / grid
        scale = (x_mean.pow(ratio) / w_mean.pow(1 - ratio)).clamp(min=1e-4)
        scale = scale / (scale.max() * scale.min()).sqrt()
        candidate = error(scale)
        if candidate < best_error:
            best, best_error = scale, candidate
    return best, best_error, plain


def awq_block(
    block: nn.Module, inputs: list, planned: dict[nn.Module, str], schemes: dict[str, WeightScheme], grid: int
) -> tuple[list[tuple[str, nn.Module, torch.Tensor]], list[dict[str, Any]]]:
    """AWQ on one block: ((layer name, quantized layer, the float weight it stands for), per group: its layers,
    whether the scale was folded, and the output errors with and without it). Folding changes the block's
    normalizations in place; ``schemes`` is updated for layers that keep an input scale."""
    layers = block_layers(block, set(planned))
    samples: dict[str, list[torch.Tensor]] = {local: [] for local in layers}

    def keep(local: str, x: torch.Tensor) -> None:
        if sum(t.shape[0] for t in samples[local]) < SAMPLE_TOKENS:
            samples[local].append(x.float())

    forward_inputs(block, inputs, layers, keep)
    results, replacements = [], []
    for group in input_groups(block, inputs[0], layers):
        names = list(group.layers)
        x = torch.cat(samples[names[0]])[:SAMPLE_TOKENS]
        weights = {name: oriented_weight(layer) for name, layer in group.layers.items()}
        scheme = schemes[planned[group.layers[names[0]]]]
        scale, error, plain = search_scale(x, torch.cat(list(weights.values())), scheme, grid)
        folded = fold_scale(block, group, scale, inputs[:2])
        for name, layer in group.layers.items():
            full = planned[layer]
            layer_scheme = schemes[full] if folded else WeightScheme.from_dict({**schemes[full].to_dict(), "input_scale": True})
            scaled = oriented_weight(layer) if folded else weights[name] * scale
            codes, s, z = round_codes(scaled, layer_scheme)
            quantized: Any = from_codes(layer, layer_scheme, codes, s, z)
            if not folded:
                quantized.input_scale.copy_(1.0 / scale)
            schemes[full] = layer_scheme
            replacements.append((full, quantized, oriented_weight(layer)))
        results.append({"layers": [planned[group.layers[n]] for n in names], "folded": folded, "error": error, "rtn_error": plain})
    return replacements, results


__all__ = ["SAMPLE_TOKENS", "awq_block", "round_codes", "search_scale"]
