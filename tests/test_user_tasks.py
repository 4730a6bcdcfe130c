"""A user's own tasks and torch's own building blocks through the verbs: regression targets, a custom task's loss in
distillation, dense predictions distilled per pixel, ``nn.TransformerEncoder`` factorized and exported, a training-only
auxiliary head through channel pruning. Real data: scikit-learn's digits (its pixels as tokens, its labels as
regression values)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchslim as ts
from torchslim.core.errors import TorchslimError
from torchslim.data.embedded import load_digits
from torchslim.distillation.losses import kl_soft_targets


def _digits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return load_digits()


def regression_loaders() -> tuple[DataLoader, DataLoader]:
    """Digits as a regression: the 64 pixels (scaled to [0, 1]) to the digit's value / 9, a float target."""
    split = _digits()
    loaders = []
    for part, shuffle in (("train", True), ("test", False)):
        images, labels = split[part]
        x = images.reshape(len(images), -1).float() / 255.0
        y = labels.float().unsqueeze(1) / 9.0
        loaders.append(DataLoader(TensorDataset(x, y), batch_size=64, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    return loaders[0], loaders[1]


def token_loaders() -> tuple[DataLoader, DataLoader]:
    """Digits as sequences of 64 tokens (each pixel's level, 0..16) with their class."""
    split = _digits()
    loaders = []
    for part in ("train", "test"):
        images, labels = split[part]
        ids = (images.reshape(len(images), -1).float() * 16.0 / 255.0).round().long()
        loaders.append(DataLoader(TensorDataset(ids, labels), batch_size=64, shuffle=part == "train", generator=torch.Generator().manual_seed(0)))
    return loaders[0], loaders[1]


class Regressor(nn.Module):
    def __init__(self, features: int = 64, hidden: int = 64):
        super().__init__()
        self.features, self.hidden = features, hidden
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


def mse_task() -> ts.Task:
    def loss(model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    def evaluate(model, batches):
        total, count = 0.0, 0
        for x, y in batches:
            total += float(F.mse_loss(model(x), y, reduction="sum"))
            count += y.numel()
        return {"mse": total / count, "loss": total / count}

    return ts.Task.custom(loss=loss, evaluate=evaluate, metric="mse", higher_is_better=False)


class TokenEncoder(nn.Module):
    """A classifier over token ids built from torch's own nn.TransformerEncoder (nn.MultiheadAttention inside)."""

    def __init__(self, vocab: int = 17, dim: int = 32, heads: int = 4, depth: int = 2, classes: int = 10):
        super().__init__()
        self.vocab, self.dim, self.heads, self.depth, self.classes = vocab, dim, heads, depth, classes
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids) + self.pos).mean(dim=1))


class AuxHeadNet(nn.Module):
    """An auxiliary classifier used only in training, as torchvision's GoogLeNet and Inception v3 have."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.classes = classes
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32, classes)
        self.aux = nn.Linear(16, classes)

    def forward(self, x):
        a = F.relu(self.conv1(x))
        out = self.head(F.adaptive_avg_pool2d(F.relu(self.conv2(a)), 1).flatten(1))
        if self.training:
            return out, self.aux(F.adaptive_avg_pool2d(a, 1).flatten(1))
        return out


def test_fractional_targets_are_refused_as_class_labels_and_the_error_names_the_way_out():
    """Regression values read as labels would all fall into class 0 (a loss of 0 that trains nothing); the error says
    so and names Task.custom, and the same data trains with the user's own task."""
    train, _ = regression_loaders()
    torch.manual_seed(0)
    model = Regressor()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TorchslimError, match=r"fractional numbers .* not class labels; .*Task\.custom"):
        ts.train(model, train, {"epochs": 1}, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    result = ts.train(model, train, {"epochs": 4, "lr": 0.05}, task=mse_task(), progress=False)
    assert result.report.stages[0].metrics["mse"] < 0.08  # predicting the mean: 0.101


def test_a_one_output_model_is_refused_by_classification():
    train, _ = token_loaders()
    with pytest.raises(TorchslimError, match="1 output per example; classification needs one logit per class"):
        ts.evaluate(nn.Sequential(nn.Embedding(17, 4), nn.Flatten(), nn.Linear(256, 1)), train)


def test_distilling_with_a_custom_task_uses_its_loss_and_alpha():
    """alpha weighs the user's own loss against the teacher's outputs: alpha 0 trains on the task alone, alpha 1 on
    the teacher alone, and the two students differ; KL over a single output (always 0) is refused with the way out."""
    train, test = regression_loaders()
    task = mse_task()
    torch.manual_seed(0)
    teacher = ts.train(Regressor(hidden=128), train, {"epochs": 4, "lr": 0.05}, task=task, progress=False).model
    students = {}
    for alpha in (0.0, 1.0):
        torch.manual_seed(1)
        student = Regressor(hidden=16)
        config = {"alpha": alpha, "loss": "mse", "train": {"epochs": 2, "lr": 0.05, "eval_every_epoch": False}}
        students[alpha] = ts.distill(student, teacher, train, config, task=task, progress=False).model
    scores = {alpha: task.evaluate(model, test)["mse"] for alpha, model in students.items()}
    untrained = task.evaluate(Regressor(hidden=16), test)["mse"]
    assert scores[0.0] < 0.5 * untrained and scores[1.0] < 0.5 * untrained
    assert not torch.allclose(students[0.0].out.weight, students[1.0].out.weight)
    with pytest.raises(TorchslimError, match="soft targets .* over a single output are always equal; use loss 'mse'"):
        ts.distill(Regressor(hidden=16), teacher, train, {"loss": "kl", "train": {"epochs": 1}}, task=task, progress=False)


def test_soft_targets_of_dense_predictions_are_taken_over_the_classes():
    """(B, classes, H, W) outputs: the softmax runs over the classes, per pixel, not over the image's width."""
    torch.manual_seed(0)
    teacher = torch.randn(2, 3, 5, 7)
    assert float(kl_soft_targets(teacher.clone(), teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    # a student that shifts every pixel's logits by a per-pixel constant predicts the same distribution per pixel
    shifted = teacher + torch.randn(2, 1, 5, 7) * 3.0
    assert float(kl_soft_targets(shifted, teacher, 2.0)) == pytest.approx(0.0, abs=1e-5)
    per_pixel = F.kl_div(
        F.log_softmax(shifted.flip(1).movedim(1, -1).reshape(-1, 3) / 2.0, -1),
        F.log_softmax(teacher.movedim(1, -1).reshape(-1, 3) / 2.0, -1),
        reduction="batchmean",
        log_target=True,
    )
    assert float(kl_soft_targets(shifted.flip(1), teacher, 2.0)) == pytest.approx(4.0 * float(per_pixel), rel=1e-5)


@pytest.fixture(scope="module")
def encoder():
    train, test = token_loaders()
    torch.manual_seed(0)
    model = ts.train(TokenEncoder(), train, {"epochs": 3, "lr": 0.003, "optimizer": "adam"}, progress=False).model
    return model, train, test


def test_torchs_transformer_encoder_is_factorized_where_it_can_be_and_runs(encoder):
    """Torch's MultiheadAttention reads its output projection's weight, and its encoder layers' fused path reads
    their feed-forward weights, rather than calling them: those layers are left whole and named, the rest (the head)
    is factorized, and the model runs in eval and train mode."""
    model, train, test = encoder
    result = ts.factorize(model, {"rank": 4}, data=train)
    notes = " ".join(result.report.stages[0].notes)
    assert "encoder.layers.0.self_attn.out_proj: left whole (torch's MultiheadAttention reads its weight directly" in notes
    assert "encoder.layers.1.linear1: left whole (torch's TransformerEncoderLayer reads its weight directly" in notes
    assert isinstance(result.model.head, ts.compression.FactorizedLinear)
    ids = next(iter(test))[0][:4]
    with torch.no_grad():
        assert result.model.eval()(ids).shape == (4, 10)
        assert result.model.train()(ids).shape == (4, 10)
    budget = ts.compression.auto_narrow(model, train, {"target_macs": 0.9, "finetune": None, "ratios": [0.25, 0.5]}, progress=False)
    assert budget.report.artifacts["allocation"]["rounds"][-1]["met"]


def test_a_module_that_reads_a_factorized_layers_weight_is_named_and_the_model_kept(encoder):
    """A user's module that reads a layer's weight instead of calling it: factorizing that layer would break the
    model, so that layer stays whole and is named, the others are factorized, and the user's model stays as it was."""

    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)
            self.out = nn.Linear(32, 10)

        def forward(self, x):
            return F.linear(self.proj(x), self.out.weight)  # the weight, not the layer

    model = TiedHead()
    before = copy.deepcopy(model.state_dict())
    result = ts.factorize(model, {"rank": 2}, example_input=torch.randn(2, 32))
    assert [row["name"] for row in result.report.stages[0].layers] == ["proj"] and isinstance(result.model.out, nn.Linear)
    assert any(note.startswith("out: left whole (the model fails with it factorized") for note in result.report.stages[0].notes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchs_transformer_encoder_exports_to_onnx_and_runs_in_onnx_runtime(encoder, tmp_path):
    """Eval mode under no_grad switches torch's encoder to a fused kernel with no ONNX conversion: the export turns
    that path off (and back on after), and ONNX Runtime gives PyTorch's outputs."""
    import onnxruntime

    model, _, test = encoder
    ids = next(iter(test))[0][:8]
    path = ts.export(model, "onnx", ids, tmp_path / "encoder.onnx").report.stages[0].metrics["path"]
    assert torch.backends.mha.get_fastpath_enabled()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = session.run(None, {name: ids.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(ids).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_full_energy_keeps_every_layer_whole():
    model = Regressor()
    result = ts.factorize(model, {"energy": 1.0}, example_input=torch.randn(2, 64))
    assert result.report.stages[0].metrics["layers_factorized"] == 0
    assert not any(isinstance(m, ts.compression.FactorizedLinear) for m in result.model.modules())


def test_channel_pruning_keeps_a_training_only_head_working():
    """The eval-mode trace never sees the auxiliary head: the set feeding it is found breaking the model in train
    mode and kept (named), the rest is pruned, and the pruned model fine-tunes."""
    data = ts.data.load("digits")
    torch.manual_seed(0)
    model = AuxHeadNet()
    result = ts.prune_channels(model, {"ratio": 0.5}, data=data, finetune={"epochs": 1, "lr": 0.01}, progress=False)
    pruned = result.model
    assert pruned.conv1.out_channels == 16 and pruned.conv2.out_channels == 16
    assert any("train mode" in note and "aux" in note for note in result.report.stages[0].notes)
    x = data.test.inputs[:4]
    with torch.no_grad():
        out, aux = pruned.train()(x)
        assert out.shape == aux.shape == (4, 10) and pruned.eval()(x).shape == (4, 10)


def test_a_budget_that_may_remove_blocks_leaves_the_callers_model_in_its_mode():
    data = ts.data.load("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 64), nn.ReLU()), nn.Linear(64, 10))
    model.train()
    ts.compression.auto_narrow(model, data, {"target_macs": 0.7, "finetune": None, "depth": True, "ratios": [0.25, 0.5]}, progress=False)
    assert all(module.training for module in model.modules())


class TwoViews(nn.Module):
    """A model of two positional inputs, model(image, extra): the digit's pixels and their row sums."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.rows = nn.Linear(8, 8)
        self.head = nn.Linear(40, 10)

    def forward(self, image, rows):
        return self.head(torch.cat([self.image(image), F.relu(self.rows(rows))], dim=1))


class TwoViewDigits(torch.utils.data.Dataset):
    """((pixels, row sums), label) examples, as a user's dataset of two inputs gives them."""

    def __init__(self):
        images, self.labels = _digits()["train"]
        self.x = images.float() / 255.0
        self.rows = self.x.sum(dim=-1).reshape(len(self.x), 8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return (self.x[index], self.rows[index]), self.labels[index]


def two_view_loader() -> DataLoader:
    return DataLoader(TwoViewDigits(), batch_size=64)


def test_a_model_of_two_positional_inputs_exports_and_quantizes_in_onnx_runtime(tmp_path):
    """((image, extra), label) batches: the model trains on them, the ONNX file takes both inputs, in order, checked
    against PyTorch, and static int8 calibrates on both."""
    loader = two_view_loader()
    torch.manual_seed(0)
    model = ts.train(TwoViews(), loader, {"epochs": 4, "lr": 0.05}, progress=False).model
    assert ts.evaluate(model, loader)["accuracy"] > 0.7  # chance: 0.1
    (image, rows), _ = next(iter(loader))
    exported = ts.export(model, "onnx", (image[:4], rows[:4]), tmp_path / "two.onnx")
    engine = exported.model
    with torch.no_grad():
        assert torch.allclose(engine(image[:5], rows[:5]), model.eval()(image[:5], rows[:5]), atol=1e-5)
    result = ts.quantize(model, {"method": "onnxruntime"}, data=loader, example_input=(image[:4], rows[:4]))
    with torch.no_grad():
        int8, reference = result.model(image, rows), model(image, rows)
    assert (int8.argmax(1) == reference.argmax(1)).float().mean() > 0.9


def test_weight_only_quantization_names_the_layers_it_leaves_in_float():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.Flatten(2), nn.Conv1d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 10)
    )
    result = ts.quantize(model, {"weights": {"bits": 4}})
    notes = " ".join(result.report.stages[0].notes)
    assert "0: left in float (padding_mode 'reflect'" in notes and "left in float: 1 Conv1d" in notes
    assert [row["name"] for row in result.report.stages[0].layers] == ["5"]


def test_a_custom_metrics_value_is_printed_as_it_is_in_the_prune_notes():
    train, _ = regression_loaders()
    result = ts.prune(Regressor(), {"sparsity": 0.5}, data=train, task=mse_task())
    note = " ".join(result.report.stages[0].notes)
    assert "mse " in note and "%" not in note.split("mse ", 1)[1].split(" ")[0]


def test_a_fake_quantized_model_saves_and_loads_back(tmp_path):
    """QAT without export hands back the fake-quant model: its file rebuilds the fake-quant layers, scales and ranges
    included, and gives the same outputs."""
    data = ts.data.load("digits")
    torch.manual_seed(0)
    model = AuxHeadNet().eval()
    result = ts.quantize(model, {"method": "qat", "export": False}, data=data, finetune={"epochs": 1, "lr": 0.01}, progress=False)
    path = ts.save(result.model, tmp_path / "qat.safetensors", factory="tests.test_user_tasks:AuxHeadNet")
    loaded = ts.load(path, trust_factory=True)
    x = data.test.inputs[:8]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), result.model.eval()(x))
    assert sum(hasattr(m, "fake") for m in loaded.modules()) == 4


def test_a_model_on_the_meta_device_is_refused_with_the_way_out():
    with torch.device("meta"):
        model = Regressor()
    with pytest.raises(TorchslimError, match="on the meta device, shapes without values .*load its weights first"):
        ts.prune(model, {"sparsity": 0.5})


class RowSignal(nn.Module):
    """A Conv1d over a digit's rows as eight channels of a signal, of any length."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(F.relu(self.conv(x)).mean(dim=-1))


def test_inputs_of_another_length_than_the_exported_example_get_a_clear_error(tmp_path):
    """Batches of two lengths (a padding collate gives them): static int8 calibration says it needs one shape, and
    an exported file run on another length names the shape it takes."""
    images, labels = _digits()["train"]
    signals = images.float().reshape(len(images), 8, 8) / 255.0
    batches = [(signals[:32], labels[:32]), (signals[32:64, :, :6], labels[32:64])]
    model = RowSignal()
    with pytest.raises(TorchslimError, match=r"come in 2 shapes .*pad or crop the calibration batches to one shape"):
        ts.quantize(model, {"method": "onnxruntime"}, data=batches, example_input=signals[:2])
    engine = ts.export(model, "onnx", signals[:2], tmp_path / "signal.onnx").model
    assert engine(signals[:3]).shape == (3, 10)
    with pytest.raises(TorchslimError, match=r"takes inputs of shape .*got .*\(3, 8, 6\)"):
        engine(signals[:3, :, :6])


def test_a_batch_of_several_inputs_is_told_from_one_argument_that_is_a_tuple():
    """((a, b), y) with one batch size is model(a, b); a tuple of images of several sizes with per-image target
    mappings (detection data) stays one argument, as it was."""
    from torchslim.tasks.batches import model_inputs

    a, b, y = torch.zeros(4, 3), torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)
    assert model_inputs(((a, b), y)) == ((a, b), {})
    images = (torch.zeros(3, 20, 30), torch.zeros(3, 24, 18))
    targets = ({"boxes": torch.zeros(1, 4)}, {"boxes": torch.zeros(2, 4)})
    args, _ = model_inputs((images, targets))
    assert len(args) == 1 and args[0] is images


def test_a_custom_tasks_metric_heads_the_compress_report():
    """The report of a user's regression run through ``compress`` shows its own metric (mse) as the headline column,
    in the console table, the Markdown document and the summary line, not the loss or a percentage."""
    from torchslim.report.console import stage_rows
    from torchslim.report.markdown import headline_key

    train, test = regression_loaders()
    torch.manual_seed(0)
    model = ts.train(Regressor(), train, {"epochs": 3, "lr": 0.01, "optimizer": "adam"}, task=mse_task(), progress=False).model
    recipe = {"name": "user", "stages": [{"prune": {"sparsity": 0.5}}, {"quantize": {"weights": {"bits": 8}}}]}
    report = ts.compress(model, recipe, test, task=mse_task(), latency=False, progress=False).report
    assert headline_key([s.metrics for s in report.stages]) == ("mse", "mse")
    headers, rows = stage_rows(report)
    assert headers[1] == "mse" and float(rows[0][1]) == pytest.approx(report.stages[0].metrics["mse"], rel=1e-3)
    document = report.render("markdown")
    assert "| stage | executed as | mse |" in document
    first, last = report.stages[0].metrics["mse"], report.stages[-1].metrics["mse"]
    assert f"mse: {first:.4g} -> {last:.4g}." in document


def test_a_signal_model_exports_with_a_dynamic_length_and_runs_on_every_length(tmp_path):
    """A Conv1d over signals of any length, exported with ``dynamic_axes``: the file is checked a quarter shorter than
    the example and gives PyTorch's outputs at lengths it never saw; an axis the input lacks is named."""
    images, _ = _digits()["train"]
    signals = images.float().reshape(len(images), 8, 8) / 255.0
    long_signals = signals.repeat(1, 1, 3)  # 24 steps
    model = RowSignal().eval()
    result = ts.export(model, "onnx", signals[:2], tmp_path / "signal.onnx", dynamic_axes={"input": {2: "length"}})
    metrics = result.report.stages[0].metrics
    assert metrics["dynamic_axes"] == {"input": {2: "length"}} and "length shorter: (2, 8, 6)" in metrics["max_abs_difference"]
    with torch.no_grad():
        for x in (signals[:5, :, :3], signals[:5], long_signals[:5]):
            assert torch.allclose(result.model(x), model(x), atol=1e-5)
    with pytest.raises(TorchslimError, match=r"dynamic_axes\['input'\] names axis 3; the input has 3 axes \(2, 8, 8\)"):
        ts.export(model, "onnx", signals[:2], tmp_path / "bad.onnx", dynamic_axes={"input": {3: "length"}})
    with pytest.raises(TorchslimError, match=r"dynamic_axes names inputs \['signal'\]; the model's inputs are \['input'\]"):
        ts.export(model, "onnx", signals[:2], tmp_path / "bad.onnx", dynamic_axes={"signal": [2]})
    assert not (tmp_path / "bad.onnx").exists()
    program = ts.export(model, "pt2", signals[:2], tmp_path / "signal.pt2", dynamic_axes={"input": [2]}).model
    with torch.no_grad():
        assert torch.allclose(program(long_signals[:3]), model(long_signals[:3]), atol=1e-5)


class SlicedPositions(TokenEncoder):
    """Token ids of any length up to 64: the learned positions are sliced to the input's length."""

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids) + self.pos[:, : ids.shape[1]]).mean(dim=1))


def test_token_ids_given_positionally_export_with_a_dynamic_sequence_where_the_model_allows_it(tmp_path):
    """Token ids as one positional tensor: the sequence is dynamic where the model runs on other lengths (its positions
    sliced), and stays the example's where it does not (positions of one fixed length)."""
    ids = _digits()["test"][0].reshape(-1, 64)[:4].long() * 16 // 255
    torch.manual_seed(0)
    sliced, fixed = SlicedPositions().eval(), TokenEncoder().eval()
    engine = ts.export(sliced, "onnx", ids, tmp_path / "sliced.onnx").model
    with torch.no_grad():
        assert torch.allclose(engine(ids[:3, :40]), sliced(ids[:3, :40]), atol=1e-4)
    engine = ts.export(fixed, "onnx", ids, tmp_path / "fixed.onnx").model
    assert [tuple(i.shape) for i in engine.session.get_inputs()] == [("batch", 64)]


class TwoHeads(nn.Module):
    """A classifier that also returns its embedding (for retrieval), as a tuple, or as a dict."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.as_dict = as_dict
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        embedding = self.body(x)
        logits = self.head(embedding)
        return {"logits": logits, "embedding": embedding} if self.as_dict else (logits, F.normalize(embedding, dim=1))


def test_a_model_of_several_outputs_exports_every_output_and_the_file_returns_them_as_the_model_does(tmp_path):
    """Every output of a tuple or dict is an ONNX output, checked against PyTorch and handed back in the model's own
    structure (the file's metadata records it, so a reloaded file does too); the task reads the first, as it does
    from the PyTorch model."""
    split = _digits()
    x = split["test"][0].reshape(-1, 64).float()[:16] / 255.0
    for as_dict in (False, True):
        torch.manual_seed(0)
        model = TwoHeads(as_dict).eval()
        path = tmp_path / f"two-{as_dict}.onnx"
        result = ts.export(model, "onnx", x[:2], path)
        reloaded = ts.load(path)
        with torch.no_grad():
            expected = model(x)
        for engine in (result.model, reloaded):
            produced = engine(x)
            assert type(produced) is type(expected)
            pairs = zip(produced.values(), expected.values()) if as_dict else zip(produced, expected)
            assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs)
        names = [o.name for o in reloaded.session.get_outputs()]
        assert names == (["logits", "embedding"] if as_dict else ["output", "output_1"])
    images, labels = split["test"]
    data = [(images.reshape(-1, 64).float() / 255.0, labels)]
    assert ts.evaluate(result.model, data)["accuracy"] == ts.evaluate(model, data)["accuracy"]


class BranchingSecondOutput(TwoHeads):
    """Its second output takes a branch by the batch size, which a TorchScript trace records as one fixed path."""

    def forward(self, x):
        logits, embedding = super().forward(x)
        return logits, embedding * 2 if x.shape[0] > 2 else embedding


def test_the_export_check_covers_every_output(tmp_path):
    """A traced path that is wrong in the second output only (batch 3 takes the other branch) is caught: nothing is
    written."""
    x = _digits()["test"][0].reshape(-1, 64).float()[:4] / 255.0
    with pytest.raises(TorchslimError, match=r"torchscript file differs from the PyTorch model .*'3': 0\.[1-9]"):
        ts.export(BranchingSecondOutput().eval(), "torchscript", x[:1], tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()


class ListOfViews(nn.Module):
    """A model of several views taking them as one list, ``forward(views)``, as multi-crop and multi-modal code does."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(64, 32))
        self.rows = nn.Linear(8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, views):
        image, rows = views
        return self.head(F.relu(self.image(image) + self.rows(rows)))


def test_a_model_that_takes_its_views_as_one_list_gets_them_as_one_list(tmp_path):
    """``((v1, v2), y)`` batches are ``model(v1, v2)`` for a forward of two inputs and ``model([v1, v2])`` for a
    forward of one: training, evaluation, distillation, pruning and both exports run on such a model."""
    from torchslim.tasks.batches import call_model, model_inputs

    loader = two_view_loader()
    (image, rows), labels = next(iter(loader))
    args, _ = model_inputs(((image, rows), labels), ListOfViews())
    assert len(args) == 1 and [v.shape for v in args[0]] == [image.shape, rows.shape]
    assert model_inputs(((image, rows), labels), TwoViews())[0] == (image, rows)
    torch.manual_seed(0)
    model = ts.train(ListOfViews(), loader, {"epochs": 3, "lr": 0.05}, progress=False).model
    accuracy = ts.evaluate(model, loader)["accuracy"]
    assert accuracy > 0.7  # chance: 0.1
    student = ts.distill(ListOfViews(), model, loader, {"train": {"epochs": 3, "lr": 0.05}}, progress=False).model
    assert ts.evaluate(student, loader)["accuracy"] > 0.5
    pruned = ts.prune(model, {"sparsity": 0.5}, data=loader).model
    assert abs(ts.evaluate(pruned, loader)["accuracy"] - accuracy) < 0.2
    for form in ("onnx", "pt2"):
        exported = ts.export(model, form, (image[:4], rows[:4]), tmp_path / f"views.{form}").model
        with torch.no_grad():
            assert torch.allclose(call_model(exported, (image[:5], rows[:5])), model.eval()([image[:5], rows[:5]]), atol=1e-5)
