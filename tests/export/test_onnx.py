import pytest
import torch

import torchslim as ts
from torchslim.export.onnx import OnnxModule, export_onnx
from torchslim.quantization.onnx_static import count_ops, onnx_int8_module
from torchslim.train import fit


@pytest.mark.parametrize("name, shape", [("lenet-5", (1, 28, 28)), ("resnet20", (3, 32, 32)), ("mobilenetv2", (3, 32, 32))])
def test_onnx_runtime_matches_eager(name, shape, tmp_path):
    torch.manual_seed(0)
    kwargs = {"width_multiplier": 0.25} if name == "mobilenetv2" else {}
    model = ts.models.create(name, **kwargs).train()
    path = export_onnx(model, torch.randn(1, *shape), tmp_path / "m.onnx")
    assert model.training  # mode restored
    engine = OnnxModule(path)
    x = torch.randn(5, *shape)
    torch.testing.assert_close(engine(x), model.eval()(x), rtol=1e-4, atol=1e-4)
    assert "BatchNormalization" not in count_ops(path)  # folded into the convolutions


@pytest.fixture(scope="module")
def trained_lenet5(mnist_small):
    torch.manual_seed(0)
    model = ts.models.create("lenet-5")
    fit(model, mnist_small, {"epochs": 1, "lr": 0.02, "eval_every_epoch": False}, progress=False)
    return model


def test_static_int8_keeps_accuracy(trained_lenet5, mnist_small, tmp_path):
    calibration = (x for x, _ in mnist_small.loader("train", batch_size=64))
    engine = onnx_int8_module(trained_lenet5, mnist_small.example_input(1), calibration, tmp_path / "q.onnx")
    ops = count_ops(engine.path)
    assert ops.get("QuantizeLinear", 0) >= 4 and ops.get("DequantizeLinear", 0) >= 8
    dense = ts.evaluate(trained_lenet5, mnist_small)["accuracy"]
    int8 = ts.evaluate(engine, mnist_small)["accuracy"]
    assert abs(dense - int8) <= 0.005
    assert (tmp_path / "q.onnx").stat().st_size < 0.35 * 431_080 * 4


@pytest.mark.parametrize("calibration", ["entropy", "percentile"])
def test_other_calibrations_and_dynamic(trained_lenet5, mnist_small, tmp_path, calibration):
    batches = (x for x, _ in mnist_small.loader("train", batch_size=64))
    engine = onnx_int8_module(
        trained_lenet5, mnist_small.example_input(1), batches, tmp_path / "q.onnx", {"calibration": calibration, "calibration_batches": 4}
    )
    dense = ts.evaluate(trained_lenet5, mnist_small)["accuracy"]
    assert abs(ts.evaluate(engine, mnist_small)["accuracy"] - dense) < 0.01
    dynamic = onnx_int8_module(trained_lenet5, mnist_small.example_input(1), None, tmp_path / "d.onnx", {"mode": "dynamic"})
    assert abs(ts.evaluate(dynamic, mnist_small)["accuracy"] - dense) < 0.01


def test_calibration_without_batches_is_an_error(trained_lenet5, tmp_path):
    with pytest.raises(ts.TorchslimError, match="calibration got no batches"):
        onnx_int8_module(trained_lenet5, torch.zeros(1, 1, 28, 28), iter([]), tmp_path / "q.onnx")
    with pytest.raises(ts.TorchslimError, match="needs calibration data"):
        onnx_int8_module(trained_lenet5, torch.zeros(1, 1, 28, 28), None, tmp_path / "q.onnx")


def test_onnxruntime_latency_backend():
    from torchslim.measure import measure_latency

    results = measure_latency(ts.models.create("lenet-300-100"), torch.zeros(1, 1, 28, 28), batch_sizes=(1, 8), backend="onnxruntime", runs=10)
    assert [r.backend for r in results] == ["onnxruntime", "onnxruntime"] and results[1].median_ms > 0
