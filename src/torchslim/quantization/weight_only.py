"""Weight-only quantization of Linear and Conv2d layers, with per-layer schemes (mixed precision).

Example:
    >>> import torchslim as ts
    >>> result = ts.quantize(ts.models.create("lenet-300-100"), {"weights": {"scheme": "kmeans", "bits": 4}})
    >>> result.report.stages[0].metrics["weight_bytes"] < 266_610 * 4 / 7
    True
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from torch import nn

from torchslim.core.config import Config, ConfigError
from torchslim.core.errors import TorchslimError
from torchslim.core.report import Report, Result, Stage
from torchslim.core.selector import LayerSelector, module_type_name, select_modules
from torchslim.measure.counts import count_parameters
from torchslim.quantization.modules import QuantizedConv2d, QuantizedLinear, WeightScheme, empty_like, quantize_module
from torchslim.quantization.primitives import sqnr_db

TRANSFORM_KIND = "weight-quantization"


@dataclasses.dataclass(frozen=True)
class WeightOnlyConfig(Config):
    """Weight-only quantization: one ``weights`` scheme for the selected layers, overridden per module type by
    ``type_schemes`` (e.g. {"Conv2d": {"scheme": "kmeans", "bits": 8}}, as Deep Compression gives convolutions more
    bits than fully connected layers) and per layer name by ``layer_schemes`` (mixed precision, e.g.
    {"fc3": {"scheme": "uniform", "bits": 8}}); a layer's name wins over its type."""

    weights: WeightScheme = WeightScheme()
    type_schemes: dict[str, WeightScheme] = dataclasses.field(default_factory=dict)
    layer_schemes: dict[str, WeightScheme] = dataclasses.field(default_factory=dict)
    layers: LayerSelector = LayerSelector()

    def validate(self) -> None:
        # a type rule is general (a recipe may meet models without convolutions); only the supported types are valid
        unknown = sorted(set(self.type_schemes) - {"Linear", "Conv2d"})
        if unknown:
            raise ConfigError(f"type_schemes: weight-only quantization supports Linear and Conv2d, got {unknown}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _record_transform(model: nn.Module, schemes: dict[str, dict[str, Any]]) -> None:
    from torchslim.io.modelfile import append_transform, model_spec

    previous = next((t for t in (model_spec(model) or {}).get("transforms", []) if t.get("kind") == TRANSFORM_KIND), {"layers": {}})
    append_transform(model, {"kind": TRANSFORM_KIND, "layers": {**previous["layers"], **schemes}}, replace_kind=True)


def apply_structure(model: nn.Module, transform: dict[str, Any]) -> nn.Module:
    """Replace the layers a saved file lists with empty quantized modules of the same structure (for loading)."""
    for name, scheme in transform["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise TorchslimError(f"the file quantizes layer {name!r}, which the architecture does not have") from None
        _set_module(model, name, empty_like(module, WeightScheme.from_dict(scheme)))
    return model


def quantize_weights(model: nn.Module, config: WeightOnlyConfig | dict, inplace: bool = False) -> Result:
    """Replace the selected layers by weight-only quantized modules; report SQNR and stored bytes per layer."""
    config = WeightOnlyConfig.coerce(config, where="quantize")
    target = model if inplace else copy.deepcopy(model)
    modules = select_modules(target, config.layers, default_types=("Linear", "Conv2d"))
    names = {name for name, _ in modules}
    unknown = sorted(set(config.layer_schemes) - names)
    if unknown:
        raise ConfigError(f"quantize.layer_schemes names layers that are not selected: {unknown}; selected: {sorted(names)}")
    rows, schemes = [], {}
    for name, module in modules:
        if isinstance(module, (QuantizedLinear, QuantizedConv2d)):
            raise TorchslimError(f"layer {name!r} is already quantized")
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TorchslimError(f"layer {name!r} ({type(module).__name__}): weight-only quantization supports Linear and Conv2d")
        scheme = config.layer_schemes.get(name, config.type_schemes.get(module_type_name(module), config.weights))
        weight = module.weight.detach().float().clone()
        quantized = quantize_module(module, scheme, name)
        _set_module(target, name, quantized)
        schemes[name] = scheme.to_dict()
        rows.append({"name": name, "scheme": scheme.scheme, "bits": scheme.stored_bits, "weights": weight.numel(),
                     "sqnr_db": round(sqnr_db(weight, quantized.quantized.weight()), 2),
                     "dense_bytes": weight.numel() * 4, "stored_bytes": quantized.stored_bytes()})
    _record_transform(target, schemes)
    weight_bytes = sum(r["stored_bytes"] for r in rows)
    metrics = {"parameters": count_parameters(model), "weight_bytes": weight_bytes,
               "dense_weight_bytes": sum(r["dense_bytes"] for r in rows),
               "compression": sum(r["dense_bytes"] for r in rows) / weight_bytes}
    stage = Stage(name="quantize", kind="quantize", metrics=metrics, layers=rows, config=config.to_dict(),
                  execution="weights stored quantized, dequantized in eager forward")
    return Result(model=target, report=Report.for_model(model, [stage]))

