"""Recipes: a named, ordered list of stages, each the config of a verb (plus optional fine-tuning).

In YAML a stage is a one-key mapping from its kind to the verb's config::

    name: deep-compression
    description: prune, k-means quantize with centroid fine-tuning, entropy-code
    stages:
      - prune: {sparsity: [0.5, 0.8, 0.9], importance: l1, scope: global, finetune: {epochs: 2, lr: 0.02}}
      - quantize: {weights: {scheme: kmeans, bits: 5}, finetune: {epochs: 1, optimizer: adam, lr: 0.00003}}
      - encode: {coders: [huffman, ans]}

A stage kind is registered once (``pipeline.stages``) with the verb's config type, whether it takes ``finetune``,
any keys of its own (the teacher of ``distill``), and whether it must end the recipe; a new technique registers one
stage kind and nothing else changes. Every stage is validated by its typed config: an unknown key or a wrong type
is an error that names the stage (its position and kind) and the key. Recipes round-trip through ``to_dict`` /
``to_yaml``.

Example:
    >>> recipe = Recipe.from_dict({"name": "r", "stages": [{"prune": {"sparsity": [0.5]}}, {"encode": {}}]})
    >>> [stage.kind for stage in recipe.stages]
    ['prune', 'encode']
    >>> Recipe.from_yaml(recipe.to_yaml()) == recipe
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from torchslim.core.config import Config, ConfigError
from torchslim.core.errors import TorchslimError
from torchslim.core.registry import Registry
from torchslim.train.fit import TrainConfig


@dataclasses.dataclass(frozen=True)
class StageKind:
    """A registered kind of recipe stage.

    ``parse(mapping, where)`` validates the verb's config; ``run(context, stage)`` applies it (see
    ``pipeline.stages``); ``finetune``: whether the stage takes a ``finetune`` training run; ``options``: a config of
    keys the stage has beside the verb's; ``terminal(config)``: whether the stage writes a final artifact, so only
    terminal stages may follow it; ``writes_onnx(config)``: whether that artifact is an ONNX file the run needs a
    path for.
    """

    name: str
    parse: Callable[[Any, str], Config]
    run: Callable[..., Any]
    finetune: bool = False
    options: type[Config] | None = None
    terminal: Callable[[Config], bool] = lambda config: False
    writes_onnx: Callable[[Config], bool] = lambda config: False


STAGES: Registry[StageKind] = Registry("stage kind")


def _predicate(value: Callable[[Config], bool] | bool) -> Callable[[Config], bool]:
    return value if callable(value) else (lambda config: value)


def register_stage(
    name: str,
    parse: Callable[[Any, str], Config] | type[Config],
    finetune: bool = False,
    options: type[Config] | None = None,
    terminal: Callable[[Config], bool] | bool = False,
    writes_onnx: Callable[[Config], bool] | bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``run(context, stage) -> StageOutcome`` as stage kind ``name`` (``parse``: a Config type or a
    function of (mapping, where)); its docstring's first line describes it."""
    parser: Callable[[Any, str], Config] = parse.from_dict if isinstance(parse, type) else parse  # type: ignore[attr-defined]

    def add(run: Callable[..., Any]) -> Callable[..., Any]:
        kind = StageKind(name, parser, run, finetune, options, _predicate(terminal), _predicate(writes_onnx))
        STAGES.register(name, (run.__doc__ or "").strip())(kind)
        return run

    return add


@dataclasses.dataclass(frozen=True)
class RecipeStage:
    """One stage: its kind, the verb's typed config, an optional fine-tuning run and the stage's own options."""

    kind: str
    config: Config
    finetune: TrainConfig | None = None
    options: Config | None = None

    def to_dict(self) -> dict[str, Any]:
        settings = self.config.to_dict()
        if self.options is not None:
            settings.update(self.options.to_dict())
        if self.finetune is not None:
            settings["finetune"] = self.finetune.to_dict()
        return {self.kind: settings}

    @property
    def terminal(self) -> bool:
        """Whether this stage writes a final artifact (only such stages may follow it)."""
        return STAGES.get(self.kind).terminal(self.config)

    @property
    def writes_onnx(self) -> bool:
        """Whether this stage writes an ONNX file (the run needs a path for it)."""
        return STAGES.get(self.kind).writes_onnx(self.config)

    @classmethod
    def parse(cls, kind: str, settings: Any, where: str) -> RecipeStage:
        """Validate one stage's settings: its options' keys and ``finetune`` are taken out, the rest is the verb's."""
        if kind not in STAGES:
            raise ConfigError(f"{where}: unknown stage kind {kind!r}; valid: {', '.join(STAGES.names())}")
        entry = STAGES.get(kind)
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where}: expected a mapping of settings, got {settings!r}")
        settings = dict(settings)
        finetune = None
        if "finetune" in settings and entry.finetune:
            raw = settings.pop("finetune")
            finetune = None if raw is None else TrainConfig.coerce(raw, where=f"{where}.finetune")
        options = None
        if entry.options is not None:
            names = {f.name for f in dataclasses.fields(entry.options)}
            options = entry.options.from_dict({k: settings.pop(k) for k in list(settings) if k in names}, where=where)
        return cls(kind, entry.parse(settings, where), finetune, options)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named, ordered list of stages."""

    name: str
    stages: tuple[RecipeStage, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError(f"recipe {self.name!r}: stages must list at least one stage")
        terminal = [i for i, stage in enumerate(self.stages) if stage.terminal]
        if terminal and any(not stage.terminal for stage in self.stages[terminal[0] :]):
            raise ConfigError(
                f"recipe {self.name!r}: stages that write the final artifact (encode, export, int8 engines) may only be "
                f"followed by one another at the end (stages: {[s.kind for s in self.stages]})"
            )
        engine = next((i for i, stage in enumerate(self.stages) if stage.kind == "quantize" and stage.terminal), None)
        if engine is not None and engine < len(self.stages) - 1:
            # what follows would work on the float model the engine was made from (an export would write it over the int8 file)
            method = getattr(self.stages[engine].config, "method", "int8")
            raise ConfigError(
                f"recipe {self.name!r}: stage {engine + 1} (quantize, method {method}) hands back an int8 engine (the ONNX file it writes, or "
                f"a compiled model), so it ends the recipe; the stages after it ({', '.join(s.kind for s in self.stages[engine + 1 :])}) would "
                "work on the float model it was made from: remove them"
            )

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
            ((kind, settings),) = entry.items()
            parsed.append(RecipeStage.parse(kind, settings, f"{where} stage {index} ({kind})"))
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
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path and text_or_path.endswith((".yaml", ".yml"))):
            path = Path(text_or_path)
            if not path.is_file():
                raise ConfigError(f"recipe file {path} does not exist")
            text, where = path.read_text(), str(path)
        try:
            data = yaml.safe_load(str(text))
        except yaml.YAMLError as error:
            raise ConfigError(f"{where}: not valid YAML ({error})") from None
        return cls.from_dict(data, where=where)

    def with_stage(self, index: int, **changes: Any) -> Recipe:
        """A copy with stage ``index`` (0-based) changed, validated again."""
        stage = self.stages[index]
        ((kind, settings),) = stage.to_dict().items()
        updated = RecipeStage.parse(kind, {**settings, **changes}, f"recipe stage {index + 1} ({kind})")
        stages = list(self.stages)
        stages[index] = updated
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


__all__ = ["STAGES", "Recipe", "RecipeStage", "StageKind", "builtin_recipes", "load_recipe", "register_stage"]
