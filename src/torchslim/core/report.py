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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchslim.core.errors import TorchslimError
from torchslim.core.files import refuse_overwrite, save_model_file, write_atomic

# Renderers of a Report by format name ("markdown", ...), registered by torchslim.report.
RENDERERS: dict[str, Callable[[Report], str]] = {}


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
    ``layers`` holds one row per layer (``measure.layers.layer_rows``), ``histograms`` the weight histograms of the
    largest layers (``measure.layers.weight_histograms``).
    """

    name: str
    kind: str = "stage"
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    execution: str = "eager"
    config: dict[str, Any] | None = None
    histograms: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


@dataclasses.dataclass
class Report:
    """The JSON-serializable record of what a verb or a recipe did, stage by stage."""

    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    stages: list[Stage] = dataclasses.field(default_factory=list)
    environment: dict[str, Any] = dataclasses.field(default_factory=dict)
    recipe: dict[str, Any] | None = None  # the recipe as run, for a report of ``compress``
    artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)  # files written, e.g. the .tslim's streams

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
            "recipe": _jsonable(self.recipe),
            "artifacts": _jsonable(self.artifacts),
        }

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(
            model=dict(data.get("model", {})),
            environment=dict(data.get("environment", {})),
            stages=[Stage(**stage) for stage in data.get("stages", [])],
            recipe=data.get("recipe"),
            artifacts=dict(data.get("artifacts") or {}),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON, atomically."""
        path = Path(path)
        write_atomic(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def render(self, form: str) -> str:
        """The report rendered by a registered renderer (``markdown``)."""
        if form not in RENDERERS:
            raise TorchslimError(f"no report renderer {form!r}; available: {', '.join(sorted(RENDERERS)) or '(none)'}")
        return RENDERERS[form](self)

    def to_markdown(self) -> str:
        """The per-stage table, then each stage's notes and per-layer rows, as Markdown."""
        return self.render("markdown")


@dataclasses.dataclass
class Result:
    """What every verb returns: the new model and the report of what was done."""

    model: torch.nn.Module
    report: Report

    def save(self, path: str | os.PathLike[str], overwrite: bool = True) -> Path:
        """Save the model in the format its suffix names (``.safetensors`` model file, ``.tslim`` compressed file,
        ``.onnx`` for models that run in ONNX Runtime) and the report beside it as ``<path>.report.json``."""
        report_path = Path(path).with_suffix(Path(path).suffix + ".report.json")
        refuse_overwrite(report_path, overwrite)
        saved = save_model_file(self.model, path, overwrite=overwrite)
        self.report.save(report_path)
        return saved
