"""Quantization on models written the way users write them: tied layers with biases of their own, QAT's mode,
inputs an engine does not take, transformers' token axis in ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.core.errors import TorchslimError


def _tied(bias_tied: bool) -> nn.Module:
    torch.manual_seed(0)
    first, second = nn.Linear(16, 16), nn.Linear(16, 16)
    second.weight = first.weight
    if bias_tied:
        second.bias = first.bias
    return nn.Sequential(first, nn.ReLU(), second).eval()


@pytest.mark.parametrize("bias_tied", [False, True])
def test_a_layer_tied_by_its_weight_keeps_its_own_bias(tmp_path, bias_tied):
    """The follower was rebuilt empty and shared only the leader's quantized weight: its bias became zeros."""
    model, x = _tied(bias_tied), torch.randn(4, 16)
    quantized = ts.quantize(model, {"weights": {"bits": 8}}).model
    with torch.no_grad():
        assert (quantized(x) - model(x)).abs().max() < 0.02 * model(x).abs().max()
        assert (quantized[2].bias is quantized[0].bias) == bias_tied
        if not bias_tied:  # a tie of biases is not something a Sequential's spec can rebuild, float or quantized
            loaded = ts.load(ts.save(quantized, tmp_path / "tied.safetensors"), trust_factory=True)
            assert torch.equal(loaded(x), quantized(x))


def test_a_qat_model_in_eval_mode_keeps_its_activation_ranges_at_inference():
    """The fake-quant modules were left in training mode inside an eval model: every call moved their ranges."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    quantized = ts.quantize(model, {"method": "qat", "export": False, "calibration_batches": 2}, data=[torch.randn(8, 16)] * 2).model
    x = torch.randn(4, 16)
    with torch.no_grad():
        first = quantized(x)
        for _ in range(5):
            quantized(100 * torch.randn(4, 16))
        assert torch.equal(quantized(x), first)
    assert not any(module.training for module in quantized.modules())


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x, gain=None):
        return self.fc(x if gain is None else x * gain)


def test_an_engine_refuses_an_input_its_file_does_not_take():
    """ONNX Runtime's engine dropped keyword inputs it was not exported with: the result silently ignored them."""
    x = torch.randn(4, 8)
    engine = ts.quantize(TwoInputs().eval(), {"method": "onnxruntime", "mode": "dynamic"}, example_input={"x": x}).model
    assert engine(x=x).shape == (4, 3)
    with pytest.raises(TorchslimError, match=r"the ONNX model takes inputs x, not gain: it was exported or quantized with an example without them"):
        engine(x=x, gain=torch.full_like(x, 2.0))


def test_int8_weights_over_a_token_axis_export_to_onnx_with_float_arithmetic(tmp_path):
    """ONNX Runtime fused the int8 DequantizeLinear + MatMul of a (batch, tokens, features) input into MatMulNBits at
    accuracy level 4 (int8 activations): the file no longer matched PyTorch and the export was refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    quantized = ts.quantize(model, {"weights": {"bits": 8}}).model
    x = torch.randn(2, 5, 64)
    result = ts.export(quantized, "onnx", x, tmp_path / "tokens.onnx")  # checked against the decoded fp32 weights
    assert "largest absolute difference" in result.report.stages[0].notes[0]
    assert result.model(x).shape == (2, 5, 8)


def test_a_bare_layer_is_named_and_compression_counts_the_same_tensors_on_both_sides():
    with pytest.raises(TorchslimError, match=r"the model is a single Linear with no submodules: wrap it \(nn.Sequential\(layer\)\)"):
        ts.quantize(nn.Linear(16, 32), {"weights": {"bits": 8}})
    metrics = ts.quantize(nn.Sequential(nn.Linear(16, 32)), {"weights": {"bits": 8}}).report.stages[0].metrics
    assert metrics["dense_weight_bytes"] == (16 * 32 + 32) * 4  # the bias on both sides, as the stored bytes count it
    assert metrics["compression"] == pytest.approx(metrics["dense_weight_bytes"] / metrics["weight_bytes"])


def test_a_pt2e_model_of_convolutions_exports_as_pt2_within_int8_rounding(tmp_path):
    """The exported reference graph and the compiled oneDNN kernels round requantized activations differently (one
    step of 1/255 of a range): the float32 bound of 1e-4 of the output refused a correct file."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()
    x = torch.randn(4, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(2)]
    compiled = ts.quantize(model, {"method": "pt2e", "calibration_batches": 2}, data=data, example_input=x).model
    exported = ts.export(compiled, "pt2", x, tmp_path / "int8.pt2")
    assert exported.model(x).shape == (4, 5) and "largest absolute difference" in exported.report.stages[0].notes[0]


class _SignBranch(nn.Module):
    """A user's model that picks a layer by the sign of its input's mean: a trace keeps the example's branch."""

    def __init__(self) -> None:
        super().__init__()
        self.positive, self.negative = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.positive(x)
        return self.negative(x)


@pytest.mark.parametrize("config", [{"method": "onnxruntime"}, {"method": "native-int8"}, {"method": "qat", "export": True}])
def test_engines_refuse_a_model_whose_control_flow_depends_on_input_values(tmp_path, config):
    """The int8 engines quantized the float export unchecked: the example's branch was baked in, and on inputs of
    the other sign the engine ran the wrong layer. Now the refusal names the control flow, and no file is left."""
    torch.manual_seed(0)
    model = _SignBranch().eval()
    data = [(torch.randn(16, 8).abs(), torch.randint(0, 4, (16,))) for _ in range(4)]
    path = tmp_path / "int8.onnx"
    with pytest.raises(TorchslimError, match="control flow that depends on its input values") as raised:
        ts.quantize(model, config, data=data, path=path)
    assert "torch.where" in str(raised.value)
    assert not path.exists()


def test_an_engine_of_a_model_without_value_branches_still_matches_pytorch():
    """The checked float export changes nothing for a model the trace follows: the engine still matches PyTorch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(4)]
    engine = ts.quantize(model, {"method": "onnxruntime"}, data=data).model
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert (engine(x) - model(x)).abs().max() < 0.2 * model(x).abs().max()  # int8 rounding of a tiny model; a wrong branch is off by about 1x


def test_qat_names_the_layers_it_leaves_in_float():
    """QAT fake-quantized plain Linear / Conv2d only and said nothing of the rest: on GPT-2 it trained the head alone
    with every Conv1D in float, and the report read as if the model were quantized."""
    pytest.importorskip("transformers")
    from tests import zoo

    torch.manual_seed(0)
    model = zoo.gpt2().eval()
    ids = torch.randint(0, 65, (4, 16))
    notes = ts.quantize(model, {"method": "qat", "export": False, "calibration_batches": 1}, data=[{"input_ids": ids, "labels": ids}]).report.stages[0].notes
    assert notes[0].startswith("1 layer fake-quantized")
    assert any(note.startswith("left in float:") and "transformer.h.0.attn.c_attn (Conv1D)" in note for note in notes)


def test_qat_with_no_layer_it_covers_is_an_error_naming_the_layers():
    class Scaled(nn.Linear):  # a user's layer with a forward of its own
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    with pytest.raises(TorchslimError, match=r"no layer to fake-quantize.*0 \(Scaled\)"):
        ts.quantize(nn.Sequential(Scaled(4, 4)), {"method": "qat", "export": False, "calibration_batches": 1}, data=[torch.randn(2, 4)])


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"weights": {"scheme": "binary", "bits": 4}}, r"quantize.weights: scheme 'binary' ignores bits=4"),
        ({"weights": {"scheme": "kmeans", "bits": 4, "granularity": "group"}}, r"scheme 'kmeans' ignores granularity='group'"),
        ({"weights": {"scheme": "fp16", "group_size": 32}}, r"scheme 'fp16' ignores group_size=32 \(it has no bits"),
        ({"weights": {"scheme": "binary"}, "overrides": {"2": {"bits": 4}}}, r"quantize.overrides\['2'\]: scheme 'binary' ignores bits=4"),
    ],
)
def test_a_key_the_scheme_would_ignore_is_an_error(config, message):
    """binary, ternary and fp16 ignored bits and the grid, k-means ignored granularity: the user got another model
    than the one asked for, without a word."""
    with pytest.raises(ts.ConfigError, match=message):
        ts.quantize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), config)


def test_an_override_of_another_scheme_does_not_inherit_keys_it_would_ignore():
    """A group-wise int4 model with its head in fp16: the head's override does not carry int4's grid."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    config = {"weights": {"scheme": "uniform", "bits": 4, "granularity": "group", "group_size": 4}, "overrides": {"2": {"scheme": "fp16"}}}
    result = ts.quantize(model, config)
    head = result.report.stages[0].config["overrides"]["2"]
    assert head["scheme"] == "fp16" and head["granularity"] == "channel" and head["group_size"] == 128
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert (result.model(x) - model(x)).abs().max() < 0.2 * model(x).abs().max()


class _AlwaysFirst(nn.Module):
    """A branch on a value that always takes the same way: the tracer warns, the file is right."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) if x.abs().sum() >= 0 else self.second(x)


def test_qat_export_of_a_harmless_branch_is_not_refused():
    """The QAT check compared the int8 file with the fake-quantized model: int8 clipping on inputs of other values
    passed its 0.1 bound and a right file was refused. The branches are now checked on the float model."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 16), torch.randint(0, 4, (16,))) for _ in range(2)]
    engine = ts.quantize(_AlwaysFirst().eval(), {"method": "qat", "calibration_batches": 1}, data=data).model
    assert engine(torch.randn(3, 16)).shape == (3, 4)


def test_a_qat_model_quantized_again_exports_and_a_pruned_one_keeps_its_zeros():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(16, 16), torch.randint(0, 4, (16,))) for _ in range(2)]
    simulated = ts.quantize(model, {"method": "qat", "export": False, "calibration_batches": 1}, data=data).model
    engine = ts.quantize(simulated, {"method": "qat", "export": True, "calibration_batches": 1}, data=data).model
    assert engine(torch.randn(3, 16)).shape == (3, 4)
    pruned = ts.prune(model, {"sparsity": 0.5}).model
    trained = ts.quantize(pruned, {"method": "qat", "export": False, "calibration_batches": 1}, data=data, finetune={"epochs": 2, "lr": 0.05}).model
    assert all(float((layer.weight == 0).float().mean()) == 0.5 for layer in (trained[0], trained[2]))


def test_activation_bits_is_taken_by_every_scheme():
    """Activations are quantized per token whatever the weights' scheme: activation_bits is not a key k-means ignores."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(4, 16)
    plain = ts.quantize(model, {"weights": {"scheme": "fp16"}}).model
    quantized = ts.quantize(model, {"weights": {"scheme": "fp16", "activation_bits": 8}}).model
    with torch.no_grad():
        assert not torch.equal(plain(x), quantized(x))


def test_a_recipes_fp32_export_stage_refuses_a_branch_on_input_values(tmp_path):
    """The recipe's export stage wrote the fp32 file unchecked, with the example's branch baked in."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 8).abs(), torch.randint(0, 4, (16,))) for _ in range(4)]
    path = tmp_path / "model.onnx"
    with pytest.raises(TorchslimError, match="export stage: the fp32 ONNX file failed its check.*control flow"):
        ts.compress(_SignBranch().eval(), {"name": "e", "stages": [{"export": {}}]}, data, export_path=path, latency=False, progress=False)
    assert not path.exists()


def test_one_bit_uniform_says_what_its_two_levels_are():
    """A 1-bit uniform grid holds zero, so it keeps one sign of the weights: the report says so and names binary."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    notes = ts.quantize(model, {"weights": {"scheme": "uniform", "bits": 1}}).report.stages[0].notes
    assert any("2 layers at 1-bit uniform" in note and "scheme 'binary'" in note for note in notes)
    assert not any("1-bit uniform" in note for note in ts.quantize(model, {"weights": {"scheme": "binary"}}).report.stages[0].notes)


def test_kmeans_of_a_layer_with_fewer_weights_than_centroids_is_exact():
    """A tiny layer (6 weights, 16 centroids) came out at 26.6 dB: Lloyd's iterations from a linear start left
    centroids empty while two weights shared one. Each value now gets its own centroid."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    result = ts.quantize(model, {"weights": {"scheme": "kmeans", "bits": 4}})
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(result.model(x), model(x))
    assert all("SQNR inf dB" in note for note in result.report.stages[0].notes if "kmeans" in note)


def test_static_uint8_weights_go_to_7_bits_on_a_cpu_without_vnni(monkeypatch):
    """ONNX Runtime's U8S8 kernels on AVX2 without VNNI sum pairs of uint8 x int8 products in int16 and saturate: a
    tiny Llama's static int8 logits fell to cosine 0.9973 on such a CPU (0.9998 with 7-bit weights)."""
    from torchslim.quantization import onnx_static
    from torchslim.quantization.onnx_static import OnnxInt8Config

    monkeypatch.setattr(onnx_static, "cpu_has_vnni", lambda: False)
    assert OnnxInt8Config().weights_on_7_bits()
    assert OnnxInt8Config(mode="dynamic").weights_on_7_bits()  # dynamic int8's activations are uint8 too
    assert not OnnxInt8Config(activations="int8").weights_on_7_bits()
    assert not OnnxInt8Config(reduce_range=False).weights_on_7_bits()
    monkeypatch.setattr(onnx_static, "cpu_has_vnni", lambda: True)
    assert not OnnxInt8Config().weights_on_7_bits() and OnnxInt8Config(reduce_range=True).weights_on_7_bits()


class _Doubled(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, 2 * self.weight, self.bias)


class _WeightStandardized(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        weight = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return super()._conv_forward(x, weight, bias)


class _Scaled(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) * 4.0


@pytest.mark.parametrize("scheme", [{"scheme": "uniform", "bits": 8}, {"scheme": "fp16"}, {"scheme": "kmeans", "bits": 6}])
def test_a_layer_subclass_with_its_own_forward_stays_float_and_is_named(scheme):
    """Its quantized replacement computed the plain layer: the subclass's doubling, standardization or scale was lost
    (relative error 0.5 to 0.9 while the report gave the SQNR of the weight)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = _Scaled(20, 8)
            self.conv = _WeightStandardized(1, 4, 3, padding=1)
            self.doubled = _Doubled(8, 8)
            self.plain = nn.Linear(8 + 4 * 8 * 8, 5)

        def forward(self, ids, image):
            tokens = self.doubled(self.emb(ids)).mean(1)
            return self.plain(torch.cat([tokens, self.conv(image).flatten(1)], 1))

    model = Net().eval()
    ids, image = torch.randint(0, 20, (3, 6)), torch.randn(3, 1, 8, 8)
    result = ts.quantize(model, {"weights": scheme, "layers": {"types": ["Linear", "Conv2d", "Embedding"]}})
    quantized, notes = result.model, " ".join(result.report.stages[0].notes)
    assert type(quantized.emb) is _Scaled and type(quantized.conv) is _WeightStandardized and type(quantized.doubled) is _Doubled
    for name, kind, method in (("emb", "_Scaled", "forward"), ("conv", "_WeightStandardized", "_conv_forward"), ("doubled", "_Doubled", "forward")):
        assert f"{name}: left in float ({kind} has its own {method}" in notes
    assert type(quantized.plain) is not nn.Linear  # the plain layer is still quantized
    with torch.no_grad():
        expected = model(ids, image)
        assert (quantized(ids, image) - expected).norm() < 0.02 * expected.norm()


def test_an_override_on_a_tied_layer_is_an_error_unless_its_leader_agrees():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.relu(self.mix(self.emb(ids))))

    model = Tied().eval()
    config = {"weights": {"scheme": "uniform", "bits": 4}, "layers": {"types": ["Linear", "Embedding"]}}
    with pytest.raises(TorchslimError, match=r"head shares its weight with emb \(tied\).*head: uniform 8 bits, emb: uniform 4 bits"):
        ts.quantize(model, {**config, "overrides": {"head": {"bits": 8}}})
    typed = ts.quantize(model, {**config, "overrides": {"type:Linear": {"bits": 8}}})  # a rule for every Linear: the tied head follows emb
    assert typed.model.head.quantized is typed.model.emb.quantized and typed.model.emb.quantized.bits == 4
    assert "head: follows emb's quantization (uniform 4 bits; tied)" in " ".join(typed.report.stages[0].notes)
    both = ts.quantize(model, {**config, "overrides": {"head": {"bits": 8}, "emb": {"bits": 8}}}).model
    leader_only = ts.quantize(model, {**config, "overrides": {"emb": {"bits": 8}}}).model  # the tied head follows its leader
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert torch.equal(both(ids), leader_only(ids))
    assert both.head.quantized is both.emb.quantized and both.emb.quantized.bits == 8  # one 8-bit weight, shared


def test_qat_calibration_takes_the_range_of_every_batch():
    """Calibration averaged the ranges of its batches (the training observer's moving average): batches of 8 clipped
    every activation the first few did not reach, 4.7% relative error of the fake-quantized model before training."""
    from torchslim.quantization.qat import calibrate_qat, prepare_qat

    torch.manual_seed(0)
    data = ts.data.load("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    model = ts.train(model, data, {"epochs": 5}, progress=False).model.eval()
    x = torch.cat([batch[0] for batch in data.loader("test", batch_size=256)])
    qat = prepare_qat(model, {"reduce_range": False}).eval()
    batches = list(data.loader("train", batch_size=8))[:8]
    calibrate_qat(qat, batches, 8)
    with torch.no_grad():
        reference, fake = model(x), qat(x)
        assert (fake - reference).norm() < 0.025 * reference.norm()
        seen = torch.cat([b[0] for b in batches]).flatten(1)
    assert float(qat[1].fake.input_high) == float(seen.max())  # the widest batch's range, not an average


def test_an_existing_onnx_file_is_kept_unless_overwrite(tmp_path):
    """quantize(path=) and compress(export_path=) wrote over a file the user had, without a word."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    data = [(torch.randn(16, 8), torch.randint(0, 4, (16,))) for _ in range(2)]
    path = tmp_path / "mine.onnx"
    path.write_bytes(b"the user's own file")
    with pytest.raises(TorchslimError, match="mine.onnx exists; refusing to overwrite"):
        ts.quantize(model, {"method": "onnxruntime"}, data=data, path=path)
    with pytest.raises(TorchslimError, match="mine.onnx exists; refusing to overwrite"):
        ts.compress(model, {"name": "e", "stages": [{"export": {}}]}, data, export_path=path, latency=False, progress=False)
    assert path.read_bytes() == b"the user's own file"
    engine = ts.quantize(model, {"method": "onnxruntime"}, data=data, path=path, overwrite=True).model
    x = data[0][0]
    with torch.no_grad():
        assert (engine(x) - model(x)).abs().max() < 0.05 * model(x).abs().max()
    result = ts.compress(model, {"name": "e", "stages": [{"export": {}}]}, data, export_path=path, latency=False, progress=False, overwrite=True)
    assert result.report.stages[-1].metrics["stored_bytes"] == path.stat().st_size


def test_a_qat_model_exports_as_pt2(tmp_path):
    """The fake-quant layers read their 'observed' flag in Python: torch.export refused it as the user's control flow."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    x = torch.randn(64, 20)
    fake = ts.quantize(model, {"method": "qat", "export": False, "calibration_batches": 2}, data=[x[:32], x[32:]]).model.eval()
    exported = ts.export(fake, "pt2", x[:2], tmp_path / "qat.pt2")
    with torch.no_grad():
        assert torch.allclose(exported.model(x[:7]), fake(x[:7]), atol=1e-5)


def test_qat_names_the_weights_no_layer_holds():
    """An attention's in_proj_weight (held by the MultiheadAttention itself, not by a Linear) stayed float unnamed."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(16, 3)).eval()
    data = [torch.randn(4, 5, 8) for _ in range(2)]
    notes = ts.quantize(model, {"method": "qat", "export": False, "calibration_batches": 2}, data=data).report.stages[0].notes
    assert any(note.startswith("left in float: 768 weights") and "self_attn.in_proj_weight" in note for note in notes), notes


class _OneReLU(nn.Module):
    """torchvision's BasicBlock style: one ``self.relu`` called after each convolution."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        return self.fc(x.mean((2, 3)))


def test_pt2e_quantizes_a_model_that_calls_one_activation_module_twice():
    """torchao's quantizer took both calls of ``self.relu`` for one partition and failed ("Input partition has more
    than one output node"). Each call now gets its own copy, on a copy of the model; the caller's keeps its one ReLU."""
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = _OneReLU().eval()
    x = torch.randn(4, 3, 8, 8)
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))) for _ in range(4)]
    compiled = ts.quantize(model, {"method": "pt2e", "calibration_batches": 4}, data=data, example_input=x).model
    with torch.no_grad():
        expected = model(x)
    got = compiled(x)
    assert float((got - expected).norm() / expected.norm()) < 0.1
    assert isinstance(model.relu, nn.ReLU)


def test_what_onnx_runtimes_quantizer_does_other_than_asked_is_said():
    """Entropy calibration through quantize_static gave the min-max file byte for byte, and dynamic int8 gave every
    convolution one weight scale with per_channel on: the report said "entropy calibration" and nothing else."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    entropy = ts.quantize(model, {"method": "onnxruntime", "calibration": "entropy"}, data=data).report.stages[0].notes
    assert any("these ranges are min-max's; observer: entropy searches the KL threshold" in note for note in entropy)
    dynamic = ts.quantize(model, {"method": "onnxruntime", "mode": "dynamic"}, data=data).report.stages[0].notes
    assert any(note.startswith("2 convolutions as ConvInteger") for note in dynamic)
