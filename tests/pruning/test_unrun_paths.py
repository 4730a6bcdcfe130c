"""A model that picks one path of an ``nn.ModuleDict`` by a key in ``forward``: the path the example did not run must
work after channels are removed, on what it reads and on what it writes."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import torchslim as ts


class PickedPath(nn.Module):
    def __init__(self, key: str = "b"):
        super().__init__()
        self.key = key
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.paths = nn.ModuleDict(
            {
                "a": nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1)),
                "b": nn.Sequential(nn.Conv2d(16, 24, 3, padding=1), nn.SiLU(), nn.Conv2d(24, 16, 1)),
            }
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.fc(self.paths[self.key](x).mean((2, 3)))


def test_the_path_that_did_not_run_keeps_what_it_writes_as_well_as_what_it_reads():
    """Path "a" kept its 16 output channels while fc, which the path that ran writes to, was cut to 8 inputs: the
    model failed with a shape error once the key chose "a"."""
    torch.manual_seed(0)
    model = PickedPath().eval()
    x = torch.randn(2, 1, 28, 28)
    for result in (ts.narrow(model, 0.5, example_input=x[:1]), ts.prune_channels(model, {"ratio": 0.5}, example_input=x[:1])):
        slim = result.model.eval()
        assert slim.paths["b"][0].out_channels == 12  # the path that ran is still narrowed inside
        notes = result.report.stages[0].notes
        assert sum("paths.a did not run on the example, and writes where paths.b, run in its place, does" in note for note in notes) == 1
        slim.key = model.key = "a"
        with torch.no_grad():
            assert torch.equal(slim(x), model(x))  # path a and what it reads and writes are whole
        model.key = "b"


class TorchAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.blocks = nn.ModuleList([nn.MultiheadAttention(16, 4, batch_first=True) for _ in range(2)])

    def forward(self, x):
        x = self.embed(x)
        for attention in self.blocks:
            x = x + attention(x, x, x, need_weights=False)[0]
        return self.head(x.mean(1))


def test_heads_asked_of_torchs_multihead_attention_are_said_to_stay():
    """head_ratio on a hand-written ViT of nn.MultiheadAttention removed no head, and no note said so."""
    result = ts.prune_channels(TorchAttention(), {"ratio": 0.3, "head_ratio": 0.5}, example_input=torch.randn(2, 5, 8))
    assert result.report.stages[0].metrics["heads_removed"] == 0
    assert any(note.startswith("heads kept whole in blocks.0, blocks.1: nn.MultiheadAttention") for note in result.report.stages[0].notes)
