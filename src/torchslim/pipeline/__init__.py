"""Recipes of compression stages, the runner that applies them with an evaluation after every stage, and the
built-in recipes (YAML files shipped in ``recipes/``)."""

from torchslim.pipeline.recipe import (STAGE_TYPES, ChannelPruneStage, DistillStage, EncodeStage, ExportStage, PruneStage, QuantizeStage, Recipe,
                                       RecipeStage, builtin_recipes, load_recipe)
from torchslim.pipeline.runner import CompressInterrupted, CompressResult, checkpoint_original, checkpoint_status, compress, logical_weights

__all__ = ["STAGE_TYPES", "ChannelPruneStage", "CompressInterrupted", "CompressResult", "DistillStage", "EncodeStage", "ExportStage", "PruneStage",
           "QuantizeStage", "Recipe", "RecipeStage", "builtin_recipes", "checkpoint_original", "checkpoint_status", "compress", "load_recipe",
           "logical_weights"]
