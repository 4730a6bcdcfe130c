"""One quantize verb: every registered method runs on a trained model through ts.quantize, returns a model that
runs, says what executes, and saves in the format its suffix names."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts
from torchslim.core.config import ConfigError
from torchslim.export.onnx import OnnxModule
from torchslim.quantization import FORMATS, METHODS, QuantizedLinear, quantize_config
from torchslim.quantization.formats import SCHEME_KEYS

CONFIGS = {
    "weight-only": {"method": "weight-only", "weights": {"scheme": "kmeans", "bits": 4}},
    "onnxruntime": {"method": "onnxruntime", "calibration_batches": 4},
    "native-int8": {"method": "native-int8", "observer": "percentile", "calibration_batches": 4},
    "pt2e": {"method": "pt2e", "calibration_batches": 4},
    "qat": {"method": "qat", "calibration_batches": 2},
    "gptq": {"method": "gptq", "weights": {"bits": 4}, "calibration_batches": 4, "batch_size": 64},
    "awq": {"method": "awq", "weights": {"bits": 4}, "calibration_batches": 4, "batch_size": 64},
    "smoothquant": {"method": "smoothquant", "calibration_batches": 4, "batch_size": 64},
}


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    return ts.train(ts.models.create_for("lenet-300-100", digits), digits, {"epochs": 6}, progress=False).model


def test_every_method_has_a_case():
    assert set(CONFIGS) == set(METHODS.names())


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_runs_and_keeps_accuracy(method, trained, digits, tmp_path):
    if method == "pt2e":
        pytest.importorskip("torchao")
    finetune = {"epochs": 1, "lr": 0.001, "max_batches_per_epoch": 10} if method == "qat" else None
    result = ts.quantize(trained, CONFIGS[method], data=digits, finetune=finetune)
    stage = result.report.stages[0]
    assert stage.config["method"] == method and stage.execution
    accuracy = ts.evaluate(result.model, digits)["accuracy"]
    assert accuracy > ts.evaluate(trained, digits)["accuracy"] - 0.05
    assert type(trained.fc1) is torch.nn.Linear  # the caller's model is untouched
    if isinstance(result.model, OnnxModule):
        saved = result.save(tmp_path / "m.onnx")
        assert saved.stat().st_size == stage.metrics["onnx_bytes"] and (tmp_path / "m.onnx.report.json").is_file()
        assert ts.evaluate(ts.load(saved), digits)["accuracy"] == accuracy
        with pytest.raises(ts.TorchslimError, match="ONNX Runtime"):
            ts.save(trained, tmp_path / "plain.onnx")


@pytest.mark.parametrize("scheme", sorted(FORMATS))
def test_quantized_layers_read_like_the_layers_they_replace(scheme):
    """``.weight`` of a quantized Linear is the decoded tensor, read-only; parameters count the weights it encodes."""
    model = ts.models.create("lenet-300-100")
    result = ts.quantize(model, {"weights": {"scheme": scheme, **({"bits": 4} if "bits" in SCHEME_KEYS[scheme] else {})}})  # bits where it reads them
    fc1 = result.model.fc1
    assert isinstance(fc1, QuantizedLinear) and fc1.weight.shape == (300, 784)
    assert torch.equal(fc1(torch.ones(1, 784)), torch.nn.functional.linear(torch.ones(1, 784), fc1.weight, fc1.bias))
    with pytest.raises(KeyError):
        fc1.weight = torch.nn.Parameter(torch.zeros(300, 784))
    assert ts.measure.count_parameters(result.model) == ts.measure.count_parameters(model) == 266_610


def test_config_dispatch_and_errors(trained, digits):
    assert type(quantize_config(None)).__name__ == "WeightOnlyConfig"
    assert type(quantize_config({"method": "native-int8"})).__name__ == "NativeInt8Config"
    with pytest.raises(ConfigError, match="unknown quantization method 'magic'"):
        ts.quantize(trained, {"method": "magic"})
    with pytest.raises(ConfigError, match="calibrates on data"):
        ts.quantize(trained, {"method": "onnxruntime"})
    with pytest.raises(ConfigError, match="unknown key 'bits'"):
        ts.quantize(trained, {"method": "native-int8", "bits": 4})
