import pytest

from torchslim.core.config import ConfigError
from torchslim.core.errors import TorchslimError
from torchslim.pipeline import PruneStage, QuantizeStage, Recipe, RecipeStage, builtin_recipes, load_recipe

EXPECTED = {"channel-slim", "deep-compression", "int8-static", "prune-distill", "prune-int8", "weight-sharing"}


def test_builtin_recipes_ship_and_round_trip():
    assert EXPECTED <= set(builtin_recipes())
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description
        assert Recipe.from_yaml(recipe.to_yaml()) == recipe
        assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_deep_compression_recipe_is_the_paper_pipeline():
    recipe = load_recipe("deep-compression")
    assert [s.kind for s in recipe.stages] == ["prune", "quantize", "encode"]
    prune, quantize, encode = (s.config for s in recipe.stages)
    assert prune.scope == "global" and prune.finetune is not None and prune.sparsities[-1] >= 0.9
    assert quantize.weights.scheme == "kmeans" and quantize.weights.bits == 5 and quantize.type_schemes["Conv2d"].bits == 8
    assert quantize.finetune is not None  # centroid fine-tuning
    assert {"huffman", "ans"} <= set(encode.coders)


def test_python_and_yaml_forms_are_the_same_recipe():
    python = Recipe(name="r", stages=(RecipeStage("prune", PruneStage(sparsities=(0.5, 0.8))),
                                      RecipeStage("quantize", QuantizeStage())))
    yaml_text = """
name: r
stages:
  - prune: {sparsities: [0.5, 0.8]}
  - quantize: {}
"""
    assert Recipe.from_yaml(yaml_text) == python


@pytest.mark.parametrize("stages, message", [
    ([{"prune": {"sparsities": [0.5]}}, {"quantize": {"weights": {"bitz": 4}}}], r"stage 2 \(quantize\)\.weights: unknown key 'bitz'"),
    ([{"prune": {"sparsities": "lots"}}], r"stage 1 \(prune\)\.sparsities: expected list of float"),
    ([{"prune": {"sparsities": [0.9, 0.5]}}], r"stage 1 \(prune\).*must not decrease"),
    ([{"squeeze": {}}], r"stage 1: unknown stage kind 'squeeze'; valid: prune, prune-channels, finetune"),
    ([{"prune": {}, "quantize": {}}], r"stage 1: expected a one-key mapping"),
    ([{"finetune": {"epochs": "two"}}], r"stage 1 \(finetune\)\.epochs: expected an integer"),
    ([{"encode": {}}, {"prune": {}}], r"only they may follow"),
    ([{"encode": {"coders": ["zip"]}}], r"unknown coder 'zip'"),
    ([], r"at least one stage"),
])
def test_bad_recipes_name_the_stage_and_key(stages, message):
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict({"name": "bad", "stages": stages})


def test_unknown_top_level_key_and_missing_files():
    with pytest.raises(ConfigError, match="unknown key 'stage'"):
        Recipe.from_dict({"name": "x", "stage": []})
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("no-such-recipe.yaml")
    with pytest.raises(TorchslimError, match="unknown recipe 'fastest'"):
        load_recipe("fastest")


def test_yaml_file_recipe(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nstages:\n  - quantize: {weights: {scheme: uniform, bits: 6}}\n  - encode: {coders: [huffman]}\n")
    recipe = load_recipe(str(path))
    assert recipe.stages[0].config.weights.bits == 6 and recipe.stages[1].config.coders == ("huffman",)
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")


def test_with_stage_validates_again():
    recipe = load_recipe("deep-compression")
    changed = recipe.with_stage(0, sparsities=[0.5, 0.9])
    assert changed.stages[0].config.sparsities == (0.5, 0.9) and recipe.stages[0].config.sparsities != (0.5, 0.9)
    with pytest.raises(ConfigError, match=r"stage 1 \(prune\)"):
        recipe.with_stage(0, sparsities=[1.5])
