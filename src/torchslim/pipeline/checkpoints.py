"""Checkpoints of a recipe run: after every stage, and after every step inside a multi-step stage (pruning steps),
the model, the report so far and where the run stands are written to a folder; ``resume`` continues from there.

The folder holds ``original.safetensors`` (the model the run started from, so a resumed run distills from the same
teacher), the latest model, and ``progress.json`` (the recipe, stages completed, steps completed inside the next
stage, masked layers, the report). Only the latest model file is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.files import write_atomic
from torchslim.core.report import Report
from torchslim.io.modelfile import load_model, save_model
from torchslim.pipeline.recipe import Recipe
from torchslim.pruning.apply import masks_of, set_mask

PROGRESS = "progress.json"
ORIGINAL = "original.safetensors"


class Checkpoint:
    """A run's checkpoint folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def status(self) -> dict[str, Any] | None:
        """What the folder holds (recipe name, stages completed, steps into the next), or None when it holds none."""
        path = self.folder / PROGRESS
        if not path.is_file():
            return None
        progress = json.loads(path.read_text())
        return {
            "recipe": progress["recipe"]["name"],
            "completed": progress["completed"],
            "stages": len(progress["recipe"]["stages"]),
            "step": progress.get("step", 0),
        }

    def save(self, recipe: Recipe, report: Report, model: nn.Module, original: nn.Module, completed: int, step: int = 0) -> None:
        """Record that ``completed`` stages (and ``step`` steps of the next one) are done, with the model as it stands."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not (self.folder / ORIGINAL).exists():
            save_model(original, self.folder / ORIGINAL)
        name = f"stage-{completed:02d}-step-{step:03d}.safetensors"
        save_model(model, self.folder / name)
        progress = {
            "recipe": recipe.to_dict(),
            "completed": completed,
            "step": step,
            "model_file": name,
            "masked": sorted(masks_of(model)),
            "report": report.to_dict(),
        }
        write_atomic(self.folder / PROGRESS, json.dumps(progress, indent=1).encode())
        for old in self.folder.glob("stage-*.safetensors"):
            if old.name != name:
                old.unlink()

    def original(self, trust_factory: bool = False) -> nn.Module:
        """The model the checkpointed run started from."""
        return load_model(self.folder / ORIGINAL, trust_factory=trust_factory)

    def load(self, recipe: Recipe, trust_factory: bool = False) -> tuple[nn.Module, Report, int, int]:
        """(model, report, stages completed, steps completed of the next stage); the recipe must be the run's."""
        progress = json.loads((self.folder / PROGRESS).read_text())
        if progress.get("recipe") != recipe.to_dict():
            raise TorchslimError(
                f"{self.folder}: the checkpoint was made by a different recipe ({progress.get('recipe', {}).get('name')!r} "
                f"with other settings); run with the same recipe, or remove the folder to start over"
            )
        model = load_model(self.folder / progress["model_file"], trust_factory=trust_factory)
        for name in progress["masked"]:
            module = model.get_submodule(name)
            set_mask(module, module.weight.detach() != 0)  # pruned weights are exactly zero in the saved file
        return model, Report.from_dict(progress["report"]), int(progress["completed"]), int(progress.get("step", 0))


def checkpoint_status(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What a checkpoint folder holds, or None."""
    return Checkpoint(folder).status()


def checkpoint_original(folder: str | os.PathLike[str], trust_factory: bool = False) -> nn.Module:
    """The model a checkpointed run started from."""
    return Checkpoint(folder).original(trust_factory)


__all__ = ["Checkpoint", "checkpoint_original", "checkpoint_status"]
