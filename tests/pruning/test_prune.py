import pytest
import torch

import torchslim as ts
from torchslim.core.config import ConfigError
from torchslim.core.errors import TorchslimError
from torchslim.pruning import (
    WEIGHT_IMPORTANCE,
    GradualPruning,
    L0Regularizer,
    PruneConfig,
    SparseLinear,
    SparsityRegularizer,
    make_permanent,
    masks_of,
    polynomial_sparsity,
    to_csr,
)
from torchslim.train import fit


@pytest.fixture
def trained_lenet(mnist_small):
    torch.manual_seed(0)
    model = ts.models.create("lenet-300-100")
    fit(model, mnist_small, {"epochs": 1, "lr": 0.05, "batch_size": 64, "eval_every_epoch": False}, progress=False)
    return model


@pytest.mark.parametrize("importance", WEIGHT_IMPORTANCE.names())
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_every_criterion_reaches_the_target(importance, scope, mnist_small):
    model = ts.models.create("lenet-300-100")
    result = ts.prune(model, {"importance": importance, "scope": scope, "sparsity": 0.8, "calibration_batches": 2}, data=mnist_small)
    rows = result.report.stages[0].layers
    assert sum(r["weights"] - r["nonzeros"] for r in rows) == round(0.8 * 266_200) or scope == "layer"
    if scope == "layer":
        assert all(abs(r["sparsity"] - 0.8) < 1e-3 for r in rows)
    assert result.report.stages[0].metrics["weight_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert result.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # the caller's model is untouched
    assert masks_of(model) == {} and int(torch.count_nonzero(model.fc1.weight)) == 235_200


def test_magnitude_beats_random_on_a_trained_model(trained_lenet, mnist_small):
    config = {"scope": "global", "sparsity": 0.9}
    magnitude = ts.evaluate(ts.prune(trained_lenet, {**config, "importance": "l1"}).model, mnist_small)["accuracy"]
    random = ts.evaluate(ts.prune(trained_lenet, {**config, "importance": "random"}).model, mnist_small)["accuracy"]
    assert magnitude > 0.8 > random + 0.2


def test_pruned_weights_stay_zero_through_finetuning(trained_lenet, mnist_small):
    result = ts.prune(trained_lenet, {"importance": "l1", "sparsity": 0.7})
    model = result.model
    masks = {name: mask.clone() for name, mask in masks_of(model).items()}
    config = {"epochs": 1, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-3, "lr": 0.05, "max_batches_per_epoch": 30, "eval_every_epoch": False}
    fit(model, mnist_small, config, progress=False)
    fit(model, mnist_small, {**config, "optimizer": "adamw", "lr": 1e-3}, progress=False)
    for name, module in model.named_modules():
        if name in masks:
            assert torch.all(module.weight[~masks[name]] == 0)
            assert torch.count_nonzero(module.weight[masks[name]]) > 0.99 * masks[name].sum()
    outputs = model(mnist_small.example_input(4))
    make_permanent(model)
    assert masks_of(model) == {} and type(model.fc1) is torch.nn.Linear
    assert torch.equal(model(mnist_small.example_input(4)), outputs)
    assert int((model.fc1.weight == 0).sum()) == int((~masks["fc1"]).sum())


def test_save_load_of_pruned_model_keeps_zeros(trained_lenet, tmp_path):
    pruned = ts.prune(trained_lenet, {"importance": "l1", "scope": "global", "sparsity": 0.9}).model
    path = ts.save(pruned, tmp_path / "p.safetensors")
    again = ts.load(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(again(x), pruned(x))
    assert ts.measure.count_nonzeros(again) == ts.measure.count_nonzeros(pruned)


def test_han_quality_threshold_and_overrides(trained_lenet):
    result = ts.prune(trained_lenet, {"quality": 1.0})
    for row in result.report.stages[0].layers:
        assert 0.5 < row["sparsity"] < 0.8  # |w| < std holds for about 68% of a bell-shaped layer
    per_layer = ts.prune(trained_lenet, {"overrides": {"fc1": 0.9, "fc2": 0.5}, "layers": {"include": ["fc1", "fc2"]}})
    assert [round(r["sparsity"], 3) for r in per_layer.report.stages[0].layers] == [0.9, 0.5]
    mixed = ts.prune(trained_lenet, {"sparsity": 0.6, "overrides": {"fc3": 0.2, "type:Linear": 0.4, "fc1": 0.8}})
    assert [round(r["sparsity"], 3) for r in mixed.report.stages[0].layers] == [0.8, 0.4, 0.2]  # name beats type beats the base
    globally = ts.prune(trained_lenet, {"sparsity": 0.9, "scope": "global", "overrides": {"fc3": 0.0}})
    rows = globally.report.stages[0].layers
    assert rows[2]["sparsity"] == 0.0 and sum(r["weights"] - r["nonzeros"] for r in rows[:2]) == round(0.9 * 265_200)
    with pytest.raises(TorchslimError, match="picks none of the selected layers"):
        ts.prune(trained_lenet, {"sparsity": 0.5, "overrides": {"conv*": 0.9}})


@pytest.mark.slow
def test_pruning_in_steps_with_fine_tuning_recovers_accuracy(trained_lenet, mnist_small):
    dense = ts.evaluate(trained_lenet, mnist_small)["accuracy"]
    steps = []
    result = ts.prune(
        trained_lenet,
        {"sparsity": [0.6, 0.85], "scope": "global"},
        data=mnist_small,
        finetune={"epochs": 1, "lr": 0.02, "max_batches_per_epoch": 40},
        on_step=lambda index, model: steps.append(index),
        progress=False,
    )
    stage = result.report.stages[0]
    assert steps == [0, 1] and len(stage.notes) == 2 and stage.metrics["nonzeros"] < 0.16 * 266_610 + 410
    after_prune, after_tuning = (
        float(part.split("accuracy ")[1].split("%")[0]) if "accuracy" in part else float(part.split("%")[0]) for part in stage.notes[-1].split(", ")[1:]
    )
    assert after_tuning >= after_prune - 0.5
    assert ts.evaluate(result.model, mnist_small)["accuracy"] > dense - 0.02
    resumed = ts.prune(trained_lenet, {"sparsity": [0.6, 0.85], "scope": "global"}, start_step=1)
    assert resumed.report.stages[0].metrics["weight_sparsity"] == pytest.approx(0.85, abs=1e-3)  # only the last step ran


def test_gradual_pruning_follows_polynomial_schedule(mnist_small):
    model = ts.models.create("lenet-300-100")
    callback = GradualPruning(PruneConfig(sparsity=0.1, scope="global"), final_sparsity=0.8, start_step=5, steps=4, frequency=10)
    fit(model, mnist_small, {"epochs": 1, "max_batches_per_epoch": 60, "eval_every_epoch": False}, callbacks=[callback], progress=False)
    steps = [step for step, _ in callback.events]
    assert steps == [15, 25, 35, 45]
    assert [round(s, 4) for _, s in callback.events] == [round(polynomial_sparsity(t, 0.0, 0.8, 5, 4, 10), 4) for t in steps]
    weights = sum(m.numel() for m in masks_of(model).values())
    assert int(sum((~m).sum() for m in masks_of(model).values())) == round(0.8 * weights)


@pytest.mark.parametrize("kind", ["l1", "l2", "group_lasso"])
def test_regularizers_shrink_weights_and_give_masks(kind, mnist_small):
    torch.manual_seed(0)
    plain = ts.models.create("lenet-300-100")
    regularized = ts.models.create("lenet-300-100")
    regularized.load_state_dict(plain.state_dict())
    strength = {"l1": 1e-4, "l2": 1e-3, "group_lasso": 1e-3}[kind]
    regularizer = SparsityRegularizer(regularized, kind, strength, layers={"include": ["fc1", "fc2"]})
    config = {"epochs": 1, "max_batches_per_epoch": 60, "eval_every_epoch": False}
    fit(plain, mnist_small, config, progress=False)
    fit(regularized, mnist_small, config, callbacks=[regularizer], progress=False)
    assert regularizer.penalty() < SparsityRegularizer(plain, kind, strength, layers={"include": ["fc1", "fc2"]}).penalty()
    masks = regularizer.to_masks(sparsity=0.5)
    if kind == "group_lasso":  # whole output neurons go
        rows = masks["fc1"].all(dim=1) | (~masks["fc1"]).all(dim=1)
        assert rows.all() and (~masks["fc1"]).all(dim=1).any()
        assert sum(int((~m).all(dim=1).sum()) for m in masks.values()) == 200  # half of the 300 + 100 neurons
    else:
        assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * (235_200 + 30_000))


def test_l0_gates_learn_sparsity(mnist_small):
    torch.manual_seed(0)
    model = ts.models.create("lenet-300-100")
    regularizer = L0Regularizer(model, strength=2.0, layers={"include": ["fc1"]}, initial_keep=0.15)
    before = regularizer.expected_l0().item()
    fit(
        model,
        mnist_small,
        {"epochs": 1, "optimizer": "adam", "lr": 0.03, "max_batches_per_epoch": 120, "eval_every_epoch": False, "schedule": "constant"},
        callbacks=[regularizer],
        progress=False,
    )
    assert regularizer.expected_l0().item() < before
    x = mnist_small.example_input(8)
    with torch.no_grad():
        gated = model.eval()(x)
    masks = regularizer.to_masks()
    assert (~masks["fc1"]).sum() > 0
    torch.testing.assert_close(model(x), gated)  # folding the gates keeps the eval outputs


def test_bad_input_errors():
    model = ts.models.create("lenet-300-100")
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        ts.prune(model, {"sparsity": 1.0})
    with pytest.raises(ConfigError, match="unknown weight importance 'l3'"):
        ts.prune(model, {"sparsity": 0.5, "importance": "l3"})
    with pytest.raises(TorchslimError, match="layer pattern 'conv\\*' matches no module"):
        ts.prune(model, {"sparsity": 0.5, "layers": {"include": ["conv*"]}})
    with pytest.raises(ConfigError, match="unknown key 'sparsty'"):
        ts.prune(model, {"sparsty": 0.5})
    with pytest.raises(ConfigError, match="needs data"):
        ts.prune(model, {"sparsity": 0.5, "importance": "taylor"})
    with pytest.raises(TorchslimError, match="layer 'bn1' \\(BatchNorm2d\\) is not one of the selectable types"):
        ts.prune(ts.models.create("resnet20"), {"sparsity": 0.5, "layers": {"include": ["bn1"]}})


def test_conv_embedding_and_attention_layers():
    transformer = ts.models.create("char-transformer", block_size=16, layers=1, embed_dim=32, heads=2)
    result = ts.prune(transformer, {"sparsity": 0.5, "layers": {"include": ["token_embedding", "re:blocks\\.0\\.attn\\..*_proj"]}})
    names = [row["name"] for row in result.report.stages[0].layers]
    assert names == ["token_embedding", "blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj", "blocks.0.attn.out_proj"]
    resnet = ts.prune(ts.models.create("resnet20"), {"sparsity": 0.5, "scope": "global"}).model
    assert resnet(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_csr_view_and_sparse_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight) < 0.9] = 0
    csr = to_csr(linear.weight)
    nnz = int(torch.count_nonzero(linear.weight))
    assert csr.nonzeros == nnz and csr.stored_bytes == nnz * 4 + nnz * 2 + 33 * 2
    assert torch.equal(csr.to_dense(), linear.weight.detach())
    x = torch.randn(5, 64)
    torch.testing.assert_close(SparseLinear(linear)(x), linear(x))
