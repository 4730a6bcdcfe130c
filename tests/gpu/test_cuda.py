"""Every verb with the model on a CUDA device: tensors follow the model, results stay on it and match the CPU where
they should. Skipped (with the reason) on machines without CUDA; run them where one is:
``python -m pytest tests/gpu``."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import torchslim as ts
from tests import zoo
from tests.llm.test_sparsity import LAYERS
from tests.test_zoo import _text_batches

# TORCHSLIM_TEST_DEVICE=cpu runs the same checks on the CPU (to check the tests themselves on a machine without CUDA)
CUDA = torch.device(os.environ.get("TORCHSLIM_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    CUDA.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device on this machine (torch.cuda.is_available() is False)"
)
TUNE = {"epochs": 1, "lr": 0.02, "batch_size": 64, "eval_every_epoch": False}


class SmallConvNet(nn.Module):
    """A user's own 8x8 convnet: conv + BN + functional ReLU, a residual add, pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.conv2(x))
        return self.head(torch.flatten(nn.functional.avg_pool2d(x, 2), 1))


def _on_cuda(model: nn.Module) -> bool:
    tensors = list(model.parameters()) + list(model.buffers())
    return bool(tensors) and all(t.device.type == CUDA.type for t in tensors)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = ts.models.create_for("lenet-300-100", digits).to(CUDA)
    return ts.train(model, digits, {"epochs": 6, "lr": 0.05}, progress=False).model


@pytest.fixture(scope="module")
def convnet(digits):
    torch.manual_seed(0)
    return ts.train(SmallConvNet().to(CUDA), digits, {"epochs": 4, "lr": 0.05}, progress=False).model.eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_cuda_in_each_precision(digits, precision):
    if precision == "fp16" and CUDA.type == "cpu":
        pytest.skip("fp16 autocast is for CUDA")
    torch.manual_seed(0)
    model = ts.models.create_for("lenet-300-100", digits).to(CUDA)
    result = ts.train(model, digits, {"epochs": 4, "lr": 0.05, "precision": precision}, progress=False)
    assert _on_cuda(result.model) and all(p.dtype == torch.float32 for p in result.model.parameters())
    assert ts.evaluate(result.model, digits)["accuracy"] > 0.85


def test_evaluate_on_cuda_equals_cpu(trained, digits):
    on_gpu = ts.evaluate(trained, digits)
    on_cpu = ts.evaluate(_cpu_copy(trained), digits)
    assert on_gpu["accuracy"] == pytest.approx(on_cpu["accuracy"], abs=2e-3)


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu()


@pytest.mark.parametrize("importance", ["l1", "taylor", "wanda"])
def test_unstructured_pruning_on_cuda(trained, digits, importance):
    result = ts.prune(trained, {"sparsity": 0.8, "importance": importance}, data=digits, finetune=TUNE, progress=False)
    assert _on_cuda(result.model)
    assert ts.evaluate(result.model, digits)["accuracy"] > 0.85
    assert result.report.stages[-1].metrics["nonzeros"] < 0.25 * sum(p.numel() for p in trained.parameters())


@pytest.mark.parametrize("importance", ["l1", "mean_activation", "taylor"])
def test_channel_removal_on_cuda(convnet, digits, importance):
    result = ts.prune_channels(convnet, {"ratio": 0.5, "importance": importance}, data=digits, finetune=TUNE, progress=False)
    assert _on_cuda(result.model) and result.model.conv1.out_channels < 16
    assert ts.evaluate(result.model, digits)["accuracy"] > 0.7
    example = torch.randn(4, 1, 8, 8, device=CUDA)
    assert result.model(example).shape == (4, 10)


@pytest.mark.parametrize(
    "config",
    [
        {"weights": {"bits": 8}},
        {"weights": {"bits": 4, "granularity": "group", "group_size": 16}},
        {"weights": {"scheme": "kmeans", "bits": 4}},
        {"method": "qat", "calibration_batches": 2, "export": False},
    ],
    ids=["int8", "int4-g16", "kmeans4", "qat"],
)
def test_quantization_on_cuda(trained, digits, config):
    finetune = TUNE if config.get("method") == "qat" else None
    result = ts.quantize(trained, config, data=digits, finetune=finetune, progress=False)
    assert _on_cuda(result.model)
    assert ts.evaluate(result.model, digits)["accuracy"] > 0.85


def test_distillation_with_a_feature_adapter_on_cuda(trained, digits):
    torch.manual_seed(0)
    student = ts.models.create("mlp", in_features=64, hidden=(32,)).to(CUDA)
    config = {"features": [{"student": "layers.0", "teacher": "fc1", "weight": 0.5}], "train": {**TUNE, "epochs": 3, "precision": "bf16"}}
    result = ts.distill(student, trained, digits, config, progress=False)
    assert _on_cuda(result.model) and ts.evaluate(result.model, digits)["accuracy"] > 0.8


def test_factorize_and_network_compression_on_cuda(convnet, digits):
    factorized = ts.factorize(convnet, {"energy": 0.95}, data=digits).model
    assert _on_cuda(factorized)
    assert ts.evaluate(factorized, digits)["accuracy"] > 0.6
    narrow = ts.narrow(convnet, 0.5, example_input=torch.randn(2, 1, 8, 8, device=CUDA)).model
    assert _on_cuda(narrow) and narrow(torch.randn(2, 1, 8, 8, device=CUDA)).shape == (2, 10)


def test_a_recipe_on_cuda_saves_a_file_that_loads_on_cpu_with_the_same_outputs(trained, digits, tmp_path):
    result = ts.compress(trained, "deep-compression", digits, latency=True, progress=False)
    assert _on_cuda(result.model)
    path = result.save(tmp_path / "model.tslim")
    loaded = ts.load(path)
    example = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(example), result.model(example.to(CUDA)).cpu(), atol=1e-4)
    assert all("latency_median_ms" in stage.metrics for stage in result.report.stages)


def test_sensitivity_on_cuda(trained, digits):
    result = ts.sensitivity(trained, digits, {"sparsities": [0.9], "bits": [2], "eval_limit": 4})
    assert {row["technique"] for row in result.report.stages[0].layers} == {"sparsity", "bits"}


def test_onnx_export_of_a_cuda_model_runs_in_onnx_runtime(convnet, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    from torchslim.export import export_onnx, onnx_session, run_onnx

    example = torch.randn(3, 1, 8, 8, device=CUDA)
    exported = export_onnx(convnet, example, tmp_path / "convnet.onnx")
    assert onnxruntime is not None
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(run_onnx(onnx_session(exported), example)), convnet(example).cpu(), atol=1e-4)


@pytest.mark.parametrize("method", ["gptq", "awq", "wanda", "sparsegpt"])
def test_llm_methods_on_cuda(method):
    torch.manual_seed(0)
    model = zoo.llama().to(CUDA)
    data = _text_batches()
    if method in ("gptq", "awq"):
        result = ts.quantize(
            model,
            {"method": method, "weights": {"bits": 4, "granularity": "group", "group_size": 32}, "calibration_batches": 3},
            data=data,
            task="language-modeling",
        )
    else:
        config = {"sparsity": 0.5, "importance": method if method == "wanda" else "l1", "solver": "sparsegpt" if method == "sparsegpt" else "mask"}
        result = ts.prune(model, {**config, "calibration_batches": 3, "batch_size": 8, "layers": LAYERS}, data=data, task="language-modeling")
    assert _on_cuda(result.model)
    batch = {key: value.to(CUDA) for key, value in data[0].items()}
    with torch.no_grad():
        assert torch.isfinite(result.model(**batch).logits).all()


@pytest.mark.parametrize("form", ["onnx", "pt2", "torchscript"])
def test_export_of_a_cuda_model_in_every_format(convnet, form, tmp_path):
    pytest.importorskip("onnxruntime")
    result = ts.export(convnet, form, torch.randn(2, 1, 8, 8, device=CUDA), tmp_path / f"convnet.{form}")
    metrics = result.report.stages[0].metrics
    assert max(metrics["max_abs_difference"].values()) <= metrics["tolerance"]
