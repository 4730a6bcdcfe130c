"""Reports a person reads: the data a real run records, the HTML and Markdown pages, the browser check, the 100-column
console table, --json / --quiet, progress bars and the run options."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

import torchslim as ts
from torchslim.cli import main
from torchslim.core.report import Report
from torchslim.report.console import print_report
from torchslim.report.html import write_report

from .browser import find_browser, open_page

ARTIFACTS = Path(os.environ.get("TORCHSLIM_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
RECIPE = {
    "name": "small",
    "stages": [
        {"prune": {"sparsity": [0.8], "finetune": {"epochs": 1, "lr": 0.02, "eval_every_epoch": False}}},
        {"quantize": {"weights": {"scheme": "kmeans", "bits": 4}}},
        {"encode": {}},
    ],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real (small) compress run on the digits data, saved as .tslim with its report."""
    data = ts.data.load("digits")
    model = ts.train(ts.models.create_for("lenet-300-100", data), data, {"epochs": 4}, progress=False).model
    result = ts.compress(model, RECIPE, data, progress=False)
    folder = tmp_path_factory.mktemp("run")
    result.save(folder / "m.tslim")
    return Report.load(folder / "m.tslim.report.json"), folder


def test_a_run_records_layers_histograms_and_latency_measured_together(run):
    report, _ = run
    assert [s.name for s in report.stages] == ["baseline", "1 prune", "2 quantize", "3 encode"]
    assert report.recipe is not None and report.recipe["name"] == "small"
    assert report.environment["torch"] == torch.__version__
    runs = {s.metrics["latency_runs"] for s in report.stages}
    assert len(runs) == 1 and runs.pop() >= 50  # every stage timed in the same interleaved rounds
    for stage in report.stages:
        m = stage.metrics
        assert 0 < m["latency_p10_ms"] <= m["latency_median_ms"] <= m["latency_p90_ms"]
        assert [row["name"] for row in stage.layers] == ["fc1", "fc2", "fc3"]
        assert [h["layer"] for h in stage.histograms] == ["fc1", "fc2", "fc3"]
    baseline, pruned, quantized = report.stages[0], report.stages[1], report.stages[2]
    assert "sparse_macs" not in baseline.metrics
    assert pruned.metrics["sparse_macs"] < 0.3 * pruned.metrics["macs"]  # 80% of the weights are zeros
    assert pruned.metrics["macs"] == baseline.metrics["macs"]  # masked layers still multiply their zeros
    fc1 = {row["name"]: row for row in pruned.layers}["fc1"]
    assert fc1["kept"] == pytest.approx(fc1["nonzeros"] / fc1["weights"], abs=1e-4) and fc1["kept"] < 0.5
    assert {row["bits"] for row in baseline.layers} == {32} and {row["bits"] for row in quantized.layers} == {4}
    histogram = quantized.histograms[0]
    assert sum(histogram["counts"]) + histogram["zeros"] == fc1["weights"]
    assert 1 < len(histogram["centroids"]) <= 16  # the k-means codebook is marked
    streams = report.artifacts["tslim"]["tensors"]
    assert any(s["coder"] != "raw" and "entropy_bytes" in s for row in streams for s in row["streams"])


def test_html_and_markdown_say_the_same_and_the_html_stands_alone(run, tmp_path):
    from PIL import Image

    report, _ = run
    written = write_report(report, tmp_path / "report.html")
    page = written["html"].read_text()
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    import base64

    for data in images:
        picture = Image.open(io.BytesIO(base64.b64decode(data)))
        picture.load()
        assert picture.width > 200 and picture.height > 200 and len(picture.convert("L").getcolors(maxcolors=1 << 16) or []) > 10
    markdown = written["markdown"].read_text()
    for title in ("Summary", "Layers", "Weights", "Notes", "The compressed file", "The recipe as run", "Machine and versions"):
        assert f"<h2>{title}</h2>" in page and f"## {title}" in markdown
    for name in ("tradeoff", "layers", "histograms"):
        assert f"](report_files/{name}.png)" in markdown and (tmp_path / "report_files" / f"{name}.png").stat().st_size > 1000
    final = report.stages[-1].metrics
    for text in (f"{100 * final['error']:.2f}%", f"{final['stored_bytes'] / 1024:.2f} KiB", "fc1.quantized"):
        assert text in page and text in markdown


def test_the_report_opens_in_headless_chromium(run, tmp_path):
    pytest.importorskip("websocket", reason="websocket-client is needed to drive the browser (pip install websocket-client)")
    if find_browser() is None:
        pytest.skip("no Chromium on this machine: scripts/setup.sh installs Debian's chromium where apt-get runs as root")
    report, _ = run
    page = write_report(report, tmp_path / "report.html")["html"]
    shot = ARTIFACTS / "report-screenshot.png"
    result = open_page(page, shot)
    assert result["title"] == "torchslim report: lenet-300-100"
    assert result["errors"] == []
    assert len(result["images"]) == 3
    for image in result["images"]:
        assert image["complete"] and image["width"] > 200 and image["height"] > 200, image
    assert shot.stat().st_size > 10_000


def _wide_report() -> Report:
    report = Report(model={"name": "a-long-model-name-from-the-hub"})
    for index, name in enumerate(["baseline", "1 prune-channels", "2 quantize", "3 distill", "4 encode"]):
        report.add_stage(
            name,
            execution="weights stored quantized, dequantized in eager forward by a kernel with a long name",
            metrics={
                "perplexity": 44.7312 * (1 + index),
                "parameters": 134_515_008,
                "nonzeros": 134_515_008 // (index + 1),
                "macs": 1_234_567_890_123,
                "stored_bytes": 10 * 1024**3 / (index + 1),
                "compression": float(index + 1),
                "latency_median_ms": 12345.678,
                "latency_p10_ms": 12000.5,
                "latency_p90_ms": 13000.25,
            },
        )
    return report


def test_the_console_table_fits_100_columns():
    stream = io.StringIO()
    print_report(_wide_report(), Console(file=stream, width=100))
    lines = stream.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = [line for line in lines if re.match(r"\s*(baseline|\d )", line)]
    assert len(rows) == 5  # one line per stage: nothing wrapped
    assert "perplexity" in stream.getvalue() and "10.00 GiB" in rows[0]


@pytest.mark.slow
def test_compress_json_quiet_and_the_report_command(tmp_path, capsys):
    recipe = tmp_path / "small.yaml"
    recipe.write_text(
        "name: small\nstages:\n"
        "  - prune: {sparsity: [0.8], finetune: {epochs: 1, eval_every_epoch: false}}\n"
        "  - quantize: {weights: {scheme: kmeans, bits: 4}}\n"
    )
    arguments = ["compress", "--data", "digits", "--recipe", str(recipe), "--train-epochs", "2", "--threads", "1", "--seed", "3"]
    assert main(arguments + ["--out", str(tmp_path / "a.tslim"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is one JSON object and nothing else
    assert result["result"].startswith("compressed model written to") and result["outputs"]["html"].endswith("a.tslim.report.html")
    assert [s["name"] for s in result["report"]["stages"]] == ["baseline", "1 prune", "2 quantize"]
    assert (tmp_path / "a.tslim.report.html").is_file() and (tmp_path / "a.tslim.report.md").is_file()
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(arguments + ["--out", str(tmp_path / "b.tslim"), "--quiet", "--no-report"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and captured.out.startswith("compressed model written to")
    assert "train" not in captured.err  # no progress lines either
    assert not (tmp_path / "b.tslim.report.html").exists()
    torch.set_num_threads(2)
    # the report command renders any run's JSON; it refuses to overwrite and names bad input
    assert main(["report", str(tmp_path / "b.tslim.report.json"), "--out", str(tmp_path / "b.html")]) == 0
    assert (tmp_path / "b.html").is_file() and (tmp_path / "b.md").is_file() and (tmp_path / "b_files" / "tradeoff.png").is_file()
    before = (tmp_path / "b.html").read_bytes()
    assert main(["report", str(tmp_path / "b.tslim.report.json"), "--out", str(tmp_path / "b.html")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err and (tmp_path / "b.html").read_bytes() == before
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["report", str(tmp_path / "bad.json")]) == 1
    assert "bad.json: not a torchslim report" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "none.json")]) == 1
    assert "no such report file" in capsys.readouterr().err


def test_run_options_are_checked_before_any_work(tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    if not torch.cuda.is_available():
        assert main(["train", "--data", "digits", "--device", "cuda", "--out", str(out)]) == 1
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--device", "tpu", "--out", str(out)]) == 1
    assert "is not a device; use cpu, cuda or cuda:N" in capsys.readouterr().err
    assert main(["train", "--data", "digits", "--threads", "0", "--out", str(out)]) == 1
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_seed_makes_training_reproducible(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["train", "--data", "digits", "--epochs", "1", "--seed", "7", "--quiet", "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    capsys.readouterr()
    a, b = ts.load(tmp_path / "a.safetensors"), ts.load(tmp_path / "b.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_shows_stage_epoch_loss_and_time_left():
    from torchslim.train.progress import Progress, stage

    stream = _Terminal()
    with stage("1 prune"):
        bar = Progress("fine-tune", total=2, mode="bar", stream=stream, unit_total=10)
        bar.update(description="fine-tune epoch 1/2", completed=5, loss=0.25)
        time.sleep(0.5)  # the live display redraws several times a second
        bar.step(loss=0.2)
        bar.step(loss=0.1)
    text = stream.getvalue()
    assert "1 prune: fine-tune epoch 1/2" in text and "loss 0.2500" in text and "left" in text
    lines = io.StringIO()
    progress = Progress("train", total=2, mode="lines", stream=lines)
    progress.step(loss=0.5)
    assert lines.getvalue().startswith("train 1/2: loss 0.5000") and "left" in lines.getvalue()


def test_a_language_models_headline_is_its_perplexity():
    """A language model's stages hold a token error too, and the headline showed it (99.6% 'test error')."""
    from torchslim.report.markdown import headline_key

    stages = [{"error": 0.996, "perplexity": 120.0, "accuracy": 0.004, "task_metric": "perplexity"}]
    assert headline_key(stages) == ("perplexity", "perplexity")
    assert headline_key([{"error": 0.02, "accuracy": 0.98, "task_metric": "accuracy"}]) == ("error", "test error")
    assert headline_key([{"loss": 0.3, "r2": 0.9, "task_metric": "r2"}]) == ("r2", "r2")


def test_a_users_metric_named_error_or_accuracy_is_shown_as_it_is():
    """A regression's mean absolute "error" of 5.05 was shown as "test error: 505.46%", and a custom "accuracy" was
    dropped from the headline for the loss."""
    from torchslim.core.report import Report
    from torchslim.report.console import stage_rows
    from torchslim.report.markdown import headline_key

    regression = Report(model={"name": "mine"})
    regression.add_stage("baseline", metrics={"error": 5.0546, "loss": 5.0546, "task_metric": "error", "stored_bytes": 5776})
    regression.add_stage("prune", metrics={"error": 6.8224, "loss": 6.8224, "task_metric": "error", "stored_bytes": 3758})
    assert "error: 5.055 -> 6.822." in regression.to_markdown()
    assert stage_rows(regression)[1][0][1] == "5.055"
    labels = Report(model={"name": "mine"})
    labels.add_stage("baseline", metrics={"accuracy": 0.9156, "loss": 0.25, "task_metric": "accuracy"})
    labels.add_stage("prune", metrics={"accuracy": 0.8789, "loss": 0.31, "task_metric": "accuracy"})
    assert "accuracy: 91.56% -> 87.89%." in labels.to_markdown()
    # classification still heads with its test error
    assert headline_key([{"accuracy": 0.99, "error": 0.01, "errors": 1, "task_metric": "accuracy"}]) == ("error", "test error")
