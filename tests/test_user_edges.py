"""Models, outputs and tasks as users write them (a third audit's findings): a tag per position whose sequence is as
long as the tag set, dict outputs, frozen layers, tied weights through factorization, keyed image inputs, wrapped
and scripted models, layers that lose every weight. Real data: scikit-learn's digits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchslim as ts
from torchslim.core.errors import TorchslimError


@pytest.fixture(scope="module")
def digits():
    return ts.data.load("digits")


def _row_tags(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each 8x8 digit as 8 rows of 8 pixels (a sequence of 8), each row tagged by how many of its pixels are above
    the mean (7 or more as 7): 8 positions, 8 tags."""
    rows = images.reshape(len(images), 8, 8)
    return rows, (rows > 0).sum(dim=-1).clamp(max=7)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 32)
        self.tag = nn.Linear(32, 8)

    def forward(self, rows):
        return self.tag(F.relu(self.mix(rows)))  # (B, T, tags)


def test_a_tag_per_position_is_scored_over_the_tags_when_the_sequence_is_as_long_as_the_tag_set(digits):
    """(B, 8, 8) logits against (B, 8) tags fit both layouts; they are read as (B, T, classes), the token
    classification convention, and trained as such. ``Task.classification(class_dim=1)`` reads (B, classes, L)."""
    train, test = _row_tags(digits.train.inputs), _row_tags(digits.test.inputs)
    torch.manual_seed(0)
    model = ts.train(Tagger(), ts.Data(train=train, eval=test), {"epochs": 15, "lr": 1e-2, "optimizer": "adam"}, progress=False).model
    metrics = ts.evaluate(model, test)
    with torch.no_grad():
        logits = model(test[0])
    expected = (logits.argmax(dim=-1) == test[1]).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(expected) and metrics["examples"] == test[1].numel()
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits.reshape(-1, 8), test[1].reshape(-1)).item(), rel=1e-5)
    assert expected > 0.6  # trained on the tags (read over the positions, 0.15)
    channels_first = ts.evaluate(Function(lambda rows: model(rows).transpose(1, 2)), test, task=ts.Task.classification(class_dim=1))
    assert channels_first["accuracy"] == pytest.approx(expected)
    with pytest.raises(TorchslimError, match="class_dim must be 1 or -1"):
        ts.Task.classification(class_dim=2)


class Function(nn.Module):
    """A function as a module (a channels-first view of a model)."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


class TwoHeads(nn.Module):
    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.body = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        features = F.relu(self.body(x.flatten(1)))
        return {"features": features, self.key: self.head(features)}


def test_a_dict_output_is_scored_by_the_key_that_names_the_prediction_and_an_unnamed_one_is_refused(digits):
    """``{"features", "out"}``: "out" is scored (the first tensor, "features", used to be: training then fitted the
    features as 16 class scores). Under a key that names nothing, the error lists the keys."""
    x, y = digits.test.inputs[:64], digits.test.targets[:64]
    torch.manual_seed(0)
    model = TwoHeads("out")
    with torch.no_grad():
        expected = (model(x)["out"].argmax(dim=-1) == y).float().mean().item()
    assert ts.evaluate(model, (x, y))["accuracy"] == pytest.approx(expected)
    trained = ts.train(
        model, ts.Data(train=(digits.train.inputs, digits.train.targets), eval=(x, y)), {"epochs": 20, "optimizer": "adam", "lr": 1e-2}, progress=False
    ).model
    with torch.no_grad():
        assert (trained(x)["out"].argmax(dim=-1) == y).float().mean().item() > 0.8
    with pytest.raises(TorchslimError, match=r"a dict of 2 tensors \('features', 'head'\) and none under a key"):
        ts.evaluate(TwoHeads("head"), (x, y))
