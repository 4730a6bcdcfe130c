import copy

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.config import ConfigError
from torchslim.core.errors import TorchslimError
from torchslim.pruning import GROUP_IMPORTANCE, StructuredConfig, prune_channels, remove_channels, select_groups, trace

ARCHITECTURES = {
    "lenet-5": (lambda: ts.models.create("lenet-5"), lambda: torch.randn(4, 1, 28, 28), {}),
    "lenet-300-100": (lambda: ts.models.create("lenet-300-100"), lambda: torch.randn(4, 1, 28, 28), {}),
    "resnet20": (lambda: ts.models.create("resnet20"), lambda: torch.randn(4, 3, 32, 32), {}),
    "resnet56": (lambda: ts.models.create("resnet56"), lambda: torch.randn(2, 3, 32, 32), {}),
    "resnet18-style": (lambda: ts.models.create("resnet18-style", stage_widths=(16, 32, 64, 128)), lambda: torch.randn(2, 3, 32, 32), {}),
    "mobilenetv2": (lambda: ts.models.create("mobilenetv2"), lambda: torch.randn(2, 3, 32, 32), {}),
    "char-transformer": (
        lambda: ts.models.create("char-transformer", block_size=16, layers=2, embed_dim=32, heads=4),
        lambda: torch.randint(0, 65, (2, 16)),
        {"prune_residual": False, "head_ratio": 0.5},
    ),
}


def _randomize_norms(model: nn.Module) -> None:
    """Trained-looking BatchNorm statistics so that the test means something."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _zero(model: nn.Module, groups, heads) -> None:
    """Make the chosen channels carry exact zeros: producer rows and biases, and norm scales/shifts."""
    with torch.no_grad():
        for group in groups:
            for piece in group.producers + [m for m in group.members if m.name in ("weight", "bias")]:
                tensor = getattr(model.get_submodule(piece.module), piece.name)
                tensor.index_fill_(piece.dim, torch.tensor(piece.indices), 0.0)
        for head in heads:
            for piece in head.slices:
                if piece.dim == 0:
                    getattr(model.get_submodule(piece.module), piece.name).index_fill_(0, torch.tensor(piece.indices), 0.0)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_removing_zero_channels_leaves_outputs_unchanged(name):
    build, example, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build().eval()
    _randomize_norms(model)
    x = example()
    graph = trace(model, x)
    config = StructuredConfig(ratio=0.4, importance="random", **extra)
    groups, _ = select_groups(model, graph, config)
    heads = [h for i, h in enumerate(graph.heads) if i % 4 in (1, 2)] if extra.get("head_ratio") else []
    assert groups, "something must be prunable"
    _zero(model, groups, heads)
    expected = model(x)
    pruned = copy.deepcopy(model)
    remove_channels(pruned, graph, groups, heads)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    output = pruned(x)
    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_pruned_model_saves_reloads_and_keeps_its_mode(name, tmp_path):
    build, example, extra = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = build()
    model.train()
    x = example()
    result = prune_channels(model, {"ratio": 0.5, **extra}, example_input=x)
    assert result.model.training and model.training  # mode preserved on both
    pruned = result.model.eval()
    assert pruned(x).shape == model.eval()(x).shape
    path = ts.save(pruned, tmp_path / "p.safetensors")
    loaded = ts.load(path)
    assert torch.equal(loaded(x), pruned(x))
    assert result.report.stages[0].metrics["macs"] < result.report.stages[0].metrics["macs_before"]


@pytest.mark.parametrize("round_to", [1, 8])
def test_channel_counts_follow_the_ratio_and_rounding(round_to):
    x = torch.randn(2, 3, 32, 32)
    model = ts.models.create("resnet56")
    result = prune_channels(model, {"ratio": 0.3, "round_to": round_to, "prune_residual": False}, example_input=x)
    for (name, before), after in zip(model.named_modules(), result.model.modules()):
        if isinstance(before, nn.Conv2d) and name.endswith("conv1") and name != "conv1":
            expected = before.out_channels - round(0.3 * before.out_channels)
            if round_to > 1:
                expected = max(round_to, round(expected / round_to) * round_to)
            assert after.out_channels == expected, name
        if isinstance(before, nn.Conv2d) and name.endswith("conv2"):
            assert after.out_channels == before.out_channels  # residual streams left whole when asked
    lenet = prune_channels(ts.models.create("lenet-5"), {"ratio": 0.5}, example_input=torch.zeros(1, 1, 28, 28)).model
    assert (lenet.conv1.out_channels, lenet.conv2.out_channels, lenet.fc1.out_features, lenet.fc2.out_features) == (10, 25, 250, 10)
    assert lenet.fc1.in_features == 25 * 4 * 4  # a flatten block per removed channel


def test_overrides_protection_and_global_scope():
    x = torch.zeros(1, 1, 28, 28)
    model = ts.models.create("lenet-300-100")
    result = prune_channels(model, {"ratio": 0.5, "overrides": {"fc2": 0.1}}, example_input=x)
    assert (result.model.fc1.out_features, result.model.fc2.out_features) == (150, 90)
    assert "protected: output channels of fc3 (they are the model's output)" in result.report.stages[0].notes
    assert result.report.stages[0].metrics["macs_ratio"] > 1.9  # the words "ratio 0.5" do what they say on an MLP
    result = prune_channels(model, {"ratio": 0.5, "overrides": {"fc1": 0.0}}, example_input=x)
    assert (result.model.fc1.out_features, result.model.fc2.out_features) == (300, 50)
    assert "protected by overrides: fc1" in result.report.stages[0].notes
    result = prune_channels(model, {"ratio": 0.5, "layers": {"exclude": ["fc2"]}}, example_input=x)
    assert (result.model.fc1.out_features, result.model.fc2.out_features) == (150, 100)
    with torch.no_grad():
        model.fc2.weight.mul_(100)  # fc2's neurons much larger: the global ranking (normalized per set) is unaffected
    result = prune_channels(model, {"ratio": 0.5, "scope": "global"}, example_input=x)
    assert result.model.fc1.out_features + result.model.fc2.out_features == 200
    with pytest.raises(TorchslimError, match="picks none of the selected layers"):
        prune_channels(model, {"ratio": 0.5, "overrides": {"fc9": 0.0}}, example_input=x)


def test_option_a_shortcut_gets_an_index_after_pruning():
    x = torch.randn(2, 3, 32, 32)
    model = ts.models.create("resnet20").eval()
    result = prune_channels(model, {"ratio": 0.5}, example_input=x)
    shortcut = result.model.layer2[0].shortcut
    assert shortcut.index is not None and len(shortcut.index) == shortcut.in_channels
    assert shortcut.out_channels == result.model.layer2[0].conv2.out_channels
    transform = result.model.torchslim_spec["transforms"][-1]
    assert transform["attributes"]["layer2.0.shortcut"]["index"] == shortcut.index


@pytest.mark.parametrize("importance", GROUP_IMPORTANCE.names())
def test_every_importance_criterion(importance, digits):
    torch.manual_seed(0)
    model = ts.models.create("resnet20", in_channels=1)  # 8x8 digits: convolutions, BatchNorm, residual streams
    data = digits
    example = digits.example_input(2)
    _randomize_norms(model)
    result = prune_channels(model, {"ratio": 0.5, "importance": importance, "calibration_batches": 2}, data=data, example_input=example)
    assert result.model(example).shape == model.eval()(example).shape
    assert result.report.stages[0].metrics["groups_removed"] > 0


def test_bn_scale_picks_the_smallest_gammas():
    model = ts.models.create("resnet20").eval()
    with torch.no_grad():
        model.layer1[0].bn1.weight.copy_(torch.arange(16, dtype=torch.float32) + 1)
    result = prune_channels(model, {"ratio": 0.25, "importance": "bn_scale", "prune_residual": False}, example_input=torch.zeros(1, 3, 32, 32))
    kept = result.model.layer1[0].bn1.weight
    assert torch.equal(kept, torch.arange(4, 16, dtype=torch.float32) + 1)  # gammas 1..4 went


def test_bad_input_is_named():
    model = ts.models.create("lenet-300-100")
    with pytest.raises(ConfigError, match="ratio must be in"):
        prune_channels(model, {"ratio": 1.2}, example_input=torch.zeros(1, 784))
    with pytest.raises(ConfigError, match="example_input"):
        prune_channels(model, {"ratio": 0.5})
    with pytest.raises(ConfigError, match="needs calibration data"):
        prune_channels(model, {"ratio": 0.5, "importance": "taylor"}, example_input=torch.zeros(1, 784))
    with pytest.raises(ConfigError, match="importance must be one of"):
        prune_channels(model, {"ratio": 0.5, "importance": "gradient"}, example_input=torch.zeros(1, 784))
    with pytest.raises(ConfigError, match="needs BatchNorm"):
        prune_channels(model, {"ratio": 0.5, "importance": "bn_scale"}, example_input=torch.zeros(1, 784))
    masked = ts.prune(model, {"sparsity": 0.5}).model
    with pytest.raises(TorchslimError, match="make_permanent"):
        prune_channels(masked, {"ratio": 0.5}, example_input=torch.zeros(1, 784))


class Unusual(nn.Module):
    """A channel shuffle the tracer cannot follow, then normal layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.conv3 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.roll(x, 1, dims=1)  # mixes channel positions
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_what_cannot_be_pruned_is_named_and_left_intact():
    model = Unusual().eval()
    x = torch.randn(2, 1, 12, 12)
    result = prune_channels(model, {"ratio": 0.5}, example_input=x)
    notes = " ".join(result.report.stages[0].notes)
    assert "roll" in notes and "left intact" in notes
    assert result.model.conv1.out_channels == 8  # its channels feed the roll: untouched
    assert result.model.conv2.out_channels == 4 and result.model.conv3.in_channels == 4
    assert result.model(x).shape == (2, 10)


def test_hugging_face_style_encoder_is_handled_or_named():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=32
    )
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))

    class Wrapper(nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, x):
            return self.bert(input_ids=x).last_hidden_state

    wrapper = Wrapper(model).eval()
    expected_shape = wrapper(ids).shape
    result = prune_channels(wrapper, {"ratio": 0.5, "prune_residual": False, "head_ratio": 0.5}, example_input=ids)
    assert result.model(ids).shape == expected_shape
    layer = result.model.bert.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 32  # the MLP neurons went
    assert layer.attention.self.num_attention_heads == 2 and layer.attention.self.query.out_features == 16
    assert layer.attention.output.dense.in_features == 16  # the projection reading the heads lost their columns
    # zero heads and neurons first: then removing them leaves the encoder's output unchanged
    graph = trace(wrapper, ids)
    groups, _ = select_groups(wrapper, graph, StructuredConfig(ratio=0.5, prune_residual=False, importance="random"))
    heads = [h for h in graph.heads if h.head in (1, 3)]
    _zero(wrapper, groups, heads)
    expected = wrapper(ids)
    pruned = copy.deepcopy(wrapper)
    remove_channels(pruned, graph, groups, heads)
    torch.testing.assert_close(pruned(ids), expected, rtol=1e-4, atol=1e-5)


def test_any_callable_is_a_group_criterion():
    """As in Torch-Pruning, a function of (model, group) ranks the groups: here, keep the groups of the largest bias."""
    model = ts.models.create("lenet-300-100")
    with torch.no_grad():
        model.fc2.bias.copy_(torch.arange(100, dtype=torch.float32))

    def bias_size(net, group):
        return sum(float(getattr(net.get_submodule(p.module), p.name).detach()[p.indices].sum()) for p in group.producers if p.name == "bias")

    result = prune_channels(model, {"ratio": 0.3, "importance": bias_size}, example_input=torch.zeros(1, 1, 28, 28))
    assert torch.equal(result.model.fc2.bias, torch.arange(30, 100, dtype=torch.float32))
    assert result.report.stages[0].config["importance"].endswith("bias_size")


def test_round_to_an_engine_keeps_its_channel_multiple():
    from torchslim.pruning.structured import channel_multiple

    torch.manual_seed(0)
    model = ts.models.create("resnet20").eval()
    result = ts.prune_channels(model, {"ratio": 0.4, "round_to": "onnxruntime"}, example_input=torch.randn(1, 3, 32, 32))
    multiple = channel_multiple("onnxruntime")
    assert multiple in (8, 16) and channel_multiple("cuda") == 8 and channel_multiple(4) == 4
    widths = {m.out_channels for m in result.model.modules() if isinstance(m, torch.nn.Conv2d)}
    assert all(width % multiple == 0 for width in widths - {10}) and result.report.stages[0].metrics["macs_ratio"] > 1.2
    with pytest.raises(ts.ConfigError, match="round_to must be an integer >= 1 or one of onnxruntime, eager, cuda, got 'tpu'"):
        ts.prune_channels(model, {"ratio": 0.4, "round_to": "tpu"}, example_input=torch.randn(1, 3, 32, 32))


def test_pruned_option_a_shortcuts_pad_a_contiguous_block_instead_of_gathering(tmp_path):
    from torchslim.export.onnx import export_onnx
    from torchslim.models.resnet_cifar import PadShortcut
    from torchslim.quantization.onnx_static import count_ops

    torch.manual_seed(0)
    model = ts.models.create("resnet20").eval()
    pruned = ts.prune_channels(model, {"ratio": 0.4, "round_to": 4}, example_input=torch.randn(1, 3, 32, 32)).model.eval()
    shortcuts = [m for m in pruned.modules() if isinstance(m, PadShortcut) and m.index is not None]
    assert shortcuts and all(s.index == list(range(s.index[0], s.index[0] + s.in_channels)) for s in shortcuts)
    for shortcut in shortcuts:  # the pad gives exactly what gathering into the recorded positions gives
        inputs = torch.randn(2, shortcut.in_channels, 8, 8)
        strided = inputs[:, :, :: shortcut.stride, :: shortcut.stride]
        gathered = torch.cat([strided, torch.zeros_like(strided[:, :1])], dim=1).index_select(1, shortcut.order)
        assert torch.equal(shortcut(inputs), gathered)
    x = torch.randn(3, 3, 32, 32)
    ops = count_ops(export_onnx(pruned, x[:1], tmp_path / "pruned.onnx"))
    assert "Gather" not in ops and ops.get("Pad", 0) >= len(shortcuts)


class _CrossAttention(nn.Module):
    """q from the tokens, k / v from a context of its own encoder (a decoder's or a conditioning pattern)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.num_heads, self.head_dim = heads, d // heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, context):
        b, n, m = x.shape[0], x.shape[1], context.shape[1]
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        return self.o_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


class _Conditioned(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.embed, self.ctx, self.norm = nn.Linear(8, d), nn.Linear(6, d), nn.LayerNorm(d)
        self.attn, self.head = _CrossAttention(d), nn.Linear(d, 5)

    def forward(self, x, context):
        h = self.embed(x)
        h = h + self.attn(self.norm(h), torch.nn.functional.gelu(self.ctx(context)))
        return self.head(h.mean(1))


def test_cross_attention_keys_read_the_contexts_kept_channels():
    """k / v were taken to read the attention's first input: they kept the token stream's columns while the context's
    producer kept others, and the pruned model computed something else with no word (the stream's LayerNorm had
    turned the output check off)."""
    torch.manual_seed(0)
    model, x, c = _Conditioned().eval(), torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    pruned = prune_channels(model, {"ratio": 0.5}, example_input=(x, c)).model
    assert pruned.ctx.out_features < model.ctx.out_features
    kept_context = [int((model.ctx.weight - row).abs().sum(1).argmin()) for row in pruned.ctx.weight]
    kept_columns = [int((model.attn.k_proj.weight.t() - column).abs().sum(1).argmin()) for column in pruned.attn.k_proj.weight.t()]
    assert kept_context == kept_columns


def test_a_per_channel_prelu_goes_with_its_channels():
    """PReLU(num_parameters=C) was a pass-through: removing the conv's channels before it failed, so none went."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16), nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    with torch.no_grad():  # half of the channels contribute nothing: removing them must leave the function as it is
        model[0].weight[::2] = 0.0
        model[0].bias[::2] = 0.0
        model[1].weight.copy_(torch.rand(16))
    x = torch.randn(2, 3, 6, 6)
    pruned = prune_channels(model, {"ratio": 0.5, "layers": {"include": ["0"]}}, example_input=x).model
    assert pruned[0].out_channels == 8 and pruned[1].num_parameters == 8 and pruned[1].weight.shape == (8,)
    assert torch.allclose(pruned(x), model(x), atol=1e-6)
