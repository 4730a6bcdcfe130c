"""Models written the way users write them, through the verbs (a second audit's findings): a head chosen at run time
from an ``nn.ModuleDict``, a plain ``nn.Sequential``, one layer registered under two names, weight_norm and
spectral_norm (parametrizations and torch's hook-based functions), keyword-only forward arguments, half precision, a ``forward(idx)`` language model
fed ``{"input_ids": ...}`` windows, one-hot labels, tensors without evaluation data. Real data: scikit-learn's digits
and the Shakespeare text of ../shared/data (skipped without it)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchslim as ts
from torchslim.core.errors import TorchslimError


@pytest.fixture(scope="module")
def digits():
    return ts.data.load("digits")


def _flat(data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return data.train.inputs.reshape(len(data.train.inputs), -1), data.train.targets, data.test.inputs.reshape(len(data.test.inputs), -1), data.test.targets


class Routed(nn.Module):
    """A trunk and a head chosen at run time by a key on the model (one of an ``nn.ModuleDict``)."""

    def __init__(self, head: str = "digits"):
        super().__init__()
        self.head = head
        self.stem = nn.ModuleList([nn.Linear(64, 48), nn.Linear(48, 32)])
        self.heads = nn.ModuleDict({"digits": nn.Linear(32, 10), "parity": nn.Linear(32, 2)})

    def forward(self, x):
        for layer in self.stem:
            x = F.relu(layer(x))
        return self.heads[self.head](x)


def test_channel_pruning_keeps_the_channels_a_head_the_example_never_ran_may_read(digits):
    """The example runs one head; the other reads the same 32 trunk channels. Those are kept whole and named, so the
    pruned model still runs with either head; the trunk's other set is pruned."""
    x = _flat(digits)[2][:8]
    model = Routed().eval()
    result = ts.prune_channels(model, {"ratio": 0.5}, example_input=x)
    pruned = result.model
    assert pruned.stem[0].out_features == 24 and pruned.stem[1].out_features == 32
    assert (
        "left intact: channels of stem.1: heads.parity did not run on the example, and heads.digits, run in its place, reads them"
        in result.report.stages[0].notes
    )
    pruned.head = "parity"
    assert pruned(x).shape == (8, 2)


class Experts(nn.Module):
    """A mixture of experts whose up and down projections sit in two lists; ``route`` picks the expert, and a layer
    kept from an older version is never called."""

    def __init__(self, width: int = 16, hidden: int = 24, count: int = 3):
        super().__init__()
        self.route = 0
        self.inp = nn.Linear(64, width)
        self.up = nn.ModuleList(nn.Linear(width, hidden) for _ in range(count))
        self.down = nn.ModuleList(nn.Linear(hidden, width) for _ in range(count))
        self.out = nn.Linear(width, 10)
        self.old_head = nn.Linear(width, 7)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.out(h + self.down[self.route](F.relu(self.up[self.route](h))))


def test_channel_pruning_of_routed_experts_prunes_their_own_channels_and_keeps_the_stream_every_expert_reads(digits):
    """The example runs expert 0: the stream every expert reads stays whole (named), each routed expert's own hidden
    channels are pruned, a layer nothing calls blocks nothing, and every expert still runs after."""
    x = _flat(digits)[2][:8]
    result = ts.prune_channels(Experts().eval(), {"ratio": 0.5}, example_input=x)
    pruned = result.model
    assert pruned.inp.out_features == 16 and pruned.up[0].out_features == 12
    assert "left intact: channels of down.0+inp: up.1 did not run on the example, and up.0, run in its place, reads them" in result.report.stages[0].notes
    for route in range(3):
        pruned.route = route
        assert pruned(x).shape == (8, 10)


def test_a_plain_sequential_saves_loads_and_goes_through_compress_into_a_file(digits, tmp_path):
    """``nn.Sequential`` is rebuilt from its layers' own specs (no import path to trust): as trained, after channel
    pruning, and after a recipe of pruning, quantization and coding, whose .tslim file loads back to the same accuracy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10))
    model = ts.train(model, digits, {"epochs": 3}, progress=False).model
    x = digits.test.inputs[:8]
    loaded = ts.load(ts.save(model, tmp_path / "seq.safetensors"))
    assert type(loaded) is nn.Sequential and torch.equal(loaded.eval()(x), model.eval()(x))
    narrowed = ts.prune_channels(model, {"ratio": 0.5}, example_input=x).model
    assert torch.allclose(ts.load(ts.save(narrowed, tmp_path / "narrow.safetensors")).eval()(x), narrowed.eval()(x))
    recipe = {"name": "user", "stages": [{"prune": {"sparsity": 0.5}}, {"quantize": {}}, {"encode": {}}]}
    result = ts.compress(model, recipe, digits, latency=False, progress=False)
    result.save(tmp_path / "seq.tslim")
    assert ts.evaluate(ts.load(tmp_path / "seq.tslim"), digits)["accuracy"] == result.report.stages[-1].metrics["accuracy"]
    conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    assert torch.equal(ts.load(ts.save(conv, tmp_path / "conv.safetensors")).eval()(x), conv.eval()(x))


class Shared(nn.Module):
    """One layer registered under two names (an encoder and a decoder that share it)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 32)
        shared = nn.Linear(32, 32)
        self.enc = shared
        self.dec = shared
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.inp(x.flatten(1)))
        return self.out(F.relu(self.dec(F.relu(self.enc(x)))))


def test_a_layer_registered_under_two_names_is_factorized_and_quantized_once_and_stays_shared(digits, tmp_path):
    torch.manual_seed(0)
    model = ts.train(Shared(), digits, {"epochs": 3, "lr": 0.01, "optimizer": "adam"}, progress=False).model
    before = sum(p.numel() for p in model.parameters())
    result = ts.factorize(model, {"rank": 8, "layers": {"include": ["dec"]}}, data=digits)
    factorized = result.model
    assert factorized.enc is factorized.dec and type(factorized.enc).__name__ == "FactorizedLinear"
    assert sum(p.numel() for p in factorized.parameters()) < before
    assert "enc: the same layer as dec, factorized once for all of them" in result.report.stages[0].notes
    quantized = ts.quantize(model, {"weights": {"bits": 4}}).model
    assert quantized.enc is quantized.dec and type(quantized.enc).__name__ == "QuantizedLinear"
    for changed, name in ((factorized, "f"), (quantized, "q")):
        loaded = ts.load(ts.save(changed, tmp_path / f"{name}.safetensors"), trust_factory=True)
        assert loaded.enc is loaded.dec
        assert torch.allclose(loaded.eval()(digits.test.inputs[:8]), changed.eval()(digits.test.inputs[:8]), atol=1e-6)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def test_weight_norm_and_spectral_norm_models_save_factorize_and_prune_with_what_is_left_named(digits, tmp_path):
    from torch.nn.utils import parametrizations

    x = digits.test.inputs[:8]
    torch.manual_seed(0)
    normed = Plain().eval()
    parametrizations.weight_norm(normed.fc1)
    loaded = ts.load(ts.save(normed, tmp_path / "wn.safetensors"), trust_factory=True)
    assert torch.allclose(loaded.eval()(x), normed(x), atol=1e-6)
    notes = ts.factorize(normed, {"rank": 4}, example_input=x).report.stages[0].notes
    assert "fc1: left whole (its weight is computed by a parametrization: _WeightNorm)" in notes
    spectral = Plain().eval()
    parametrizations.spectral_norm(spectral.c1)
    result = ts.prune_channels(spectral, {"ratio": 0.5}, example_input=x)
    assert any(note.startswith("left intact: channels of c1: removing them fails (RuntimeError") for note in result.report.stages[0].notes)
    assert result.model.fc1.out_features == 16 and result.model(x).shape == (8, 10)


def test_spectral_and_weight_norm_layers_export_in_either_torch_form_and_the_hook_form_is_refused_by_name(digits, tmp_path):
    """ONNX export folds spectral_norm / weight_norm into the weight they compute in eval mode, for torch's
    parametrizations and for its older hook-based functions (whose model cannot even be deep-copied), and leaves the
    user's model as it was. A verb that rewrites the model refuses the hook-based form by layer, naming the way out."""
    from torch.nn.utils import parametrizations, spectral_norm, weight_norm

    x = digits.test.inputs[:8]
    for form, normed in (("parametrizations", (parametrizations.spectral_norm, parametrizations.weight_norm)), ("hooks", (spectral_norm, weight_norm))):
        torch.manual_seed(0)
        model = Plain()
        normed[0](model.c1)
        normed[1](model.fc1)
        model(x)  # one training-mode call: spectral_norm's power iteration moves its vectors
        model.eval()
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        reference = model(x)
        exported = ts.export(model, "onnx", x, path=tmp_path / f"{form}.onnx").model
        assert torch.allclose(exported(x), reference, atol=1e-4), form
        assert type(model.c1) is not nn.Conv2d if form == "parametrizations" else hasattr(model.c1, "weight_orig")
        assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items()) and torch.equal(model(x), reference)
        loaded = ts.load(ts.save(model, tmp_path / f"{form}.safetensors"), trust_factory=True)  # stored as the weights they compute
        assert torch.allclose(loaded.eval()(x), reference, atol=1e-6), form
    with pytest.raises(TorchslimError) as raised:
        ts.prune(model, {"sparsity": 0.5})
    message = str(raised.value)
    assert "prune: 2 layers use torch's hook-based" in message and "c1 (spectral_norm), fc1 (weight_norm)" in message
    assert "torch.nn.utils.parametrizations.spectral_norm / torch.nn.utils.parametrizations.weight_norm instead" in message


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x, mask=None, *, temperature: float = 1.0):
        x = x.flatten(1) if mask is None else x.flatten(1) * mask
        return self.fc2(F.relu(self.fc1(x))) / temperature


def test_a_forward_with_keyword_only_arguments_exports_and_runs_static_int8(digits, tmp_path):
    torch.manual_seed(0)
    model = ts.train(KeywordOnly(), digits, {"epochs": 2}, progress=False).model.eval()
    x = digits.test.inputs[:16]
    engine = ts.export(model, "onnx", x[:2], tmp_path / "kw.onnx").model
    assert torch.allclose(engine(x), model(x), atol=1e-5)
    int8 = ts.quantize(model, {"method": "onnxruntime"}, data=digits).model
    assert ts.evaluate(int8, digits)["accuracy"] > ts.evaluate(model, digits)["accuracy"] - 0.03


def test_a_half_precision_model_exports_within_its_own_rounding_and_bfloat16_names_the_way_out(digits, tmp_path):
    x = digits.test.inputs[:4].flatten(1)
    torch.manual_seed(0)
    half = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).half()
    report = ts.export(half, "onnx", x.half(), tmp_path / "half.onnx").report.stages[0]
    assert report.metrics["tolerance"] >= 1e-2
    with pytest.raises(TorchslimError, match=r"no bfloat16 kernel for it: export model.float\(\)"):
        ts.export(half.float().bfloat16(), "onnx", x.bfloat16(), tmp_path / "bf16.onnx")
    assert not (tmp_path / "bf16.onnx").exists()


class TinyGPT(nn.Module):
    """A nanoGPT-style character model whose forward takes the ids positionally, ``forward(idx)``."""

    def __init__(self, vocab: int = 65, dim: int = 32, block: int = 64):
        super().__init__()
        self.vocab, self.dim, self.block = vocab, dim, block
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(block, dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight
        for table in (self.wte, self.wpe):
            nn.init.normal_(table.weight, std=0.02)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        x = x + self.proj(F.gelu(self.fc(x)))
        return self.head(x)


def test_a_forward_idx_language_model_takes_input_ids_windows_through_the_verbs(tmp_path):
    """Windows of ``{"input_ids": ...}`` (``ts.data.token_windows``) feed ``forward(idx)`` positionally: training,
    SparseGPT, GPTQ, static int8 in ONNX Runtime, and the exported file evaluated on the same windows."""
    from tests.conftest import shared_data_or_skip

    text = ts.data.load("shakespeare", root=shared_data_or_skip("text"), download=False)
    ids = text.train_ids[:24000]
    train, held = ts.data.token_windows(ids[:20000], 64, batch_size=16), ts.data.token_windows(ids[20000:], 64, batch_size=16)
    data = ts.data.Data(train=train, eval=held)
    torch.manual_seed(0)
    model = ts.train(TinyGPT(), data, {"epochs": 4, "optimizer": "adam", "lr": 1e-2}, task="language-modeling", progress=False).model
    base = ts.evaluate(model, data, task="language-modeling")["perplexity"]
    assert base < 30  # uniform over 65 characters: 65
    sparse = ts.prune(model, {"solver": "sparsegpt", "sparsity": 0.5}, data=data, task="language-modeling").model
    assert ts.evaluate(sparse, data, task="language-modeling")["perplexity"] < 1.5 * base
    gptq = ts.quantize(model, {"method": "gptq", "weights": {"bits": 4, "granularity": "group", "group_size": 32}}, data=data, task="language-modeling")
    assert ts.evaluate(gptq.model, data, task="language-modeling")["perplexity"] < 1.5 * base
    int8 = ts.quantize(model, {"method": "onnxruntime"}, data=data, task="language-modeling").model
    assert ts.evaluate(int8, data, task="language-modeling")["perplexity"] < 2 * base
    engine = ts.export(model, "onnx", {"input_ids": held[0]["input_ids"][:2]}, tmp_path / "gpt.onnx").model
    assert ts.evaluate(engine, data, task="language-modeling")["perplexity"] == pytest.approx(base, rel=1e-4)


def test_one_hot_labels_are_read_as_the_classes_they_mark_and_soft_labels_are_named(digits):
    x, y, xt, yt = _flat(digits)
    torch.manual_seed(0)
    model = ts.train(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), [(x, y)], {"epochs": 3}, progress=False).model
    assert ts.evaluate(model, [(xt, F.one_hot(yt, 10).float())]) == ts.evaluate(model, [(xt, yt)])
    soft = F.one_hot(yt, 10).float() * 0.9 + 0.01
    with pytest.raises(TorchslimError, match=r"one value per output, but are not one-hot \(soft labels, or regression values\)"):
        ts.evaluate(model, [(xt, soft)])


def test_training_on_tensors_without_evaluation_data_says_its_accuracy_is_the_training_datas(digits):
    x, y, _, _ = _flat(digits)
    torch.manual_seed(0)
    result = ts.train(nn.Sequential(nn.Linear(64, 10)), (x, y), {"epochs": 1}, progress=False)
    stage = result.report.stages[0]
    assert stage.metrics["evaluated_on"] == "training data" and "on the training data, accuracy" in stage.notes[0] and "test" not in stage.notes[0]
    assert ts.train(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), digits, {"epochs": 1}, progress=False).report.stages[0].notes[0].count("test accuracy") == 1


def test_the_command_line_names_a_pickled_model_file_and_the_way_in(tmp_path, capsys):
    from torchslim.cli import main

    path = tmp_path / "net.pt"
    torch.save(nn.Linear(64, 10), path)
    assert main(["evaluate", str(path), "--data", "digits"]) == 1
    assert "not a model file torchslim reads" in capsys.readouterr().err


def test_a_torch_dataset_of_single_examples_is_batched(digits):
    """A ``TensorDataset`` (or any map-style Dataset) is drawn in shuffled batches, as a DataLoader would."""
    from torch.utils.data import TensorDataset

    x, y, xt, yt = _flat(digits)
    torch.manual_seed(0)
    result = ts.train(nn.Sequential(nn.Linear(64, 10)), TensorDataset(x, y), {"epochs": 3}, progress=False)
    batched, whole = ts.evaluate(result.model, TensorDataset(xt, yt)), ts.evaluate(result.model, [(xt, yt)])
    assert batched["errors"] == whole["errors"] and batched["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert ts.evaluate(result.model, [(xt, yt)])["accuracy"] > 0.8


def test_channel_pruning_keeps_a_channels_last_model_channels_last(digits):
    x = digits.test.inputs[:4].contiguous(memory_format=torch.channels_last)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
    )
    model = model.eval().to(memory_format=torch.channels_last)
    pruned = ts.prune_channels(model, {"ratio": 0.5}, example_input=x).model
    assert pruned[2].in_channels == 8 and all(pruned[i].weight.is_contiguous(memory_format=torch.channels_last) for i in (0, 2))
    assert torch.allclose(pruned(x), pruned(x.contiguous()), atol=1e-6)


class LengthScaled(nn.Module):
    """Token ids pooled and scaled by a length the trace records as a constant (``math.sqrt(idx.shape[1])``)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(17, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, idx):
        return self.head(self.emb(idx).sum(1) / math.sqrt(idx.shape[1]))


def test_exports_keep_an_input_fixed_where_another_length_would_give_other_values(tmp_path):
    """A dynamic sequence that would give other values at another length is given up for the example's length (noted),
    not a failed export; integer images (uint8 pixels) keep their height and width."""
    ids = torch.randint(0, 17, (2, 12))
    result = ts.export(LengthScaled().eval(), "onnx", ids, tmp_path / "scaled.onnx")
    assert [tuple(i.shape) for i in result.model.session.get_inputs()] == [("batch", 12)]
    assert any("failed at another sequence length" in note for note in result.report.stages[0].notes)
    pixels = (torch.rand(2, 8, 8) * 255).to(torch.uint8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def as_float(module, inputs):
        return (inputs[0].float() / 255,)

    model.register_forward_pre_hook(as_float)
    engine = ts.export(model.eval(), "onnx", pixels, tmp_path / "pixels.onnx").model
    assert [tuple(i.shape) for i in engine.session.get_inputs()] == [("batch", 8, 8)]


def test_a_list_example_of_two_inputs_exports_and_a_static_batch_stays_static_in_pt2(tmp_path):
    signal, extra = torch.randn(2, 8, 16), torch.randn(2, 5)

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv1d(8, 3, 3, padding=1), nn.Linear(5, 3)

        def forward(self, x, y):
            return self.a(x).mean(2) + self.b(y)

    model = TwoInputs().eval()
    engine = ts.export(model, "onnx", [signal, extra], tmp_path / "two.onnx", dynamic_axes={"input": [2]}).model
    assert torch.allclose(engine(signal[:, :, :9], extra), model(signal[:, :, :9], extra), atol=1e-5)
    program = ts.export(model, "pt2", (signal, extra), tmp_path / "two.pt2", dynamic_batch=False, dynamic_axes={"input": [2]}).model
    assert torch.allclose(program(signal[:, :, :7], extra), model(signal[:, :, :7], extra), atol=1e-5)
    with pytest.raises(Exception, match="size"):
        program(torch.randn(5, 8, 16), torch.randn(5, 5))  # the batch stayed the example's


def test_a_torch_dataset_is_batched_at_the_size_asked_for_and_a_recurrent_sequential_saves(tmp_path):
    from torch.utils.data import TensorDataset

    from torchslim.data.sources import as_source

    dataset = TensorDataset(torch.randn(200, 8), torch.randint(0, 3, (200,)))
    source = as_source(dataset)
    assert [len(b[1]) for b in source.batches("train", batch_size=64)] == [64, 64, 64, 8] and source.batches_per_epoch(16) == 13
    first = [next(iter(source.batches("train", batch_size=16, seed=s)))[1].tolist() for s in (1, 1, 2)]
    assert first[0] == first[1] != first[2]
    recurrent = nn.Sequential(nn.LSTM(8, 6, batch_first=True))
    loaded = ts.load(ts.save(recurrent, tmp_path / "lstm.safetensors"))
    x = torch.randn(2, 5, 8)
    assert torch.equal(loaded(x)[0], recurrent(x)[0])


def test_a_replaced_layers_forward_hooks_move_to_its_replacement(digits):
    """Quantizing, factorizing or substituting replaces a layer: the hooks the user registered on it (feature capture)
    run on the replacement, the notes say so, and the caller's model keeps its own."""
    model = Plain().eval()
    seen = []
    model.fc1.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    model.fc1.register_forward_pre_hook(lambda _m, args: seen.append("pre"))
    x = digits.test.inputs[:2]
    quantized = ts.quantize(model, {"weights": {"bits": 8}})
    moved = "fc1: its 2 hook(s) moved to the quantized layer (they see its input and output, which match the original's)"
    assert moved in quantized.report.stages[0].notes
    factorized = ts.factorize(model, {"rank": 4, "layers": {"include": ["fc1"]}}, example_input=x)
    assert any(note.startswith("fc1: its 2 hook(s) moved to the factorized layer") for note in factorized.report.stages[0].notes)
    for result in (quantized, factorized):
        seen.clear()
        result.model(x)
        assert seen == ["pre", (2, 32)]
    shared = nn.GELU()  # one activation object under two names: both replaced, its hook on the one replacement
    gelu = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    shared.register_forward_hook(lambda _m, _i, out: seen.append("gelu"))
    substituted = ts.substitute_activations(gelu, {"to": "relu"})
    seen.clear()
    substituted.model(torch.randn(1, 4))
    assert [type(m).__name__ for m in substituted.model] == ["Linear", "ReLU", "Linear", "ReLU"] and substituted.model[1] is substituted.model[3]
    assert seen == ["gelu", "gelu"] and any("moved to the substituted layer" in note for note in substituted.report.stages[0].notes)
    seen.clear()
    model(x)
    assert seen == ["pre", (2, 32)]  # the caller's model still runs its hooks


def test_hooks_moved_in_place_keep_their_handles_and_backward_hooks_and_tied_heads_move_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    seen = []
    handle = model[0].register_forward_hook(lambda *_: seen.append("forward"))
    model[0].register_full_backward_hook(lambda _m, grad_in, grad_out: seen.append("backward"))
    result = ts.factorize(model, {"rank": 4, "layers": {"include": ["0"]}}, example_input=torch.randn(2, 16), inplace=True)
    assert "0: its 2 hook(s) moved" in " ".join(result.report.stages[0].notes)
    seen.clear()  # factorize's own checks ran the model
    result.model(torch.randn(2, 16, requires_grad=True)).sum().backward()
    assert seen == ["forward", "backward"]  # the backward hook runs on the factorized layer
    seen.clear()
    handle.remove()  # the user's handle removes the hook from the replacement
    result.model(torch.randn(2, 16))
    assert seen == []

    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))

    lm = TiedLM().eval()
    lm.head.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    quantized = ts.quantize(lm, {"weights": {"bits": 8}, "layers": {"types": ["Linear", "Embedding"]}})
    quantized.model(torch.randint(0, 50, (1, 5)))
    assert seen == [(1, 5, 50)] and any(note.startswith("head: its 1 hook(s) moved") for note in quantized.report.stages[0].notes)
