import json
import subprocess
import sys

import pytest
import torch

import torchslim as ts
from torchslim.cli import main


def test_list_shows_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lenet-300-100" in out and "mnist-sample" in out and "eager" in out


@pytest.mark.slow
def test_train_evaluate_profile_round_trip(tmp_path, capsys):
    out = tmp_path / "digits.safetensors"
    report = tmp_path / "report.json"
    code = main(["train", "--model", "lenet-300-100", "--data", "digits", "--epochs", "2", "--out", str(out), "--report", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test error" in printed and "model written to" in printed
    data = json.loads(report.read_text())
    accuracy = data["stages"][0]["metrics"]["accuracy"]
    assert accuracy > 0.8
    assert main(["evaluate", str(out), "--data", "digits"]) == 0
    assert f"accuracy {100 * accuracy:.2f}%" in capsys.readouterr().out
    assert main(["profile", str(out), "--data", "digits", "--batch-sizes", "1,8", "--runs", "5"]) == 0
    assert "batch    8" in capsys.readouterr().out
    for form, suffix in (("onnx", ".onnx"), ("pt2", ".pt2"), ("torchscript", ".pt")):
        exported = tmp_path / f"digits{suffix}"
        assert main(["export", str(out), "--data", "digits", "--format", form, "--out", str(exported)]) == 0
        assert f"{form} written to {exported}" in capsys.readouterr().out and exported.is_file()
    assert main(["evaluate", str(tmp_path / "digits.onnx"), "--data", "digits"]) == 0  # the ONNX file runs in ONNX Runtime
    assert f"accuracy {100 * accuracy:.2f}%" in capsys.readouterr().out
    # the model written earlier is not overwritten without --force
    before = out.read_bytes()
    assert main(["train", "--data", "digits", "--epochs", "1", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["train", "--model", "vgg"], "error: unknown model 'vgg'; valid models:"),
        (["train", "--data", "imagenet"], "error: unknown dataset 'imagenet'; valid datasets:"),
        (["profile", "lenet-300-100", "--batch-sizes", "1,x"], "error: --batch-sizes: expected comma-separated integers"),
        (["list", "recipes-that-do-not-exist"], "error: unknown list"),
    ],
)
def test_errors_are_one_line(arguments, message, capsys):
    assert main(arguments) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_missing_data_dir_message(tmp_path, capsys):
    assert main(["evaluate", "lenet-300-100", "--data", "mnist", "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "not found; looked in" in err and str(tmp_path) in err


def test_debug_shows_traceback():
    result = subprocess.run([sys.executable, "-m", "torchslim", "--debug", "train", "--model", "vgg"], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_help_for_newcomers():
    result = subprocess.run([sys.executable, "-m", "torchslim", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--data-root" in result.stdout and "embedded" in result.stdout
    assert ts.__version__


@pytest.mark.slow
def test_prune_command(tmp_path, capsys):
    trained = tmp_path / "m.safetensors"
    assert main(["train", "--data", "digits", "--epochs", "2", "--out", str(trained)]) == 0
    pruned = tmp_path / "p.safetensors"
    assert main(["prune", str(trained), "--data", "digits", "--sparsity", "0.75", "--scope", "global", "--out", str(pruned)]) == 0
    model = ts.load(pruned)
    weights = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    zeros = sum(int((m.weight == 0).sum()) for m in (model.fc1, model.fc2, model.fc3))
    assert zeros == round(0.75 * weights)
    capsys.readouterr()
    assert main(["prune", str(trained), "--data", "digits", "--sparsity", "1.5", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_command(tmp_path, capsys):
    teacher = tmp_path / "t.safetensors"
    assert main(["train", "--data", "digits", "--epochs", "3", "--out", str(teacher)]) == 0
    student = tmp_path / "s.safetensors"
    code = main(
        [
            "distill",
            "--teacher",
            str(teacher),
            "--student",
            "mlp",
            "--student-args",
            '{"hidden": [24]}',
            "--data",
            "digits",
            "--epochs",
            "3",
            "--temperature",
            "5",
            "--out",
            str(student),
        ]
    )
    assert code == 0
    assert "student error" in capsys.readouterr().out
    model = ts.load(student)
    assert model.layers[0].out_features == 24
    assert (
        main(["distill", "--teacher", str(teacher), "--student", "mlp", "--student-args", "{bad", "--data", "digits", "--out", str(tmp_path / "x.safetensors")])
        == 1
    )
    assert "--student-args is not valid JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_command(tmp_path, capsys):
    trained = tmp_path / "m.safetensors"
    assert main(["train", "--data", "digits", "--epochs", "2", "--out", str(trained)]) == 0
    packed = tmp_path / "q.safetensors"
    assert main(["quantize", str(trained), "--data", "digits", "--scheme", "kmeans", "--bits", "4", "--layer-bits", "fc3=8", "--out", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "fc3" in out and "8 bits" in out and "test error" in out
    assert packed.stat().st_size < trained.stat().st_size / 5
    onnx_file = tmp_path / "q.onnx"
    assert main(["quantize", str(trained), "--data", "digits", "--scheme", "int8-static", "--out", str(onnx_file)]) == 0
    assert onnx_file.exists()
    capsys.readouterr()
    native = tmp_path / "native.onnx"
    assert (
        main(
            [
                "quantize",
                str(trained),
                "--data",
                "digits",
                "--scheme",
                "int8-native",
                "--calibration",
                "mse",
                "--calibration-batches",
                "4",
                "--out",
                str(native),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    before, after = [float(v.strip().rstrip("%")) for v in printed.split("test error ")[1].split(" -> ")]
    assert native.stat().st_size < trained.stat().st_size / 3 and abs(after - before) < 2.0
    assert main(["quantize", str(trained), "--data", "digits", "--scheme", "int8-native", "--calibration", "magic", "--out", str(tmp_path / "n2.onnx")]) == 1
    assert "observer must be one of" in capsys.readouterr().err
    assert main(["quantize", str(trained), "--data", "digits", "--bits", "40", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "bits must be between 1 and 16" in capsys.readouterr().err


def test_export_at_an_accuracy_level(tmp_path, capsys):
    trained = tmp_path / "m.safetensors"
    assert main(["train", "--data", "digits", "--epochs", "1", "--out", str(trained)]) == 0
    packed = tmp_path / "int4.safetensors"
    quantize = ["quantize", str(trained), "--data", "digits", "--bits", "4", "--granularity", "group", "--group-size", "16", "--asymmetric"]
    assert main([*quantize, "--out", str(packed)]) == 0
    capsys.readouterr()
    exported = tmp_path / "int4.onnx"
    assert main(["export", str(packed), "--data", "digits", "--accuracy-level", "4", "--out", str(exported)]) == 0
    printed = capsys.readouterr().out
    assert f"onnx written to {exported}" in printed and "3 MatMulNBits at accuracy level 4" in printed and "relative error" in printed
    assert main(["export", str(packed), "--data", "digits", "--format", "pt2", "--accuracy-level", "4", "--out", str(tmp_path / "x.pt2")]) == 1
    assert "applies to onnx only" in capsys.readouterr().err and not (tmp_path / "x.pt2").exists()


def test_export_with_dynamic_image_sizes(tmp_path, capsys):
    """A globally pooled convnet exported with its height and width dynamic runs in ONNX Runtime on other sizes; a
    malformed axis is named."""
    out = tmp_path / "r20.onnx"
    assert main(["export", "resnet20", "--data", "digits", "--dynamic-axis", "input:2", "--dynamic-axis", "input:3", "--out", str(out)]) == 0
    assert "onnx written to" in capsys.readouterr().out
    engine = ts.load(out)
    assert [tuple(i.shape) for i in engine.session.get_inputs()] == [("batch", 1, "input_axis2", "input_axis3")]
    assert engine(torch.randn(2, 1, 12, 16)).shape == (2, 10)
    assert main(["export", "resnet20", "--data", "digits", "--dynamic-axis", "input2", "--out", str(tmp_path / "x.onnx")]) == 1
    assert "--dynamic-axis takes INPUT:AXIS (e.g. input:2), got 'input2'" in capsys.readouterr().err


def test_recipes_command_lists_the_builtins(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ("deep-compression", "int8-static", "prune-distill", "weight-sharing", "prune-int8", "channel-slim"):
        assert name in out
    assert "prune -> quantize -> encode" in out


@pytest.mark.slow
def test_compress_inspect_evaluate(tmp_path, capsys):
    recipe = tmp_path / "quick.yaml"
    recipe.write_text(
        "name: quick\nstages:\n"
        "  - prune: {sparsity: [0.8], finetune: {epochs: 1, lr: 0.02, eval_every_epoch: false}}\n"
        "  - quantize: {weights: {scheme: kmeans, bits: 4}}\n"
        "  - encode: {}\n"
    )
    out = tmp_path / "m.tslim"
    arguments = ["compress", "--data", "digits", "--recipe", str(recipe), "--out", str(out), "--train-epochs", "4", "--no-latency"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "3 encode" in printed and "reloaded from the file: test error" in printed
    assert out.is_file() and (tmp_path / "m.tslim.report.json").is_file()
    assert not (tmp_path / "m.tslim.ckpt").exists()  # the checkpoint goes once the run is done
    report = json.loads((tmp_path / "m.tslim.report.json").read_text())
    final = report["stages"][-1]["metrics"]
    assert final["stored_bytes"] == pytest.approx(out.stat().st_size, abs=200)
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("fc1.quantized.packed" in printed and "sparse-symbols" in printed) or "symbols" in printed
    assert main(["evaluate", str(out), "--data", "digits"]) == 0
    assert f"error {100 * final['error']:.2f}%" in capsys.readouterr().out
    # a second run does not overwrite the file, and --resume needs a checkpoint
    before = out.read_bytes()
    assert main(arguments) == 1
    assert "refusing to overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(arguments + ["--resume"]) == 1  # the output is checked first, resumed or not
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(arguments + ["--resume", "--force"]) == 1
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: bad\nstages:\n  - quantize: {weights: {bitz: 3}}\n", r"error: .*stage 1 \(quantize\)\.weights: unknown key 'bitz'"),
        ("name: bad\nstages:\n  - shrink: {}\n", r"error: .*unknown stage kind 'shrink'"),
    ],
)
def test_compress_bad_recipe_is_one_line(tmp_path, capsys, text, message):
    import re

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    assert main(["compress", "--data", "digits", "--recipe", str(recipe), "--out", str(tmp_path / "x.tslim")]) == 1
    err = capsys.readouterr().err
    assert re.match(message, err) and err.count("\n") == 1
    assert not (tmp_path / "x.tslim").exists()


def test_inspect_corrupt_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "x.tslim"
    path.write_bytes(b"TSLIM\x00\x01" + b"\x10\x00\x00\x00" + b"\x00" * 4 + b"garbage garbage!")
    assert main(["inspect", str(path)]) == 1
    assert "header checksum mismatch" in capsys.readouterr().err


@pytest.mark.slow
def test_compress_a_users_own_model_from_an_import_path(tmp_path, capsys):
    """A model class given as package.module:callable plus a .pt state_dict, compressed and reloaded."""
    import torch

    from tests.conftest import TinyConvNet

    data = ts.data.load("digits")
    torch.manual_seed(0)
    model = ts.train(TinyConvNet(), data, {"epochs": 3, "lr": 0.05}, progress=False).model
    weights = tmp_path / "net.pt"
    torch.save(model.state_dict(), weights)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - prune: {sparsity: 0.5}\n  - quantize: {weights: {scheme: kmeans, bits: 6}}\n  - encode: {}\n")
    out = tmp_path / "net.tslim"
    code = main(
        [
            "compress",
            "--model",
            "tests.conftest:TinyConvNet",
            "--weights",
            str(weights),
            "--data",
            "digits",
            "--recipe",
            str(recipe),
            "--out",
            str(out),
            "--no-latency",
        ]
    )
    assert code == 0, capsys.readouterr().err
    with pytest.raises(ts.TorchslimError, match="trust_factory"):
        ts.load(out)  # the file names an import path: loading it runs code, so it must be trusted explicitly
    loaded = ts.load(out, trust_factory=True)
    assert isinstance(loaded, TinyConvNet)
    report = json.loads((tmp_path / "net.tslim.report.json").read_text())
    assert ts.evaluate(loaded, data)["error"] == pytest.approx(report["stages"][-1]["metrics"]["error"])


def test_the_technique_commands_take_an_import_path_model_only_with_its_weights(tmp_path, capsys):
    """prune, quantize and export used to build an import-path model with fresh random weights and write it as
    if it were the user's; they refuse that now, and take --weights as compress does."""
    import torch

    from tests.conftest import TinyConvNet

    data = ts.data.load("digits")
    torch.manual_seed(0)
    model = ts.train(TinyConvNet(), data, {"epochs": 1}, progress=False).model
    weights = tmp_path / "net.pt"
    torch.save(model.state_dict(), weights)
    for command in (["prune", "--sparsity", "0.5"], ["quantize", "--scheme", "kmeans"], ["export"]):
        out = tmp_path / f"{command[0]}.{'onnx' if command[0] == 'export' else 'safetensors'}"
        assert main([command[0], "tests.conftest:TinyConvNet", *command[1:], "--data", "digits", "--out", str(out)]) == 1
        assert "an import-path model is built with fresh random weights; pass its trained state with --weights" in capsys.readouterr().err
        assert not out.exists()
        code = main([command[0], "tests.conftest:TinyConvNet", *command[1:], "--weights", str(weights), "--data", "digits", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        assert out.is_file()
    own = tmp_path / "own.safetensors"  # a callable that loads its own checkpoint says so
    assert main(["prune", "tests.conftest:TinyConvNet", "--factory-trained", "--sparsity", "0.5", "--data", "digits", "--out", str(own)]) == 0
    assert own.is_file()
    pruned = ts.load(tmp_path / "prune.safetensors", trust_factory=True)
    kept = pruned.conv1.weight != 0
    assert kept.any() and torch.equal(pruned.conv1.weight[kept], model.conv1.weight.detach()[kept])  # the trained weights, pruned


def test_weights_saved_from_a_wrapper_load_into_the_model(tmp_path, capsys):
    """A state dict saved from nn.DataParallel (``module.`` before every name), a compiled model (``_orig_mod.``) or
    both (``module._orig_mod.``) loads into the model it was saved from; it used to fail on a list of missing and unexpected names."""
    import torch

    from tests.conftest import TinyConvNet

    torch.manual_seed(0)
    model = TinyConvNet().eval()
    wrappers = (("parallel", torch.nn.DataParallel(model)), ("compiled", torch.compile(model)), ("both", torch.nn.DataParallel(torch.compile(model))))
    for label, wrapped in wrappers:
        weights = tmp_path / f"{label}.pt"
        torch.save(wrapped.state_dict(), weights)
        assert main(["evaluate", "tests.conftest:TinyConvNet", "--weights", str(weights), "--data", "digits", "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["metrics"]["accuracy"] == pytest.approx(ts.evaluate(model, ts.data.load("digits"))["accuracy"])


@pytest.mark.slow
def test_compress_resume_after_interrupt(tmp_path, capsys, monkeypatch):
    from torchslim.pipeline import stages

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - prune: {sparsity: 0.7}\n  - distill: {teacher: original, train: {epochs: 1, lr: 0.01}}\n  - encode: {}\n")
    out = tmp_path / "m.tslim"
    arguments = ["compress", "--data", "digits", "--recipe", str(recipe), "--out", str(out), "--train-epochs", "3", "--no-latency"]
    original = stages.distill
    monkeypatch.setattr(stages, "distill", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(arguments) == 130
    assert "interrupted during stage 2 (distill); the checkpoint after stage 1" in capsys.readouterr().out
    assert not out.exists() and (tmp_path / "m.tslim.ckpt" / "progress.json").is_file()
    assert main(arguments) == 1  # a fresh start would throw the checkpoint away: refused
    assert "pass --resume" in capsys.readouterr().err
    monkeypatch.setattr(stages, "distill", original)
    assert main(arguments + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert "no --weights given" not in printed  # nothing retrained: the checkpoint holds the starting model
    assert out.is_file() and not (tmp_path / "m.tslim.ckpt").exists()
    report = json.loads((tmp_path / "m.tslim.report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["baseline", "1 prune", "2 distill", "3 encode"]


@pytest.mark.slow
def test_prune_structured_command(tmp_path, capsys):
    trained = tmp_path / "m.safetensors"
    assert main(["train", "--data", "digits", "--epochs", "3", "--out", str(trained)]) == 0
    pruned = tmp_path / "s.safetensors"
    code = main(["prune", str(trained), "--structured", "--sparsity", "0.5", "--data", "digits", "--finetune-epochs", "1", "--out", str(pruned)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "fewer" in printed and "channels removed" in printed
    model = ts.load(pruned)
    assert (model.fc1.out_features, model.fc2.out_features) == (150, 50)
    assert main(["evaluate", str(pruned), "--data", "digits"]) == 0
    assert (
        main(
            [
                "prune",
                str(trained),
                "--structured",
                "--sparsity",
                "0.5",
                "--importance",
                "gradient",
                "--data",
                "digits",
                "--out",
                str(tmp_path / "x.safetensors"),
            ]
        )
        == 1
    )
    assert "importance must be one of" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_main_job_runs_as_written(tmp_path):
    """`python3 -m torchslim compress` with no arguments: Deep Compression of LeNet-300-100 on the embedded sample."""
    result = subprocess.run([sys.executable, "-m", "torchslim", "compress"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 encode" in result.stdout and "reloaded from the file" in result.stdout
    out = tmp_path / "lenet-300-100-deep-compression.tslim"
    report = json.loads((tmp_path / "lenet-300-100-deep-compression.tslim.report.json").read_text())
    final = report["stages"][-1]["metrics"]
    assert final["compression"] > 30 and final["error"] < 0.1  # real compression of a working classifier
    assert ts.evaluate(ts.load(out), ts.data.load("mnist-sample"))["error"] == pytest.approx(final["error"])


@pytest.mark.slow
def test_a_hugging_face_model_folder_through_the_commands(tmp_path, capsys):
    """A ViTForImageClassification saved with save_pretrained: heads and MLP neurons pruned from the command line, the
    result evaluated from its file without any import path."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=10
    )
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    out = tmp_path / "vit-slim.safetensors"
    code = main(
        [
            "prune",
            str(tmp_path / "vit"),
            "--structured",
            "--sparsity",
            "0.5",
            "--head-ratio",
            "0.5",
            "--data",
            "digits",
            "--finetune-epochs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "mlp.fc1" in printed and "4 heads -> 2 heads" in printed and "fewer" in printed
    model = ts.load(out)
    assert isinstance(model, transformers.ViTForImageClassification)
    attention = next(m for n, m in model.named_modules() if n.endswith("layers.0.attention") or n.endswith("layer.0.attention.attention"))
    assert attention.num_attention_heads == 2 and attention.q_proj.out_features == 16
    assert main(["evaluate", str(out), "--data", "digits"]) == 0
    assert "accuracy" in capsys.readouterr().out


class RGBNet(torch.nn.Module):
    """A user's model of three-channel 28x28 images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


def test_a_users_model_that_does_not_run_on_the_default_data_is_named_before_any_work(tmp_path, capsys):
    """A saved three-channel model profiled without --data: the default (mnist-sample, one channel) does not fit it,
    and the command says so with the input it tried, rather than a shape error from deep inside."""
    path = ts.save(RGBNet(), tmp_path / "rgb.safetensors", factory="tests.test_cli:RGBNet")
    assert main(["profile", str(path), "--runs", "2", "--trust-factory"]) == 1
    error = capsys.readouterr().err
    assert "does not run on the examples of mnist-sample (input (1, 1, 28, 28))" in error and "give --data with this model's inputs" in error
