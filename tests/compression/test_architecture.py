"""Activation substitution, depth reduction and width scaling on models written the way users write them (functional
activations, lambdas, Hugging Face classes), saved and reloaded, and as recipe stages."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from tests import zoo
from torchslim.compression.depth import Skip, candidate_blocks


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.inner(x)


class ResidualMLP(nn.Module):
    """A user's model: GELU modules, residual blocks in a Sequential, a functional activation and a lambda."""

    def __init__(self, blocks: int = 4, width: int = 48) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.Sequential(*[Residual(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 10)
        self.flatten = lambda x: x.flatten(1)

    def forward(self, x):
        return self.head(self.blocks(F.gelu(self.stem(self.flatten(x)))))


def _trained(seed: int = 0) -> tuple[nn.Module, object]:
    torch.manual_seed(seed)
    data = ts.data.load("digits")
    model = ts.train(ResidualMLP(), data, {"epochs": 6, "lr": 0.05}, progress=False).model
    return model, data


def test_activations_replaced_and_functional_calls_named(tmp_path):
    torch.manual_seed(0)
    model = zoo.EfficientNetish().eval()
    x = torch.randn(2, 3, 32, 32)
    relu = ts.substitute_activations(model, {"to": "relu"}, example_input=x[:1])
    assert not any(isinstance(m, nn.SiLU) for m in relu.model.modules()) and any(isinstance(m, nn.ReLU) for m in relu.model.modules())
    notes = " ".join(relu.report.stages[0].notes)
    assert "silu as a function" in notes and "sigmoid as a function" in notes  # F.silu / torch.sigmoid in forward code
    hard = ts.substitute_activations(model, {"to": "hard"}, example_input=x[:1]).model.eval()
    assert any(isinstance(m, nn.Hardswish) for m in hard.modules())
    assert any(isinstance(m, nn.SiLU) for m in model.modules())  # the original is untouched
    ts.save(hard, tmp_path / "m.safetensors", factory="tests.zoo:EfficientNetish")
    again = ts.load(tmp_path / "m.safetensors", trust_factory=True).eval()
    assert torch.allclose(again(x), hard(x), atol=1e-6)


def test_a_hugging_face_gelu_becomes_relu():
    pytest.importorskip("transformers")
    model = zoo.bert().eval()
    ids = torch.randint(0, 65, (1, 12))
    result = ts.substitute_activations(model, {"to": "relu"}, example_input={"input_ids": ids})
    rows = result.report.stages[0].layers
    assert rows and all(row["after"] == "ReLU" and "GELU" in row["before"] for row in rows)
    assert result.model(input_ids=ids).last_hidden_state.shape == model(input_ids=ids).last_hidden_state.shape


@pytest.mark.slow
def test_substitution_then_fine_tuning_recovers_and_latency_is_measured():
    model, data = _trained()
    result = ts.substitute_activations(model, {"to": "relu"}, data=data, finetune={"epochs": 2, "lr": 0.02}, progress=False)
    metrics = result.report.stages[0].metrics
    assert metrics["replaced"] == 4 and metrics["error"] <= metrics["error_before"] + 0.03
    assert metrics["latency_ms"] > 0 and metrics["speedup"] > 0
    assert "gelu as a function" in " ".join(result.report.stages[0].notes)


def test_candidate_blocks_skip_downsampling_blocks_of_a_resnet_with_lambda_shortcuts():
    model = zoo.resnet20().eval()
    blocks = candidate_blocks(model, torch.zeros(1, 3, 32, 32))
    assert blocks == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]


@pytest.mark.slow
def test_the_least_important_block_goes_first_and_the_file_loads_back(tmp_path):
    model, data = _trained()
    with torch.no_grad():  # block 2 made a no-op: bypassing it changes nothing
        model.blocks[2].inner[2].weight.zero_()
        model.blocks[2].inner[2].bias.zero_()
    result = ts.remove_blocks(model, {"count": 2}, data=data, finetune={"epochs": 1, "lr": 0.01}, progress=False)
    metrics = result.report.stages[0].metrics
    assert metrics["removed"][0] == "blocks.2" and len(metrics["removed"]) == 2
    assert isinstance(result.model.blocks[2], nn.Identity)
    scores = {row["name"]: row["loss_rise_when_bypassed"] for row in result.report.stages[0].layers}
    assert abs(scores["blocks.2"]) < 1e-6
    assert metrics["error"] <= metrics["error_before"] + 0.05
    ts.save(result.model, tmp_path / "m.safetensors", factory="tests.compression.test_architecture:ResidualMLP")
    again = ts.load(tmp_path / "m.safetensors", trust_factory=True)
    assert ts.evaluate(again, data) == ts.evaluate(result.model, data)
    with pytest.raises(ts.ConfigError, match="out of 4 candidates"):
        ts.remove_blocks(model, {"count": 4}, data=data)


def test_narrow_keeps_the_largest_norm_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.mul_(torch.tensor([1.0, 9.0, 1.0, 8.0, 1.0, 7.0])[:, None])
    result = ts.narrow(model, 0.5, example_input=torch.zeros(1, 8))
    kept = result.model[0].weight
    assert kept.shape == (3, 8)
    assert torch.equal(kept, model[0].weight[[1, 3, 5]])
    with pytest.raises(ts.ConfigError, match="width must be in"):
        ts.narrow(model, 1.5, example_input=torch.zeros(1, 8))


@pytest.mark.slow
def test_every_architecture_stage_in_one_recipe(tmp_path):
    model, data = _trained()
    recipe = {
        "name": "architecture",
        "stages": [
            {"activations": {"to": "relu", "finetune": {"epochs": 1, "lr": 0.02}}},
            {"depth": {"count": 1}},
            {"narrow": {"width": 0.75}},
            {"distill": {"temperature": 4.0, "alpha": 0.9, "train": {"epochs": 2, "lr": 0.02}}},
            {"factorize": {"ratio": 0.6, "finetune": {"epochs": 2, "lr": 0.02}}},
            {"encode": {}},
        ],
    }
    run = ts.compress(model, recipe, data, latency=False, progress=False)
    kinds = [s.kind for s in run.report.stages]
    assert kinds == ["baseline", "activations", "depth", "narrow", "distill", "factorize", "encode"]
    assert run.report.stages[-1].metrics["parameters"] < 0.6 * run.report.stages[0].metrics["parameters"]
    assert run.report.stages[-1].metrics["error"] < 0.12
    run.save(tmp_path / "m.tslim")
    assert ts.evaluate(ts.load(tmp_path / "m.tslim", trust_factory=True), data) == ts.evaluate(run.model, data)


def test_narrow_takes_its_config_like_every_verb():
    from torchslim.pruning.structured import channel_multiple

    torch.manual_seed(0)
    model = ts.models.create("resnet20").eval()
    example = torch.randn(1, 3, 32, 32)
    by_config = ts.narrow(model, {"width": 0.5, "round_to": "onnxruntime"}, example_input=example).model
    by_arguments = ts.narrow(model, 0.5, example_input=example, round_to=channel_multiple("onnxruntime")).model
    widths = [m.out_channels for m in by_config.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [m.out_channels for m in by_arguments.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(width % channel_multiple("onnxruntime") == 0 for width in widths)
    with pytest.raises(ts.ConfigError, match="narrow: unknown key 'depth'"):
        ts.narrow(model, {"width": 0.5, "depth": 2}, example_input=example)
    with pytest.raises(ts.ConfigError, match="narrow: with the config given as a whole, per_set, round_to go in it, not as keyword arguments"):
        ts.narrow(model, {"width": 0.5}, example_input=example, per_set={"conv1": 1.0}, round_to=12)  # they were ignored


def test_decoder_layers_of_a_hugging_face_llama_are_deleted_and_the_model_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.test_zoo import _text_batches

    torch.manual_seed(0)
    model = zoo.llama_layers(4).eval()
    data = _text_batches()
    result = ts.remove_blocks(model, {"count": 1}, data=data, task="language-modeling")
    pruned = result.model.eval()
    scores = {row["name"]: row["loss_rise_when_bypassed"] for row in result.report.stages[0].layers}
    assert sorted(scores) == [f"model.layers.{i}" for i in range(4)]
    (removed,) = result.report.stages[0].metrics["removed"]
    assert scores[removed] == min(scores.values())
    assert len(pruned.model.layers) == 3 and pruned.config.num_hidden_layers == 3 and len(pruned.config.layer_types) == 3
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1, 2]
    assert len(model.model.layers) == 4  # the caller's model is untouched
    bypassed = copy.deepcopy(model)  # the original with that layer skipped: what the shortened stack must compute
    bypassed.model.layers[int(removed.rpartition(".")[2])] = Skip()
    batch = {"input_ids": data[0]["input_ids"][:2, :12]}
    with torch.no_grad():
        expected = bypassed(**batch, use_cache=False).logits
        torch.testing.assert_close(pruned(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        tokens = pruned.generate(batch["input_ids"], max_new_tokens=4, do_sample=False, use_cache=True)  # cache slots renumbered
        assert torch.equal(tokens, pruned.generate(batch["input_ids"], max_new_tokens=4, do_sample=False, use_cache=False))
    pruned.save_pretrained(tmp_path / "hf")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ts.save(pruned, tmp_path / "m.safetensors")
    loaded = ts.load(tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert len(loaded.model.layers) == 3
