"""Recipes of compression stages (each a verb's config), the runner that applies them with an evaluation after every
stage, checkpoints, and the built-in recipes (YAML files shipped in ``recipes/``)."""

from torchslim.pipeline import stages  # noqa: F401 - registers the stage kinds
from torchslim.pipeline.checkpoints import Checkpoint, checkpoint_original, checkpoint_status
from torchslim.pipeline.recipe import STAGES, Recipe, RecipeStage, StageKind, builtin_recipes, load_recipe, register_stage
from torchslim.pipeline.runner import CompressInterrupted, CompressResult, compress, measure_stage
from torchslim.pipeline.stages import DistillOptions, EncodeConfig, ExportConfig, StageContext, StageOutcome

__all__ = [
    "STAGES",
    "Checkpoint",
    "CompressInterrupted",
    "CompressResult",
    "DistillOptions",
    "EncodeConfig",
    "ExportConfig",
    "Recipe",
    "RecipeStage",
    "StageContext",
    "StageKind",
    "StageOutcome",
    "builtin_recipes",
    "checkpoint_original",
    "checkpoint_status",
    "compress",
    "load_recipe",
    "measure_stage",
    "register_stage",
]
