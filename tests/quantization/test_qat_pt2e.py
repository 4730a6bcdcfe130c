import pytest
import torch

import torchslim as ts
from torchslim.export.onnx import OnnxModule
from torchslim.quantization.cpu import cpu_has_vnni
from torchslim.quantization.onnx_static import count_ops
from torchslim.quantization.qat import QATConv2d, QATLinear, calibrate_qat, export_qat_onnx, prepare_qat
from torchslim.train import fit

pytestmark = pytest.mark.slow  # every test here trains or runs a recipe


@pytest.mark.parametrize("weight_scale", ["learned", "observer"])
def test_qat_trains_and_runs_as_int8_in_onnx_runtime(weight_scale, mnist_small, tmp_path):
    torch.manual_seed(0)
    model = ts.models.create("lenet-300-100")
    fit(model, mnist_small, {"epochs": 1, "eval_every_epoch": False}, progress=False)
    qat = prepare_qat(model, {"weight_scale": weight_scale})
    assert type(model.fc1) is torch.nn.Linear and isinstance(qat.fc1, QATLinear)
    calibrate_qat(qat, mnist_small.loader("train", batch_size=64), 4)
    scale_before = qat.fc1.fake.weight_scale.detach().clone()
    fit(qat, mnist_small, {"epochs": 1, "lr": 0.005, "max_batches_per_epoch": 40, "eval_every_epoch": False}, progress=False)
    if weight_scale == "learned":
        assert not torch.equal(qat.fc1.fake.weight_scale, scale_before)  # LSQ moved the scales
    accuracy = ts.evaluate(qat, mnist_small)["accuracy"]
    assert accuracy > ts.evaluate(model, mnist_small)["accuracy"] - 0.01
    path = export_qat_onnx(qat, mnist_small.example_input(1), tmp_path / "qat.onnx")
    ops = count_ops(path)
    # inputs and outputs quantized at run time (3 + 3), weights stored as int8 initializers, all dequantized (9)
    assert ops["QuantizeLinear"] == 6 and ops["DequantizeLinear"] == 9 and "Round" not in ops
    engine = OnnxModule(path)
    # integer kernels round differently (on a CPU without VNNI the weights train on 7 bits, so pair sums cannot saturate)
    assert qat.fc1.fake.qmax == (127 if cpu_has_vnni() else 63)
    assert abs(ts.evaluate(engine, mnist_small)["accuracy"] - accuracy) <= 0.005


def test_qat_seven_bit_weights_reach_the_file(tmp_path):
    """reduce_range puts the weights on [-64, 63] in training and in the int8 file, which is recorded with the layers
    (a saved model reloads on the grid it trained on, whatever CPU loads it)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from torchslim.core.spec import model_spec
    from torchslim.quantization.primitives import sqnr_db

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    x = torch.randn(16, 3, 8, 8)
    qat = prepare_qat(model, {"reduce_range": True}).eval()
    calibrate_qat(qat, [(x, None)], 1)
    assert qat[0].fake.qmax == 63 and qat[3].fake.qmin == -64
    assert model_spec(qat)["transforms"][-1]["config"]["reduce_range"] is True
    codes = qat[3].fake.quantize_weight(qat[3].weight) / qat[3].fake.weight_scale.reshape(-1, 1)
    assert codes.round().abs().max() <= 64
    path = export_qat_onnx(qat, x[:1], tmp_path / "seven.onnx")
    weights = [numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert len(weights) == 2 and all(w.min() >= -64 and w.max() <= 63 for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) >= 60  # the grid is used, not shrunk further
    expected = qat(x).detach()
    assert sqnr_db(expected, OnnxModule(path)(x)) > 35
    assert prepare_qat(model, {"reduce_range": False})[0].fake.qmax == 127
    loaded = ts.load(ts.save(qat, tmp_path / "seven.safetensors"))
    assert loaded[0].fake.qmax == 63 and torch.allclose(loaded(x), expected, atol=1e-6)


def test_qat_convs(tmp_path):
    torch.manual_seed(0)
    qat = prepare_qat(ts.models.create("resnet20"), {"layers": {"include": ["layer1.*"]}})
    assert sum(isinstance(m, QATConv2d) for m in qat.modules()) == 6
    x = torch.randn(2, 3, 32, 32)
    running_mean = qat.bn1.running_mean.clone()
    calibrate_qat(qat, [(x, None)], 1)
    assert torch.equal(qat.bn1.running_mean, running_mean) and bool(qat.layer1[0].conv1.fake.observed)
    qat.train()
    qat(x)
    qat.eval()
    engine = OnnxModule(export_qat_onnx(qat, x[:1], tmp_path / "r.onnx"))
    # integer kernels requantize their outputs with their own rounding: an element may land one output step away
    from torchslim.quantization.primitives import sqnr_db

    expected = qat(x).detach()
    assert sqnr_db(expected, engine(x)) > 35  # the same model, not merely a similar one
    assert (engine(x) - expected).abs().max() < 0.05 * expected.abs().max()


def test_pt2e_int8_matches_float(mnist_small):
    pytest.importorskip("torchao")
    from torchslim.quantization.pt2e import pt2e_int8

    torch.manual_seed(0)
    model = ts.models.create("lenet-5")
    fit(model, mnist_small, {"epochs": 1, "lr": 0.02, "max_batches_per_epoch": 50, "eval_every_epoch": False}, progress=False)
    calibration = (x for x, _ in mnist_small.loader("train", batch_size=64))
    quantized = pt2e_int8(model, mnist_small.example_input(1), calibration, batches=4)
    dense = ts.evaluate(model, mnist_small)["accuracy"]
    assert abs(ts.evaluate(quantized, mnist_small)["accuracy"] - dense) <= 0.01
    with pytest.raises(ts.TorchslimError, match="PT2E calibration got no batches"):
        pt2e_int8(model, mnist_small.example_input(1), iter([]))


def test_native_ptq_with_observers_folds_bn_and_stores_int8(tmp_path):
    import onnx

    from torchslim.quantization.qat import calibrate_observers, fold_batchnorm

    torch.manual_seed(0)
    model = ts.models.create("resnet20").eval()
    folded = fold_batchnorm(model)
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    native = prepare_qat(folded, {"weight_scale": "observer"})
    calibrate_observers(native, [(torch.randn(8, 3, 32, 32), None) for _ in range(4)], "mse", 4)
    path = export_qat_onnx(native, x[:1], tmp_path / "ptq.onnx")
    graph = onnx.load(str(path)).graph
    int8 = [init for init in graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 20  # the 19 convolutions and the linear layer hold int8 weights
    assert path.stat().st_size < 0.35 * 269_722 * 4
    from torchslim.quantization.primitives import sqnr_db

    assert sqnr_db(model(x), OnnxModule(path)(x)) > 15


def test_native_int8_quantizes_residual_adds_pooling_and_the_classifier_with_torchslims_ranges(tmp_path):
    """Every activation range comes from torchslim's observer (minmax reproduces ONNX Runtime's own calibration
    exactly), and ONNX Runtime's optimized graph runs the residual adds, the pooling and the classifier in int8."""
    import collections

    import onnx
    import onnxruntime as ort

    from torchslim.quantization.primitives import sqnr_db

    torch.manual_seed(0)
    model = ts.models.create("resnet20").eval()
    batches = [(torch.randn(8, 3, 32, 32), None) for _ in range(4)]
    example, probe = torch.randn(1, 3, 32, 32), torch.randn(16, 3, 32, 32)
    common = {"calibration_batches": 4, "batch_size": 8}
    engines = {
        name: ts.quantize(model, config, data=batches, example_input=example, path=tmp_path / f"{name}.onnx").model
        for name, config in {
            "native-minmax": {"method": "native-int8", "observer": "minmax", **common},
            "native-mse": {"method": "native-int8", "observer": "mse", **common},
            "onnxruntime": {"method": "onnxruntime", "calibration": "minmax", **common},
        }.items()
    }
    with torch.no_grad():
        reference = model(probe)
    outputs = {name: engine(probe) for name, engine in engines.items()}
    torch.testing.assert_close(outputs["native-minmax"], outputs["onnxruntime"], rtol=0, atol=0)  # the same ranges
    assert sqnr_db(reference, outputs["native-mse"]) > 20
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "native-mse.onnx"), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearConv"] == 19 and ops["QLinearAdd"] == 9 and ops["QLinearGlobalAveragePool"] == 1 and ops["QGemm"] == 1
    assert "Conv" not in ops and "Add" not in ops and "Gemm" not in ops
