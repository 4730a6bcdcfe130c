"""Every Config subclass in torchslim round-trips through dict, JSON and YAML (one parametrized test)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import torchslim
from torchslim.core.config import Config


def _all_configs() -> list[type[Config]]:
    for info in pkgutil.walk_packages(torchslim.__path__, prefix="torchslim."):
        if info.name != "torchslim.__main__":
            importlib.import_module(info.name)
    found, pending = [], list(Config.__subclasses__())
    while pending:
        klass = pending.pop()
        pending.extend(klass.__subclasses__())
        if klass.__module__.startswith("torchslim."):
            found.append(klass)
    return sorted(set(found), key=lambda k: f"{k.__module__}.{k.__qualname__}")


# configs whose defaults are not a complete config: a representative value of each
EXAMPLES = {
    "PruneConfig": {"sparsity": [0.5, 0.8], "overrides": {"fc1": 0.9}, "layers": {"exclude": ["fc3"]}},
    "FeaturePair": {"student": "layer1", "teacher": "layer2"},
    "BudgetConfig": {"target_size": 20_000, "bits": [4, 2]},
    "SpeedBudgetConfig": {"target_latency": 0.5, "backend": "onnxruntime", "ratios": [0.5, 0.75], "finetune": None},
}


@pytest.mark.parametrize("klass", _all_configs(), ids=lambda k: k.__qualname__)
def test_config_round_trips(klass):
    config = klass.from_dict(EXAMPLES.get(klass.__name__, {}))
    assert klass.from_dict(config.to_dict()) == config
    assert klass.from_json(config.to_json()) == config
    assert klass.from_yaml(config.to_yaml()) == config


def test_every_config_is_found():
    names = {klass.__name__ for klass in _all_configs()}
    assert {
        "PruneConfig",
        "StructuredConfig",
        "WeightOnlyConfig",
        "OnnxInt8Config",
        "NativeInt8Config",
        "QATConfig",
        "DistillConfig",
        "TrainConfig",
        "EncodeConfig",
        "ExportConfig",
        "LayerSelector",
        "WeightScheme",
    } <= names
