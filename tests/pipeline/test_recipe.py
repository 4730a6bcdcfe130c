import pytest

from torchslim.core.config import ConfigError
from torchslim.core.errors import TorchslimError
from torchslim.pipeline import STAGES, Recipe, RecipeStage, builtin_recipes, load_recipe
from torchslim.pruning import PruneConfig
from torchslim.quantization import WeightOnlyConfig
from torchslim.train import TrainConfig

EXPECTED = {"channel-slim", "deep-compression", "int8-static", "prune-distill", "prune-int8", "weight-sharing"}


def test_builtin_recipes_ship_and_round_trip():
    assert set(builtin_recipes()) >= EXPECTED
    for name in builtin_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description
        assert Recipe.from_yaml(recipe.to_yaml()) == recipe
        assert Recipe.from_dict(recipe.to_dict()) == recipe


def test_deep_compression_recipe_is_the_paper_pipeline():
    recipe = load_recipe("deep-compression")
    assert [s.kind for s in recipe.stages] == ["prune", "quantize", "encode"]
    prune, quantize, encode = recipe.stages
    assert prune.config.scope == "global" and prune.finetune is not None and prune.config.steps[-1] >= 0.9
    assert quantize.config.weights.scheme == "kmeans" and quantize.config.weights.bits == 5
    conv = quantize.config.overrides["type:Conv2d"]
    assert (conv.scheme, conv.bits, conv.kmeans_init) == ("kmeans", 8, "linear")  # the override is merged onto the weights scheme
    assert quantize.finetune is not None  # centroid fine-tuning
    assert {"huffman", "ans"} <= set(encode.config.coders)


def test_python_and_yaml_forms_are_the_same_recipe():
    python = Recipe(
        name="r", stages=(RecipeStage("prune", PruneConfig(sparsity=(0.5, 0.8)), finetune=TrainConfig(epochs=1)), RecipeStage("quantize", WeightOnlyConfig()))
    )
    yaml_text = """
name: r
stages:
  - prune: {sparsity: [0.5, 0.8], finetune: {epochs: 1}}
  - quantize: {}
"""
    assert Recipe.from_yaml(yaml_text) == python


def test_every_stage_kind_parses_its_defaults_and_round_trips():
    """Parametrized over the registry: each stage kind takes {} (or its verb's defaults) and round-trips."""
    for kind in STAGES.names():
        settings = {"sparsity": 0.5} if kind == "prune" else {}
        stage = RecipeStage.parse(kind, settings, f"stage ({kind})")
        ((again, plain),) = stage.to_dict().items()
        assert again == kind and RecipeStage.parse(kind, plain, "again") == stage


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"prune": {"sparsity": [0.5]}}, {"quantize": {"weights": {"bitz": 4}}}], r"stage 2 \(quantize\)\.weights: unknown key 'bitz'"),
        ([{"prune": {"sparsity": "lots"}}], r"stage 1 \(prune\)\.sparsity: expected float \| list of float \| null"),
        ([{"prune": {"sparsity": [0.9, 0.5]}}], r"stage 1 \(prune\).*must not decrease"),
        ([{"prune": {"sparsity": 0.5, "method": "l1"}}], r"stage 1 \(prune\): unknown key 'method'"),
        ([{"squeeze": {}}], r"stage 1 \(squeeze\): unknown stage kind 'squeeze'; valid: activations, depth, distill"),
        ([{"encode": {"finetune": {"epochs": 1}}}], r"stage 1 \(encode\): unknown key 'finetune'"),
        ([{"quantize": {"method": "onnxruntime"}}, {"finetune": {}}], r"only be followed by one another at the end"),
        ([{"quantize": {"method": "lossless"}}], r"unknown quantization method 'lossless'"),
        ([{"prune": {}, "quantize": {}}], r"stage 1: expected a one-key mapping"),
        ([{"finetune": {"epochs": "two"}}], r"stage 1 \(finetune\)\.epochs: expected an integer"),
        ([{"encode": {}}, {"prune": {"sparsity": 0.5}}], r"only be followed by one another"),
        ([{"encode": {"coders": ["zip"]}}], r"unknown coder 'zip'"),
        ([], r"at least one stage"),
    ],
)
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
    changed = recipe.with_stage(0, sparsity=[0.5, 0.9])
    assert changed.stages[0].config.sparsity == (0.5, 0.9) and recipe.stages[0].config.sparsity != (0.5, 0.9)
    assert changed.stages[0].finetune == recipe.stages[0].finetune
    with pytest.raises(ConfigError, match=r"stage 1 \(prune\)"):
        recipe.with_stage(0, sparsity=[1.5])


@pytest.mark.parametrize("after", ["export", "encode"])
def test_an_int8_engine_stage_ends_the_recipe(after):
    """``quantize native-int8`` then ``export`` exported the float model over the int8 ONNX file the quantize stage
    had written (an fp32 file where int8 was asked, with no error); then ``encode`` reported a .tslim never written."""
    mapping = {"name": "mine", "stages": [{"quantize": {"method": "native-int8"}}, {after: {}}]}
    with pytest.raises(ConfigError, match=rf"stage 1 \(quantize, method native-int8\) hands back an int8 engine .* the stages after it \({after}\)"):
        Recipe.from_dict(mapping)
    assert Recipe.from_dict({"name": "mine", "stages": [{"prune": {"sparsity": 0.5}}, {"quantize": {"method": "native-int8"}}]}).stages[-1].terminal
