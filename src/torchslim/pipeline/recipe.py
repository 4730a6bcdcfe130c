"""Recipes: an ordered list of typed stages (prune, finetune, quantize, distill, encode, export).

In YAML a stage is a one-key mapping from its kind to its settings::

    name: deep-compression
    description: prune, k-means quantize with centroid fine-tuning, entropy-code
    stages:
      - prune: {sparsities: [0.5, 0.8, 0.9], method: l1, scope: global, finetune: {epochs: 2, lr: 0.02}}
      - quantize: {weights: {scheme: kmeans, bits: 5}, finetune: {epochs: 1, optimizer: adam, lr: 0.001}}
      - encode: {coders: [huffman, ans]}

Every stage is validated by its typed config: an unknown key or a wrong type is an error that names the stage
(its position and kind) and the key. Recipes round-trip through ``to_dict`` / ``to_yaml``.

Example:
    >>> recipe = Recipe.from_dict({"name": "r", "stages": [{"prune": {"sparsities": [0.5]}}, {"encode": {}}]})
    >>> [stage.kind for stage in recipe.stages]
    ['prune', 'encode']
    >>> Recipe.from_yaml(recipe.to_yaml()) == recipe
    True
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from torchslim.codec.entropy import CODERS
from torchslim.core.config import Config, ConfigError, check
from torchslim.core.errors import TorchslimError
from torchslim.core.selector import LayerSelector
from torchslim.distillation.trainer import DistillConfig
from torchslim.quantization.modules import WeightScheme
from torchslim.quantization.onnx_static import OnnxInt8Config
from torchslim.pruning.structured import StructuredConfig
from torchslim.train.fit import TrainConfig


@dataclasses.dataclass(frozen=True)
class PruneStage(Config):
    """Unstructured pruning to each sparsity in ``sparsities`` in turn (one step = prune + optional fine-tune).

    ``method``/``scope``/``layers`` as in ``torchslim.prune``; ``finetune`` trains after every step with the masks
    in force (Han et al. 2015); leave it out for one-shot pruning.
    """

    sparsities: tuple[float, ...] = (0.5, 0.75, 0.875, 0.92)
    method: str = "l1"
    scope: str = "global"
    layers: LayerSelector = LayerSelector()
    finetune: TrainConfig | None = None

    def validate(self) -> None:
        check(len(self.sparsities) > 0, "sparsities must list at least one step")
        check(all(0 <= s < 1 for s in self.sparsities), f"every sparsity must be in [0, 1), got {list(self.sparsities)}")
        check(list(self.sparsities) == sorted(self.sparsities), f"sparsities must not decrease, got {list(self.sparsities)}")
        check(self.scope in ("layer", "global"), f"scope must be 'layer' or 'global', got {self.scope!r}")


@dataclasses.dataclass(frozen=True)
class ChannelPruneStage(StructuredConfig):
    """Structured pruning (see ``torchslim.prune_channels`` and its ``StructuredConfig``, whose keys it takes):
    channels, neurons and heads physically removed, then an optional fine-tuning run."""

    finetune: TrainConfig | None = None

    def structured_config(self) -> StructuredConfig:
        return StructuredConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StructuredConfig)})


@dataclasses.dataclass(frozen=True)
class QuantizeStage(Config):
    """Weight-only quantization (see ``torchslim.quantize``); with ``finetune`` the codebooks (k-means centroids)
    and biases are trained afterwards while every weight keeps its cluster (Deep Compression section 3.3).

    A centroid's gradient is the sum over its whole cluster (hundreds to thousands of weights), so centroid
    fine-tuning wants a learning rate far below the one the weights were trained with (e.g. Adam at 3e-5)."""

    weights: WeightScheme = WeightScheme(scheme="kmeans", bits=5)
    type_schemes: dict[str, WeightScheme] = dataclasses.field(default_factory=dict)
    layer_schemes: dict[str, WeightScheme] = dataclasses.field(default_factory=dict)
    layers: LayerSelector = LayerSelector()
    finetune: TrainConfig | None = None


@dataclasses.dataclass(frozen=True)
class DistillStage(Config):
    """Train the current model against a teacher: ``original`` (the model the recipe started from) or a path to
    a saved model file."""

    teacher: str = "original"
    temperature: float = 4.0
    alpha: float = 0.9
    loss: str = "kl"
    train: TrainConfig = TrainConfig(epochs=5, lr=0.01)

    def distill_config(self) -> DistillConfig:
        return DistillConfig(temperature=self.temperature, alpha=self.alpha, loss=self.loss, train=self.train)

    def validate(self) -> None:
        self.distill_config()  # the same checks as torchslim.distill


@dataclasses.dataclass(frozen=True)
class EncodeStage(Config):
    """Write the model as a .tslim file: sparse relative indices and codebook codes, each stream coded with the
    smallest of ``coders`` (``packed`` fixed-width bits, ``huffman``, ``ans``)."""

    coders: tuple[str, ...] = CODERS
    index_bits: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)

    def validate(self) -> None:
        check(len(self.coders) > 0, "coders must name at least one coder")
        for coder in self.coders:
            check(coder in CODERS, f"unknown coder {coder!r}; valid: {', '.join(CODERS)}")
        check(len(self.index_bits) > 0 and all(1 <= b <= 16 for b in self.index_bits), f"index_bits must be between 1 and 16, got {list(self.index_bits)}")


@dataclasses.dataclass(frozen=True)
class ExportStage(Config):
    """Export to ONNX and run in ONNX Runtime: fp32 (``int8: null``) or int8 (``int8: {mode: static, ...}``,
    QDQ with uint8 activations and int8 weights); the evaluation after this stage runs the exported file."""

    format: str = "onnx"
    int8: OnnxInt8Config | None = None

    def validate(self) -> None:
        check(self.format == "onnx", f"format must be 'onnx', got {self.format!r}")


STAGE_TYPES: dict[str, type[Config]] = {
    "prune": PruneStage,
    "prune-channels": ChannelPruneStage,
    "finetune": TrainConfig,
    "quantize": QuantizeStage,
    "distill": DistillStage,
    "encode": EncodeStage,
    "export": ExportStage,
}


TERMINAL_KINDS = ("encode", "export")


@dataclasses.dataclass(frozen=True)
class RecipeStage:
    """One stage: its kind and its typed settings."""

    kind: str
    config: Config

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.config.to_dict()}

    @property
    def label(self) -> str:
        return self.kind


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named, ordered list of stages."""

    name: str
    stages: tuple[RecipeStage, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(f"recipe {self.name!r}: stages must list at least one stage")
        kinds = [s.kind for s in self.stages]
        terminal = [i for i, kind in enumerate(kinds) if kind in TERMINAL_KINDS]
        if terminal and any(kind not in TERMINAL_KINDS for kind in kinds[terminal[0]:]):
            raise ConfigError(f"recipe {self.name!r}: encode and export write the final files, so only they may follow "
                              f"one another at the end (stages: {kinds})")

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any], where: str = "recipe") -> Recipe:
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'name' and 'stages', got {type(mapping).__name__}")
        unknown = sorted(set(mapping) - {"name", "description", "stages"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: name, description, stages")
        name = mapping.get("name", "recipe")
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected a string, got {name!r}")
        stages = mapping.get("stages")
        if not isinstance(stages, (list, tuple)):
            raise ConfigError(f"{where}.stages: expected a list of stages, got {stages!r}")
        parsed = []
        for index, entry in enumerate(stages, start=1):
            if isinstance(entry, RecipeStage):
                parsed.append(entry)
                continue
            if not isinstance(entry, Mapping) or len(entry) != 1:
                raise ConfigError(f"{where} stage {index}: expected a one-key mapping like {{prune: {{...}}}}, got {entry!r}")
            (kind, settings), = entry.items()
            if kind not in STAGE_TYPES:
                raise ConfigError(f"{where} stage {index}: unknown stage kind {kind!r}; valid: {', '.join(STAGE_TYPES)}")
            config = STAGE_TYPES[kind].from_dict(settings or {}, where=f"{where} stage {index} ({kind})")
            parsed.append(RecipeStage(kind, config))
        description = mapping.get("description", "")
        if not isinstance(description, str):
            raise ConfigError(f"{where}.description: expected a string, got {description!r}")
        return cls(name=name, stages=tuple(parsed), description=description)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "stages": [s.to_dict() for s in self.stages]}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> Recipe:
        where = "recipe"
        text = text_or_path
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                              and text_or_path.endswith((".yaml", ".yml"))):
            path = Path(text_or_path)
            if not path.is_file():
                raise ConfigError(f"recipe file {path} does not exist")
            text, where = path.read_text(), str(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{where}: not valid YAML ({error})") from None
        return cls.from_dict(data, where=where)

    def with_stage(self, index: int, **changes: Any) -> Recipe:
        """A copy with stage ``index`` (0-based) changed, validated again."""
        stage = self.stages[index]
        updated = STAGE_TYPES[stage.kind].from_dict({**stage.config.to_dict(), **changes}, where=f"recipe stage {index + 1} ({stage.kind})")
        stages = list(self.stages)
        stages[index] = RecipeStage(stage.kind, updated)
        return dataclasses.replace(self, stages=tuple(stages))


def builtin_recipes() -> dict[str, Path]:
    """{name: path} of the recipes shipped inside the package."""
    folder = resources.files("torchslim.pipeline") / "recipes"
    return {Path(str(entry)).stem: Path(str(entry)) for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.name.endswith(".yaml")}


def load_recipe(recipe: str | Path | Mapping[str, Any] | Recipe) -> Recipe:
    """A Recipe from a built-in name, a YAML file path, a plain mapping, or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    builtin = builtin_recipes()
    if isinstance(recipe, str) and recipe in builtin:
        return Recipe.from_yaml(builtin[recipe])
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        return Recipe.from_yaml(path)
    raise TorchslimError(f"unknown recipe {str(recipe)!r}: not a built-in ({', '.join(builtin)}) and not a .yaml file")
