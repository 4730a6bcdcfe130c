"""Regression tests for quantization bugs a user-style probe found (observers, engines, configs, errors)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from torchslim.core.config import ConfigError
from torchslim.core.errors import TorchslimError
from torchslim.quantization.observers import EntropyObserver, MinMaxObserver, observed_sqnr
from torchslim.quantization.onnx_static import OnnxInt8Config
from torchslim.quantization.primitives import UniformSpec, dequantize, qparams_from_range, quantize


def _sqnr(x: torch.Tensor, rounded: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).sum() / (x - rounded).pow(2).sum()))


def test_entropy_observer_does_not_overclip_relu_outputs():
    torch.manual_seed(0)
    batches = [torch.relu(torch.randn(64, 64)) for _ in range(8)]
    entropy, minmax = EntropyObserver(), MinMaxObserver()
    for batch in batches:
        entropy.observe(batch)
        minmax.observe(batch)
    low, high = entropy.range()
    assert float(high) > 0.8 * float(entropy.high)  # the exact zeros used to pull it down to ~44% of the maximum
    spec = UniformSpec(bits=8, symmetric=False, granularity="tensor")
    x = torch.cat(batches)
    scale, zero_point = qparams_from_range(low.reshape(1), high.reshape(1), spec)
    rounded = dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec)
    assert _sqnr(x, rounded) > _sqnr(x, observed_sqnr(x, minmax, spec)) - 1.0


def test_entropy_observer_still_clips_heavy_tails():
    torch.manual_seed(0)
    observer = EntropyObserver()
    for _ in range(16):
        observer.observe(torch.relu(torch.distributions.StudentT(2.0).sample((64, 64))))
    assert observer.clip() < 0.5 * float(observer.high)


def test_entropy_observer_of_only_zeros():
    observer = EntropyObserver()
    observer.observe(torch.zeros(4, 4))
    low, high = observer.range()
    assert float(low) == 0.0 and float(high) == 0.0


def _engine() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    return ts.quantize(model, {"method": "onnxruntime", "mode": "dynamic"}, example_input=torch.randn(2, 8)).model


@pytest.mark.parametrize("suffix", [".safetensors", ".tslim"])
def test_saving_an_onnx_engine_other_than_onnx_says_how(tmp_path, suffix):
    engine = _engine()
    with pytest.raises(TorchslimError, match="an ONNX Runtime engine is saved as its .onnx file"):
        ts.save(engine, tmp_path / f"e{suffix}")
    assert not (tmp_path / f"e{suffix}").exists()
    assert ts.save(engine, tmp_path / "e.onnx").is_file()


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, a, b):
        return self.a(a) + self.b(b)


def test_pt2e_refuses_several_inputs_up_front():
    pytest.importorskip("torchao")
    model = _TwoInputs().eval()
    data = [((torch.randn(4, 4), torch.randn(4, 2)), torch.randn(4, 3))]
    with pytest.raises(TorchslimError, match="PT2E int8 takes a model called with one tensor.*'onnxruntime'"):
        ts.quantize(model, {"method": "pt2e"}, data=data, example_input=(torch.randn(2, 4), torch.randn(2, 2)))
    with pytest.raises(TorchslimError, match="mapping of inputs a, b"):
        ts.quantize(model, {"method": "pt2e"}, data=data, example_input={"a": torch.randn(2, 4), "b": torch.randn(2, 2)})


def test_saving_a_pt2e_model_points_to_export(tmp_path):
    from torchslim.io.modelfile import refuse_engine
    from torchslim.quantization.pt2e import CompiledModule

    compiled = CompiledModule(lambda x: x, "pt2e-int8")
    with pytest.raises(TorchslimError, match=r"ts.export\(model, 'pt2', example_input\)"):
        refuse_engine(compiled, "m.safetensors")
    with pytest.raises(TorchslimError, match="ts.export"):
        ts.save(compiled, tmp_path / "m.safetensors")


class _TiedTransposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 8)

    def forward(self, x):
        return F.linear(torch.relu(self.enc(x)), self.enc.weight.t())


@pytest.mark.parametrize("method", ["native-int8", "onnxruntime"])
def test_static_int8_of_a_weight_used_transposed_names_it(method):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    with pytest.raises(TorchslimError, match=r"failed at node .*weight enc\.weight.*used by 2 nodes"):
        ts.quantize(_TiedTransposed().eval(), {"method": method, "calibration_batches": 2}, data=[x, x])


def test_native_int8_of_an_operator_onnx_runtime_cannot_run_says_so():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, (3, 5), padding="same", dilation=(1, 2)), nn.ReLU()).eval()
    x = torch.randn(2, 3, 9, 9)
    with pytest.raises(TorchslimError, match="(ONNX Runtime cannot run the exported model|the onnx file does not run on batch 1).*Conv"):
        ts.quantize(model, {"method": "native-int8", "calibration_batches": 2}, data=[x, x])


@pytest.mark.parametrize(
    "config, message",
    [
        ({"mode": "dynamic", "observer": "mse"}, "observer 'mse': dynamic int8"),
        ({"mode": "dynamic", "calibration": "entropy"}, "calibration 'entropy': dynamic int8"),
        ({"observer": "bogus"}, "observer must be one of"),
        ({"observer": "mse", "calibration": "entropy"}, "not both"),
    ],
)
def test_onnxruntime_config_refuses_what_it_would_ignore(config, message):
    with pytest.raises(ConfigError, match=message):
        OnnxInt8Config.from_dict({"method": "onnxruntime", **config}, where="quantize")


def test_onnxruntime_static_with_an_observer_reports_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    result = ts.quantize(model, {"method": "onnxruntime", "observer": "mse", "calibration_batches": 2}, data=data)
    assert "torchslim's mse observer" in result.report.stages[0].execution
