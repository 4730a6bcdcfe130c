"""GPTQ: against round-to-nearest on the layer-wise objective it minimizes (any grid it takes), and through
``ts.quantize`` on a Hugging Face Llama (grouped KV heads, SwiGLU) and a model without repeated blocks: closer to the
float model's outputs than round-to-nearest, files that reload exactly, and a recipe stage that an encode stage follows."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import torchslim as ts
from tests import zoo
from tests.test_zoo import _text_batches
from torchslim.llm.gptq import gptq, hessian_of, layer_error, round_to_nearest
from torchslim.quantization.primitives import UniformSpec, compute_qparams, dequantize, quantize, search_qparams


def _correlated_inputs(tokens: int = 2048, features: int = 128) -> torch.Tensor:
    torch.manual_seed(0)
    mixing = torch.randn(features, features) * 0.3
    scales = torch.ones(features)
    scales[:4] = 20.0  # a few outlier features, as transformer activations have
    return (torch.randn(tokens, features) @ mixing + torch.randn(features)) * scales


@pytest.mark.parametrize(
    "bits, granularity, group, act_order",
    [(4, "group", 32, False), (4, "group", 32, True), (3, "channel", 0, False), (2, "group", 64, False), (4, "group", 48, False), (8, "channel", 0, True)],
)
def test_gptq_beats_round_to_nearest_on_the_layer_objective(bits, granularity, group, act_order):
    inputs = _correlated_inputs()
    weight = torch.randn(64, 128)
    spec = UniformSpec(bits=bits, symmetric=False, granularity=granularity, group_size=group or 128)
    hessian = hessian_of(inputs)
    codes, scale, zero = gptq(weight, hessian, spec, block_size=32, act_order=act_order)
    assert codes.shape == weight.shape and int(codes.min()) >= spec.code_range[0] and int(codes.max()) <= spec.code_range[1]
    assert layer_error(weight, dequantize(codes, scale, zero, spec), hessian) < 0.8 * layer_error(weight, round_to_nearest(weight, spec), hessian)


@pytest.mark.parametrize("granularity", ["group", "channel"])
def test_clipping_search_rounds_heavy_tailed_weights_better_and_gptq_with_it_errs_less(granularity):
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((64, 128))  # a few large weights stretch min-max ranges
    spec = UniformSpec(bits=4, symmetric=False, granularity=granularity, group_size=32)
    errors = {}
    for search in (compute_qparams, search_qparams):
        scale, zero = search(weight, spec)
        errors[search] = (dequantize(quantize(weight, scale, zero, spec), scale, zero, spec) - weight).abs().pow(2.4).sum(dim=1)
    assert bool((errors[search_qparams] <= errors[compute_qparams] * (1 + 1e-6)).all())  # never worse on its objective, row by row
    assert float(errors[search_qparams].sum()) < 0.97 * float(errors[compute_qparams].sum())
    hessian = hessian_of(_correlated_inputs())
    plain, searched = (layer_error(weight, dequantize(*gptq(weight, hessian, spec, clip_search=flag), spec), hessian) for flag in (False, True))
    assert searched < 0.97 * plain


def test_gptq_ignores_inputs_that_are_always_zero():
    inputs = _correlated_inputs(features=32)
    inputs[:, 5] = 0.0
    weight = torch.randn(8, 32)
    codes, scale, _ = gptq(weight, hessian_of(inputs), UniformSpec(bits=4, symmetric=False, granularity="channel"))
    assert torch.isfinite(scale).all() and codes.shape == (8, 32)


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**batch).logits for batch in batches])


def test_gptq_on_a_llama_is_closer_to_the_float_model_than_round_to_nearest(tmp_path):
    torch.manual_seed(0)
    model = zoo.llama()
    data = _text_batches()
    reference = _logits(model, data)
    weights = {"bits": 3, "granularity": "group", "group_size": 32}
    gptq_result = ts.quantize(model, {"method": "gptq", "weights": weights, "calibration_batches": 3}, data=data, task="language-modeling")
    rtn = ts.quantize(model, {"weights": {**weights, "symmetric": False}}).model
    stage = gptq_result.report.stages[0]
    assert stage.metrics["output_error_vs_rtn"] < 0.8
    assert any("lm_head: left in float, its weight is tied to model.embed_tokens.weight" in note for note in stage.notes)
    assert F.mse_loss(_logits(gptq_result.model, data), reference) < F.mse_loss(_logits(rtn, data), reference)
    for suffix in (".safetensors", ".tslim"):
        saved = ts.save(gptq_result.model, tmp_path / f"gptq{suffix}")
        assert torch.equal(_logits(ts.load(saved), data), _logits(gptq_result.model, data))


def test_clip_search_on_a_hugging_face_llama_lowers_the_layer_error_and_the_file_reloads(tmp_path):
    torch.manual_seed(0)
    model = zoo.llama()
    data = _text_batches()
    weights = {"bits": 3, "granularity": "group", "group_size": 32}
    errors = {}
    for clip in (False, True):
        config = {"method": "gptq", "weights": weights, "calibration_batches": 3, "act_order": True, "clip_search": clip}
        result = ts.quantize(model, config, data=data, task="language-modeling")
        errors[clip] = result.report.stages[0].metrics["output_error_vs_rtn"]
    assert errors[True] < errors[False]
    saved = ts.save(result.model, tmp_path / "clipped.tslim")
    assert torch.equal(_logits(ts.load(saved), data), _logits(result.model, data))


def test_gptq_is_a_recipe_stage_that_an_encode_stage_follows():
    torch.manual_seed(0)
    model = zoo.TiedCharLM(vocab=128)
    data = [batch["input_ids"] for batch in _text_batches()]
    recipe = {
        "name": "gptq-encode",
        "stages": [{"quantize": {"method": "gptq", "weights": {"bits": 4, "group_size": 32}, "calibration_batches": 2}}, {"encode": {}}],
    }
    result = ts.compress(model, recipe, data, task="language-modeling", latency=False, progress=False)
    assert [s.name for s in result.report.stages] == ["baseline", "1 quantize", "2 encode"]
    assert result.report.stages[-1].metrics["stored_bytes"] < result.report.stages[0].metrics["stored_bytes"] / 2.5  # the tied embedding stays float
