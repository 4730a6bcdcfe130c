"""Every technique on models written the way users write them (tests/zoo.py), each with its own data pipeline: a
DataLoader of real digits for the image models (pixel masks for the U-Net), text from this repository's README
for the Hugging Face language and sentence models. Unstructured and structured pruning (outputs keep their shape;
the removal is checked against zeroed channels inside), weight-only quantization, save and reload, and a two-stage
recipe on the model's task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchslim as ts
from tests import zoo
from torchslim.quantization.primitives import sqnr_db
from torchslim.tasks.batches import call_model, output_tensor

README = Path(__file__).resolve().parents[1] / "README.md"


def _digits_as_rgb(count: int | None = None):
    digits = ts.data.load("digits")

    def convert(split):
        images = F.interpolate(split.inputs[:count], size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        return images, split.targets[:count]

    return convert(digits.train), convert(digits.test)


def _image_data(segmentation: bool = False):
    (train_x, train_y), (test_x, test_y) = _digits_as_rgb(512)
    if segmentation:  # foreground / background of each pixel
        train_y, test_y = (train_x[:, 0] > 0).long(), (test_x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    return ts.Data(train=loader, eval=DataLoader(TensorDataset(test_x[:128], test_y[:128]), batch_size=64))


def _text_batches(vocab: int = 128, length: int = 32, count: int = 24, labels: bool = False):
    codes = torch.tensor([min(b, vocab - 1) for b in README.read_bytes()[: length * count * 2]], dtype=torch.long)
    windows = codes[: length * count].reshape(count, length)
    mask = torch.ones_like(windows)
    mask[::3, -5:] = 0  # some padded rows: their tail is masked out
    return [{"input_ids": windows[i : i + 8], "attention_mask": mask[i : i + 8]} for i in range(0, count, 8)]


ZOO = {
    "lambda-resnet20": dict(build=zoo.resnet20, data=_image_data, task=None, factory="tests.zoo:resnet20"),
    "torchvision-resnet18": dict(build=zoo.ResNet18, data=_image_data, task=None),
    "torchvision-mobilenetv2": dict(build=zoo.MobileNetV2, data=_image_data, task=None),
    "efficientnet-se": dict(build=zoo.EfficientNetish, data=_image_data, task=None),
    "unet": dict(build=zoo.UNet, data=lambda: _image_data(segmentation=True), task="classification"),
    "vit": dict(build=zoo.PatchViT, data=_image_data, task=None),
    "hf-bert": dict(build=lambda: zoo.bert(128), data=_text_batches, task="fidelity", hf=True, structured={"head_ratio": 0.5}),
    "hf-gpt2": dict(build=lambda: zoo.gpt2(128), data=_text_batches, task="language-modeling", hf=True),
    "hf-vit": dict(build=zoo.hf_vit, data=_image_data, task=None, hf=True, structured={"head_ratio": 0.5}),
}


def _model(name: str):
    entry = ZOO[name]
    if entry.get("hf"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    return entry["build"]().eval()


def _example(name: str):
    source = ts.data.as_source(ZOO[name]["data"]())
    return source.example(2)


def _output(model, example):
    with torch.no_grad():
        return output_tensor(call_model(model.eval(), example))


@pytest.mark.parametrize("name", list(ZOO))
def test_unstructured_pruning(name):
    model, example = _model(name), _example(name)
    result = ts.prune(model, {"sparsity": 0.5, "scope": "global"})
    assert result.report.stages[0].metrics["weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert _output(result.model, example).shape == _output(model, example).shape


@pytest.mark.parametrize("name", list(ZOO))
def test_structured_pruning_keeps_shapes_and_names_what_it_left(name):
    model, example = _model(name), _example(name)
    result = ts.prune_channels(model, {"ratio": 0.3, **ZOO[name].get("structured", {})}, example_input=example)
    stage = result.report.stages[0]
    assert _output(result.model, example).shape == _output(model, example).shape
    assert stage.metrics["macs_ratio"] > 1.05, stage.notes
    assert any(note.startswith("protected: output channels") for note in stage.notes)
    if name == "lambda-resnet20":  # the lambda pads a fixed channel count: the streams it touches stay whole
        assert any("pad of the channel axis" in note for note in stage.notes)


@pytest.mark.slow
def test_the_lambda_resnet56_of_the_bug_report():
    """ResNet-56 with the lambda shortcut, ratio 0.5, widths rounded to 8: a working model, not a shape error."""
    model = zoo.resnet56().eval()
    x = torch.randn(2, 3, 32, 32)
    result = ts.prune_channels(model, {"ratio": 0.5, "round_to": 8}, example_input=x)
    assert result.model(x).shape == (2, 10) and result.report.stages[0].metrics["macs_ratio"] > 1.3
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in result.model.parameters())


@pytest.mark.parametrize("name", list(ZOO))
def test_weight_only_quantization(name):
    model, example = _model(name), _example(name)
    result = ts.quantize(model, {"weights": {"bits": 8}})
    assert sqnr_db(_output(model, example), _output(result.model, example)) > 25


@pytest.mark.parametrize("name", list(ZOO))
def test_save_and_reload_after_structure_changes(name, tmp_path):
    model, example = _model(name), _example(name)
    changed = ts.prune_channels(model, {"ratio": 0.3, **ZOO[name].get("structured", {})}, example_input=example).model
    changed = ts.quantize(changed, {"weights": {"bits": 8}}).model
    factory = ZOO[name].get("factory")
    if factory is not None:  # its constructor takes a block class: it cannot tell how it was built
        with pytest.raises(ts.TorchslimError, match="save with factory="):
            ts.save(changed, tmp_path / "m.safetensors")
    for suffix in (".safetensors", ".tslim"):
        path = ts.save(changed, tmp_path / f"m{suffix}", factory=factory)
        loaded = ts.load(path, trust_factory=not ZOO[name].get("hf"))  # Hugging Face classes need no import path
        assert torch.equal(_output(loaded, example), _output(changed, example))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO))
def test_a_two_stage_recipe_on_the_models_task(name, tmp_path):
    model, data, task = _model(name), ZOO[name]["data"](), ZOO[name]["task"]
    if task != "fidelity":  # a few steps of training, so the task's metric means something
        model = ts.train(model, data, {"epochs": 1, "lr": 0.01, "optimizer": "adam", "max_batches_per_epoch": 12}, task=task, progress=False).model
    recipe = {
        "name": "two-stage",
        "stages": [
            {
                "prune-channels": {
                    "ratio": 0.25,
                    **ZOO[name].get("structured", {}),
                    "finetune": {"epochs": 1, "lr": 0.001, "optimizer": "adam", "max_batches_per_epoch": 6},
                }
            },
            {"quantize": {"weights": {"bits": 8}}},
        ],
    }
    result = ts.compress(model, recipe, data, task=task, latency=False, progress=False)
    stages = result.report.stages
    metric = {"fidelity": "cosine", "language-modeling": "perplexity"}.get(task, "accuracy")
    assert [s.name for s in stages] == ["baseline", "1 prune-channels", "2 quantize"] and all(metric in s.metrics for s in stages)
    assert stages[-1].metrics["macs"] < stages[0].metrics["macs"]
    if metric == "cosine":
        assert stages[-1].metrics["cosine"] > 0.5
    path = ts.save(result.model, tmp_path / "m.tslim", factory=ZOO[name].get("factory"))
    example = ts.data.as_source(data).example(2)
    assert torch.equal(_output(ts.load(path, trust_factory=True), example), _output(result.model, example))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf-gpt2", "hf-bert"])
def test_distilling_a_hugging_face_model_into_a_shallower_one(name):
    """Teacher outputs are ModelOutputs (logits for GPT-2, hidden states for BERT): read and matched all the same."""
    transformers = pytest.importorskip("transformers")
    teacher = _model(name)
    config = teacher.config.to_dict()
    config.update(n_layer=1) if name == "hf-gpt2" else config.update(num_hidden_layers=1)
    torch.manual_seed(1)
    student = type(teacher)(type(teacher.config).from_dict(config))
    task = ZOO[name]["task"]
    data = ZOO[name]["data"]()
    loss = "kl" if task == "language-modeling" else "mse"
    before = ts.evaluate(student, data, task=task, reference=teacher)
    result = ts.distill(
        student, teacher, data, {"loss": loss, "alpha": 1.0, "train": {"epochs": 3, "lr": 3e-3, "optimizer": "adam"}}, task=task, progress=False
    )
    after = result.report.stages[0].metrics
    metric = "perplexity" if task == "language-modeling" else "cosine"
    assert ts.tasks.get_task(task).better(after[metric], before[metric])
    assert isinstance(result.model, transformers.PreTrainedModel) and result.model.config.to_dict() == student.config.to_dict()


def test_a_checkpointed_run_names_a_model_it_cannot_rebuild_before_any_work(tmp_path):
    model = zoo.resnet20()
    with pytest.raises(ts.TorchslimError, match="checkpoint .*save with factory="):
        ts.compress(model, {"name": "r", "stages": [{"prune": {"sparsity": 0.5}}]}, _image_data(), checkpoint=tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()
