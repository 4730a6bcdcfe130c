import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.core.errors import TorchslimError
from torchslim.pruning.masks import global_masks, layer_masks, std_threshold_masks, threshold_masks


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), sparsity=st.floats(0, 0.99), seed=st.integers(0, 1000))
def test_layer_masks_prune_exact_count_of_lowest(rows, cols, sparsity, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = layer_masks({"w": scores}, sparsity)["w"]
    pruned = int(round(sparsity * rows * cols))
    assert int((~mask).sum()) == pruned
    if 0 < pruned < rows * cols:
        assert scores[~mask].max() <= scores[mask].min()


def test_global_masks_share_one_threshold():
    scores = {"a": torch.tensor([[0.1, 0.9], [0.2, 0.8]]), "b": torch.tensor([0.3, 0.4, 0.05, 1.0])}
    masks = global_masks(scores, 0.5)
    assert masks["a"].tolist() == [[False, True], [False, True]]
    assert masks["b"].tolist() == [False, True, False, True]


def test_thresholds_and_han_rule():
    weights = {"w": torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])}
    assert threshold_masks({"w": weights["w"].abs()}, 1.0)["w"].tolist() == [True, False, False, False, True]
    std = weights["w"].std().item()
    masks = std_threshold_masks(weights, 1.0 / std)  # threshold = 1.0
    assert masks["w"].tolist() == [True, False, False, False, True]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_out_of_range_names_layer(bad):
    with pytest.raises(TorchslimError, match=r"fc2: sparsity must be in \[0, 1\)"):
        layer_masks({"fc2": torch.rand(3)}, bad)


def test_making_a_copy_permanent_leaves_the_original_masked_and_working():
    import copy

    import torchslim as ts

    torch.manual_seed(0)
    model = ts.prune(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2)), {"sparsity": 0.5}).model
    x = torch.randn(2, 1, 8, 8)
    before = model(x)
    permanent = ts.make_permanent(copy.deepcopy(model))
    assert torch.equal(permanent(x), before) and not hasattr(permanent[0], "parametrizations")
    assert torch.equal(model(x), before) and hasattr(model[0], "parametrizations")  # the original still runs, masked


def test_training_a_compressed_model_says_it_regrows_its_zeros_and_hold_zeros_keeps_them():
    """ts.compress hands back plain weights (masks folded): fine-tuning it further regrew every pruned weight
    without a word."""
    import warnings

    import torchslim as ts

    torch.manual_seed(0)
    x, y = torch.randn(256, 20), torch.randint(0, 4, (256,))
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    recipe = {"name": "p", "stages": [{"prune": {"sparsity": 0.8}}]}
    pruned = ts.compress(model, recipe, (x, y), latency=False, progress=False).model
    assert float((pruned[0].weight == 0).float().mean()) > 0.79
    config = {"epochs": 1, "lr": 0.05, "batch_size": 64, "eval_every_epoch": False}
    with pytest.warns(UserWarning, match=r"regrows the zeros of 2 pruned layer\(s\) that hold no mask \(0: 80% zeros, 2: 80% zeros\)"):
        trained = ts.train(pruned, (x, y), config, progress=False).model
    assert float((trained[0].weight == 0).float().mean()) < 0.1
    held = ts.compress(model, recipe, (x, y), latency=False, progress=False).model
    assert ts.pruning.hold_zeros(held) == ["0", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained = ts.train(held, (x, y), config, progress=False).model
    assert float((trained[0].weight == 0).float().mean()) > 0.79
