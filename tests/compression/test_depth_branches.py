"""Residual branches written in the parent's forward the way users write them: the branch's output masked, scaled by
a buffer, transposed back or subtracted before it meets the stream. Removing one must leave the stream as it was
(the branch adds nothing), never hand the stream on in the branch's place (which doubles it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchslim as ts


class Branch(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv, self.norm = nn.Conv1d(width, width, 3, padding=1), nn.BatchNorm1d(width)

    def forward(self, x):
        return torch.tanh(self.norm(self.conv(x)))


class MaskedSequence(nn.Module):
    """WaveNet-style: ``h = h + block(h) * mask``, the mask from the input's padding, full width; or scaled by a
    per-channel buffer; or subtracted."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.inp = nn.Conv1d(4, 8, 1)
        self.blocks = nn.ModuleList([Branch() for _ in range(3)])
        self.register_buffer("gain", torch.linspace(0.5, 1.5, 8).view(1, 8, 1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        mask = (x.abs().sum(1, keepdim=True) > 0).float().expand(-1, 8, -1)
        h = self.inp(x) * mask
        for block in self.blocks:
            if self.style == "mask":
                h = h + block(h) * mask
            elif self.style == "buffer":
                h = h + block(h) * self.gain
            else:
                h = h - block(h)
        return self.fc(h.mean(-1))


class TokenMixing(nn.Module):
    def __init__(self, tokens: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Mixer(nn.Module):
    """MLP-Mixer with its adds in the parent: the token branch runs on the transposed stream and is transposed back."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.norms = nn.ModuleList([nn.LayerNorm(16) for _ in range(2)])
        self.tokens = nn.ModuleList([TokenMixing(10) for _ in range(2)])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x.transpose(1, 2))  # (B, 10 tokens, 16)
        for norm, mixing in zip(self.norms, self.tokens):
            x = x + mixing(norm(x).transpose(1, 2)).transpose(1, 2)
        return self.head(x.mean(1))


class Nothing(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("make, name", [(lambda: MaskedSequence("mask"), "blocks.1"), (lambda: MaskedSequence("buffer"), "blocks.1"),
                                        (lambda: MaskedSequence("sub"), "blocks.1"), (Mixer, "tokens.1")])  # fmt: skip
def test_a_branch_masked_scaled_transposed_or_subtracted_is_removed_as_adding_nothing(make, name):
    """These were bypassed by the identity: the model then computed ``h + h * mask`` (0.48 off the branch-less model,
    no note)."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, 10)
    x[:, :, 7:] = 0.0  # padding at the end of every sequence
    model = make().eval()
    result = ts.remove_blocks(model, {"count": 1, "layers": {"include": [name]}, "calibration_batches": 1}, data=[(x, torch.zeros(16, dtype=torch.long))])
    assert type(result.model.get_submodule(name)).__name__ == "Zero"
    assert any("removed as adding nothing" in note for note in result.report.stages[0].notes)
    expected = copy.deepcopy(model)
    parent, _, index = name.rpartition(".")
    expected.get_submodule(parent)[int(index)] = Nothing()
    with torch.no_grad():
        assert torch.equal(result.model(x), expected(x))
        assert not torch.equal(model(x), expected(x))


class OwnResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class MaskedStack(nn.Module):
    """Blocks that hold their own residual, their output masked by the parent but never added to the stream."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([OwnResidual() for _ in range(3)])

    def forward(self, x):
        mask = (x.abs().sum(-1, keepdim=True) > 0).float()
        for block in self.blocks:
            x = block(x) * mask
        return x.sum(1)


def test_a_block_that_holds_its_residual_is_still_handed_the_stream_when_its_output_is_masked():
    torch.manual_seed(0)
    model = MaskedStack().eval()
    x = torch.randn(4, 5, 8)
    result = ts.remove_blocks(model, {"count": 1, "layers": {"include": ["blocks.1"]}}, data=[x], task="fidelity")
    assert type(result.model.blocks[1]).__name__ == "Skip"
