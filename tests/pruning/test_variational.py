"""Sparse variational dropout: per-layer sparsity learned by training (no sparsity given), on the registry's MLP, a
user's own convnet on their own DataLoader, and as a recipe stage that k-means and entropy coding follow."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.errors import TorchslimError
from torchslim.pruning import SparseVariationalDropout, masks_of, sparsify_variational
from torchslim.pruning.variational import kl_approximation, log_alpha
from torchslim.train import fit

TRAIN = {"epochs": 15, "optimizer": "adam", "lr": 1e-3, "schedule": "constant", "eval_every_epoch": False}


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = ts.data.load("digits")
    model = ts.train(ts.models.create_for("lenet-300-100", data), data, {"epochs": 10}, progress=False).model
    return model, data


def test_the_kl_term_falls_as_the_noise_grows_and_pruned_weights_have_large_alpha():
    weight = torch.ones(4)
    quiet, noisy = kl_approximation(weight, torch.full((4,), -10.0)), kl_approximation(weight, torch.full((4,), 2.0))
    assert noisy < quiet  # the log-uniform prior favours noise: the KL drops as alpha grows
    assert float(log_alpha(torch.tensor([1e-3]), torch.tensor([0.0]))) == pytest.approx(8.0)  # clamped


def test_training_learns_each_layers_sparsity_and_leaves_a_plain_masked_model(trained, tmp_path):
    model, data = trained
    dense = ts.evaluate(model, data)["accuracy"]
    result = sparsify_variational(model, data, {}, finetune=TRAIN, progress=False)
    stage = result.report.stages[0]
    sparsity = {row["name"]: row["sparsity"] for row in stage.layers}
    assert stage.metrics["sparsity"] > 0.8 and len(set(round(s, 2) for s in sparsity.values())) == 3  # learned, different per layer
    assert ts.evaluate(result.model, data)["accuracy"] > dense - 0.06
    assert not any("log_sigma2" in key for key in result.model.state_dict()) and set(masks_of(result.model)) == {"fc1", "fc2", "fc3"}
    assert not result.model.fc1._forward_hooks  # the noise hooks are gone
    assert not hasattr(model.fc1, "log_sigma2") and not masks_of(model)  # the caller's model untouched
    ts.save(result.model, tmp_path / "svd.safetensors")
    assert ts.evaluate(ts.load(tmp_path / "svd.safetensors"), data) == ts.evaluate(result.model, data)


class UsersNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.pool = lambda x: torch.nn.functional.max_pool2d(x, 2).flatten(1)
        self.head = torch.nn.Linear(16 * 16, 10)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.conv(x.reshape(-1, 1, 8, 8)))))


def test_a_users_convnet_on_a_dataloader_trains_with_noise_only_in_training():
    torch.manual_seed(0)
    digits = ts.data.load("digits")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(digits.train.inputs, digits.train.targets), batch_size=64, shuffle=True)
    model = ts.train(UsersNet(), loader, {"epochs": 4, "lr": 0.05}, progress=False).model
    dropout = SparseVariationalDropout(model, train_size=len(digits.train.inputs), initial_log_sigma2=-2.0)
    x = digits.test.inputs[:8]
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x), model(x))  # evaluation: mean weights, no noise
        model.train()
        assert not torch.equal(model(x), model(x))  # training: sampled pre-activations
    fit(model, loader, TRAIN | {"epochs": 3}, callbacks=[dropout], progress=False)
    masks = dropout.to_masks()
    assert set(masks) == {"conv", "head"} and all(0.0 < float((~m).float().mean()) < 1.0 for m in masks.values())


def test_a_recipe_stage_then_kmeans_and_coding_write_a_small_file(trained, tmp_path):
    model, data = trained
    recipe = {
        "name": "variational",
        "stages": [{"variational-dropout": {"finetune": TRAIN}}, {"quantize": {"weights": {"scheme": "kmeans", "bits": 4}}}, {"encode": {}}],
    }
    result = ts.compress(model, recipe, data, latency=False, progress=False)
    result.save(tmp_path / "v.tslim")
    assert (tmp_path / "v.tslim").stat().st_size < 8_000  # the dense float file is 202 KB
    assert ts.evaluate(ts.load(tmp_path / "v.tslim"), data) == ts.evaluate(result.model, data)
    assert "weights with log alpha above 3 masked" in result.report.stages[1].notes[0]


def test_the_data_term_may_be_the_given_models_soft_targets(trained):
    """With distill_alpha 1 the labels are not read: on training labels scrambled, the sparse model still follows the
    model as given (the teacher, copied before the noise); on the labels alone it learns the scramble."""
    model, data = trained
    dense = ts.evaluate(model, data)["accuracy"]
    scrambled = data.train.targets[torch.randperm(len(data.train.targets), generator=torch.Generator().manual_seed(0))]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.train.inputs, scrambled), batch_size=64, shuffle=True)
    torch.manual_seed(0)
    taught = sparsify_variational(model, loader, {"distill_alpha": 1.0}, finetune=TRAIN, progress=False)
    torch.manual_seed(0)
    labels = sparsify_variational(model, loader, {}, finetune=TRAIN, progress=False)
    assert ts.evaluate(taught.model, data)["accuracy"] > dense - 0.06 > ts.evaluate(labels.model, data)["accuracy"]
    assert taught.report.stages[0].metrics["sparsity"] > 0.8
    assert "data term: 1 soft targets of the model as given, T 4" in taught.report.stages[0].notes[0]
    assert not hasattr(model.fc1, "log_sigma2") and not masks_of(model)  # the caller's model untouched
    with pytest.raises(ts.ConfigError, match="distill_alpha must be in"):
        sparsify_variational(model, loader, {"distill_alpha": 1.5}, finetune=TRAIN, progress=False)


def test_bad_input_is_named(trained):
    model, _ = trained
    with pytest.raises(TorchslimError, match="train_size must be the number of training examples"):
        SparseVariationalDropout(model, train_size=0)
    with pytest.raises(TorchslimError, match="covers Linear and Conv2d layers; not: 0"):
        SparseVariationalDropout(torch.nn.Sequential(torch.nn.Embedding(4, 4)), 10, layers={"types": ["Embedding"]})


def test_train_clip_trains_the_network_as_it_will_be_pruned():
    """With train_clip, weights whose log alpha passed the threshold are out of the sampled pre-activation, mean and
    noise: with the kept weights' noise negligible, a training-mode pass is the pruned model's output. Without it,
    those weights still count, with their noise."""
    torch.manual_seed(0)
    digits = ts.data.load("digits")
    x = digits.test.inputs[:16]
    for clip in (True, False):
        model = UsersNet()
        dropout = SparseVariationalDropout(model, train_size=100, train_clip=clip)
        pruned = torch.rand_like(model.head.weight) < 0.5
        with torch.no_grad():
            model.head.log_sigma2.copy_(torch.where(pruned, torch.log(model.head.weight**2 + 1e-8) + 6.0, torch.full_like(pruned, -40.0, dtype=torch.float)))
            model.conv.log_sigma2.fill_(-40.0)
            model.train()
            sampled = model(x)
            dropout.to_masks()
            model.eval()
            masked = model(x)
        assert torch.equal(masks_of(model)["head"], ~pruned)
        assert torch.allclose(sampled, masked, atol=1e-3) == clip  # 1e-4: the noise floor of the sampled standard deviation


def test_a_sparsity_target_masks_the_noisiest_weights_next_over_all_layers(trained):
    torch.manual_seed(0)
    model = UsersNet()
    dropout = SparseVariationalDropout(model, train_size=100)
    with torch.no_grad():
        for shift, (_, module) in enumerate(dropout.modules):  # all below 3, one layer's noisier than the other's
            module.log_sigma2.copy_(torch.log(module.weight**2 + 1e-8) + torch.empty_like(module.weight).uniform_(-6.0, 2.0) - 2.0 * shift)
        alphas = {name: log_alpha(module.weight, module.log_sigma2).clone() for name, module in dropout.modules}
    masks = dropout.to_masks(0.9)
    total = sum(mask.numel() for mask in masks.values())
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(0.9 * total)
    masked = torch.cat([alphas[name][~mask] for name, mask in masks.items()])
    kept = torch.cat([alphas[name][mask] for name, mask in masks.items()])
    assert masked.min() > kept.max() and dropout.cutoff < 3.0  # one cut across layers, the highest log alpha first
    assert len({round(float((~mask).float().mean()), 2) for mask in masks.values()}) > 1  # each layer's share differs
    tied = UsersNet()  # every log alpha on the clamp (-8): ties are cut in order, and the count rounds up
    dropout = SparseVariationalDropout(tied, train_size=100)
    with torch.no_grad():
        for _, module in dropout.modules:
            module.weight.fill_(1.0)
    masks = dropout.to_masks(0.3)
    total = sum(mask.numel() for mask in masks.values())  # 2,704 weights: 0.3 of them is 811.2, so 812 masked
    assert sum(int((~mask).sum()) for mask in masks.values()) == math.ceil(0.3 * total) == 812 and dropout.cutoff == pytest.approx(-8.0)

    mlp, data = trained
    short = dict(TRAIN, epochs=3)
    result = sparsify_variational(mlp, data, {"sparsity": 0.9}, finetune=short, progress=False)
    stage = result.report.stages[0]
    assert stage.metrics["sparsity"] == pytest.approx(0.9, abs=1e-4) and "lowered to reach sparsity 0.9" in stage.notes[0]
    assert ts.evaluate(result.model, data)["accuracy"] > 0.8, ts.evaluate(result.model, data)["accuracy"]
    plain = sparsify_variational(mlp, data, {"sparsity": 0.01}, finetune=short, progress=False).report.stages[0]
    assert plain.metrics["sparsity"] > 0.2 and "above 3 masked" in plain.notes[0] and "lowered" not in plain.notes[0]  # more than 1%
    with pytest.raises(ts.ConfigError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        sparsify_variational(mlp, data, {"sparsity": 1.0}, finetune=short, progress=False)


class _Doubled(nn.Linear):
    """A user's Linear with a forward of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


def test_train_clip_keeps_a_layers_own_forward():
    """train_clip computed the mean again with F.linear: a subclass's own forward (here, doubling) was lost while
    training, so the network trained was not the one evaluated."""
    torch.manual_seed(0)
    model = nn.Sequential(_Doubled(8, 4))
    SparseVariationalDropout(model, train_size=100, train_clip=True)
    x = torch.randn(16, 8)
    with torch.no_grad():
        model[0].log_sigma2.fill_(-40.0)  # no noise: a training pass is the mean
        sampled = model.train()(x)
        expected = model.eval()(x)
    assert torch.allclose(sampled, expected, atol=1e-3)
