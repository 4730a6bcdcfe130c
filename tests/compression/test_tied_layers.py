"""Two Linear layers that share one weight (``self.mid2.weight = self.mid.weight``), as users tie them: every verb that
takes per-layer values treats them as one layer, under either name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchslim as ts
from torchslim.core.errors import TorchslimError


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.mid, self.mid2, self.fc = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        self.mid2.weight = self.mid.weight

    def forward(self, x):
        x = F.relu(self.enc(x.flatten(1)))
        return self.fc(F.relu(self.mid2(F.relu(self.mid(x)))))


def test_an_override_may_name_either_name_of_a_tied_layer():
    """``overrides: {mid2: 0.9}`` was refused ("picks none of the selected layers (enc, mid)"), naming no tie."""
    torch.manual_seed(0)
    model = Tied()
    result = ts.prune(model, {"sparsity": 0.5, "overrides": {"mid2": 0.9}})
    pruned = result.model
    assert pruned.mid2.weight is pruned.mid.weight or torch.equal(pruned.mid2.weight, pruned.mid.weight)
    assert (pruned.mid.weight == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    assert (pruned.enc.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(TorchslimError, match=r"picked by both 'mid' and 'mid2' with different values \(mid2 holds the same weight: one layer, one value\)"):
        ts.prune(model, {"sparsity": 0.5, "overrides": {"mid": 0.5, "mid2": 0.9}})


def test_sensitivity_and_a_size_budget_take_a_tied_layer_once(digits):
    """auto_compress gave mid2 a setting of its own, and its prune stage then refused it, after the whole sweep."""
    torch.manual_seed(0)
    model = ts.train(Tied(), digits, {"epochs": 2, "optimizer": "adam", "lr": 1e-2}, progress=False).model
    measured = ts.sensitivity(model, digits, {"sparsities": [0.5], "bits": [], "ranks": []})
    stage = measured.report.stages[0]
    assert {row["layer"] for row in stage.layers} == {"enc", "mid", "fc"}
    assert "mid2 holds mid's weight: measured once, as mid" in stage.notes
    config = {"target_size": 3_000, "sparsities": [0.5, 0.9], "bits": [4], "ranks": [], "prune_steps": 1, "rounds": 1, "eval_limit": 128,
              "finetune": {"epochs": 1, "lr": 0.01}, "quantize_finetune": {"epochs": 1, "lr": 1e-4, "optimizer": "adam"}}  # fmt: skip
    result = ts.compression.auto_compress(model, digits, config, progress=False)
    assert [row["layer"] for row in result.report.artifacts["allocation"]["layers"]] == ["enc", "mid", "fc"]
    reloaded = result.model
    assert torch.equal(reloaded.mid.weight, reloaded.mid2.weight)
