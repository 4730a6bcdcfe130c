import random

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.measure import detect_bimodal, measure_latency


def test_bimodal_detection_on_stalled_timings():
    rng = random.Random(0)
    steady = [1.0 + rng.random() * 0.05 for _ in range(100)]
    assert detect_bimodal(steady)[0] is False
    stalled = steady[:80] + [x + 8.0 for x in steady[80:]]
    bimodal, slow_fraction, fast_median = detect_bimodal(stalled)
    assert bimodal and slow_fraction == pytest.approx(0.2)
    assert fast_median == pytest.approx(1.025, abs=0.03)
    # a single outlier is spread, not a second mode
    assert detect_bimodal(steady[:99] + [20.0])[0] is False


def test_harness_reports_statistics_and_restores_state():
    model = ts.models.create("lenet-300-100").train()
    threads = torch.get_num_threads()
    results = measure_latency(model, torch.zeros(1, 1, 28, 28), batch_sizes=(1, 16), runs=20, warmup=3, threads=1)
    assert [r.batch_size for r in results] == [1, 16]
    for result in results:
        assert result.runs >= 20 and result.threads == 1
        assert 0 < result.min_ms <= result.median_ms <= result.p90_ms
        assert len(result.samples_ms) == result.runs
    assert model.training and torch.get_num_threads() == threads


def test_custom_backend_and_unknown_backend():
    calls = []

    def counting_backend(model, example):
        def run(x):
            calls.append(x.shape[0])
            return model(x)

        return run

    measure_latency(nn.Linear(4, 4), torch.zeros(1, 4), batch_sizes=(3,), backend=counting_backend, runs=5, warmup=2)
    assert calls == [3] * 7
    with pytest.raises(ts.TorchslimError, match="unknown latency backend 'tvm'"):
        measure_latency(nn.Linear(4, 4), torch.zeros(1, 4), backend="tvm")


def test_compile_backend_runs_and_matches_eager():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    example = torch.randn(2, 16)
    from torchslim.measure.latency import compile_backend

    run = compile_backend(model, example)
    torch.testing.assert_close(run(example), model(example))
    results = measure_latency(model, example, backend="compile", runs=5, warmup=1)
    assert results[0].backend == "compile" and results[0].median_ms > 0


def test_profile_report(tmp_path):
    result = ts.profile(ts.models.create("lenet-5"), torch.zeros(1, 1, 28, 28), batch_sizes=(1, 4), runs=10)
    metrics = result.report.stages[0].metrics
    assert metrics["parameters"] == 431_080 and metrics["macs"] == 2_293_000
    assert metrics["stored_bytes"] > metrics["dense_bytes"] == 431_080 * 4
    assert [row["batch_size"] for row in metrics["latency"]] == [1, 4]
    assert {row["name"] for row in result.report.stages[0].layers} == {"conv1", "conv2", "fc1", "fc2"}
    result.report.save(tmp_path / "r.json")
    assert "| profile |" in result.report.to_markdown()


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, mask):
        return self.head(torch.relu(self.a(x) * self.b(mask)))


def test_onnxruntime_backend_feeds_positional_and_keyword_inputs():
    pytest.importorskip("onnxruntime")
    from torchslim.measure.latency import onnxruntime_backend

    model = _TwoInputs().eval()
    x, mask = torch.randn(2, 6), torch.randn(2, 3)
    expected = model(x, mask)
    for example in ((x, mask), {"x": x, "mask": mask}):
        output = onnxruntime_backend(model, example)(example)[0]
        torch.testing.assert_close(torch.from_numpy(output), expected, rtol=1e-4, atol=1e-5)
        results = measure_latency(model, example, batch_sizes=(1, 3), backend="onnxruntime", runs=3, warmup=1)
        assert [r.batch_size for r in results] == [1, 3] and all(r.median_ms > 0 for r in results)
    profiled = ts.profile(model, (x[:1], mask[:1]), backends=("eager", "onnxruntime"), runs=3, file_bytes=False)
    assert [row["backend"] for row in profiled.report.stages[0].metrics["latency"]] == ["eager", "onnxruntime"]
    with pytest.raises(ts.TorchslimError, match="takes 2 inputs .*the example has 3"):
        onnxruntime_backend(model, (x, mask))((x, mask, mask))
