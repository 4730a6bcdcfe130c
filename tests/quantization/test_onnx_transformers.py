"""Transformers through ONNX Runtime: export with named inputs and dynamic batch and sequence length; static int8 that
quantizes only the products with weights (LayerNorm, softmax and activation-by-activation products stay float),
calibrated by min-max, percentile or entropy over batches of different shapes; the result evaluated and saved."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import torchslim as ts
from tests import zoo
from tests.test_zoo import _text_batches
from torchslim.export.onnx import OnnxModule, export_onnx

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")


def _reference(model, batches):
    with torch.no_grad():
        return torch.cat([ts.tasks.batches.output_tensor(model(**batch)) for batch in batches])


def _cosine(a, b):
    return float(F.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).mean())


@pytest.mark.parametrize("build", [zoo.llama, zoo.bert], ids=["llama", "bert"])
def test_export_has_named_inputs_and_dynamic_batch_and_sequence(build, tmp_path):
    torch.manual_seed(0)
    model = build(128).eval()
    model.train()  # the export runs in eval mode and gives every submodule its own mode back
    example = {"input_ids": torch.randint(0, 128, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    path = export_onnx(model, example, tmp_path / "model.onnx")
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "sequence"]
    engine = OnnxModule(path)
    other = {"input_ids": torch.randint(0, 128, (3, 20)), "attention_mask": torch.ones(3, 20, dtype=torch.long)}
    other["attention_mask"][0, 14:] = 0
    torch.testing.assert_close(engine(**other), _reference(model, [other]), rtol=1e-4, atol=1e-4)
    with pytest.raises(ts.TorchslimError, match="takes inputs input_ids, attention_mask; missing attention_mask"):
        engine(input_ids=other["input_ids"])


@pytest.mark.parametrize("calibration", ["minmax", "percentile", "entropy"])
def test_static_int8_of_a_llama_keeps_its_outputs_over_batches_of_different_shapes(calibration, tmp_path):
    torch.manual_seed(0)
    model = zoo.llama(128).eval()
    data = _text_batches()
    short = {"input_ids": data[0]["input_ids"][:3, :20], "attention_mask": data[0]["attention_mask"][:3, :20]}
    result = ts.quantize(model, {"method": "onnxruntime", "calibration": calibration}, data=data + [short], task="fidelity", path=tmp_path / "int8.onnx")
    engine = result.model
    assert isinstance(engine, OnnxModule)
    assert _cosine(torch.cat([engine(**b) for b in data]), _reference(model, data)) > 0.999
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    for node in graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "SimplifiedLayerNormalization", "Pow", "Sigmoid"):
            assert not dequantized & set(node.input), f"{node.op_type} {node.name} reads an int8 tensor"
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert any(dequantized & set(n.input) for n in matmuls)
    assert any("kept float: inputs whose tokens" in note and "below 20 dB" in note for note in result.report.stages[0].notes)  # checked by default
    reloaded = ts.load(tmp_path / "int8.onnx")
    torch.testing.assert_close(reloaded(**data[0]), engine(**data[0]))
    metrics = ts.evaluate(engine, data, task="language-modeling")
    assert metrics["perplexity"] == pytest.approx(ts.evaluate(model, data, task="language-modeling")["perplexity"], rel=0.05)


def test_quantizing_every_operator_puts_int8_before_norms_and_softmax_and_is_no_closer(tmp_path):
    torch.manual_seed(0)
    model = zoo.llama(128).eval()
    data = _text_batches()
    reference = _reference(model, data)
    cosine, int8_inputs = {}, {}
    for only in (True, False):
        path = tmp_path / f"{only}.onnx"
        engine = ts.quantize(model, {"method": "onnxruntime", "weight_matmuls_only": only}, data=data, task="fidelity", path=path).model
        cosine[only] = _cosine(torch.cat([engine(**b) for b in data]), reference)
        graph = onnx.load(str(path)).graph
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        int8_inputs[only] = {n.op_type for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dequantized & set(n.input)}
    assert "MatMul" in int8_inputs[True] and int8_inputs[True] <= {"MatMul", "Shape"}  # Shape reads no values
    assert int8_inputs[False] - {"MatMul", "Shape"}
    assert cosine[True] > 0.999 and cosine[False] <= cosine[True] + 1e-4


def test_smoothing_keeps_the_float_function_and_feeds_the_engine(tmp_path):
    torch.manual_seed(0)
    model = zoo.llama(128).eval()
    data = _text_batches()
    with torch.no_grad():  # an activation outlier channel, as trained transformers have
        model.model.layers[0].input_layernorm.weight[5] = 30.0
    import copy

    from torchslim.llm.scaling import smooth_float

    smoothed = smooth_float(copy.deepcopy(model), data, 0.5)
    torch.testing.assert_close(_reference(smoothed, data), _reference(model, data), rtol=1e-4, atol=1e-4)
    assert float(smoothed.model.layers[0].input_layernorm.weight[5].detach()) < 30.0  # folded into the norm before the layers
    engine = ts.quantize(model, {"method": "onnxruntime", "smooth": 0.5}, data=data, task="fidelity").model
    assert _cosine(torch.cat([engine(**b) for b in data]), _reference(model, data)) > 0.99


def test_per_token_dynamic_int8_keeps_small_tokens_that_one_tensor_scale_loses(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.GELU(), torch.nn.Linear(48, 10)).eval()
    x = torch.randn(3, 16, 64) * torch.logspace(-2, 2, 16).reshape(1, 16, 1)  # tokens of very different sizes
    with torch.no_grad():
        reference = model(x)
    worst = {}
    for per_token in (False, True):
        path = tmp_path / f"{per_token}.onnx"
        config = {"method": "onnxruntime", "mode": "dynamic", "per_token": per_token}
        engine = ts.quantize(model, config, example_input=x, path=path).model
        out = engine(x)
        worst[per_token] = float(F.cosine_similarity(out, reference, dim=-1).min())
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert ("DynamicQuantizeLinear" in ops) != per_token and "MatMulInteger" in ops
    assert worst[True] > 0.999, worst
    assert worst[False] < 0.99, worst  # the smallest tokens round to nothing under one scale


def test_transformers_get_per_token_int8_by_default_and_it_reloads(tmp_path):
    torch.manual_seed(0)
    model = zoo.llama(128).eval()
    data = _text_batches()
    path = tmp_path / "dyn.onnx"
    engine = ts.quantize(model, {"method": "onnxruntime", "mode": "dynamic"}, data=data, task="fidelity", path=path).model
    graph = onnx.load(str(path)).graph
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == 15 and not any(n.op_type == "DynamicQuantizeLinear" for n in graph.node)  # 7 per layer + head
    assert {i.data_type for i in graph.initializer if i.name.endswith("_w")} == {onnx.TensorProto.INT8}
    assert _cosine(torch.cat([engine(**b) for b in data]), _reference(model, data)) > 0.999
    torch.testing.assert_close(ts.load(path)(**data[0]), engine(**data[0]))
    with pytest.raises(ts.ConfigError, match="per_token activation scales are computed at run time"):
        ts.quantize(model, {"method": "onnxruntime", "per_token": True}, data=data, path=tmp_path / "static.onnx")


def test_static_int8_keeps_float_the_product_whose_tokens_one_grid_would_erase(tmp_path):
    torch.manual_seed(0)
    # a user's model: the first product reads tokens of very different sizes, the second reads them normalized
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.LayerNorm(48), torch.nn.GELU(), torch.nn.Linear(48, 10)).eval()
    x = torch.randn(8, 16, 64) * torch.logspace(-2, 2, 16).reshape(1, 16, 1)
    with torch.no_grad():
        reference = model(x)
    worst, notes = {}, {}
    for threshold in (0, 20):
        path = tmp_path / f"{threshold}.onnx"
        config = {"method": "onnxruntime", "float_below_db": threshold, "calibration_batches": 4, "weight_matmuls_only": True}
        result = ts.quantize(model, config, data=[x[i : i + 2] for i in range(0, 8, 2)], example_input=x[:1], path=path)
        worst[threshold] = float(F.cosine_similarity(result.model(x), reference, dim=-1).min())
        notes[threshold] = result.report.stages[0].notes
        graph = onnx.load(str(path)).graph
        dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
        products = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
        assert len(products) == 2
        assert [bool(dequantized & {n.input[0]}) for n in products] == ([True, True] if threshold == 0 else [False, True])
    assert any(note.startswith("1 product kept float") for note in notes[20]) and not any("kept float" in note for note in notes[0])
    assert worst[20] > 0.999 and worst[0] < 0.99, worst  # one grid for all tokens rounds the smallest to nothing
    with pytest.raises(ts.ConfigError, match="float_below_db chooses products a static calibration would round badly"):
        ts.quantize(model, {"method": "onnxruntime", "mode": "dynamic", "float_below_db": 20}, example_input=x[:1], path=tmp_path / "d.onnx")
