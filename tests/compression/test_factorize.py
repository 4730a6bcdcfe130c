"""Low-rank factorization: exact at full rank, Eckart-Young error at lower rank, conv geometry kept, budgets met,
layers that would not shrink left, saved files and ONNX exports that run, users' own models, the recipe stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from tests import zoo
from torchslim.compression import FactorizedConv2d, FactorizedLinear


def test_svd_of_a_linear_is_exact_at_its_rank_and_optimal_below_it():
    torch.manual_seed(0)
    low_rank = nn.Sequential(nn.Linear(40, 30))
    with torch.no_grad():
        low_rank[0].weight.copy_(torch.randn(30, 5) @ torch.randn(5, 40))
    x = torch.randn(8, 40)
    exact = ts.factorize(low_rank, {"rank": 5}, example_input=x[:1]).model
    assert isinstance(exact[0], FactorizedLinear) and torch.allclose(exact(x), low_rank(x), atol=1e-4)
    # a rank whose two factors would hold more weights than the layer leaves it whole, and says so
    whole = ts.factorize(low_rank, {"rank": 30}, example_input=x[:1])
    assert isinstance(whole.model[0], nn.Linear) and "left whole" in whole.report.stages[0].notes[0]
    model = nn.Sequential(nn.Linear(40, 30))
    result = ts.factorize(model, {"rank": 10, "min_saving": 0.0}, example_input=x[:1])
    singular = torch.linalg.svdvals(model[0].weight.detach().double())
    expected = float(singular[10:].pow(2).sum().sqrt() / singular.pow(2).sum().sqrt())
    row = result.report.stages[0].layers[0]
    assert row["rank"] == 10 and row["weight_error"] == pytest.approx(expected, abs=1e-4)  # Eckart-Young
    factored = result.model[0]
    product = factored[1].weight @ factored[0].weight
    assert float((product - model[0].weight).norm() / model[0].weight.norm()) == pytest.approx(expected, abs=1e-4)
    assert torch.equal(result.model[0][1].bias, model[0].bias)


@pytest.mark.parametrize("method", ["svd", "tucker2"])
def test_a_strided_padded_conv_keeps_its_geometry(method):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    model = nn.Sequential(conv)
    x = torch.randn(2, 6, 13, 17)
    full_ranks = {"svd": 10, "tucker2": 10}[method]
    full = ts.factorize(model, {"rank": full_ranks, "method": method, "min_saving": 0.0}, example_input=x[:1])
    if full.report.stages[0].metrics["layers_factorized"]:  # full rank may cost more than the layer: then it is left
        assert torch.allclose(full.model(x), model(x), atol=1e-4)
    low = ts.factorize(model, {"rank": 3, "method": method}, example_input=x[:1]).model
    assert isinstance(low[0], FactorizedConv2d) and low[0].form == method
    assert low(x).shape == model(x).shape
    error = float((low(x) - model(x)).norm() / model(x).norm())
    assert 0 < error < 1


def test_tucker_refinement_does_not_do_worse_than_plain_hosvd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1))
    x = torch.randn(1, 16, 8, 8)
    plain = ts.factorize(model, {"rank": 6, "method": "tucker2", "tucker_iterations": 0}, example_input=x)
    refined = ts.factorize(model, {"rank": 6, "method": "tucker2", "tucker_iterations": 3}, example_input=x)
    assert refined.report.stages[0].layers[0]["weight_error"] <= plain.report.stages[0].layers[0]["weight_error"] + 1e-6


def test_a_ratio_is_met_and_layers_that_would_not_shrink_are_left_and_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    x = torch.randn(1, 256)
    result = ts.factorize(model, {"ratio": 0.5}, example_input=x)
    metrics = result.report.stages[0].metrics
    selected = 256 * 256 + 256 * 4
    weights_after = sum(p.numel() for n, p in result.model.named_parameters() if n.endswith("weight"))
    assert weights_after <= 0.5 * selected
    assert isinstance(result.model[0], FactorizedLinear) and isinstance(result.model[2], nn.Linear)  # 256 -> 4 cannot shrink
    assert any(note.startswith("2:") for note in result.report.stages[0].notes)
    assert metrics["parameter_ratio"] > 1.9
    # a budget no rank can reach is refused with what is reachable
    with pytest.raises(ts.TorchslimError, match="out of reach"):
        ts.factorize(nn.Sequential(nn.Linear(4, 4)), {"ratio": 0.1}, example_input=torch.zeros(1, 4))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rank": 4, "energy": 0.9}, "at most one of rank, energy or ratio"),
        ({"energy": 1.5}, "energy must be in"),
        ({"rank": 2, "method": "cp"}, "method must be one of"),
        ({"rank_shares": {"0": 1.5}}, r"rank_shares\['0'\] must be a fraction of the layer's full rank"),
        ({"rank_shares": {"0": 0.5}, "overrides": {"0": 2}}, "'0' is in both overrides and rank_shares"),
    ],
)
def test_bad_configs_are_named(config, message):
    with pytest.raises(ts.ConfigError, match=message):
        ts.factorize(nn.Sequential(nn.Linear(4, 4)), config, example_input=torch.zeros(1, 4))


def test_a_rank_share_follows_the_width_the_layer_has_when_the_stage_runs():
    """A share of the full rank: 1/4 of a 64 x 32 layer is rank 8, and of the same layer after pruning left it 64 x 16,
    rank 4; a conv's share counts its filters against its flattened kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(2, 32)
    assert ts.factorize(model, {"rank_shares": {"0": 0.25}, "layers": {"include": ["0"]}}, example_input=x).model[0][0].out_features == 8
    narrower = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10))
    assert ts.factorize(narrower, {"rank_shares": {"0": 0.25}, "layers": {"include": ["0"]}}, example_input=x[:, :16]).model[0][0].out_features == 4
    conv = nn.Sequential(nn.Conv2d(8, 16, 3))
    result = ts.factorize(conv, {"rank_shares": {"0": 0.5}, "method": "svd"}, example_input=torch.randn(1, 8, 6, 6))
    assert result.model[0][0].out_channels == 8  # min(16, 8 * 3 * 3) = 16, half of it


def test_a_pruned_model_must_be_made_permanent_first():
    pruned = ts.prune(nn.Sequential(nn.Linear(16, 16)), {"sparsity": 0.5}).model
    with pytest.raises(ts.TorchslimError, match="make_permanent"):
        ts.factorize(pruned, {"rank": 2}, example_input=torch.zeros(1, 16))


def test_files_and_onnx_of_a_factorized_users_model(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = zoo.resnet20().eval()
    x = torch.randn(2, 3, 32, 32)
    result = ts.factorize(model, {"energy": 0.8, "layers": {"include": ["layer2.*", "linear"]}}, example_input=x[:1])
    factored = result.model.eval()
    assert result.report.stages[0].metrics["layers_factorized"] >= 3
    expected = factored(x)
    for name in ("m.safetensors", "m.tslim"):
        ts.save(factored, tmp_path / name, factory="tests.zoo:resnet20")  # a class whose arguments it cannot tell
        again = ts.load(tmp_path / name, trust_factory=True).eval()
        assert torch.allclose(again(x), expected, atol=1e-5), name
    from torchslim.export.onnx import OnnxModule, export_onnx

    session = OnnxModule(export_onnx(factored, x[:1], tmp_path / "m.onnx"), threads=1)
    assert torch.allclose(session(x), expected, atol=1e-4)


@pytest.mark.slow
def test_a_trained_lenet_at_half_the_parameters_keeps_its_accuracy_and_runs_in_a_recipe(tmp_path):
    torch.manual_seed(0)
    data = ts.data.load("mnist-sample")
    model = ts.train(ts.models.create_for("lenet-300-100", data), data, {"epochs": 6}, progress=False).model
    dense = ts.evaluate(model, data)["error"]
    result = ts.factorize(model, {"ratio": 0.5}, data=data)
    metrics = result.report.stages[0].metrics
    assert metrics["parameter_ratio"] > 1.9 and metrics["error"] <= dense + 0.01  # before any fine-tuning
    recipe = {"name": "lowrank", "stages": [{"factorize": {"ratio": 0.25, "finetune": {"epochs": 1, "lr": 0.01}}}, {"quantize": {}}, {"encode": {}}]}
    run = ts.compress(model, recipe, data, latency=False, progress=False)
    assert [s.kind for s in run.report.stages] == ["baseline", "factorize", "quantize", "encode"]
    assert run.report.stages[1].metrics["parameters"] < 0.3 * run.report.stages[0].metrics["parameters"]
    assert run.report.stages[-1].metrics["error"] <= dense + 0.02
    run.save(tmp_path / "m.tslim")
    assert ts.evaluate(ts.load(tmp_path / "m.tslim"), data) == ts.evaluate(run.model, data)


def test_layers_factorize_does_not_take_are_named_not_passed_over_in_silence():
    """A Conv1d sequence net: "ratio 0.5" took 3% off and the notes were empty; the two Conv1d layers (92% of the
    weights) are now named, by factorize and by sensitivity."""
    model = nn.Sequential(nn.Conv1d(4, 32, 5, padding=2), nn.ReLU(), nn.Conv1d(32, 32, 5, padding=2), nn.Flatten(), nn.Linear(32 * 8, 10))
    example = torch.randn(2, 4, 8)
    result = ts.factorize(model, {"ratio": 0.5}, example_input=example)
    note = next(note for note in result.report.stages[0].notes if note.startswith("not factorized"))
    assert "(Conv1d): 0.weight, 2.weight" in note and "5,760 weights" in note
    measured = ts.sensitivity(model, [example], {"sparsities": [0.5], "bits": [], "ranks": []}, task="fidelity")
    assert any(note.startswith("not measured: 5,760 weights") for note in measured.report.stages[0].notes)
    chosen = ts.factorize(model, {"ratio": 0.5, "layers": {"include": ["4"]}}, example_input=example)
    assert not any(note.startswith("not factorized") for note in chosen.report.stages[0].notes)  # the caller's selection
