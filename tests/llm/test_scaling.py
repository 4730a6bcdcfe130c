"""AWQ and SmoothQuant: per-input-channel scales searched or computed from activations, folded into the normalization
before a group of layers only where the block's outputs stay the same (else kept as input scales), on models with
the activation outliers these methods exist for."""

from __future__ import annotations

import torch
from torch.nn import functional as F

import torchslim as ts
from tests import zoo
from tests.test_zoo import _text_batches
from torchslim.llm.awq import search_scale
from torchslim.llm.blocks import capture_inputs, find_blocks
from torchslim.llm.scaling import fold_scale, input_groups
from torchslim.quantization.formats import WeightScheme


def _outliers(model):
    """Give some hidden channels 25x the scale after every pre-attention normalization: the outlier features of
    trained transformers, which make per-token activation quantization and plain rounding lose the most."""
    with torch.no_grad():
        for block in model.blocks:
            block.norm1.weight[:3] *= 25.0
            block.norm2.weight[5:7] *= 25.0
    return model


def _lm():
    torch.manual_seed(0)
    model = _outliers(zoo.TiedCharLM(vocab=128, dim=64))
    data = [batch["input_ids"] for batch in _text_batches()]
    return model.eval(), data


def _mse(model, reference, data):
    with torch.no_grad():
        return F.mse_loss(torch.cat([model(ids) for ids in data]), reference).item()


def test_the_awq_scale_search_never_does_worse_than_plain_rounding():
    torch.manual_seed(0)
    x = torch.randn(2048, 64)
    x[:, :4] *= 30.0
    weight = torch.randn(48, 64)
    scheme = WeightScheme(bits=3, symmetric=False, granularity="group", group_size=32)
    scale, error, plain = search_scale(x, weight, scheme, grid=20)
    assert error < 0.8 * plain and scale.shape == (64,)
    _, error_flat, plain_flat = search_scale(torch.randn(512, 64), weight, scheme, grid=20)
    assert error_flat <= plain_flat


def test_folding_a_scale_keeps_the_block_outputs_and_refuses_where_it_would_not():
    torch.manual_seed(0)
    model = zoo.llama()
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks[0], _text_batches()[:1])
    block = blocks[0]
    layers = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    groups = {tuple(sorted(g.layers)): g for g in input_groups(block, inputs[0], layers)}
    assert ("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj") in groups and ("mlp.gate_proj", "mlp.up_proj") in groups
    attention = groups[("self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj")]
    before = block(*inputs[0][0], **inputs[0][1])
    scale = torch.rand(64) + 0.5
    assert fold_scale(block, attention, scale, inputs)
    after = block(*inputs[0][0], **inputs[0][1])
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)
    down = groups[("mlp.down_proj",)]  # its input is act(gate) * up, made by no normalization
    assert not fold_scale(block, down, scale, inputs)
    assert torch.equal(block(*inputs[0][0], **inputs[0][1]), after)


def test_awq_beats_round_to_nearest_on_a_model_with_outliers_and_reloads(tmp_path):
    model, data = _lm()
    with torch.no_grad():
        reference = torch.cat([model(ids) for ids in data])
    weights = {"bits": 4, "granularity": "group", "group_size": 32, "symmetric": False}
    awq = ts.quantize(model, {"method": "awq", "weights": weights, "calibration_batches": 3}, data=data, task="language-modeling")
    rtn = ts.quantize(model, {"weights": weights}).model
    assert _mse(awq.model, reference, data) < 0.9 * _mse(rtn, reference, data)
    metrics = awq.report.stages[0].metrics
    assert metrics["groups"] == 8 and metrics["output_error_vs_rtn"] < 0.7
    saved = ts.save(awq.model, tmp_path / "awq.tslim", factory="tests.zoo:TiedCharLM", kwargs={"vocab": 128, "dim": 64})
    loaded = ts.load(saved, trust_factory="tests.zoo:TiedCharLM")
    with torch.no_grad():
        assert all(torch.equal(loaded(ids), awq.model(ids)) for ids in data)


def test_smoothquant_moves_outliers_into_the_weights_and_runs_on_integer_matmuls(tmp_path):
    model, data = _lm()
    with torch.no_grad():
        reference = torch.cat([model(ids) for ids in data])
    smooth = ts.quantize(model, {"method": "smoothquant", "calibration_batches": 3}, data=data, task="language-modeling")
    plain = ts.quantize(model, {"weights": {"bits": 8, "activation_bits": 8}}).model  # W8A8 without smoothing
    assert _mse(smooth.model, reference, data) < 0.5 * _mse(plain, reference, data)
    assert "torch._int_mm" in smooth.report.stages[0].execution
    simulated = ts.quantize(model, {"method": "smoothquant", "calibration_batches": 3}, data=data, task="language-modeling").model
    for module in simulated.modules():
        if hasattr(module, "quantized"):
            module.quantized.scheme = WeightScheme.from_dict({**module.quantized.scheme.to_dict(), "kernel": False})
    with torch.no_grad():  # the integer path computes what the rounding it stands for computes
        for ids in data:
            assert torch.allclose(smooth.model(ids), simulated(ids), rtol=1e-3, atol=1e-3)
