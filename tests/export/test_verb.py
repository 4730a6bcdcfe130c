"""``ts.export``: dense, pruned, factorized and quantized models as ONNX, torch.export programs and TorchScript,
each loaded back from the file and checked against PyTorch at two batch sizes and on inputs of other values; failures
leave nothing behind."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import torchslim as ts
from tests import zoo
from tests.test_zoo import _text_batches
from torchslim.quantization.modules import decoded_weights

FORMATS = ["onnx", "pt2", "torchscript"]
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 10)
    )
    return ts.train(model, digits, {"epochs": 2, "lr": 0.05}, progress=False).model.eval()


def _variants(model, digits):
    example = digits.test.inputs[:4]
    return {
        "dense": model,
        "channels-removed": ts.prune_channels(model, {"ratio": 0.5}, example_input=example).model,
        "masked": ts.prune(model, {"sparsity": 0.8}).model,
        "factorized": ts.factorize(model, {"energy": 0.9}, example_input=example).model,
        "int8-weights": ts.quantize(model, {"weights": {"bits": 8}}).model,
        "kmeans-4bit": ts.quantize(model, {"weights": {"scheme": "kmeans", "bits": 4}}).model,
    }


@pytest.mark.parametrize("form", FORMATS)
def test_every_kind_of_compressed_model_exports_and_matches_pytorch(trained, digits, form, tmp_path):
    example = digits.test.inputs[:4]
    for name, model in _variants(trained, digits).items():
        path = tmp_path / f"{name}{SUFFIX[form]}"
        result = ts.export(model, form, example, path)
        metrics = result.report.stages[0].metrics
        assert path.is_file() and metrics["file_bytes"] == path.stat().st_size, name
        assert set(metrics["max_abs_difference"]) == {"1", "3", "other values", "negated"}, name
        assert max(metrics["max_abs_difference"].values()) <= metrics["tolerance"], name
        # the loaded model takes any batch size and agrees with the original on real digits (an ONNX file has no int8
        # kernel with bfloat16 activations: it matches the exact decoded math)
        with torch.no_grad(), decoded_weights() if form == "onnx" else contextlib.nullcontext():
            expected = model.eval()(digits.test.inputs[:7])
            produced = result.model(digits.test.inputs[:7])
        torch.testing.assert_close(torch.as_tensor(produced), expected, atol=1e-4, rtol=1e-4, msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}{SUFFIX[form]}" for name in _variants(trained, digits))


def test_the_callers_model_keeps_its_masks(trained, tmp_path):
    from torchslim.pruning.apply import masks_of

    masked = ts.prune(trained, {"sparsity": 0.5}).model
    ts.export(masked, "torchscript", torch.randn(2, 1, 8, 8), tmp_path / "m.pt")
    assert set(masks_of(masked)) == {"0", "3", "6"}  # masks folded in the exported copy only


def test_an_int8_engine_exports_as_onnx_only(trained, digits, tmp_path):
    engine = ts.quantize(trained, {"method": "onnxruntime", "calibration_batches": 2}, data=digits).model
    result = ts.export(engine, "onnx", digits.test.inputs[:4], tmp_path / "int8.onnx")
    assert max(result.report.stages[0].metrics["max_abs_difference"].values()) == 0.0  # the same engine, byte for byte
    with pytest.raises(ts.TorchslimError, match="exports as onnx only, not pt2"):
        ts.export(engine, "pt2", digits.test.inputs[:4], tmp_path / "int8.pt2")
    assert not (tmp_path / "int8.pt2").exists()


@pytest.mark.parametrize("form", ["onnx", "pt2"])
def test_a_hugging_face_model_with_keyword_inputs(form, tmp_path):
    torch.manual_seed(0)
    model = zoo.llama().eval()
    batch = _text_batches()[0]
    result = ts.export(model, form, {"input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]}, tmp_path / f"llama{SUFFIX[form]}")
    assert max(result.report.stages[0].metrics["max_abs_difference"].values()) < 1e-3


class _ValueDependent(nn.Module):
    """Control flow on the input's values: tracing records one branch only."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.linear(x)
        return -self.linear(x)


def test_a_wrong_export_is_refused_and_what_was_there_stays(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"the user's file")
    with pytest.raises(ts.TorchslimError, match="exists; refusing to overwrite"):
        ts.export(_ValueDependent(), "torchscript", torch.ones(2, 4), target)
    # traced on a positive example: the batches checked are positive too, but the example negated takes the other branch
    torch.manual_seed(0)
    model = _ValueDependent()
    with pytest.raises(ts.TorchslimError, match="differs on the example negated .*control flow that depends on its input values"):
        ts.export(model, "torchscript", torch.ones(2, 4), target, overwrite=True)
    # a file wrong on the batches themselves (traced on a positive example, checked on a negative one) is refused too
    with pytest.raises(ts.TorchslimError, match="differs from the PyTorch model"):
        _traced_on(model, torch.ones(2, 4), -torch.ones(1, 4), target)
    assert target.read_bytes() == b"the user's file"  # the existing file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def _traced_on(model, traced, checked, target):
    """Export traced on one example and checked on another (by swapping the example the file is traced on)."""
    from torchslim.export import verb

    original = verb.repeat_example

    def first(example, count):
        return original(traced if count == 2 else checked, count)

    verb.repeat_example = first
    try:
        ts.export(model, "torchscript", checked, target, overwrite=True)
    finally:
        verb.repeat_example = original


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ts.TorchslimError, match="format must be one of onnx, pt2, torchscript, got 'tflite'"):
        ts.export(nn.Linear(2, 2), "tflite", torch.zeros(1, 2), tmp_path / "m")
    with pytest.raises(ts.TorchslimError, match="export of Linear as pt2 failed"):
        ts.export(nn.Linear(2, 2), "pt2", torch.zeros(1, 3), tmp_path / "m.pt2")
    assert not any(tmp_path.iterdir())


def test_int8_weights_stay_int8_in_the_onnx_file(trained, digits, tmp_path):
    import onnx

    from torchslim.quantization.onnx_static import count_ops

    example = digits.test.inputs[:4]
    dense = ts.export(trained, "onnx", example, tmp_path / "dense.onnx")
    quantized = ts.quantize(trained, {"weights": {"bits": 8}}).model
    result = ts.export(quantized, "onnx", example, tmp_path / "int8.onnx")
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    int8 = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    # the second convolution and the linear layer keep int8 codes behind a DequantizeLinear; the first convolution's
    # weight changed when the export folded its BatchNorm into it, so it stays float
    assert sorted(i.name for i in int8) == ["3.weight_int8", "6.weight_int8"], [i.name for i in int8]
    assert count_ops(tmp_path / "int8.onnx")["DequantizeLinear"] == 2
    assert result.report.stages[0].metrics["file_bytes"] < 0.5 * dense.report.stages[0].metrics["file_bytes"]
    assert max(result.report.stages[0].metrics["max_abs_difference"].values()) <= result.report.stages[0].metrics["tolerance"]


@pytest.mark.parametrize(
    "weights",
    [
        {"bits": 4, "granularity": "group", "group_size": 32, "symmetric": False},
        {"bits": 4, "granularity": "channel", "symmetric": True},
        {"bits": 3, "granularity": "group", "group_size": 16, "symmetric": False},
        {"bits": 8, "granularity": "group", "group_size": 32, "symmetric": False},
        {"bits": 6, "granularity": "channel", "symmetric": False},
    ],
    ids=["int4-g32", "int4-channel", "int3-g16", "int8-g32", "int6-channel"],
)
def test_block_layers_run_as_matmulnbits_on_their_packed_codes(trained, digits, weights, tmp_path):
    from torchslim.quantization.onnx_static import count_ops

    example = digits.test.inputs[:4]
    quantized = ts.quantize(trained, {"weights": weights, "layers": {"types": ["Linear"]}}).model
    dense = ts.export(trained, "onnx", example, tmp_path / "dense.onnx").report.stages[0].metrics["file_bytes"]
    result = ts.export(quantized, "onnx", example, tmp_path / "int4.onnx")
    ops = count_ops(tmp_path / "int4.onnx")
    assert ops["MatMulNBits"] == 1 and "Gemm" not in ops  # the classifier, on 1,024 inputs
    metrics = result.report.stages[0].metrics
    assert max(metrics["max_abs_difference"].values()) <= metrics["tolerance"]
    kept = 0.125 if weights["bits"] <= 4 else 0.25  # two codes per byte, or one
    assert dense - metrics["file_bytes"] > (0.85 - kept) * 10 * 1024 * 4  # the classifier's float weight gone, codes and scales in its place
    with torch.no_grad(), decoded_weights():
        torch.testing.assert_close(result.model(digits.test.inputs[:50]), quantized.eval()(digits.test.inputs[:50]), atol=1e-4, rtol=1e-4)


def test_a_group_matmulnbits_cannot_hold_stays_float_and_a_llama_goes_int4_in_every_block(tmp_path):
    import onnx

    from torchslim.quantization.onnx_static import count_ops

    torch.manual_seed(0)
    odd = ts.quantize(nn.Sequential(nn.Linear(96, 8)), {"weights": {"bits": 4, "granularity": "group", "group_size": 48}}).model
    ts.export(odd, "onnx", torch.randn(2, 96), tmp_path / "odd.onnx")
    assert "MatMulNBits" not in count_ops(tmp_path / "odd.onnx")  # 48 is no power of two: the float product stays
    model = zoo.llama().eval()
    batch = _text_batches()[0]
    example = {"input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]}
    blocks = {"include": [r"re:model\.layers\..*"]}
    weights = {"bits": 4, "granularity": "group", "group_size": 16, "symmetric": False}
    quantized = ts.quantize(model, {"method": "gptq", "weights": weights, "layers": blocks, "calibration_batches": 2}, data=_text_batches()).model
    result = ts.export(quantized, "onnx", example, tmp_path / "llama.onnx")
    graph = onnx.load(str(tmp_path / "llama.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * len(model.model.layers)
    assert max(result.report.stages[0].metrics["max_abs_difference"].values()) <= result.report.stages[0].metrics["tolerance"]


def test_a_tied_embedding_and_head_are_stored_once_in_the_onnx_file(tmp_path):
    import onnx

    torch.manual_seed(0)
    batch = _text_batches()[0]
    example = {"input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]}
    sizes = {}
    for tie in (True, False):
        model = zoo.llama(vocab=200, tie=tie).eval()
        result = ts.export(model, "onnx", example, tmp_path / f"{tie}.onnx")
        graph = onnx.load(str(tmp_path / f"{tie}.onnx")).graph
        tables = [i for i in graph.initializer if sorted(i.dims) == [64, 200]]
        assert len(tables) == (1 if tie else 2)  # one 200 x 64 table for both uses when tied
        assert any(n.op_type == "Transpose" and n.input[0] == tables[0].name for n in graph.node) == tie
        assert max(result.report.stages[0].metrics["max_abs_difference"].values()) <= result.report.stages[0].metrics["tolerance"]
        sizes[tie] = result.report.stages[0].metrics["file_bytes"]
    assert sizes[False] - sizes[True] > 0.9 * 200 * 64 * 4


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_quantized_embedding_is_gathered_from_its_packed_codes(tie, bits, tmp_path):
    import onnx

    from torchslim.quantization.onnx_static import count_ops

    torch.manual_seed(0)
    batch = _text_batches()[0]
    example = {"input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]}
    model = zoo.llama(vocab=200, tie=tie).eval()
    weights = {"bits": bits, "granularity": "group", "group_size": 32, "symmetric": False}
    products = ts.quantize(model, {"weights": weights, "layers": {"types": ["Linear"], "exclude": ["lm_head"]}}).model
    whole = ts.quantize(model, {"weights": weights, "layers": {"types": ["Linear", "Embedding"]}}).model
    sizes = {}
    for name, quantized in (("products", products), ("whole", whole)):
        result = ts.export(quantized, "onnx", example, tmp_path / f"{name}.onnx")
        metrics = result.report.stages[0].metrics
        assert max(metrics["max_abs_difference"].values()) <= metrics["tolerance"]
        sizes[name] = metrics["file_bytes"]
    ops = count_ops(tmp_path / "whole.onnx")
    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 7 * len(model.model.layers) + 1  # the blocks and the head
    graph = onnx.load(str(tmp_path / "whole.onnx")).graph
    assert not [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and 200 in i.dims]  # no float table left
    assert len([i for i in graph.initializer if i.name.endswith("_codes") and i.dims[0] == 200]) == (1 if tie else 2)  # tied: one copy of the codes
    assert sizes["products"] - sizes["whole"] > (0.85 - bits / 32) * (1 if tie else 2) * 200 * 64 * 4  # each float table gone, codes in its place


@pytest.mark.parametrize("bits", [4, 5])
def test_a_lookup_with_a_ragged_last_group_matches_pytorch(bits, tmp_path):
    from torchslim.quantization.onnx_static import count_ops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 40), nn.Flatten(), nn.Linear(280, 5))
    quantized = ts.quantize(model, {"weights": {"bits": bits, "granularity": "group", "group_size": 32}, "layers": {"types": ["Embedding"]}}).model
    ids = torch.randint(0, 50, (4, 7))
    result = ts.export(quantized, "onnx", ids, tmp_path / "lookup.onnx")
    assert count_ops(tmp_path / "lookup.onnx")["GatherBlockQuantized"] == 1  # 40 = 32 + a last group of 8, sliced off the padded rows
    with torch.no_grad(), decoded_weights():
        torch.testing.assert_close(result.model(ids), quantized.eval()(ids), atol=1e-5, rtol=1e-5)


def test_accuracy_level_4_runs_the_products_on_int8_activations_within_the_relative_bound(tmp_path):
    import onnx
    from onnx import helper

    torch.manual_seed(0)
    batch = _text_batches()[0]
    example = {"input_ids": batch["input_ids"][:2], "attention_mask": batch["attention_mask"][:2]}
    model = zoo.llama(vocab=200, tie=True).eval()
    weights = {"bits": 8, "granularity": "group", "group_size": 32, "symmetric": False}
    quantized = ts.quantize(model, {"weights": weights, "layers": {"types": ["Linear", "Embedding"]}}).model
    exact = ts.export(quantized, "onnx", example, tmp_path / "level0.onnx").report.stages[0]
    fast = ts.export(quantized, "onnx", example, tmp_path / "level4.onnx", accuracy_level=4).report.stages[0]
    products = [n for n in onnx.load(str(tmp_path / "level4.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(products) == 7 * len(model.model.layers) + 1
    assert all(helper.get_attribute_value(next(a for a in n.attribute if a.name == "accuracy_level")) == 4 for n in products)
    assert fast.metrics["tolerance_bounds"] == "relative error" and fast.metrics["accuracy_level"] == 4
    assert f"{len(products)} MatMulNBits at accuracy level 4" in fast.notes
    # level 0 is PyTorch's arithmetic; level 4 really rounds the activations (ONNX Runtime honours the attribute), within the bound
    assert max(exact.metrics["relative_error"].values()) < 1e-5
    assert 1e-4 < max(fast.metrics["relative_error"].values()) <= fast.metrics["tolerance"] == 0.1
    with pytest.raises(ts.TorchslimError, match="relative error of .* at accuracy level 4"):
        ts.export(quantized, "onnx", example, tmp_path / "tight.onnx", accuracy_level=4, tolerance=1e-6)
    assert not (tmp_path / "tight.onnx").exists()


def test_accuracy_level_is_checked_and_said_when_it_has_no_effect(tmp_path):
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ts.TorchslimError, match="accuracy_level must be one of 0, 1, 2, 3, 4"):
        ts.export(model, "onnx", torch.zeros(1, 8), tmp_path / "m.onnx", accuracy_level=5)
    with pytest.raises(ts.TorchslimError, match="applies to onnx only, not pt2"):
        ts.export(model, "pt2", torch.zeros(1, 8), tmp_path / "m.pt2", accuracy_level=4)
    assert not any(tmp_path.iterdir())
    stage = ts.export(model, "onnx", torch.zeros(1, 8), tmp_path / "m.onnx", accuracy_level=4).report.stages[0]
    assert any("has no effect: the file has no MatMulNBits" in note for note in stage.notes)
