"""Report and Result: what every verb returns.

A Report is one JSON-serializable tree: the model it describes, then one Stage per step (baseline, prune,
quantize, ...), each with its metrics, per-layer rows and notes. Rendering lives in ``torchslim.report``.

Example:
    >>> report = Report(model={"name": "lenet-300-100"})
    >>> stage = report.add_stage("baseline", metrics={"accuracy": 0.98})
    >>> report.to_dict()["stages"][0]["metrics"]["accuracy"]
    0.98
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _jsonable(value: Any) -> Any:
    """Turn tensors, numpy scalars, paths and tuples into plain JSON values; NaN/Inf become strings."""
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return _jsonable(to_dict() if callable(to_dict) else dataclasses.asdict(value))
    return value


@dataclasses.dataclass
class Stage:
    """One step of a run: its name, the kind of step, metrics, per-layer rows and notes.

    ``execution`` says whether the step's numbers come from a simulation (masks, fake-quant) or real execution.
    """

    name: str
    kind: str = "stage"
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    execution: str = "eager"
    config: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class Report:
    """The JSON-serializable record of what a verb or a recipe did, stage by stage."""

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    stages: list[Stage] = dataclasses.field(default_factory=list)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def for_model(cls, model: Any, stages: list[Stage] | None = None) -> Report:
        """A report about ``model``: its registry name (or class name) and architecture spec."""
        spec = getattr(model, "torchslim_spec", None)
        name = (spec or {}).get("name") or (spec or {}).get("factory") or type(model).__name__
        return cls(model={"name": name, "spec": spec}, stages=list(stages or []))

    def add_stage(self, name: str, kind: str = "stage", **fields: Any) -> Stage:
        stage = Stage(name=name, kind=kind, **fields)
        self.stages.append(stage)
        return stage

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {[s.name for s in self.stages]}")

    def extend(self, other: Report) -> Report:
        """Append another report's stages (used when verbs are chained)."""
        self.stages.extend(other.stages)
        if not self.model:
            self.model = dict(other.model)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": _jsonable(self.model),
            "environment": _jsonable(self.environment),
            "stages": [stage.to_dict() for stage in self.stages],
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            model=dict(data.get("model", {})),
            environment=dict(data.get("environment", {})),
            stages=[Stage(**stage) for stage in data.get("stages", [])],
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON, atomically."""
        path = Path(path)
        write_atomic(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_markdown(self) -> str:
        from torchslim.report.markdown import report_to_markdown

        return report_to_markdown(self)


@dataclasses.dataclass
class Result:
    """What every verb returns: the new model and the report of what was done."""

    model: torch.nn.Module
    report: Report

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save the model (safetensors weights + JSON architecture spec) and the report beside it."""
        from torchslim.io.modelfile import save_model

        saved = save_model(self.model, path)
        self.report.save(saved.with_suffix(saved.suffix + ".report.json"))
        return saved


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; a finished file gets the usual permissions
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
