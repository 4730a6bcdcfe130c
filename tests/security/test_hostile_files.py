"""Hostile files and careless input, each attack as it was tried against torchslim: forged files with their checksums
recomputed (tests/security/corpus/), planted checkpoints, a user's files in the way, non-finite and half-precision
weights, tied weights, labels out of range, an output folder that cannot be written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import torchslim as ts
from tests import zoo
from tests.security.corpus import CASES, FOLDER
from torchslim.cli import main
from torchslim.codec.reader import inspect_tslim, read_tslim
from torchslim.core.errors import TorchslimError
from torchslim.pipeline import checkpoint_status, load_recipe

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


# -- the corpus: every forged file gives its own error ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_hostile_file_gives_its_error(name):
    message = CASES[name][1]
    readers = [ts.load, inspect_tslim] if name.endswith(".tslim") else [ts.load]
    for read in readers:
        with pytest.raises(TorchslimError, match=re.escape(message)):
            read(FOLDER / name)


def test_the_corpus_is_what_its_checksums_say():
    """The files are the ones corpus.py builds (a stray edit would test something else)."""
    import hashlib

    listed = dict(line.split("  ")[::-1] for line in (FOLDER / "SHA256SUMS").read_text().splitlines())
    assert set(listed) == set(CASES)
    for name, digest in listed.items():
        assert hashlib.sha256((FOLDER / name).read_bytes()).hexdigest() == digest, name


def test_the_corpus_is_read_in_bounded_memory():
    """All of it in a fresh process: the peak stays near what importing torch costs, whatever the files declare
    (2^31 symbols, 2^31 elements, a 64 MiB+ header, in_features 10^9, hidden 40,000 x 40,000)."""
    script = (
        "import resource, torch, torchslim as ts\n"
        "from tests.security.corpus import CASES, FOLDER\n"
        "from torchslim.codec.reader import inspect_tslim\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for name in CASES:\n"
        "    for read in (ts.load, inspect_tslim) if name.endswith('.tslim') else (ts.load,):\n"
        "        try:\n"
        "            read(FOLDER / name)\n"
        "        except ts.TorchslimError:\n"
        "            pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) < 256, f"reading the corpus raised the peak by {done.stdout.split()[-1]} MiB"


# -- what a checkpoint or a file names is never run, what a user had is never lost -------------------------------


def _recipe(tmp_path: Path) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - prune: {sparsity: 0.5}\n  - encode: {}\n")
    return recipe


def _weights(tmp_path: Path) -> Path:
    from tests.conftest import TinyConvNet

    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.save(TinyConvNet().state_dict(), path)
    return path


def test_a_planted_checkpoint_cannot_run_its_import_path(tmp_path, capsys):
    """--resume builds the model from the import path the user names, never from the one the checkpoint holds."""
    out = tmp_path / "m.tslim"
    folder = tmp_path / "m.tslim.ckpt"
    folder.mkdir()
    sentinel = tmp_path / "planted-code-ran"
    planted = ts.models.create("lenet-300-100", in_features=64)
    from safetensors.torch import save_file

    from torchslim.io.modelfile import _digest, state_for_saving

    tensors = state_for_saving(planted)
    spec = {"factory": "os:system", "kwargs": {"command": f"touch {sentinel}"}}
    save_file(
        tensors,
        folder / "original.safetensors",
        metadata={"format": "torchslim-model", "version": "1", "torchslim.spec": json.dumps(spec), "torchslim.sha256": _digest(tensors)},
    )
    (folder / ".torchslim-checkpoint").write_text("x")
    recipe = _recipe(tmp_path)
    progress = {"recipe": load_recipe(recipe).to_dict(), "completed": 1, "step": 0, "model_file": "stage-01-step-000.safetensors", "masked": [], "report": {}}
    (folder / "progress.json").write_text(json.dumps(progress))
    arguments = ["compress", "--model", "tests.conftest:TinyConvNet", "--weights", str(_weights(tmp_path)), "--data", "digits"]
    code = main(arguments + ["--recipe", str(recipe), "--out", str(out), "--no-latency", "--resume"])
    assert code == 1
    assert "'os:system'; importing it runs its code" in capsys.readouterr().err
    assert not sentinel.exists()


def test_a_folder_torchslim_did_not_make_is_never_written_or_deleted(tmp_path, capsys):
    out = tmp_path / "m.tslim"
    arguments = ["compress", "--data", "digits", "--recipe", str(_recipe(tmp_path)), "--out", str(out), "--no-latency", "--train-epochs", "1"]
    folder = tmp_path / "m.tslim.ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert main(arguments + extra) == 1
        assert "was not made by torchslim; refusing to write into it" in capsys.readouterr().err
        assert (folder / "notes.txt").read_text() == "mine" and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    # a symbolic link in its place: refused, and nothing in the folder it points to is touched
    (folder / "notes.txt").unlink()
    folder.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "progress.json").write_text("a user's own file of that name")
    folder.symlink_to(elsewhere, target_is_directory=True)
    assert main(arguments) == 1
    assert "is a symbolic link" in capsys.readouterr().err
    assert (elsewhere / "progress.json").read_text() == "a user's own file of that name"


def test_reports_follow_the_outputs_rule(tmp_path, capsys):
    out = tmp_path / "m.tslim"
    arguments = ["compress", "--data", "digits", "--recipe", str(_recipe(tmp_path)), "--out", str(out), "--no-latency", "--train-epochs", "1"]
    beside = tmp_path / "m.tslim.report.json"
    beside.write_text("an earlier report")
    assert main(arguments) == 1
    assert "m.tslim.report.json exists" in capsys.readouterr().err and beside.read_text() == "an earlier report"
    beside.unlink()
    chosen = tmp_path / "mine.json"
    chosen.write_text("kept")
    assert main(arguments + ["--report", str(chosen)]) == 1
    assert chosen.read_text() == "kept" and not out.exists()


def test_an_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from torchslim.pipeline import runner

    monkeypatch.setattr(runner, "compress", lambda *a, **k: pytest.fail("work started before the output was checked"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "m.tslim"  # its folder is a file: nothing can be written there, even by root
    code = main(["compress", "--data", "digits", "--recipe", str(_recipe(tmp_path)), "--out", str(out), "--no-latency"])
    assert code == 1
    assert str(blocker) in capsys.readouterr().err


# -- weights that are not what torchslim computes with -------------------------------------------------------------


@pytest.fixture()
def poisoned(digits):
    model = ts.models.create_for("lenet-300-100", digits)
    with torch.no_grad():
        model.fc1.weight[0, :3] = float("nan")
        model.fc2.weight[1, 0] = float("inf")
    return model


def test_non_finite_weights_stop_every_verb(poisoned, digits, tmp_path):
    calls = {
        "evaluate": lambda: ts.evaluate(poisoned, digits),
        "prune": lambda: ts.prune(poisoned, {"sparsity": 0.9}),
        "quantize": lambda: ts.quantize(poisoned, {"weights": {"scheme": "kmeans", "bits": 4}}),
        "distill": lambda: ts.distill(ts.models.create_for("lenet-300-100", digits), poisoned, digits, {"train": {"epochs": 1}}),
        "train": lambda: ts.train(poisoned, digits, {"epochs": 1}),
        "save .tslim": lambda: ts.save(poisoned, tmp_path / "m.tslim"),
        "save .safetensors": lambda: ts.save(poisoned, tmp_path / "m.safetensors"),
        "compress": lambda: ts.compress(poisoned, "deep-compression", digits),
    }
    for verb, call in calls.items():
        with pytest.raises(TorchslimError, match=r"4 non-finite values \(NaN or Inf\): fc1.weight \(3\), fc2.weight \(1\)"):
            call()
        assert not list(tmp_path.iterdir()), verb
    with ts.allow_nonfinite(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ts.evaluate(poisoned, digits)
    assert any("4 non-finite values" in str(w.message) for w in caught)


def test_a_loss_that_becomes_nan_stops_the_stage_and_keeps_the_last_checkpoint(digits, tmp_path):
    torch.manual_seed(0)
    model = ts.train(ts.models.create_for("lenet-300-100", digits), digits, {"epochs": 2}, progress=False).model
    calls = {"count": 0}
    base = ts.tasks.ClassificationTask()

    def loss(m, batch):
        calls["count"] += 1
        value = base.loss(m, batch)
        return value * float("nan") if calls["count"] > 30 else value  # the second epoch of the fine-tuning stage

    task = ts.Task.custom(loss=loss, evaluate=base.evaluate, metric="accuracy", higher_is_better=True)
    recipe = {"name": "nan", "stages": [{"prune": {"sparsity": 0.5}}, {"finetune": {"epochs": 3, "batch_size": 64, "max_batches_per_epoch": 20}}]}
    folder = tmp_path / "c"
    with pytest.raises(
        TorchslimError, match=r"stage 2 \(finetune\) stopped: finetune: the loss became nan .*the checkpoint after stage 1 and step 1 of stage 2 is in"
    ):
        ts.compress(model, recipe, digits, task=task, checkpoint=folder, latency=False, progress=False)
    assert checkpoint_status(folder)["step"] == 1


def test_a_half_precision_model_evaluates_saves_and_loads_and_other_verbs_say_why_not(digits, tmp_path):
    torch.manual_seed(0)
    model = ts.train(ts.models.create_for("lenet-300-100", digits), digits, {"epochs": 2}, progress=False).model
    half = model.half()
    assert ts.evaluate(half, digits)["accuracy"] == pytest.approx(ts.evaluate(model.float(), digits)["accuracy"], abs=0.01)
    half = model.half()
    for suffix in (".safetensors", ".tslim"):
        ts.save(half, tmp_path / f"h{suffix}")
        loaded = ts.load(tmp_path / f"h{suffix}")
        assert next(loaded.parameters()).dtype == torch.float16
        assert ts.evaluate(loaded, digits)["accuracy"] == ts.evaluate(half, digits)["accuracy"]
    for call in (lambda: ts.prune(half, {"sparsity": 0.5}), lambda: ts.quantize(half, {}), lambda: ts.train(half, digits, {"epochs": 1})):
        with pytest.raises(TorchslimError, match=r"holds float16 weights; torchslim trains and compresses in float32: pass model.float\(\)"):
            call()


def test_labels_and_token_ids_out_of_range_are_named(digits):
    model = ts.models.create_for("lenet-300-100", digits)
    inputs = digits.test.inputs[:32]
    labels = digits.test.targets[:32].clone()
    labels[5] = 12
    for call in (lambda: ts.evaluate(model, [(inputs, labels)]), lambda: ts.train(model, [(inputs, labels)], {"epochs": 1}, progress=False)):
        with pytest.raises(TorchslimError, match=r"label 12 is outside the model's 10 classes \(valid: 0 to 9\)"):
            call()
    lm = zoo.TiedCharLM(vocab=50)
    ids = torch.randint(0, 50, (4, 16))
    ids[2, 3] = 77
    with pytest.raises(TorchslimError, match=r"token id 77 is outside the model's 50 embeddings"):
        ts.evaluate(lm, [ids], task="language-modeling")


# -- tied weights --------------------------------------------------------------------------------------------------


def _text(vocab: int = 65, length: int = 32):
    codes = torch.tensor([min(b, vocab - 1) for b in README.read_bytes()[: length * 64]], dtype=torch.long)
    windows = codes.reshape(-1, length)
    return ts.Data(train=[windows[i : i + 8] for i in range(0, 48, 8)], eval=[windows[48:]])


def _tied(model) -> bool:
    return model.head.weight is model.tokens.weight


def test_tied_weights_stay_tied_through_every_step_and_are_stored_once(tmp_path):
    torch.manual_seed(0)
    data = _text()
    model = ts.train(zoo.TiedCharLM(), data, {"epochs": 2, "optimizer": "adam", "lr": 3e-3}, task="language-modeling", progress=False).model
    assert _tied(model)
    pruned = ts.prune(model, {"sparsity": 0.5, "scope": "global"}, data=data, task="language-modeling").model
    layers = {row["name"] for row in ts.prune(model, {"sparsity": 0.5}).report.stages[0].layers}
    assert "tokens" in layers and "head" not in layers  # the shared weight is scored and counted once
    assert torch.equal(pruned.head.weight, pruned.tokens.weight)
    ts.make_permanent(pruned)
    assert _tied(pruned)
    quantized = ts.quantize(pruned, {"weights": {"scheme": "kmeans", "bits": 4}})
    assert _tied(quantized.model) and any("head: left in float, its weight is tied to tokens.weight" in n for n in quantized.report.stages[0].notes)
    structured = ts.prune_channels(pruned, {"ratio": 0.5}, data=data, task="language-modeling").model
    assert _tied(structured)
    for model_out, suffix in ((quantized.model, ".tslim"), (quantized.model, ".safetensors"), (structured, ".safetensors")):
        path = tmp_path / f"m{id(model_out)}{suffix}"
        ts.save(model_out, path, factory="tests.zoo:TiedCharLM", kwargs={})
        loaded = ts.load(path, trust_factory="tests.zoo:TiedCharLM")
        assert _tied(loaded)
        ids = data.eval[0]
        assert torch.allclose(loaded(ids), model_out.eval()(ids), atol=1e-5)
        names = list(read_tslim(path)[0]["tensors"]) if suffix == ".tslim" else list(safe_open(str(path), "pt").keys())
        stored = [r["name"] for r in names] if suffix == ".tslim" else names
        assert "tokens.weight" in stored and "head.weight" not in stored  # stored once
    # an architecture that ties while its file does not say so (an older file) is tied again on loading
    untied = {k: v for k, v in model.state_dict().items()}
    fresh = zoo.TiedCharLM()
    from torchslim.io.modelfile import load_state

    load_state(fresh, untied, "state")
    assert _tied(fresh)


def test_a_checkpointed_run_of_a_tied_model_resumes_tied(tmp_path):
    torch.manual_seed(0)
    data = _text()
    model = zoo.TiedCharLM()
    recipe = {"name": "tied", "stages": [{"prune": {"sparsity": [0.3, 0.5]}}, {"encode": {}}]}
    result = ts.compress(model, recipe, data, task="language-modeling", checkpoint=tmp_path / "c", latency=False, progress=False)
    assert _tied(result.model)


def test_fuzzing_ends_only_in_models_that_run_or_torchslims_errors():
    """A few thousand mutations of a real .tslim and a real model file (forged and re-checksummed, or flipped and
    truncated), read in a fresh process under a per-case alarm: no other exception, no hang, bounded memory.
    TORCHSLIM_FUZZ_CASES sets how many (default 1500 of each)."""
    cases = os.environ.get("TORCHSLIM_FUZZ_CASES", "1500")
    done = subprocess.run(
        [sys.executable, "-m", "tests.security.fuzz", "--cases", cases, "--seed", "3"], cwd=ROOT, capture_output=True, text=True, timeout=1800
    )
    summary = json.loads(done.stdout)
    assert not summary["findings"], summary["findings"][:3]
    assert summary["outcomes"].get(".tslim refused", 0) > 0 and summary["outcomes"].get(".safetensors refused", 0) > 0
    assert summary["peak_mib"] - summary["setup_peak_mib"] < 256, summary
    assert done.returncode == 0
