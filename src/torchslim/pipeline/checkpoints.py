"""Checkpoints of a recipe run: after every stage, and after every step inside a multi-step stage (pruning steps),
the model, the report so far and where the run stands are written to a folder; ``resume`` continues from there.

The folder holds ``original.safetensors`` (the model the run started from, so a resumed run distills from the same
teacher), the latest model, ``progress.json`` (the recipe, stages completed, steps or epochs completed inside the next
stage, masked layers, the report) and, inside a training stage, ``training.safetensors`` (optimizer and random
generator state). Only the latest model file is kept. A marker file says torchslim made the folder:
an existing folder without it (a user's own) is never written into or deleted, nor is a symbolic link followed;
``remove`` deletes only the files torchslim wrote.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

from torchslim.core.errors import TorchslimError
from torchslim.core.files import check_writable, write_atomic
from torchslim.core.report import Report
from torchslim.io.modelfile import load_model, save_model
from torchslim.io.statefile import load_state_file, save_state
from torchslim.pipeline.recipe import Recipe
from torchslim.pruning.apply import masks_of, set_mask
from torchslim.train import distributed

PROGRESS = "progress.json"
ORIGINAL = "original.safetensors"
MARKER = ".torchslim-checkpoint"
TRAINING = "training.safetensors"


class Checkpoint:
    """A run's checkpoint folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)

    def check(self) -> None:
        """Refuse a place torchslim does not own (a symbolic link, a file, a folder with content but no marker),
        before any work, without creating anything."""
        if self.folder.is_symlink():
            raise TorchslimError(f"{self.folder} is a symbolic link; torchslim keeps checkpoints only in a folder of its own")
        if self.folder.exists():
            if not self.folder.is_dir():
                raise TorchslimError(f"{self.folder} exists and is not a folder; refusing to put a checkpoint there")
            if any(self.folder.iterdir()) and not (self.folder / MARKER).is_file():
                raise TorchslimError(f"{self.folder} exists and was not made by torchslim; refusing to write into it (choose another --out or move the folder)")
        check_writable(self.folder, folder=True)

    def claim(self) -> None:
        """Make the folder torchslim's (see ``check``)."""
        self.check()
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MARKER).write_text("checkpoint folder of a torchslim compress run\n")

    def remove(self) -> list[str]:
        """Delete the files torchslim wrote, and the folder if nothing else is left; returns what was left in it."""
        if not distributed.is_main() or self.folder.is_symlink() or not (self.folder / MARKER).is_file():
            return []
        for path in self.folder.iterdir():
            if (
                not path.is_symlink()
                and path.is_file()
                and (path.name in (PROGRESS, ORIGINAL, MARKER, TRAINING) or (path.name.startswith("stage-") and path.suffix == ".safetensors"))
            ):
                path.unlink()
        left = sorted(path.name for path in self.folder.iterdir())
        if not left:
            self.folder.rmdir()
        return left

    def status(self) -> dict[str, Any] | None:
        """What the folder holds (recipe name, stages completed, steps into the next), or None when it holds none."""
        if not (self.folder / PROGRESS).is_file():
            return None
        progress = self._progress()
        return {
            "recipe": progress["recipe"]["name"],
            "completed": progress["completed"],
            "stages": len(progress["recipe"]["stages"]),
            "step": progress.get("step", 0),
        }

    def save(
        self, recipe: Recipe, report: Report, model: nn.Module, original: nn.Module, completed: int, step: int = 0, training: dict[str, Any] | None = None
    ) -> None:
        """Record that ``completed`` stages (and ``step`` steps or epochs of the next one) are done, with the model as
        it stands and, inside a training stage, the state that resumes its training exactly (``training``). Under
        ``torchrun`` only rank 0 writes (every rank holds the same state)."""
        if not distributed.is_main():
            return
        self.claim()
        if not (self.folder / ORIGINAL).exists():
            save_model(original, self.folder / ORIGINAL)
        name = f"stage-{completed:02d}-step-{step:03d}.safetensors"
        save_model(model, self.folder / name)
        if training is not None:
            save_state(training, self.folder / TRAINING)
        elif (self.folder / TRAINING).is_file():
            (self.folder / TRAINING).unlink()
        progress = {
            "recipe": recipe.to_dict(),
            "completed": completed,
            "step": step,
            "model_file": name,
            "training": training is not None,
            "masked": sorted(masks_of(model)),
            "report": report.to_dict(),
        }
        write_atomic(self.folder / PROGRESS, json.dumps(progress, indent=1).encode())
        for old in self.folder.glob("stage-*.safetensors"):
            if old.name != name:
                old.unlink()

    def _progress(self) -> dict[str, Any]:
        """progress.json, every field checked (a damaged or hand-edited file is named, not half-used)."""
        path = self.folder / PROGRESS
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as error:
            raise TorchslimError(f"{path}: not a readable checkpoint record ({type(error).__name__}); remove the folder to start over") from None
        recipe = progress.get("recipe") if isinstance(progress, dict) else None
        valid = (
            isinstance(recipe, dict)
            and isinstance(recipe.get("name"), str)
            and isinstance(recipe.get("stages"), list)
            and all(isinstance(progress.get(key), int) and not isinstance(progress.get(key), bool) and progress[key] >= 0 for key in ("completed", "step"))
            and isinstance(progress.get("model_file"), str)
            and re.fullmatch(r"stage-\d{2}-step-\d{3}\.safetensors", progress["model_file"]) is not None
            and isinstance(progress.get("masked"), list)
            and all(isinstance(name, str) for name in progress["masked"])
            and isinstance(progress.get("report"), dict)
        )
        if not valid:
            raise TorchslimError(f"{path}: a damaged checkpoint record (a field is missing or of the wrong kind); remove the folder to start over")
        return progress

    def original(self, trust_factory: bool | str = False) -> nn.Module:
        """The model the checkpointed run started from."""
        return load_model(self.folder / ORIGINAL, trust_factory=trust_factory)

    def load(self, recipe: Recipe, trust_factory: bool | str = False) -> tuple[nn.Module, Report, int, int, dict[str, Any] | None]:
        """(model, report, stages completed, steps completed of the next stage, training state inside it); the recipe
        must be the run's."""
        progress = self._progress()
        if progress.get("recipe") != recipe.to_dict():
            raise TorchslimError(
                f"{self.folder}: the checkpoint was made by a different recipe ({progress.get('recipe', {}).get('name')!r} "
                f"with other settings); run with the same recipe, or remove the folder to start over"
            )
        model = load_model(self.folder / progress["model_file"], trust_factory=trust_factory)
        for name in progress["masked"]:
            module = model.get_submodule(name)
            set_mask(module, module.weight.detach() != 0)  # pruned weights are exactly zero in the saved file
        training = load_state_file(self.folder / TRAINING) if progress.get("training") else None
        return model, Report.from_dict(progress["report"]), int(progress["completed"]), int(progress.get("step", 0)), training


def checkpoint_status(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What a checkpoint folder holds, or None."""
    return Checkpoint(folder).status()


def checkpoint_original(folder: str | os.PathLike[str], trust_factory: bool | str = False) -> nn.Module:
    """The model a checkpointed run started from."""
    return Checkpoint(folder).original(trust_factory)


__all__ = ["Checkpoint", "checkpoint_original", "checkpoint_status"]
