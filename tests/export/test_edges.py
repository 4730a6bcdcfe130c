"""``ts.export`` at its edges: control flow on input values (refused by the check on inputs of other values), keyword
inputs that are no sequence, keyword inputs named like a positional one, a dict example with several outputs, an
operator only the torch.export-based ONNX exporter converts, nested outputs, a directory as the path, an axis the
model cannot vary and a PT2E model in a format it cannot take."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import torchslim as ts

SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}


class Branchy(nn.Module):
    """Its output takes one branch or the other by the sign of its values: a trace records the example's branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * 2 if y.mean() > 0 else -y


def _positive_branchy() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = Branchy().eval()
    model.fc.bias.data.zero_()
    x = torch.randn(2, 4)
    while model(x[:1]).mean() <= 0:
        x = torch.randn(2, 4)
    return model, x


@pytest.mark.parametrize("form", ["torchscript", "onnx"])
def test_control_flow_on_input_values_is_refused_by_name_and_nothing_is_written(form, tmp_path):
    model, x = _positive_branchy()
    path = tmp_path / f"branchy{SUFFIX[form]}"
    with pytest.raises(
        ts.TorchslimError, match=r"matches the PyTorch model on the example but differs on .*control flow that depends on its input values"
    ) as caught:
        ts.export(model, form, x, path)
    assert "test_edges.py" in str(caught.value)  # the tracer's warning names the line of the branch
    assert not any(tmp_path.iterdir())


def test_pt2_names_control_flow_on_values_too(tmp_path):
    model, x = _positive_branchy()
    with pytest.raises(ts.TorchslimError, match="control flow that depends on its input values"):
        ts.export(model, "pt2", x, tmp_path / "branchy.pt2")
    assert not any(tmp_path.iterdir())


class AlwaysTaken(nn.Module):
    """A branch on values that every input takes: the file is right, and the tracer's warning is reported."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.abs() >= 0).all()):
            return self.fc(x)
        return -self.fc(x)


@pytest.mark.parametrize("form", ["torchscript", "onnx"])
def test_the_tracers_warnings_are_in_the_notes(form, tmp_path):
    torch.manual_seed(0)
    stage = ts.export(AlwaysTaken().eval(), form, torch.randn(2, 4), tmp_path / f"m{SUFFIX[form]}").report.stages[0]
    assert {"other values", "negated"} <= set(stage.metrics["max_abs_difference"])
    assert any("constants of the file at" in note and "test_edges.py" in note and "Python boolean" in note for note in stage.notes), stage.notes


def test_other_values_keep_shapes_ids_and_masks():
    from torchslim.export.check import other_values

    torch.manual_seed(0)
    ids = torch.randint(5, 50, (2, 6))
    example = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2]), "scores": torch.randn(2, 6) * 3 + 1}
    varied = other_values(example)
    assert sorted(varied["input_ids"].flatten().tolist()) == sorted(ids.flatten().tolist()) and not torch.equal(varied["input_ids"], ids)
    assert torch.equal(varied["attention_mask"], example["attention_mask"])
    assert varied["scores"].shape == (2, 6) and not torch.allclose(varied["scores"], example["scores"])
    assert abs(float(varied["scores"].mean()) - float(example["scores"].mean())) < 2.5
    assert torch.equal(other_values(torch.ones(3, 4)), torch.ones(3, 4))  # a constant input stays in the random draw (a mask of ones)
    negated = other_values(example, seed=1, negate=True)
    assert torch.equal(negated["scores"], -example["scores"]) and torch.equal(negated["attention_mask"], example["attention_mask"])


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _variant(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BatchNormNet()
    model.body[1].running_mean.uniform_(-1, 1)
    model.body[1].running_var.uniform_(0.5, 2)
    if name == "masked":
        return ts.prune(model, {"sparsity": 0.5}).model
    return ts.quantize(model, {"weights": {"bits": 8}}).model if name == "int8" else model


@pytest.mark.parametrize("name", ["dense", "masked", "int8"])
@pytest.mark.parametrize("form", ["onnx", "pt2", "torchscript"])
def test_models_without_control_flow_on_values_agree_on_other_values(form, name, tmp_path):
    metrics = ts.export(_variant(name).eval(), form, torch.rand(2, 3, 8, 8), tmp_path / f"{name}{SUFFIX[form]}").report.stages[0].metrics
    assert max(metrics["max_abs_difference"][key] for key in ("other values", "negated")) <= metrics["tolerance"]


class Tabular(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.a(features)


def test_a_dict_of_tabular_features_exports_with_its_width_fixed(tmp_path):
    """``{"features": (batch, 4)}`` looks like a sequence of samples, but the model runs on four features only: axis 1
    stays fixed (it used to get a dynamic sequence and fail with a raw shape error)."""
    torch.manual_seed(0)
    model = Tabular().eval()
    result = ts.export(model, "onnx", {"features": torch.randn(2, 4)}, tmp_path / "tabular.onnx")
    assert not any(key.startswith("sequence") for key in result.report.stages[0].metrics["max_abs_difference"])
    x = torch.randn(5, 4)
    torch.testing.assert_close(result.model(features=x), model(x), atol=1e-5, rtol=1e-5)


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.a(x * mask)


def test_an_onnx_model_takes_every_keyword_input_including_one_named_x(tmp_path):
    torch.manual_seed(0)
    model = Masked().eval()
    engine = ts.export(model, "onnx", {"x": torch.randn(2, 4), "mask": torch.ones(2, 4)}, tmp_path / "masked.onnx").model
    x, mask = torch.randn(3, 4), (torch.rand(3, 4) > 0.5).float()
    expected = model(x, mask)
    torch.testing.assert_close(engine(x=x, mask=mask), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine(x, mask=mask), expected, atol=1e-5, rtol=1e-5)  # by position, then by name
    torch.testing.assert_close(engine(x, mask), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ts.TorchslimError, match="got x both by position and by name"):
        engine(x, x=x)
    with pytest.raises(ts.TorchslimError, match="missing mask"):
        engine(x=x)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, inp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = inp * mask
        return {"logits": self.a(h), "aux": self.b(h)}


@pytest.mark.parametrize("form", ["pt2", "torchscript", "onnx"])
def test_a_dict_example_with_a_dict_output_keeps_every_output(form, tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    result = ts.export(model, form, {"inp": torch.randn(2, 4), "mask": torch.ones(2, 4)}, tmp_path / f"heads{SUFFIX[form]}")
    x, mask = torch.randn(5, 4), torch.ones(5, 4)
    produced, expected = result.model(inp=x, mask=mask), model(x, mask)
    assert list(produced) == ["logits", "aux"]
    for key in expected:
        torch.testing.assert_close(produced[key], expected[key], atol=1e-5, rtol=1e-5)


class OneEntry(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc, self.kind = nn.Linear(4, 3), kind

    def forward(self, x: torch.Tensor):
        y = self.fc(x)
        return {"logits": y} if self.kind == "dict" else (y,) if self.kind == "tuple" else [y]


@pytest.mark.parametrize("form", ["pt2", "torchscript", "onnx"])
@pytest.mark.parametrize("kind", ["dict", "tuple", "list"])
def test_an_output_of_one_entry_comes_back_as_the_model_returns_it(form, kind, tmp_path):
    """A dict or tuple of one tensor came back as a bare tensor, with a note that other values were dropped (none were)."""
    torch.manual_seed(0)
    model = OneEntry(kind).eval()
    result = ts.export(model, form, torch.randn(2, 4), tmp_path / f"one{SUFFIX[form]}")
    assert not any("besides tensors" in note for note in result.report.stages[0].notes)
    x = torch.randn(5, 4)
    produced, expected = result.model(x), model(x)
    assert type(produced) is type(expected)
    torch.testing.assert_close(produced["logits"] if kind == "dict" else produced[0], model.fc(x), atol=1e-5, rtol=1e-5)


class Differences(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.diff(x, dim=1))


def test_an_operator_the_torchscript_exporter_cannot_convert_goes_through_torch_export(tmp_path, capfd):
    torch.manual_seed(0)
    model = Differences().eval()
    result = ts.export(model, "onnx", torch.randn(2, 8), tmp_path / "diff.onnx")
    stage = result.report.stages[0]
    assert stage.metrics["exporter"] == "dynamo"
    assert any("the TorchScript exporter failed" in note and "aten::diff" in note for note in stage.notes), stage.notes
    x = torch.randn(5, 8)
    torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=1e-5)
    captured = capfd.readouterr()
    assert "Torch IR graph at exception" not in captured.out + captured.err  # the exporter's graph dump stays off


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple:
        y = self.a(x)
        return y, (y + 1, {"twice": y * 2, "both": [y, -y]})


@pytest.mark.parametrize("form", ["onnx", "pt2"])
def test_nested_outputs_come_back_in_the_models_structure(form, tmp_path):
    torch.manual_seed(0)
    model = Nested().eval()
    result = ts.export(model, form, torch.randn(2, 4), tmp_path / f"nested{SUFFIX[form]}")
    assert len(result.report.stages[0].metrics["max_abs_difference"]) == 4  # batch 1 and 3, other values, negated
    model_ = ts.load(tmp_path / "nested.onnx") if form == "onnx" else result.model
    x = torch.randn(5, 4)
    produced, expected = model_(x), model(x)
    assert isinstance(produced, tuple) and isinstance(produced[1], tuple) and list(produced[1][1]) == ["twice", "both"]
    assert isinstance(produced[1][1]["both"], list)
    flat = [produced[0], produced[1][0], produced[1][1]["twice"], *produced[1][1]["both"]]
    for got, want in zip(flat, [expected[0], expected[1][0], expected[1][1]["twice"], *expected[1][1]["both"]]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class WithNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.a(x), None


def test_an_output_holding_more_than_tensors_is_noted(tmp_path):
    stage = ts.export(WithNone().eval(), "onnx", torch.randn(2, 4), tmp_path / "none.onnx").report.stages[0]
    assert any("holding NoneType besides tensors: the file has its first tensor only" in note for note in stage.notes), stage.notes


def test_a_directory_as_the_path_is_named(tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    with pytest.raises(ts.TorchslimError, match=r"model.onnx is a directory; give the file to write"):
        ts.export(Tabular().eval(), "onnx", torch.randn(2, 4), folder, overwrite=True)
    assert folder.is_dir() and not any(folder.iterdir())


class FlattenedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


@pytest.mark.parametrize("form", ["onnx", "pt2"])
def test_a_dynamic_axis_the_model_cannot_vary_is_named(form, tmp_path):
    with pytest.raises(ts.TorchslimError, match=r"dynamic_axes: FlattenedConv does not run with axis 2 of input 'input' \(8 -> 6\).*leave it out"):
        ts.export(FlattenedConv().eval(), form, torch.randn(2, 3, 8, 8), tmp_path / f"flat{SUFFIX[form]}", dynamic_axes={"input": [2]})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("form", ["onnx", "torchscript"])
def test_a_pt2e_model_exports_as_pt2_only(form, tmp_path):
    from torchslim.quantization.pt2e import CompiledModule

    compiled = CompiledModule(nn.Linear(4, 3), "Linear")  # what pt2e quantization returns: a compiled int8 graph behind a module
    with pytest.raises(ts.TorchslimError, match=f"CompiledModule is a PT2E int8 model .*export it as pt2 .*not {form}"):
        ts.export(compiled, form, torch.randn(2, 4), tmp_path / f"q{SUFFIX[form]}")
    assert not any(tmp_path.iterdir())


class FixedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(2, 6)


def test_a_model_that_runs_on_the_example_only_is_named_before_anything_is_written(tmp_path):
    with pytest.raises(ts.TorchslimError, match=r"FixedBatch runs on the example but not on its first input repeated to batch 1 .*dynamic_batch=False"):
        ts.export(FixedBatch(), "onnx", torch.randn(2, 6), tmp_path / "fixed.onnx")
    with pytest.raises(ts.TorchslimError, match=r"export of Linear as pt2 failed: Linear does not run on the example \(.*2x3"):
        ts.export(nn.Linear(4, 2), "pt2", torch.randn(2, 3), tmp_path / "linear.pt2")
    assert not any(tmp_path.iterdir())


def test_pt2_of_keyword_token_inputs_takes_any_sequence_length(tmp_path):
    """A pt2 program of BERT kept the example's length (12) and failed at 7 with a guard error, while the ONNX file
    took any length; torch.export is now asked for any length and the program checked at a shorter one. The notes say
    the loaded program takes the tensors by position. An image's channel axis is not taken for a sequence."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    bert = transformers.BertModel(config).eval()
    example = {"input_ids": torch.randint(0, 64, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    result = ts.export(bert, "pt2", example, tmp_path / "bert.pt2")
    notes = " ".join(result.report.stages[0].notes)
    assert "any sequence length (input_ids, attention_mask: axis 1)" in notes and "in this order: input_ids, attention_mask" in notes
    shorter = {"input_ids": torch.randint(0, 64, (5, 7)), "attention_mask": torch.ones(5, 7, dtype=torch.long)}
    with torch.no_grad():
        expected = bert(**shorter).last_hidden_state
        program = torch.export.load(str(tmp_path / "bert.pt2")).module()
        got = program(shorter["input_ids"], shorter["attention_mask"])
    leaves = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    assert any(t.shape == expected.shape and torch.allclose(t, expected, atol=1e-4) for t in leaves)
    returned = result.model(**shorter)
    assert torch.allclose(getattr(returned, "last_hidden_state", returned), expected, atol=1e-4)
    image = ts.export(nn.Conv2d(3, 4, 3), "pt2", {"x": torch.randn(2, 3, 8, 8)}, tmp_path / "conv.pt2").report.stages[0].notes
    assert not any("sequence" in note for note in image)


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, ids=None):  # ids: a collate function's strings, never read by the graph
        feature = torch.relu(self.body(x))
        return _Out(self.head(feature), feature)


_Out = collections.namedtuple("_Out", ["logits", "feature"])


def test_a_namedtuple_output_exports_every_field_and_comes_back_by_name(tmp_path):
    """Every field but the first was dropped, with no note."""
    torch.manual_seed(0)
    model, x = _Named().eval(), torch.randn(7, 8)
    engine = ts.export(model, "onnx", x[:2], tmp_path / "m.onnx").model
    out, reference = engine(x), model(x)
    assert type(out).__name__ == "_Out" and out._fields == ("logits", "feature")
    assert torch.allclose(out.feature, reference.feature, atol=1e-5) and torch.allclose(out.logits, reference.logits, atol=1e-5)


def test_an_engine_takes_the_batches_whose_non_tensor_entries_its_export_left_out(tmp_path):
    """Dict batches with strings from a collate function: the engine refused the entry its own export had dropped."""
    torch.manual_seed(0)
    model = _Named().eval()
    batches = [{"x": torch.randn(8, 8), "ids": [f"row{i}" for i in range(8)], "labels": torch.randint(0, 3, (8,))} for _ in range(2)]
    engine = ts.export(model, "onnx", {"x": batches[0]["x"][:2], "ids": ["a", "b"]}, tmp_path / "m.onnx").model
    assert ts.evaluate(engine, batches)["accuracy"] == ts.evaluate(model, batches)["accuracy"]
    with pytest.raises(ts.TorchslimError, match="takes inputs x, not extra"):
        engine(x=batches[0]["x"], extra=torch.zeros(8))


class _LastStep(nn.Module):
    """A GRU read at each sequence's last real step, given the lengths beside the padded ids."""

    def __init__(self):
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(50, 16), nn.GRU(16, 32, batch_first=True), nn.Linear(32, 3)

    def forward(self, input_ids, lengths):
        out, _ = self.rnn(self.embed(input_ids))
        return self.head(out[torch.arange(out.shape[0]), lengths - 1])


def test_per_example_lengths_are_cut_with_the_sequence_so_the_file_takes_any_length(tmp_path):
    """The trial at a shorter sequence kept lengths of the example's length: indexing failed, and the file was
    written for the example's length alone, with no note."""
    torch.manual_seed(0)
    model = _LastStep().eval()
    example = {"input_ids": torch.randint(1, 50, (2, 10)), "lengths": torch.tensor([10, 4])}
    engine = ts.export(model, "onnx", example, tmp_path / "gru.onnx").model
    for count, length in ((1, 4), (7, 25)):
        ids, lengths = torch.randint(1, 50, (count, length)), torch.randint(1, length + 1, (count,))
        with torch.no_grad():
            assert torch.allclose(engine(input_ids=ids, lengths=lengths), model(ids, lengths), atol=1e-5)
