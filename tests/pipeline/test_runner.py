import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.errors import TorchslimError
from torchslim.pipeline import CompressInterrupted, checkpoint_status, load_recipe
from torchslim.pipeline import stages as stages_module

pytestmark = pytest.mark.slow  # every test here trains or runs a recipe

SMALL = {
    "name": "small-deep-compression",
    "stages": [
        {"prune": {"sparsity": [0.5, 0.8], "scope": "global", "finetune": {"epochs": 1, "lr": 0.02, "batch_size": 64, "eval_every_epoch": False}}},
        {"finetune": {"epochs": 1, "lr": 0.01, "batch_size": 64, "eval_every_epoch": False}},
        {
            "quantize": {
                "weights": {"scheme": "kmeans", "bits": 4},
                "finetune": {"epochs": 1, "optimizer": "adam", "lr": 0.001, "batch_size": 64, "eval_every_epoch": False},
            }
        },
        {"encode": {}},
    ],
}


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    return ts.train(ts.models.create_for("lenet-300-100", digits), digits, {"epochs": 8, "lr": 0.05}, progress=False).model


def _interrupt_at_call(number: int, function):
    """``function``, except that its ``number``-th call raises KeyboardInterrupt (Ctrl-C at that point)."""
    calls = {"count": 0}

    def interrupted(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == number:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return interrupted


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_stage_is_evaluated_and_measured(trained, digits):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    result = ts.compress(trained, SMALL, digits, latency=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())  # the input model is untouched
    stages = result.report.stages
    assert [s.name for s in stages] == ["baseline", "1 prune", "2 finetune", "3 quantize", "4 encode"]
    for stage in stages:
        for key in ("accuracy", "error", "parameters", "nonzeros", "macs", "stored_bytes", "compression", "latency_median_ms"):
            assert key in stage.metrics, (stage.name, key)
    weights = sum(m.weight.numel() for m in (trained.fc1, trained.fc2, trained.fc3))
    assert stages[0].metrics["parameters"] == stages[-1].metrics["parameters"] == ts.measure.count_parameters(trained)
    assert stages[1].metrics["nonzeros"] == stages[0].metrics["nonzeros"] - round(0.8 * weights)
    assert stages[0].metrics["macs"] == stages[-1].metrics["macs"] == weights  # dense execution counted honestly
    sizes = [s.metrics["stored_bytes"] for s in stages]
    assert sizes[0] > sizes[1] > sizes[3] > sizes[4]  # pruning, then codebooks, then entropy coding shrink the file
    assert stages[-1].metrics["bytes_as"] == ".tslim, entropy-coded"
    assert stages[-1].metrics["error"] < 0.2  # still a working classifier on the real digits
    assert any("after fine-tuning" in note for note in stages[1].notes)
    assert any("codebook fine-tuning" in note for note in stages[3].notes)


def test_compressed_file_rebuilds_the_model_exactly(trained, digits, tmp_path):
    result = ts.compress(trained, SMALL, digits, latency=False, progress=False)
    path = result.save(tmp_path / "model.tslim")
    assert path.stat().st_size == pytest.approx(result.report.stages[-1].metrics["stored_bytes"], abs=200)  # metadata aside
    assert (tmp_path / "model.tslim.report.json").is_file()
    loaded = ts.load(path)
    assert _states_equal(result.model, loaded)
    assert ts.evaluate(loaded, digits) == ts.evaluate(result.model, digits)


def test_pruned_weights_stay_zero_through_every_fine_tuning(trained, digits):
    recipe = load_recipe(SMALL).with_stage(2, finetune={"epochs": 2, "optimizer": "adam", "lr": 0.01, "eval_every_epoch": False})
    result = ts.compress(trained, recipe, digits, latency=False, progress=False)
    pruned_after_prune = result.report.stages[1].metrics["nonzeros"]
    assert result.report.stages[-1].metrics["nonzeros"] == pruned_after_prune
    codebook = result.model.fc1.quantized.codebook
    assert (codebook == 0).sum() == 1  # the pruned weights' centroid stayed exactly zero while the others moved


def test_interrupted_run_resumes_to_the_same_model(trained, digits, tmp_path, monkeypatch):
    uninterrupted = ts.compress(trained, SMALL, digits, latency=False, progress=False)
    folder = tmp_path / "ckpt"
    original = stages_module.quantize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages_module, "quantize", interrupted)
    with pytest.raises(CompressInterrupted, match=r"during stage 3 \(quantize\); the checkpoint after stage 2 is in .*--resume"):
        ts.compress(trained, SMALL, digits, checkpoint=folder, latency=False, progress=False)
    assert checkpoint_status(folder) == {"recipe": "small-deep-compression", "completed": 2, "stages": 4, "step": 0}
    # starting over on the same folder without resume is refused: the checkpoint is not overwritten
    with pytest.raises(TorchslimError, match="holds a checkpoint"):
        ts.compress(trained, SMALL, digits, checkpoint=folder, latency=False, progress=False)
    monkeypatch.setattr(stages_module, "quantize", original)
    resumed = ts.compress(trained, SMALL, digits, checkpoint=folder, resume=True, latency=False, progress=False)
    assert [s.name for s in resumed.report.stages] == [s.name for s in uninterrupted.report.stages]
    assert _states_equal(resumed.model, uninterrupted.model)
    assert checkpoint_status(folder)["completed"] == 4
    # a different recipe cannot continue this checkpoint
    with pytest.raises(TorchslimError, match="different recipe"):
        ts.compress(trained, load_recipe(SMALL).with_stage(1, epochs=3), digits, checkpoint=folder, resume=True, latency=False)


def _interrupted_in_finetune(trained, digits, tmp_path, monkeypatch, sparsity: float) -> dict:
    """A prune-then-finetune recipe run until Ctrl-C in its fine-tuning (checkpoint in tmp_path / "c"); returns it."""
    recipe = {"name": "p", "stages": [{"prune": {"sparsity": [sparsity]}}, {"finetune": {"epochs": 1, "lr": 0.05, "eval_every_epoch": False}}]}
    original = stages_module.fit
    monkeypatch.setattr(stages_module, "fit", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(CompressInterrupted):
        ts.compress(trained, recipe, digits, checkpoint=tmp_path / "c", latency=False, progress=False)
    monkeypatch.setattr(stages_module, "fit", original)
    return recipe


def test_masks_are_restored_on_resume(trained, digits, tmp_path, monkeypatch):
    """Resuming after the prune stage keeps pruned weights at zero through the next fine-tuning."""
    recipe = _interrupted_in_finetune(trained, digits, tmp_path, monkeypatch, 0.9)
    result = ts.compress(trained, recipe, digits, checkpoint=tmp_path / "c", resume=True, latency=False, progress=False)
    assert result.report.stages[-1].metrics["nonzeros"] == result.report.stages[1].metrics["nonzeros"]


def test_int8_export_stage_runs_in_onnx_runtime(trained, digits, tmp_path):
    result = ts.compress(trained, "int8-static", digits, export_path=tmp_path / "m.onnx", latency=True, progress=False)
    stage = result.report.stages[-1]
    assert stage.execution == "ONNX Runtime" and (tmp_path / "m.onnx").is_file() and result.files["onnx"] == tmp_path / "m.onnx"
    assert stage.metrics["stored_bytes"] == (tmp_path / "m.onnx").stat().st_size < result.report.stages[0].metrics["stored_bytes"] / 2.5
    assert abs(stage.metrics["accuracy"] - result.report.stages[0].metrics["accuracy"]) < 0.03
    # the result is the engine the last stage describes (it was the float model), the float model beside it
    from torchslim.export.onnx import OnnxModule

    assert isinstance(result.model, OnnxModule) and result.float_model is not None
    assert ts.evaluate(result.model, digits)["accuracy"] == pytest.approx(stage.metrics["accuracy"])
    with pytest.raises(TorchslimError, match="ends in an int8 engine"):
        result.save(tmp_path / "m.tslim")
    assert ts.evaluate(ts.load(result.save(tmp_path / "again.onnx")), digits)["accuracy"] == pytest.approx(stage.metrics["accuracy"])
    with pytest.raises(TorchslimError, match="export_path"):
        ts.compress(trained, "int8-static", digits)


def test_int8_quantize_stage_and_native_export_run_in_onnx_runtime(trained, digits, tmp_path):
    """The quantize stage takes every method of the quantize verb; an int8 engine ends the recipe."""
    for index, stage in enumerate(
        [
            {"quantize": {"method": "native-int8", "calibration_batches": 4}},
            {"export": {"int8": {"method": "native-int8", "observer": "mse", "calibration_batches": 4}}},
        ]
    ):
        path = tmp_path / f"n{index}.onnx"
        result = ts.compress(trained, {"name": "n", "stages": [stage]}, digits, export_path=path, latency=False, progress=False)
        final = result.report.stages[-1]
        assert path.is_file() and final.metrics["stored_bytes"] == path.stat().st_size
        assert "ONNX Runtime" in final.execution and abs(final.metrics["accuracy"] - result.report.stages[0].metrics["accuracy"]) < 0.03


def test_prune_distill_recipe(trained, digits):
    recipe = load_recipe("prune-distill").with_stage(1, train={"epochs": 2, "lr": 0.01, "eval_every_epoch": False})
    result = ts.compress(trained, recipe, digits, latency=False, progress=False)
    pruned, distilled = result.report.stages[1], result.report.stages[2]
    assert distilled.metrics["nonzeros"] == pruned.metrics["nonzeros"]  # masks stay while distilling
    assert distilled.metrics["error"] <= pruned.metrics["error"]
    assert "teacher accuracy" in distilled.notes[0]


def test_compress_takes_a_list_of_batches(trained, digits):
    """Any iterable of batches is data: the same recipe on the digits as a list of (inputs, labels) batches."""
    batches = list(digits.loader("train", batch_size=64, shuffle=True))
    data = ts.Data(train=batches, eval=list(digits.loader("test", batch_size=256)))
    recipe = {"name": "r", "stages": [{"prune": {"sparsity": 0.5, "finetune": {"epochs": 1, "lr": 0.01}}}, {"encode": {}}]}
    result = ts.compress(trained, recipe, data, latency=False, progress=False)
    assert result.report.stages[-1].metrics["examples"] == len(digits.test)
    assert result.report.stages[-1].metrics["accuracy"] > 0.8


def test_channel_pruning_stage_shrinks_the_model_and_the_file_reloads(digits, tmp_path):
    torch.manual_seed(0)
    model = ts.train(ts.models.create_for("lenet-300-100", digits, hidden=(64, 32)), digits, {"epochs": 5}, progress=False).model
    recipe = {
        "name": "slim",
        "stages": [
            {"prune-channels": {"ratio": 0.5, "finetune": {"epochs": 2, "lr": 0.02, "eval_every_epoch": False}}},
            {"quantize": {"weights": {"scheme": "uniform", "bits": 8}}},
            {"encode": {}},
        ],
    }
    result = ts.compress(model, recipe, digits, latency=False, progress=False)
    baseline, pruned = result.report.stages[0], result.report.stages[1]
    assert pruned.metrics["macs"] < baseline.metrics["macs"] / 1.8 and "MACs" in pruned.notes[0]
    assert (result.model.fc1.out_features, result.model.fc2.out_features) == (32, 16)
    assert result.report.stages[-1].metrics["error"] < 0.25
    path = result.save(tmp_path / "slim.tslim")
    loaded = ts.load(path)  # channel-pruned shapes and quantized layers both rebuilt from the spec
    x = digits.example_input(5)
    assert torch.equal(loaded(x), result.model(x))


def test_an_interrupt_inside_the_prune_stage_loses_one_step_at_most(trained, digits, tmp_path, monkeypatch):
    """Ctrl-C during the second pruning step: the checkpoint holds the first step; resuming runs the rest and ends
    where an uninterrupted run ends."""
    from torchslim.pruning import unstructured

    recipe = {
        "name": "steps",
        "stages": [
            {"prune": {"sparsity": [0.5, 0.7, 0.9], "scope": "global", "finetune": {"epochs": 1, "lr": 0.02, "eval_every_epoch": False}}},
            {"encode": {}},
        ],
    }
    uninterrupted = ts.compress(trained, recipe, digits, latency=False, progress=False)
    original = unstructured.fit
    monkeypatch.setattr(unstructured, "fit", _interrupt_at_call(2, original))
    folder = tmp_path / "c"
    with pytest.raises(CompressInterrupted, match=r"the checkpoint after step 1 of stage 1 is in"):
        ts.compress(trained, recipe, digits, checkpoint=folder, latency=False, progress=False)
    assert checkpoint_status(folder) == {"recipe": "steps", "completed": 0, "stages": 2, "step": 1}
    monkeypatch.setattr(unstructured, "fit", original)
    resumed = ts.compress(trained, recipe, digits, checkpoint=folder, resume=True, latency=False, progress=False)
    assert _states_equal(resumed.model, uninterrupted.model)
    assert [s.name for s in resumed.report.stages] == ["baseline", "1 prune", "2 encode"]


@pytest.mark.parametrize("kind", ["finetune", "distill"])
def test_an_interrupt_inside_a_training_stage_loses_one_epoch_at_most(trained, digits, tmp_path, monkeypatch, kind):
    """Ctrl-C in the third epoch of a fine-tuning or distillation stage: the checkpoint holds two epochs with the
    optimizer's momentum; resuming trains the rest and ends exactly where an uninterrupted run ends."""
    import importlib

    fit_module = importlib.import_module("torchslim.train.fit")

    train = {"epochs": 3, "lr": 0.02, "batch_size": 64, "eval_every_epoch": False, "max_batches_per_epoch": 6}
    stage = {"finetune": train} if kind == "finetune" else {"distill": {"temperature": 4.0, "train": {**train, "optimizer": "adam", "lr": 0.001}}}
    recipe = {"name": "epochs", "stages": [{"prune": {"sparsity": 0.8}}, stage, {"encode": {}}]}
    uninterrupted = ts.compress(trained, recipe, digits, latency=False, progress=False)
    original = fit_module.learning_rate_factor
    monkeypatch.setattr(fit_module, "learning_rate_factor", _interrupt_at_call(2 * 6 + 3, original))  # 4th batch of epoch 3
    folder = tmp_path / "c"
    with pytest.raises(CompressInterrupted, match=rf"during stage 2 \({kind}\); the checkpoint after stage 1 and step 2 of stage 2 is in"):
        ts.compress(trained, recipe, digits, checkpoint=folder, latency=False, progress=False)
    assert (folder / "training.safetensors").is_file()
    monkeypatch.setattr(fit_module, "learning_rate_factor", original)
    resumed = ts.compress(trained, recipe, digits, checkpoint=folder, resume=True, latency=False, progress=False)
    assert _states_equal(resumed.model, uninterrupted.model)
    assert not folder.exists() or not (folder / "training.safetensors").exists()


def test_a_stage_that_fails_after_others_says_they_completed_and_why_nothing_was_kept(digits):
    model = ts.models.create_for("lenet-300-100", digits)
    recipe = {"name": "x", "stages": [{"prune": {"sparsity": 0.5}}, {"narrow": {"width": 0.5}}, {"factorize": {"ratio": 0.0001}}]}
    with pytest.raises(TorchslimError, match=r"stage 3 \(factorize\) stopped: .*; stages 1 to 2 had completed, but no checkpoint folder was given"):
        ts.compress(model, recipe, digits, latency=False, progress=False)


@pytest.mark.parametrize("index_bits", [None, [8]])
def test_the_encode_stage_measures_the_file_the_result_saves(tmp_path, index_bits):
    """The stage measured the model without the recipe's metadata (41 bytes short of the file), and the saved file
    ignored the stage's index_bits."""
    torch.manual_seed(0)
    data = ts.data.load("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    encode = {"index_bits": index_bits} if index_bits else {}
    recipe = {"name": "sized", "stages": [{"prune": {"sparsity": 0.8}}, {"quantize": {"weights": {"scheme": "kmeans", "bits": 4}}}, {"encode": encode}]}
    result = ts.compress(model, recipe, data, latency=False, progress=False)
    path = result.save(tmp_path / "m.tslim")
    assert path.stat().st_size == result.report.stages[-1].metrics["stored_bytes"]


def test_a_run_resumed_on_other_data_is_refused(trained, digits, tmp_path, monkeypatch):
    """``--resume`` with another ``--data`` finished with no warning, its report mixing two datasets (the baseline on
    one, the later stages on the other)."""
    recipe = _interrupted_in_finetune(trained, digits, tmp_path, monkeypatch, 0.5)
    other = ts.Data(train=(digits.train.inputs, digits.train.targets), eval=(digits.test.inputs[:300], digits.test.targets[:300]))
    with pytest.raises(TorchslimError, match=rf"started on other data \(the original model's examples {len(digits.test)} then, 300 now"):
        ts.compress(trained, recipe, other, checkpoint=tmp_path / "c", resume=True, latency=False, progress=False)
    assert ts.compress(trained, recipe, digits, checkpoint=tmp_path / "c", resume=True, latency=False, progress=False).report.stages[-1].kind == "finetune"


def test_quantization_aware_training_after_pruning_keeps_the_pruned_weights_at_zero(trained, digits, tmp_path):
    """A prune stage then a QAT stage was refused ("fold the masks first with make_permanent", which a recipe cannot
    do between stages), after the pruning had run. QAT now trains the pruned layers with their zeros held."""
    recipe = {
        "name": "prune-qat",
        "stages": [{"prune": {"sparsity": 0.5}}, {"quantize": {"method": "qat", "finetune": {"epochs": 1, "lr": 0.001, "optimizer": "adam"}}}],
    }
    result = ts.compress(trained, recipe, digits, export_path=tmp_path / "m.onnx", latency=False, progress=False)
    assert result.float_model is not None
    for name, module in result.float_model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            assert float((module.weight == 0).float().mean()) >= 0.5, name
    assert abs(result.report.stages[-1].metrics["accuracy"] - result.report.stages[1].metrics["accuracy"]) < 0.05


class _AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.attention, self.head = nn.Linear(8, 16), nn.MultiheadAttention(16, 4, batch_first=True), nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        return self.head((x + self.attention(x, x, x, need_weights=False)[0]).mean(1))


def test_the_macs_of_non_zeros_count_what_no_layer_row_holds():
    """An nn.MultiheadAttention's products have no layer row (its weight is in_proj_weight): a dense model was reported
    with 'MACs of non-zeros' of half its MACs. Only what the rows' zeros save comes off now."""
    data = [(torch.randn(4, 5, 8), torch.randint(0, 3, (4,))) for _ in range(2)]
    recipe = {"name": "p", "stages": [{"prune": {"sparsity": 0.5, "layers": {"include": ["head"]}}}]}
    result = ts.compress(_AttentionNet(), recipe, data, latency=False, progress=False)
    baseline, pruned = result.report.stages[0].metrics, result.report.stages[-1].metrics
    assert "sparse_macs" not in baseline
    head = next(row for row in result.report.stages[-1].layers if row["name"] == "head")
    assert pruned["sparse_macs"] == pruned["macs"] - (head["macs"] - head["sparse_macs"]) and pruned["sparse_macs"] > pruned["macs"] / 2
