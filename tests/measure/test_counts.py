import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import torchslim as ts
from torchslim.measure import count_macs, count_nonzeros, count_parameters, dense_bytes, layer_table, stored_bytes


def _reference_macs(model: nn.Module, example: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(example)
    return counter.get_total_flops() // 2


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("lenet-300-100", {}, (1, 1, 28, 28)),
        ("lenet-5", {}, (1, 1, 28, 28)),
        ("resnet20", {}, (1, 3, 32, 32)),
        ("mobilenetv2", {"width_multiplier": 0.5}, (1, 3, 32, 32)),
    ],
)
def test_macs_match_torch_flop_counter(name, kwargs, shape):
    model = ts.models.create(name, **kwargs)
    example = torch.randn(shape)
    assert count_macs(model, example)["total"] == _reference_macs(model, example)


def test_known_mac_counts():
    assert count_macs(ts.models.create("lenet-300-100"), torch.zeros(1, 1, 28, 28))["total"] == 266_200
    # LeNet-5: conv1 24*24*20*25 + conv2 8*8*50*500 + fc 800*500 + 500*10
    assert count_macs(ts.models.create("lenet-5"), torch.zeros(1, 1, 28, 28))["total"] == 288_000 + 1_600_000 + 400_000 + 5_000
    # ResNet-20 is about 41M MACs
    assert 40e6 < count_macs(ts.models.create("resnet20"), torch.zeros(1, 3, 32, 32))["total"] < 42e6


def test_attention_matmuls_are_counted():
    model = ts.models.create("char-transformer", block_size=32, layers=2, embed_dim=64, heads=4)
    ids = torch.randint(0, 65, (1, 32))
    counted = count_macs(model, ids)
    attention = [row for row in counted["layers"] if row["type"] == "CausalSelfAttention"]
    assert len(attention) == 2 and attention[0]["macs"] == 2 * 32 * 32 * 64
    assert counted["total"] == _reference_macs(model, ids)


def test_multihead_attention_counter():
    mha = nn.MultiheadAttention(32, 4, batch_first=True)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    example = torch.randn(1, 10, 32)
    # q/k/v projections 3*10*32*32, QK^T and AV 2*10*10*32, output projection 10*32*32
    assert count_macs(Wrapper(), example)["total"] == 30_720 + 6_400 + 10_240


def test_macs_per_example_and_mode_restored():
    model = ts.models.create("lenet-5").train()
    single = count_macs(model, torch.zeros(1, 1, 28, 28))["total"]
    assert count_macs(model, torch.zeros(8, 1, 28, 28))["total"] == single
    assert count_macs(model, torch.zeros(8, 1, 28, 28), per_example=False)["total"] == 8 * single
    assert model.training


def test_nonzeros_bytes_and_layers(tmp_path):
    model = ts.models.create("lenet-300-100")
    with torch.no_grad():
        model.fc1.weight[:, :392] = 0
    assert count_parameters(model) == 266_610
    assert count_nonzeros(model) == 266_610 - 300 * 392
    assert dense_bytes(model) == 266_610 * 4
    rows = {row["name"]: row for row in layer_table(model, torch.zeros(1, 1, 28, 28))}
    assert rows["fc1"]["sparsity"] == pytest.approx(300 * 392 / 235_500, abs=1e-4)
    assert rows["fc1"]["macs"] == 235_200
    path = ts.save(model, tmp_path / "m.safetensors")
    assert stored_bytes(path) == path.stat().st_size > 266_610 * 4


def test_nonzeros_see_parametrized_masks():
    model = ts.models.create("lenet-300-100")
    mask = torch.zeros_like(model.fc2.weight)

    class Mask(nn.Module):
        def forward(self, weight):
            return weight * mask

    torch.nn.utils.parametrize.register_parametrization(model.fc2, "weight", Mask())
    assert count_nonzeros(model) == 266_610 - 30_000
    assert count_parameters(model) == 266_610


def test_recurrent_layers_count_every_gate_at_every_step():
    lstm = count_macs(nn.LSTM(8, 16, batch_first=True), torch.randn(2, 5, 8))["total"]
    assert lstm == 5 * 4 * 16 * (8 + 16)  # per example: 5 steps, 4 gates, input and hidden products
    gru = count_macs(nn.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True), torch.randn(2, 5, 8))["total"]
    assert gru == 5 * 2 * (3 * 16 * (8 + 16) + 3 * 16 * (32 + 16))  # the second layer reads both directions


class _SequenceFirst(nn.Module):
    """An LSTM tagger fed (sequence, batch, features), torch's default layout."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(8, 16, batch_first=batch_first), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def test_a_sequence_first_model_is_counted_per_example_not_per_time_step():
    """The example's first axis was taken for the batch: a (20 steps, batch 3) input counted 3 examples' MACs for
    one step's worth, 6.7x off. The recurrent layers' own layout says where the batch is."""
    per_example = 20 * (4 * 16 * (8 + 16) + 16 * 4)
    assert count_macs(_SequenceFirst(False), torch.randn(20, 3, 8))["total"] == per_example
    assert count_macs(_SequenceFirst(True), torch.randn(3, 20, 8))["total"] == per_example
    attention = nn.MultiheadAttention(16, 2)  # sequence first as well
    batched = nn.MultiheadAttention(16, 2, batch_first=True)
    assert count_macs(attention, (torch.randn(10, 3, 16),) * 3)["total"] == count_macs(batched, (torch.randn(3, 10, 16),) * 3)["total"]
