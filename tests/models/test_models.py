import pytest
import torch

import torchslim as ts
from torchslim.measure import count_parameters

# Published parameter counts (ResNets: He et al. 2016's CIFAR nets with option-A shortcuts).
EXPECTED = {
    "lenet-300-100": 266_610,
    "lenet-5": 431_080,
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
}


@pytest.mark.parametrize("name, count", sorted(EXPECTED.items()))
def test_parameter_counts_exact(name, count):
    assert count_parameters(ts.models.create(name)) == count


def _input(name: str) -> torch.Tensor:
    if name.startswith("lenet") or name == "mlp":
        return torch.randn(2, 1, 28, 28)
    if name == "char-transformer":
        return torch.randint(0, 65, (2, 32))
    return torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("name", ts.models.names())
def test_every_model_runs_and_records_its_spec(name):
    kwargs = {"width_multiplier": 0.25} if name == "mobilenetv2" else {}
    model = ts.models.create(name, **kwargs)
    output = model(_input(name))
    assert output.shape[0] == 2 and output.shape[-1] == (65 if name == "char-transformer" else 10)
    assert model.torchslim_spec == {"name": name, "kwargs": kwargs}


def test_transformer_parameter_formula():
    vocab, block, layers, dim, heads = 65, 32, 2, 64, 4
    model = ts.models.create("char-transformer", vocab_size=vocab, block_size=block, layers=layers, embed_dim=dim, heads=heads)
    per_block = 2 * 2 * dim + 4 * (dim * dim + dim) + (dim * 4 * dim + 4 * dim) + (4 * dim * dim + dim)
    expected = vocab * dim + block * dim + layers * per_block + 2 * dim + dim * vocab + vocab
    assert count_parameters(model) == expected


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = ts.models.create("char-transformer", block_size=16, layers=1, embed_dim=32, heads=2).eval()
    ids = torch.randint(0, 65, (1, 16))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 65
    assert torch.allclose(model(ids)[0, :-1], model(changed)[0, :-1], atol=1e-6)


def test_create_for_sizes_models_to_data(digits):
    model = ts.models.create_for("lenet-300-100", digits)
    assert model(digits.example_input(3)).shape == (3, 10)
    with pytest.raises(ValueError, match="at least 16x16"):
        ts.models.create_for("lenet-5", digits)
    with pytest.raises(ts.TorchslimError, match="unknown model"):
        ts.models.create_for("vgg", digits)
