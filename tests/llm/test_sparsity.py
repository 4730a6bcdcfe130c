"""Sparsity for large models: Wanda (activation-weighted magnitude, compared within rows), N:M patterns, and SparseGPT
(masks chosen and remaining weights updated against each layer's input Hessian, block by block), on the layer
objective and through ``ts.prune`` on a Hugging Face Llama."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import torchslim as ts
from tests import zoo
from tests.test_zoo import _text_batches
from torchslim.core.config import ConfigError
from torchslim.llm.gptq import hessian_of, layer_error
from torchslim.llm.sparsegpt import sparsegpt

LAYERS = {"include": [r"re:model\.layers\..*"]}


def _inputs(tokens: int = 1024, features: int = 64) -> torch.Tensor:
    torch.manual_seed(0)
    scales = torch.ones(features)
    scales[:3] = 10.0
    return (torch.randn(tokens, features) @ (torch.randn(features, features) * 0.3)) * scales


def _magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    count = int(sparsity * weight.shape[1])
    threshold = weight.abs().sort(dim=1).values[:, count - 1 : count]
    return weight * (weight.abs() > threshold)


@pytest.mark.parametrize("sparsity, pattern, per_row", [(0.5, None, False), (0.5, None, True), (0.7, None, False), (None, "2:4", False), (None, "4:8", False)])
def test_sparsegpt_beats_magnitude_on_the_layer_objective(sparsity, pattern, per_row):
    inputs, weight = _inputs(), torch.randn(32, 64)
    hessian = hessian_of(inputs)
    pruned, mask = sparsegpt(weight, hessian, sparsity, pattern, block_size=16, per_row=per_row)
    assert torch.equal(pruned != 0, mask) or bool(((pruned != 0) <= mask).all())
    if pattern is not None:
        kept, group = map(int, pattern.split(":"))
        assert (mask.reshape(32, -1, group).sum(-1) == kept).all()
        reference = _magnitude(weight, 1 - kept / group)
    else:
        assert abs(1 - mask.float().mean().item() - sparsity) < 0.01
        if per_row:
            assert (mask.sum(1) == mask.sum(1)[0]).all()
        reference = _magnitude(weight, sparsity)
    assert layer_error(weight, pruned, hessian) < 0.7 * layer_error(weight, reference, hessian)


def test_sparsegpt_keeps_an_earlier_mask():
    inputs, weight = _inputs(), torch.randn(16, 64)
    first, mask = sparsegpt(weight, hessian_of(inputs), 0.3)
    _, second_mask = sparsegpt(first, hessian_of(inputs), 0.6, keep=mask)
    assert bool((second_mask <= mask).all()) and abs(1 - second_mask.float().mean().item() - 0.6) < 0.01


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**batch).logits for batch in batches])


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return zoo.llama(), _text_batches()


def _prune(model, data, **config):
    return ts.prune(model, {**config, "calibration_batches": 3, "batch_size": 8, "layers": LAYERS}, data=data, task="language-modeling")


def test_wanda_and_sparsegpt_keep_a_llama_closer_to_its_outputs_than_magnitude(llama):
    model, data = llama
    reference = _logits(model, data)
    error = {}
    for name, config in {
        "magnitude": {"sparsity": 0.5, "scope": "row"},
        "wanda": {"importance": "wanda", "sparsity": 0.5, "scope": "row"},
        "sparsegpt": {"solver": "sparsegpt", "sparsity": 0.5},
    }.items():
        result = _prune(model, data, **config)
        assert result.report.stages[0].metrics["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
        error[name] = F.mse_loss(_logits(result.model, data), reference).item()
    assert error["sparsegpt"] < error["wanda"] < error["magnitude"]


@pytest.mark.parametrize("config", [{"pattern": "2:4"}, {"pattern": "2:4", "importance": "wanda"}, {"pattern": "2:4", "solver": "sparsegpt"}])
def test_two_of_four_patterns_hold_in_every_group_and_survive_the_file(llama, tmp_path, config):
    model, data = llama
    pruned = ts.make_permanent(_prune(model, data, **config).model)
    for module in pruned.model.layers.modules():
        if isinstance(module, torch.nn.Linear):
            assert ((module.weight.reshape(module.out_features, -1, 4) != 0).sum(-1) <= 2).all()
    saved = ts.save(pruned, tmp_path / "sparse.tslim")
    assert torch.equal(_logits(ts.load(saved), data), _logits(pruned, data))


def test_sparsegpt_in_steps_and_its_errors(llama):
    model, data = llama
    stepped = _prune(model, data, solver="sparsegpt", sparsity=[0.3, 0.6])
    assert stepped.report.stages[0].metrics["weight_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert any("SparseGPT over 2 blocks" in note for note in stepped.report.stages[0].notes)
    with pytest.raises(ConfigError, match="solver 'sparsegpt' calibrates on data"):
        ts.prune(model, {"solver": "sparsegpt", "sparsity": 0.5, "layers": LAYERS})
    with pytest.raises(ConfigError, match="pattern must look like N:M"):
        ts.prune(model, {"pattern": "4:2"})
    with pytest.raises(ts.TorchslimError, match="multiple of 8"):
        ts.prune(zoo.TiedCharLM(dim=36), {"pattern": "4:8", "layers": {"include": ["blocks.0.qkv"]}})
