"""The network-compression verbs on models written the way users write them: torch's own transformer layers, Hugging
Face configs, subclassed layers, parametrized weights, nested block containers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from tests.zoo import same_after_save_pretrained
from torchslim.core.errors import TorchslimError
from torchslim.measure.counts import count_macs


def test_a_transformer_encoder_layer_infers_with_the_activation_it_was_given():
    """torch's fused inference path reads a flag, not the activation module: it ran GELU after GELU -> ReLU."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation=nn.GELU(), batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    x = torch.randn(3, 5, 8)
    result = ts.substitute_activations(model, {"to": "relu"}, example_input=x)
    replaced = result.model
    with torch.no_grad():
        fused = replaced(x)  # eval and no_grad: the fused path
        replaced.train()
        plain = replaced(x)  # the modules, one by one
        replaced.eval()
        assert torch.allclose(fused, plain, atol=1e-5)
        assert not torch.allclose(fused, model(x), atol=1e-3)
    assert any("fused inference path set to ReLU" in note for note in result.report.stages[0].notes)
    hard = ts.substitute_activations(model, {"to": "hard"}, example_input=x).model
    assert all(layer.activation_relu_or_gelu == 0 for layer in hard[1].layers)  # Hardswish: the fused path is off


def test_a_hugging_face_config_names_the_new_activation_so_save_pretrained_reloads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    lm = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 6))
    result = ts.substitute_activations(lm, {"to": "relu"}, example_input={"input_ids": ids})
    assert result.model.config.hidden_act == "relu" and lm.config.hidden_act == "silu"  # the caller's model keeps its own
    assert same_after_save_pretrained(result.model, ids, tmp_path, atol=1e-5)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.elu = nn.ELU()

    def forward(self, x):
        h = self.elu(self.fc1(x))
        return F.relu6(h.sigmoid() + h.tanh() + F.leaky_relu(self.fc2(h)))


def test_activation_notes_say_what_was_left_and_every_functional_call_is_counted():
    x = torch.randn(2, 8)
    notes = ts.substitute_activations(Functional(), {"to": "hard"}, example_input=x).report.stages[0].notes
    assert "elu: ELU left (to: hard has no variant of it; to: relu replaces it)" in notes
    for kind in ("sigmoid", "tanh", "leaky_relu", "relu6"):
        assert f"1 call(s) of {kind} as a function in forward code: not replaced (only activation modules can be)" in notes, notes
    with pytest.raises(TorchslimError, match=r"layer pattern 'seqq\.\*' matches no module"):
        ts.substitute_activations(Functional(), {"layers": {"include": ["seqq.*"]}}, example_input=x)


class OnlyFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.silu(self.fc(x))


def test_a_model_of_functional_activations_gets_them_counted_not_an_error():
    result = ts.substitute_activations(OnlyFunctional(), {"to": "relu"}, example_input=torch.randn(2, 8))
    assert result.report.stages[0].metrics["replaced"] == 0
    assert "1 call(s) of silu as a function in forward code: not replaced (only activation modules can be)" in result.report.stages[0].notes


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.out = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.out(F.relu(F.linear(F.relu(self.inp(x)), self.fc.weight, self.fc.bias)))


def test_factorize_leaves_whole_a_subclassed_layer_and_one_whose_weight_the_model_reads():
    torch.manual_seed(0)
    scaled = nn.Sequential(ScaledLinear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    result = ts.factorize(scaled, {"rank": 2}, example_input=torch.randn(4, 16))
    assert isinstance(result.model[0], ScaledLinear)
    assert "0: left whole (ScaledLinear has its own forward, which two plain factor layers would not run)" in result.report.stages[0].notes
    model, x = ReadsWeight().eval(), torch.randn(4, 8)
    for inplace in (False, True):
        user = ReadsWeight().eval() if inplace else model
        result = ts.factorize(user, {"rank": 2}, example_input=x, inplace=inplace)
        assert isinstance(result.model.fc, nn.Linear) and not isinstance(result.model.inp, nn.Linear)  # the read layer stays whole
        assert any(note.startswith("fc: left whole (the model fails with it factorized") for note in result.report.stages[0].notes)
        assert [row["name"] for row in result.report.stages[0].layers] == ["inp", "out"]
        assert result.model(x).shape == (4, 3)
    unchecked = ts.factorize(model, {"rank": 2})
    assert any(note.startswith("not checked: without data or example_input") for note in unchecked.report.stages[0].notes)


def test_factorize_overrides_take_the_most_specific_pattern_and_a_pattern_that_picks_nothing_is_an_error():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    ranks = lambda config: {row["name"]: row["rank"] for row in ts.factorize(model, config).report.stages[0].layers}  # noqa: E731
    assert ranks({"rank": 8, "overrides": {"*": 16, "0": 4}}) == {"0": 4, "2": 16}
    assert ranks({"rank": 8, "overrides": {"type:Linear": 16, "0": 4}}) == {"0": 4, "2": 16}
    with pytest.raises(TorchslimError, match=r"factorize.overrides: layer pattern 'typo' picks none of the selected layers"):
        ts.factorize(model, {"rank": 8, "overrides": {"typo": 2}})
    with pytest.raises(TorchslimError, match=r"factorize.rank_shares: layer pattern 'typo' picks none"):
        ts.factorize(model, {"rank": 8, "rank_shares": {"typo": 0.5}})


def test_sensitivity_measures_layers_whose_weight_is_computed_and_leaves_them_as_they_were():
    """A weight_norm parametrization or a pruning mask recomputes the weight at each access: a change to it never
    reached the forward, and every row read the baseline."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 32), torch.randint(0, 3, (16,))) for _ in range(2)]
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(32, 32)), nn.ReLU(), nn.Linear(32, 3))
    masked = ts.prune(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)), {"sparsity": 0.5}).model
    for model in (normed, masked):
        before = {key: value.clone() for key, value in model.state_dict().items()}
        result = ts.sensitivity(model, data, {"sparsities": [0.99], "bits": [2], "ranks": [1], "layers": {"include": ["0"]}})
        stage = result.report.stages[0]
        assert all(abs(row["loss"] - stage.metrics["loss"]) > 1e-4 for row in stage.layers), stage.layers
        assert any(note.startswith("measured on a copy with computed weights folded") for note in stage.notes)
        assert result.model is model and all(torch.equal(before[key], value) for key, value in model.state_dict().items())
        assert hasattr(model[0], "parametrizations")


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.c2(F.relu(self.c1(x))))


def _stages():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Sequential(Block(8), Block(8)),
        nn.Sequential(Block(8), Block(8)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


class Recurrent(nn.Module):
    """One block applied three times (weights shared across depth), then two of their own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([Block(8), Block(8), Block(8)])
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(3):
            x = self.blocks[0](x)
        return self.head(self.blocks[2](self.blocks[1](x)).mean((2, 3)))


def test_remove_blocks_never_counts_a_block_inside_a_removed_one_and_fails_without_touching_the_model():
    data = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    result = ts.remove_blocks(_stages(), {"count": 3}, data=data)  # the blocks of the stages, not the stages
    assert result.report.stages[0].metrics["candidates"] == 4 and all(name.count(".") == 1 for name in result.report.stages[0].metrics["removed"])
    model = _stages()
    nested = {"count": 5, "layers": {"include": ["type:Sequential", "type:Block"]}}  # stages and their blocks, chosen by the user
    with pytest.raises(TorchslimError, match=r"only \d of 5 blocks could be removed .*inside or around removed ones.*the model is unchanged"):
        ts.remove_blocks(model, nested, data=data, inplace=True)
    assert [type(child).__name__ for child in model] == ["Conv2d", "Sequential", "Sequential", "AdaptiveAvgPool2d", "Flatten", "Linear"]
    assert all(isinstance(block, Block) for stage in (model[1], model[2]) for block in stage)
    shared = ts.remove_blocks(Recurrent().eval(), {"count": 1, "iterative": False}, data=data)
    assert shared.report.stages[0].metrics["removed"] in (["blocks.1"], ["blocks.2"]) and shared.report.stages[0].metrics["candidates"] == 2
    assert "not candidates: blocks.0 (each runs several times per forward: bypassing it would remove every application)" in shared.report.stages[0].notes


def test_sensitivity_at_one_bit_measures_two_levels_per_channel_not_the_two_bit_grid():
    from torchslim.compression.sensitivity import _quantized

    torch.manual_seed(0)
    weight = torch.randn(4, 16)
    one, two = _quantized(weight, 1, "uniform"), _quantized(weight, 2, "uniform")
    assert all(len(row.unique()) == 2 for row in one) and not torch.equal(one, two)
    assert torch.allclose(one.abs().mean(1), weight.abs().mean(1))  # sign times the channel's mean |w|


def test_factorize_takes_gpt2s_conv1d_projections_and_the_file_loads_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 8))
    result = ts.factorize(gpt, {"rank": 4}, example_input={"input_ids": ids})
    names = {row["name"] for row in result.report.stages[0].layers}
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_proj"} <= names
    assert result.report.stages[0].metrics["parameter_ratio"] > 1.2
    exact = ts.factorize(gpt, {"rank": 32, "min_saving": 0.0, "layers": {"include": ["transformer.h.0.attn.c_proj"]}}, example_input={"input_ids": ids})
    with torch.no_grad():  # a full-rank factorization of the (in, out) weight computes what the layer computes
        assert torch.allclose(exact.model(ids).logits, gpt(ids).logits, atol=1e-4)
        loaded = ts.load(ts.save(result.model, tmp_path / "gpt.safetensors"), trust_factory=True).eval()
        assert torch.equal(loaded(ids).logits, result.model(ids).logits)


class BareTie(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.shared = self.fc.weight  # the model's own parameter, tied to the layer's

    def forward(self, x):
        return self.fc(x) @ self.shared


def test_a_weight_tied_to_a_bare_parameter_is_named_by_that_parameter():
    notes = ts.factorize(BareTie(), {"rank": 2}, example_input=torch.randn(2, 16)).report.stages[0].notes
    assert "fc: left whole (its weight is tied to shared: factorizing it would untie it and add a copy)" in notes


def test_activation_selection_by_the_block_holding_them():
    """include naming a block replaced nothing and reported success; now it selects the activations inside the block,
    exclude leaves a block's out, and a selection that holds no activation is an error naming what it holds."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)) for _ in range(2)])

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    x = torch.randn(2, 8)
    first = ts.substitute_activations(Net(), {"to": "relu", "layers": {"include": ["blocks.0"]}}, example_input=x).model
    assert type(first.blocks[0][1]) is nn.ReLU and type(first.blocks[1][1]) is nn.GELU
    rest = ts.substitute_activations(Net(), {"to": "relu", "layers": {"exclude": ["blocks.0"]}}, example_input=x).model
    assert type(rest.blocks[0][1]) is nn.GELU and type(rest.blocks[1][1]) is nn.ReLU
    with pytest.raises(ts.TorchslimError, match=r"select no activation module that to=.relu. replaces \(blocks.0.0 is Linear\)"):
        ts.substitute_activations(Net(), {"to": "relu", "layers": {"include": ["blocks.0.0"]}}, example_input=x)


class _InlineResidual(nn.Module):
    """Residual branches added in the parent's forward (x = x + block(x), pre-norm x = x + block(norm(x))), next to a
    block that holds its own residual."""

    def __init__(self, width=16):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.branches = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(2)])
        self.norm = nn.LayerNorm(width)
        self.prenorm = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.Tanh())])
        self.whole = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))  # a stage whose blocks are plain layers
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        x = self.inp(x)
        for block in self.branches:
            x = x + block(x)
        for block in self.prenorm:
            x = x + 0.5 * block(self.norm(x))
        return self.out(x)


def test_a_residual_branch_written_in_the_parent_is_removed_as_adding_nothing(tmp_path):
    """Bypassing x + block(x) by the identity doubled the stream (x + x): the branch that contributed nothing scored
    as harmful and another block went instead."""
    from torchslim.compression.depth import BRANCH, candidate_blocks

    torch.manual_seed(0)
    model = _InlineResidual().eval()
    with torch.no_grad():
        model.branches[1][2].weight.mul_(1e-4)
        model.branches[1][2].bias.zero_()
    x = torch.randn(32, 8)
    batches = [(x, torch.randint(0, 3, (32,)))] * 2
    assert set(candidate_blocks(copy.deepcopy(model), x[:1])) >= {"branches.0", "branches.1", "prenorm.0"}
    result = ts.remove_blocks(model, {"count": 1, "layers": {"include": ["branches.*", "prenorm.*"]}}, data=batches)
    scores = {row["name"]: row["loss_rise_when_bypassed"] for row in result.report.stages[0].layers}
    assert abs(scores["branches.1"]) < 1e-3 and abs(scores["branches.0"]) > 10 * abs(scores["branches.1"])
    one = ts.remove_blocks(model, {"count": 1, "layers": {"include": ["branches.1"]}}, data=batches).model
    assert getattr(model.branches[1], BRANCH, False) is False  # the caller's blocks are not marked
    with torch.no_grad():
        stream = model.inp(x)
        stream = stream + model.branches[0](stream)
        stream = stream + 0.5 * model.prenorm[0](model.norm(stream))
        assert torch.allclose(one(x), model.out(stream), atol=1e-6)
        assert torch.allclose(ts.load(ts.save(one, tmp_path / "one.safetensors"), trust_factory=True)(x), one(x))
    prenorm = ts.remove_blocks(model, {"count": 1, "layers": {"include": ["prenorm.0"]}}, data=batches)
    assert "prenorm.0: residual branches" in " ".join(prenorm.report.stages[0].notes)

    from torchslim.compression.depth import leaves_no_marks

    @leaves_no_marks
    def finds(caller, example):
        found = candidate_blocks(caller, example)
        assert getattr(caller.branches[0], BRANCH, False)  # marked while the function runs, for its copies to carry
        return found

    finds(model, x[:1])
    assert not any(getattr(module, BRANCH, False) for module in model.modules())  # the caller's model is left as it was


class _Aliased(nn.Module):
    """One layer kept under two attribute names (self.block2 = self.block1), called twice."""

    def __init__(self):
        super().__init__()
        self.inp, self.block1, self.head = nn.Linear(20, 64), nn.Linear(64, 64), nn.Linear(64, 4)
        self.block2 = self.block1

    def forward(self, x):
        return self.head(F.relu(self.block2(F.relu(self.block1(F.relu(self.inp(x)))))))


def _classes(count=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 20, generator=generator)
    return x, (x[:, :4] * torch.tensor([1.0, -1.0, 0.5, 2.0])).argmax(1)


def test_a_layer_under_two_names_is_counted_once_by_the_size_budget():
    """Its weight was counted again as a tensor 'stored whole': a 6,000-byte budget was refused as too small for the
    fixed bytes (18,192), though the file stores the layer once."""
    torch.manual_seed(0)
    model = _Aliased()
    x, y = _classes()
    ts.train(model, (x, y), {"epochs": 5, "lr": 0.01, "batch_size": 64, "eval_every_epoch": False}, progress=False)
    config = {
        "target_size": 6000,
        "rounds": 2,
        "sparsities": [0.7, 0.9],
        "bits": [4, 2],
        "ranks": [],
        "prune_steps": 1,
        "finetune": {"epochs": 1, "lr": 0.01, "eval_every_epoch": False},
    }
    result = ts.compression.auto_compress(model, (x, y), config, progress=False)
    rounds = result.report.artifacts["allocation"]["rounds"]
    assert any(r["met"] for r in rounds) and min(r["measured_bytes"] for r in rounds if r["met"]) <= 6000


class _Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv1d(4, 16, 5, padding=2), nn.Conv1d(16, 32, 5, padding=2), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean(-1))


def test_layers_a_technique_does_not_take_are_named_not_dropped():
    """type:Conv1d among the include patterns was dropped without a word (sensitivity measured only the Linear), and
    auto_compress with layers.types [Conv1d] failed in its own quantize stage after the whole sensitivity sweep."""
    model, data = _Sequence(), [(torch.randn(8, 4, 16), torch.randint(0, 3, (8,))) for _ in range(2)]
    with pytest.raises(TorchslimError, match=r"layer 'c1' \(Conv1d, picked by 'type:Conv1d'\) is not one of the selectable types Linear, Conv2d"):
        ts.sensitivity(model, data, {"sparsities": [0.5], "layers": {"include": ["type:Conv1d", "type:Linear"]}})
    with pytest.raises(ts.ConfigError, match="layer 'c1' is a Conv1d; auto_compress compresses Linear and Conv2d layers"):
        ts.compression.auto_compress(model, data, {"target_size": 4000, "layers": {"types": ["Conv1d", "Linear"]}}, progress=False)


def test_the_budget_verbs_rank_by_the_loss_of_unlabeled_data():
    """The fidelity task (unlabeled data: outputs against the original model's) reported no loss, so auto_compress and
    auto_narrow refused data that prune_channels took."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 32))
    batches = list((torch.randn(256, 8) @ torch.randn(8, 32)).split(64))
    narrowed = ts.compression.auto_narrow(model, batches, {"target_macs": 0.6, "finetune": None, "ratios": [0.5]})
    assert count_macs(narrowed.model, batches[0])["total"] <= 0.6 * count_macs(model, batches[0])["total"]
    assert "loss" in ts.evaluate(narrowed.model, batches, task="fidelity", reference=model)


class _NormMLP(nn.Module):
    def __init__(self, norm="ln"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 64), nn.Linear(64, 4)
        self.norm = {"ln": nn.LayerNorm(64), "bn": nn.BatchNorm1d(64)}[norm]  # the argument is not kept as self.norm

    def forward(self, x):
        return self.fc2(F.relu(self.norm(self.fc1(x))))


def test_saving_a_narrowed_model_whose_default_was_assumed_says_why_and_how(tmp_path):
    """The error was the replayed pruning step's shape mismatch, naming neither the assumed default nor factory=."""
    model = _NormMLP("bn").eval()
    x, y = _classes(64)
    narrowed = ts.narrow(model, 0.5, data=(x, y)).model
    with pytest.raises(TorchslimError, match=r"keeps no attribute named 'norm'.*replaying its recorded changes fails.*factory="):
        ts.save(narrowed, tmp_path / "narrow.safetensors")
    assert not (tmp_path / "narrow.safetensors").exists()
