import json

import pytest
import torch

from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry
from torchslim.core.report import Report, write_atomic


def test_registry_duplicates_and_unknown_names():
    registry = Registry("widget")

    @registry.register("a")
    def make_a():
        """Makes an a."""
        return "a"

    assert registry.get("a")() == "a"
    assert registry.summary("a") == "Makes an a."
    with pytest.raises(TorchslimError, match="registered twice"):
        registry.register("a")(lambda: None)
    with pytest.raises(TorchslimError, match=r"unknown widget 'b'; valid widgets: a"):
        registry.get("b")


def test_report_is_json_and_round_trips(tmp_path):
    report = Report(model={"name": "m"})
    report.add_stage("baseline", metrics={"accuracy": torch.tensor(0.5), "macs": 10, "bad": float("nan")}, layers=[{"name": "fc", "sparsity": 0.1}])
    path = report.save(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["stages"][0]["metrics"]["accuracy"] == 0.5
    assert data["stages"][0]["metrics"]["bad"] == "nan"
    again = Report.load(path)
    assert again.stage("baseline").layers == [{"name": "fc", "sparsity": 0.1}]
    markdown = again.to_markdown()
    assert "| baseline |" in markdown and "50.00%" in markdown


def test_write_atomic_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
