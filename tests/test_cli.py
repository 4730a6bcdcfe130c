import json
import subprocess
import sys

import pytest

import torchslim as ts
from torchslim.cli import main


def test_list_shows_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "lenet-300-100" in out and "mnist-sample" in out and "eager" in out


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


def test_distill_command(tmp_path, capsys):
    teacher = tmp_path / "t.safetensors"
    assert main(["train", "--data", "digits", "--epochs", "3", "--out", str(teacher)]) == 0
    student = tmp_path / "s.safetensors"
    code = main(["distill", "--teacher", str(teacher), "--student", "mlp", "--student-args", '{"hidden": [24]}',
                 "--data", "digits", "--epochs", "3", "--temperature", "5", "--out", str(student)])
    assert code == 0
    assert "student error" in capsys.readouterr().out
    model = ts.load(student)
    assert model.layers[0].out_features == 24
    assert main(["distill", "--teacher", str(teacher), "--student", "mlp", "--student-args", "{bad", "--data", "digits", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "--student-args is not valid JSON" in capsys.readouterr().err


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
    assert main(["quantize", str(trained), "--data", "digits", "--bits", "40", "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "bits must be between 1 and 16" in capsys.readouterr().err
