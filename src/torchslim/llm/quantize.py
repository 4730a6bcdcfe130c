"""Quantization methods for large models, registered with ``ts.quantize``: ``gptq`` and ``awq`` (``llm.awq``).

Both calibrate block by block (``llm.blocks``) on batches of the user's data, write the same packed weight-only layers
as round-to-nearest (so files, kernels and the .tslim codec work unchanged), and report each layer's output error on
the calibration tokens next to what round-to-nearest would give.

Example:
    >>> import torch, torchslim as ts
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.embed = nn.Embedding(32, 64)
    ...         self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(2))
    ...         self.head = nn.Linear(64, 32)
    ...     def forward(self, ids):
    ...         x = self.embed(ids)
    ...         for layer in self.layers:
    ...             x = layer(x)
    ...         return self.head(x)
    >>> _ = torch.manual_seed(0)
    >>> batches = [torch.randint(0, 32, (4, 16)) for _ in range(4)]
    >>> result = ts.quantize(Net(), {"method": "gptq", "weights": {"bits": 3, "granularity": "group", "group_size": 32,
    ...                                "symmetric": False}}, data=batches, task="language-modeling")
    >>> rows = result.report.stages[0].layers
    >>> all(row["output_error"] <= row["rtn_output_error"] for row in rows if "rtn_output_error" in row)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from torchslim.core.config import Config, check
from torchslim.core.report import Stage
from torchslim.core.selector import LayerSelector
from torchslim.llm.awq import awq_block, round_codes
from torchslim.llm.blocks import block_layers, forward_inputs, sequential
from torchslim.llm.gptq import HessianAccumulator, gptq, layer_error, round_to_nearest
from torchslim.llm.scaling import fold_scale, oriented_weight, smoothing_scales
from torchslim.quantization.api import calibration, quantization_method
from torchslim.quantization.formats import WeightScheme
from torchslim.quantization.modules import from_codes, quantize_module
from torchslim.quantization.primitives import dequantize
from torchslim.quantization.weight_only import LayerPlan, finish, float_weight, plan_layers, replace_layer

GPTQ_DEFAULT = WeightScheme(bits=4, symmetric=False, granularity="group", group_size=128)


@dataclasses.dataclass(frozen=True)
class GPTQConfig(Config):
    """GPTQ: uniform ``weights`` (per channel or group; 2-8 bits) chosen column by column against the Hessian of each
    layer's inputs over ``calibration_batches`` batches of ``batch_size`` sequences of the training data, block by
    block. ``block_size`` columns per lazy update, ``damp`` x mean diagonal added to the Hessian, ``act_order``
    (most sensitive columns first), ``clip_search`` (each group's range clipped where that rounds its weights
    better, as GPTQ's reference quantizer's ``mse`` option). Selected layers outside the repeated blocks (an output
    layer, embeddings) are rounded to nearest, with a note."""

    method: str = "gptq"
    weights: WeightScheme = GPTQ_DEFAULT
    layers: LayerSelector = LayerSelector()
    overrides: dict[str, WeightScheme] = dataclasses.field(default_factory=dict)
    calibration_batches: int = 32
    batch_size: int = 8
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    clip_search: bool = False

    def validate(self) -> None:
        check(self.method == "gptq", f"method must be 'gptq' for GPTQConfig, got {self.method!r}")
        for where, scheme in [("weights", self.weights), *((f"overrides[{k!r}]", v) for k, v in self.overrides.items())]:
            check(scheme.scheme == "uniform", f"{where}: GPTQ chooses codes on a uniform grid, got scheme {scheme.scheme!r}")
            check(scheme.granularity in ("channel", "group"), f"{where}: GPTQ quantizes per channel or per group, got {scheme.granularity!r}")
        check(self.calibration_batches >= 1 and self.batch_size >= 1, "calibration_batches and batch_size must be >= 1")
        check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        check(0 < self.damp < 1, f"damp must be in (0, 1), got {self.damp}")

    @classmethod
    def from_dict(cls, mapping: Any, where: str | None = None) -> GPTQConfig:
        """As ``Config.from_dict``, the weights merged onto GPTQ's default (4 bits, groups of 128, asymmetric)."""
        if isinstance(mapping, dict) and isinstance(mapping.get("weights"), dict):
            mapping = {**mapping, "weights": {**GPTQ_DEFAULT.to_dict(), **mapping["weights"]}}
        return super().from_dict(mapping, where=where)


# said where a block-by-block method found no repeated blocks
NO_BLOCKS = (
    "no repeated blocks found (an nn.ModuleList or nn.Sequential of layers run one after another on the hidden states): the whole "
    "model was calibrated as one block, in one pass (more memory than block by block)"
)


def _outside_blocks(target: nn.Module, plan: LayerPlan, inside: set[str], prefix: str = "") -> list[str]:
    """Round the planned layers no block calibrated to nearest; the notes name them: those no block holds, and those
    of a block that its forward never called (``prefix``: where the blocks are)."""
    names = [name for name, _ in plan.modules if name not in inside]
    for name in names:
        module = target.get_submodule(name)
        replace_layer(target, plan, name, float_weight(module), quantize_module(module, plan.scheme(name), name), method="round to nearest")
    held = [name for name in names if prefix and name.startswith(f"{prefix}.")]
    outside = [name for name in names if name not in held]
    notes = [f"outside the repeated blocks, rounded to nearest: {', '.join(outside)}"] if outside else []
    if not prefix:
        notes.append(NO_BLOCKS)
    if held:
        notes.append(
            "never called on the calibration batches (the block reads its weight directly, as nn.MultiheadAttention reads out_proj's), "
            f"rounded to nearest: {', '.join(held)}"
        )
    return notes


def run_gptq(model: nn.Module, config: GPTQConfig, batches: Any) -> Stage:
    """GPTQ on ``model`` in place (see ``GPTQConfig``)."""
    plan = plan_layers(model, config, types=("Linear", "Conv1D"))
    planned = {module: name for name, module in plan.modules}
    inside: set[str] = set()

    def quantize_block(block_name: str, block: nn.Module, inputs: list) -> None:
        layers = {local: layer for local, layer in block_layers(block, set(planned)).items()}
        hessians = {local: HessianAccumulator(float_weight(layer).shape[1]) for local, layer in layers.items()}
        forward_inputs(block, inputs, layers, lambda local, x: hessians[local].add(x))
        for local, layer in layers.items():
            name = planned[layer]
            scheme = plan.scheme(name)
            spec = scheme.uniform_spec()
            if hessians[local].count == 0:
                continue  # never called: its weight is read directly (rounded to nearest, named, with those outside)
            weight = float_weight(layer)
            hessian = hessians[local].hessian()
            codes, scale, zero = gptq(weight, hessian, spec, config.block_size, config.damp, config.act_order, config.clip_search)
            error = layer_error(weight, dequantize(codes, scale, zero, spec), hessian)
            rtn_error = layer_error(weight, round_to_nearest(weight, spec), hessian)
            quantized = from_codes(layer, scheme, codes, scale, zero)
            replace_layer(model, plan, name, weight, quantized, method="GPTQ", output_error=error, rtn_output_error=rtn_error)
            inside.add(name)

    run = sequential(model, batches, quantize_block)
    notes = _outside_blocks(model, plan, inside, run.prefix)
    stage = finish(model, model, config, plan, notes)
    rows = [row for row in plan.rows if "rtn_output_error" in row]
    gptq_total, rtn_total = sum(r["output_error"] for r in rows), sum(r["rtn_output_error"] for r in rows)
    stage.metrics.update(
        {
            "calibration_tokens": run.tokens,
            "calibration_seconds": round(run.seconds, 2),
            "peak_rss_mib": round(run.peak_rss_mib, 1),
            "output_error_vs_rtn": gptq_total / rtn_total if rtn_total else 1.0,
        }
    )
    stage.notes.insert(
        0,
        f"GPTQ over {run.blocks} blocks, {run.calibration_batches} batches ({run.tokens:,} tokens) in {run.seconds:.1f} s; "
        f"layer output error {gptq_total / rtn_total if rtn_total else 1.0:.3f}x round-to-nearest's",
    )
    return stage


@dataclasses.dataclass(frozen=True)
class AWQConfig(Config):
    """AWQ: per-input-channel scales from activation magnitudes, the exponent searched over ``grid`` steps for the
    smallest output error, then uniform ``weights`` rounded to nearest (per channel or group). Scales are folded
    into the normalization before a group of layers where that leaves the block's outputs unchanged, otherwise kept
    as the layers' input scales. Calibration as in GPTQ; layers outside the repeated blocks are rounded plainly."""

    method: str = "awq"
    weights: WeightScheme = GPTQ_DEFAULT
    layers: LayerSelector = LayerSelector()
    overrides: dict[str, WeightScheme] = dataclasses.field(default_factory=dict)
    calibration_batches: int = 32
    batch_size: int = 8
    grid: int = 20

    def validate(self) -> None:
        check(self.method == "awq", f"method must be 'awq' for AWQConfig, got {self.method!r}")
        for where, scheme in [("weights", self.weights), *((f"overrides[{k!r}]", v) for k, v in self.overrides.items())]:
            check(scheme.scheme == "uniform", f"{where}: AWQ scales a uniform grid, got scheme {scheme.scheme!r}")
        check(self.calibration_batches >= 1 and self.batch_size >= 1, "calibration_batches and batch_size must be >= 1")
        check(self.grid >= 2, f"grid must be >= 2, got {self.grid}")

    @classmethod
    def from_dict(cls, mapping: Any, where: str | None = None) -> AWQConfig:
        """As ``Config.from_dict``, the weights merged onto the default (4 bits, groups of 128, asymmetric)."""
        if isinstance(mapping, dict) and isinstance(mapping.get("weights"), dict):
            mapping = {**mapping, "weights": {**GPTQ_DEFAULT.to_dict(), **mapping["weights"]}}
        return super().from_dict(mapping, where=where)


def run_awq(model: nn.Module, config: AWQConfig, batches: Any) -> Stage:
    """AWQ on ``model`` in place (see ``AWQConfig``)."""
    plan = plan_layers(model, config, types=("Linear", "Conv1D"))
    planned = {module: name for name, module in plan.modules}
    inside: set[str] = set()
    groups: list[dict[str, Any]] = []

    def quantize_block(block_name: str, block: nn.Module, inputs: list) -> None:
        replacements, results = awq_block(block, inputs, planned, plan.schemes, config.grid)
        for name, quantized, reference in replacements:
            replace_layer(model, plan, name, reference, quantized, method="AWQ")
            inside.add(name)
        groups.extend(results)

    run = sequential(model, batches, quantize_block)
    notes = _outside_blocks(model, plan, inside, run.prefix)
    stage = finish(model, model, config, plan, notes)
    awq_total, rtn_total = sum(g["error"] for g in groups), sum(g["rtn_error"] for g in groups)
    folded = sum(1 for g in groups if g["folded"])
    stage.metrics.update(
        {
            "calibration_tokens": run.tokens,
            "calibration_seconds": round(run.seconds, 2),
            "peak_rss_mib": round(run.peak_rss_mib, 1),
            "output_error_vs_rtn": awq_total / rtn_total if rtn_total else 1.0,
            "groups_folded": folded,
            "groups": len(groups),
        }
    )
    stage.notes.insert(
        0,
        f"AWQ over {run.blocks} blocks, {run.tokens:,} calibration tokens in {run.seconds:.1f} s; {folded} of {len(groups)} layer "
        f"groups' scales folded into the normalization before them, the rest kept as input scales; sampled output "
        f"error {awq_total / rtn_total if rtn_total else 1.0:.3f}x round-to-nearest's",
    )
    return stage


W8A8 = WeightScheme(bits=8, symmetric=True, granularity="channel", activation_bits=8)


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(Config):
    """SmoothQuant W8A8: activation outliers moved into the weights by per-input-channel scales s = max|x|^alpha /
    max|w|^(1-alpha) (folded into the normalization before where possible), then int8 weights per channel and int8
    activations per token, computed with integer matmuls (``torch._int_mm``)."""

    method: str = "smoothquant"
    alpha: float = 0.5
    layers: LayerSelector = LayerSelector()
    calibration_batches: int = 32
    batch_size: int = 8

    # not fields: W8A8 is what SmoothQuant runs, on every selected layer
    weights: ClassVar[WeightScheme] = W8A8
    overrides: ClassVar[dict[str, WeightScheme]] = {}

    def validate(self) -> None:
        check(self.method == "smoothquant", f"method must be 'smoothquant' for SmoothQuantConfig, got {self.method!r}")
        check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}")
        check(self.calibration_batches >= 1 and self.batch_size >= 1, "calibration_batches and batch_size must be >= 1")


def run_smoothquant(model: nn.Module, config: SmoothQuantConfig, batches: Any) -> Stage:
    """SmoothQuant on ``model`` in place (see ``SmoothQuantConfig``)."""
    plan = plan_layers(model, config, types=("Linear", "Conv1D"))
    planned = {module: name for name, module in plan.modules}
    inside: set[str] = set()
    folded_groups, all_groups = [0], [0]

    def smooth_block(block_name: str, block: nn.Module, inputs: list) -> None:
        for group, scale, weights in smoothing_scales(block, inputs, block_layers(block, set(planned)), config.alpha):
            folded = fold_scale(block, group, scale, inputs[:2])
            folded_groups[0] += int(folded)
            all_groups[0] += 1
            for name, layer in group.layers.items():
                full = planned[layer]
                scheme = W8A8 if folded else WeightScheme.from_dict({**W8A8.to_dict(), "input_scale": True})
                plan.schemes[full] = scheme
                scaled = oriented_weight(layer) if folded else weights[name] * scale
                codes, s, z = round_codes(scaled, scheme)
                quantized: Any = from_codes(layer, scheme, codes, s, z)
                if not folded:
                    quantized.input_scale.copy_(1.0 / scale)
                replace_layer(model, plan, full, oriented_weight(layer), quantized, method="SmoothQuant")
                inside.add(full)

    run = sequential(model, batches, smooth_block)
    notes = _outside_blocks(model, plan, inside, run.prefix)
    stage = finish(model, model, config, plan, notes)
    stage.metrics.update({"calibration_tokens": run.tokens, "calibration_seconds": round(run.seconds, 2), "peak_rss_mib": round(run.peak_rss_mib, 1)})
    stage.notes.insert(
        0,
        f"SmoothQuant (alpha {config.alpha}) over {run.blocks} blocks, {run.tokens:,} calibration tokens; {folded_groups[0]} of "
        f"{all_groups[0]} layer groups' scales folded into the normalization before them, the rest kept as input scales",
    )
    return stage


def _calibrated(run: Callable[[nn.Module, Any, Any], Stage]) -> Callable[[nn.Module, Any, Any], tuple[nn.Module, Stage]]:
    """A block-by-block method as ``ts.quantize`` calls it: the model changed in place on the config's calibration
    batches, without gradients."""

    def apply(model: nn.Module, config: Any, context: Any) -> tuple[nn.Module, Stage]:
        with torch.no_grad():
            stage = run(model, config, calibration(context, config.batch_size, config.calibration_batches))
        return model, stage

    return apply


for _name, _config, _run in (("gptq", GPTQConfig, run_gptq), ("awq", AWQConfig, run_awq), ("smoothquant", SmoothQuantConfig, run_smoothquant)):
    quantization_method(_name, _config, needs_data=True)(_calibrated(_run))


__all__ = ["AWQConfig", "GPTQConfig", "SmoothQuantConfig", "run_awq", "run_gptq", "run_smoothquant"]
