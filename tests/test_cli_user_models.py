"""The command line with a user's own model class: constructor arguments, import paths given as file paths, missing
files, and a student named by its import path."""

from __future__ import annotations

import textwrap

import pytest
import torch

import torchslim as ts
from torchslim.cli import main

NETS = """
import torch
from torch import nn
from torch.nn import functional as F


class NeedsArgs(nn.Module):
    def __init__(self, hidden, num_classes):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, hidden), nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "usernets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.chdir(tmp_path)
    import usernets

    torch.manual_seed(0)
    digits = ts.data.load("digits")
    model = ts.train(usernets.NeedsArgs(32, 10), digits, {"epochs": 3, "optimizer": "adam", "lr": 1e-2}, progress=False).model
    torch.save(model.state_dict(), tmp_path / "net.pt")
    return tmp_path, ts.evaluate(model, digits)


def test_constructor_arguments_are_given_with_model_args(user_module, capsys):
    """A class whose constructor needs arguments could not be used at all ("missing 2 required positional
    arguments", with no way to give them)."""
    folder, metrics = user_module
    assert main(["evaluate", "usernets:NeedsArgs", "--weights", "net.pt", "--data", "digits"]) == 1
    assert "give them as JSON with --model-args" in capsys.readouterr().err
    arguments = ["--weights", "net.pt", "--model-args", '{"hidden": 32, "num_classes": 10}', "--data", "digits"]
    assert main(["evaluate", "usernets:NeedsArgs", *arguments]) == 0
    assert f"accuracy {100 * metrics['accuracy']:.2f}%" in capsys.readouterr().out
    assert main(["prune", "usernets:NeedsArgs", *arguments, "--sparsity", "0.5", "--out", "pruned.safetensors", "--quiet"]) == 0
    pruned = ts.load(folder / "pruned.safetensors", trust_factory=True)
    assert pruned.fc1.out_features == 32 and float((pruned.fc1.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert main(["evaluate", "usernets:NeedsArgs", *arguments[:2], "--model-args", "[32, 10]", "--data", "digits"]) == 1
    assert "--model-args: expected a JSON object" in capsys.readouterr().err


def test_a_student_is_named_by_its_import_path(user_module, capsys):
    """``distill --student usernets:NeedsArgs`` was refused as an unknown registered model."""
    arguments = ["distill", "--teacher", "usernets:NeedsArgs", "--weights", "net.pt", "--model-args", '{"hidden": 32, "num_classes": 10}']
    student = ["--student", "usernets:NeedsArgs", "--student-args", '{"hidden": 8, "num_classes": 10}']
    assert main([*arguments, *student, "--data", "digits", "--epochs", "2", "--out", "student.safetensors", "--quiet"]) == 0
    assert ts.load(user_module[0] / "student.safetensors", trust_factory=True).fc1.out_features == 8


@pytest.mark.parametrize(
    "model, message",
    [
        ("pkg/usernets.py:NeedsArgs", "a model is named by an importable module, not a file path"),
        ("./pkg/usernets.py:NeedsArgs", "PYTHONPATH=pkg and --model usernets:NeedsArgs"),
        ("no_such_model.safetensors", "error: no_such_model.safetensors: no such file"),
    ],
)
def test_a_model_named_wrongly_gets_the_way_out(user_module, model, message, capsys):
    assert main(["evaluate", model, "--weights", "net.pt", "--data", "digits"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_trains_final_line_is_the_test_error(tmp_path, capsys):
    """It printed the test loss (``loss 0.3847``) under a table of test errors."""
    assert main(["train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--quiet"]) == 0
    assert "trained mlp: test error" in capsys.readouterr().out
