"""Models, outputs and tasks as users write them (a third audit's findings): a tag per position whose sequence is as
long as the tag set, dict outputs, frozen layers, tied weights through factorization, keyed image inputs, wrapped
and scripted models, layers that lose every weight. Real data: scikit-learn's digits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchslim as ts
from tests.zoo import LambdaLayer, same_after_save_pretrained
from torchslim.core.errors import TorchslimError
from torchslim.pruning.structured import channel_sets


@pytest.fixture(scope="module")
def digits():
    return ts.data.load("digits")


def _row_tags(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each 8x8 digit as 8 rows of 8 pixels (a sequence of 8), each row tagged by how many of its pixels are above
    the mean (7 or more as 7): 8 positions, 8 tags."""
    rows = images.reshape(len(images), 8, 8)
    return rows, (rows > 0).sum(dim=-1).clamp(max=7)


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 32)
        self.tag = nn.Linear(32, 8)

    def forward(self, rows):
        return self.tag(F.relu(self.mix(rows)))  # (B, T, tags)


def test_a_tag_per_position_is_scored_over_the_tags_when_the_sequence_is_as_long_as_the_tag_set(digits):
    """(B, 8, 8) logits against (B, 8) tags fit both layouts; they are read as (B, T, classes), the token
    classification convention, and trained as such. ``Task.classification(class_dim=1)`` reads (B, classes, L)."""
    train, test = _row_tags(digits.train.inputs), _row_tags(digits.test.inputs)
    torch.manual_seed(0)
    model = ts.train(Tagger(), ts.Data(train=train, eval=test), {"epochs": 15, "lr": 1e-2, "optimizer": "adam"}, progress=False).model
    metrics = ts.evaluate(model, test)
    with torch.no_grad():
        logits = model(test[0])
    expected = (logits.argmax(dim=-1) == test[1]).float().mean().item()
    assert metrics["accuracy"] == pytest.approx(expected) and metrics["examples"] == test[1].numel()
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits.reshape(-1, 8), test[1].reshape(-1)).item(), rel=1e-5)
    assert expected > 0.6  # trained on the tags (read over the positions, 0.15)
    channels_first = ts.evaluate(LambdaLayer(lambda rows: model(rows).transpose(1, 2)), test, task=ts.Task.classification(class_dim=1))
    assert channels_first["accuracy"] == pytest.approx(expected)
    with pytest.raises(TorchslimError, match="class_dim must be 1 or -1"):
        ts.Task.classification(class_dim=2)


class TwoHeads(nn.Module):
    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.body = nn.Linear(64, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        features = F.relu(self.body(x.flatten(1)))
        return {"features": features, self.key: self.head(features)}


def test_a_dict_output_is_scored_by_the_key_that_names_the_prediction_and_an_unnamed_one_is_refused(digits):
    """``{"features", "out"}``: "out" is scored (the first tensor, "features", used to be: training then fitted the
    features as 16 class scores). Under a key that names nothing, the error lists the keys."""
    x, y = digits.test.inputs[:64], digits.test.targets[:64]
    torch.manual_seed(0)
    model = TwoHeads("out")
    with torch.no_grad():
        expected = (model(x)["out"].argmax(dim=-1) == y).float().mean().item()
    assert ts.evaluate(model, (x, y))["accuracy"] == pytest.approx(expected)
    trained = ts.train(
        model, ts.Data(train=(digits.train.inputs, digits.train.targets), eval=(x, y)), {"epochs": 20, "optimizer": "adam", "lr": 1e-2}, progress=False
    ).model
    with torch.no_grad():
        assert (trained(x)["out"].argmax(dim=-1) == y).float().mean().item() > 0.8
    with pytest.raises(TorchslimError, match=r"a dict of 2 tensors \('features', 'head'\) and none under a key"):
        ts.evaluate(TwoHeads("head"), (x, y))


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.fc(x.flatten(1))


def _frozen_weights(model: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from torchslim.measure.weights import effective_weights

    return {name: tensor.clone() for name, tensor in effective_weights(model).items() if name.startswith(names)}


def test_a_frozen_backbone_stays_frozen_through_quantization_and_factorization_fine_tuning(digits):
    """The layers a user froze (``requires_grad=False``) are replaced by k-means codes and by factors; the
    replacements are frozen too, so fine-tuning moves the head alone (the codebook and the factors used to train)."""
    torch.manual_seed(0)
    model = Backbone()
    for layer in (model.c1, model.c2):
        layer.requires_grad_(False)
    tune = {"epochs": 1, "lr": 0.05}
    kmeans = {"weights": {"scheme": "kmeans", "bits": 4}}
    factors = {"rank": 4, "layers": {"include": ["c2", "fc"]}}
    pairs = [
        (ts.quantize(model, kmeans).model, ts.quantize(model, kmeans, data=digits, finetune=tune).model),
        (ts.factorize(model, factors).model, ts.factorize(model, factors, data=digits, finetune=tune).model),
    ]
    for untuned, tuned in pairs:
        frozen = [p for name, p in tuned.named_parameters() if name.startswith(("c1", "c2"))]
        assert frozen and not any(p.requires_grad for p in frozen)
        assert all(p.requires_grad for name, p in tuned.named_parameters() if name.startswith("fc"))
        before, after = _frozen_weights(untuned, ("c1", "c2")), _frozen_weights(tuned, ("c1", "c2"))
        assert before.keys() == after.keys() and all(torch.equal(tensor, after[name]) for name, tensor in before.items())
        head_before, head_after = _frozen_weights(untuned, ("fc",)), _frozen_weights(tuned, ("fc",))
        assert any(not torch.equal(tensor, head_after[name]) for name, tensor in head_before.items())  # the head trained


class TiedLM(nn.Module):
    """A character model whose output layer shares the embedding's weight."""

    def __init__(self, vocabulary: int = 17, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, vocabulary, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(F.relu(self.fc(self.embed(ids))))


def test_factorization_leaves_a_weight_tied_to_another_layer_whole_and_says_so(digits):
    """Factorizing the head would untie it from the embedding and add a copy (the model grew); it is left whole and
    named, the tie kept, and the other layers factorized."""
    ids = (digits.test.inputs.reshape(-1, 64)[:16] * 4 + 8).clamp(0, 16).long()
    torch.manual_seed(0)
    model = TiedLM()
    result = ts.factorize(model, {"rank": 4}, example_input=ids)
    factorized = result.model
    assert "head: left whole (its weight is tied to embed: factorizing it would untie it and add a copy)" in result.report.stages[0].notes
    assert factorized.head.weight is factorized.embed.weight and isinstance(factorized.head, nn.Linear)
    assert sum(p.numel() for p in factorized.parameters()) < sum(p.numel() for p in model.parameters())
    assert factorized(ids).shape == (16, 64, 17)


def test_an_image_given_by_keyword_exports_with_its_channels_fixed(digits, tmp_path):
    """``{"image": x}`` (and Hugging Face's ``pixel_values``): axis 1 is channels, not a sequence; the export used to
    make it dynamic and fail on a raw channel-count error."""
    rgb = digits.test.inputs.expand(-1, 3, -1, -1)  # the digits as three-channel images

    class Keyed(Backbone):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, image):
            return super().forward(image)

    torch.manual_seed(0)
    model = Keyed().eval()
    exported = ts.export(model, "onnx", {"image": rgb[:4]}, path=tmp_path / "keyed.onnx").model
    assert torch.allclose(exported(image=rgb[:7]), model(rgb[:7]), atol=1e-4)


def test_compiled_and_data_parallel_models_save_and_export_the_module_they_hold(digits, tmp_path):
    """``torch.compile(model)`` and ``nn.DataParallel(model)``: the file holds the user's module (save used to suggest
    the wrapper's class as a factory, and export failed on it)."""
    x = digits.test.inputs[:4]
    torch.manual_seed(0)
    model = Backbone().eval()
    for label, wrapped in (("compiled", torch.compile(model)), ("parallel", nn.DataParallel(model))):
        loaded = ts.load(ts.save(wrapped, tmp_path / f"{label}.safetensors"), trust_factory=True).eval()
        assert type(loaded) is Backbone and torch.allclose(loaded(x), model(x), atol=1e-6)
        exported = ts.export(wrapped, "onnx", x, path=tmp_path / f"{label}.onnx").model
        assert torch.allclose(exported(x), model(x), atol=1e-4)


def test_a_scripted_submodule_is_refused_by_name_before_any_work(digits):
    model = Backbone()
    model.c2 = torch.jit.script(model.c2)
    for verb in (lambda: ts.prune(model, {"sparsity": 0.5}), lambda: ts.train(model, digits, {"epochs": 1}, progress=False)):
        with pytest.raises(TorchslimError, match=r"c2 is a TorchScript module \(torch.jit.script / torch.jit.trace\).*pass the model before scripting"):
            verb()
    assert ts.evaluate(model, digits)["examples"] > 0  # evaluation reads it as it is


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv2d(1, 16, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.e2 = nn.Conv2d(16, 8, 3, padding=1)
        self.d1 = nn.ConvTranspose2d(8, 16, 2, stride=2)
        self.d2 = nn.Conv2d(16, 1, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.e2(F.relu(self.norm(self.e1(x)))))
        return self.d2(F.relu(self.d1(x)))


def test_the_channel_pruning_table_lists_every_narrowed_layer_transposed_convolutions_included(digits):
    x = digits.test.inputs[:4]
    torch.manual_seed(0)
    result = ts.prune_channels(AutoEncoder().eval(), {"ratio": 0.5}, example_input=x)
    rows = {row["name"]: (row["before"], row["after"]) for row in result.report.stages[0].layers}
    assert rows["d1"] == ("8->16", "4->8") and rows["d2"] == ("16->1", "8->1") and rows["e2"] == ("16->8", "8->4")
    assert rows["e1"] == ("1->16", "1->8") and rows["norm"] == ("16 (4 groups)", "8 (2 groups)")  # whole groups of 4 go
    assert result.model(x).shape == x.shape


class GroupNormNet(nn.Module):
    """Convolutions with GroupNorm (as diffusion and detection models write them), a residual stream across two norms
    of different group sizes, and a norm of one group (a LayerNorm over channels)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.norm0 = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, 16)
        self.wide = nn.Conv2d(16, 32, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, 32)
        self.last = nn.Conv2d(32, 12, 1)
        self.whole = nn.GroupNorm(1, 12)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.silu(self.norm0(self.stem(x)))
        x = x + F.silu(self.norm1(self.conv(x)))
        x = F.silu(self.norm2(self.wide(x)))
        x = F.silu(self.whole(self.last(x)))
        return self.fc(x.mean((2, 3)))


def test_channel_pruning_removes_whole_groupnorm_groups_and_the_model_loads_back(digits, tmp_path):
    x = digits.test.inputs[:8]
    torch.manual_seed(0)
    model = GroupNormNet().eval()
    result = ts.prune_channels(model, {"ratio": 0.5}, example_input=x)
    pruned = result.model
    # the residual stream joins a norm of groups of 4 and one of groups of 2: it loses whole groups of 4
    assert (pruned.norm0.num_channels, pruned.norm0.num_groups, pruned.norm1.num_channels, pruned.norm1.num_groups) == (8, 2, 8, 4)
    assert (pruned.wide.out_channels, pruned.norm2.num_channels, pruned.norm2.num_groups) == (16, 16, 4)
    assert pruned.last.out_channels == 12 and pruned.whole.num_groups == 1  # one group: kept whole, and said
    assert any("whole: GroupNorm (one group normalizes over every channel)" in note for note in result.report.stages[0].notes)
    assert result.report.stages[0].metrics["macs"] < 0.6 * result.report.stages[0].metrics["macs_before"]
    # what is left computes what the original computes with the removed groups' readers zeroed (the removal check),
    # and the file rebuilds it
    loaded = ts.load(ts.save(pruned, tmp_path / "gn.safetensors"), trust_factory=True).eval()
    assert loaded.norm1.num_groups == 4 and torch.allclose(loaded(x), pruned(x), atol=1e-6)
    sets = channel_sets(model, example_input=x)
    assert sets["wide"] == 32 and sets["conv+stem"] == 16  # channels, not groups
    kept = ts.prune_channels(model, {"ratio": 0.5, "round_to": 8}, example_input=x).model
    assert kept.norm2.num_channels == 16 and kept.norm0.num_channels == 8


class OddWidths(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 20, 3, padding=1)
        self.c2 = nn.Conv2d(20, 36, 3, padding=1)
        self.norm = nn.GroupNorm(12, 36)  # groups of 3, which multiples of 8 divide only at 24
        self.fc = nn.Linear(36, 10)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.c2(F.relu(self.c1(x))))).mean((2, 3)))


def test_round_to_leaves_a_protected_set_whole_and_never_rounds_groups_coarser_than_half_a_set(digits):
    x = digits.test.inputs[:4]
    torch.manual_seed(0)
    result = ts.prune_channels(OddWidths().eval(), {"ratio": 0.1, "round_to": 8, "overrides": {"c1": 0.0}}, example_input=x)
    pruned = result.model
    assert pruned.c1.out_channels == 20  # protected by its override: not rounded down to 16
    assert (pruned.c2.out_channels, pruned.norm.num_groups) == (33, 11)  # whole groups of 3 (a multiple of 24 would leave 24)


class NonNesting(nn.Module):
    """One residual stream of 24 channels through GroupNorms of groups of 8 and of 3: no channel goes alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 24, 3, padding=1)
        self.norm_a = nn.GroupNorm(3, 24)
        self.conv = nn.Conv2d(24, 24, 3, padding=1)
        self.norm_b = nn.GroupNorm(8, 24)
        self.mid = nn.Conv2d(24, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.silu(self.norm_a(self.stem(x)))
        x = x + F.silu(self.norm_b(self.conv(x)))
        return self.fc(F.relu(self.mid(x)).mean((2, 3)))


def test_a_stream_whose_groupnorm_groups_do_not_nest_is_kept_whole_and_the_notes_say_why(digits):
    x = digits.test.inputs[:4]
    torch.manual_seed(0)
    result = ts.prune_channels(NonNesting().eval(), {"ratio": 0.5}, example_input=x)
    pruned = result.model
    assert (pruned.stem.out_channels, pruned.conv.out_channels, pruned.mid.out_channels) == (24, 24, 8)  # the stream whole, mid halved
    notes = result.report.stages[0].notes
    assert any("conv+stem" in note and "do not nest" in note for note in notes), notes


class Concatenated(nn.Module):
    """Two branches concatenated into one GroupNorm: its groups of 4 hold 2 channels of each branch."""

    def __init__(self, first=2):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, first, 3, padding=1), nn.Conv2d(1, 8 - first, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c(F.silu(self.norm(torch.cat([self.a(x), self.b(x)], 1))))).mean((2, 3)))


def test_groupnorm_groups_across_a_concatenation_count_every_channel_and_a_one_group_set_is_named(digits):
    x = digits.test.inputs[:4]
    assert channel_sets(Concatenated(), example_input=x) == {"a+b": 4, "b": 4, "c": 8}  # a group of 2 of a and 2 of b, then one of b
    result = ts.prune_channels(Concatenated(4).eval(), {"ratio": 0.5}, example_input=x)  # each branch exactly one group
    assert (result.model.a.out_channels, result.model.b.out_channels, result.model.c.out_channels) == (4, 4, 4)
    notes = result.report.stages[0].notes
    assert any(note.startswith("left intact: a (all of its channels are one GroupNorm group)") for note in notes), notes


class Scaled(nn.Module):
    """A convolution of a hundredth the others' scale, which the BatchNorm after it undoes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)
        with torch.no_grad():
            self.c2.weight.mul_(0.01)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.c2(F.relu(self.c1(x))))), 2)
        return self.fc(x.flatten(1))


def test_one_global_threshold_never_empties_a_layer(digits):
    """Global magnitude pruning at 0.9 put every weight of the small-scale convolution under the threshold: the model
    then computed from c2's bias alone. The layer keeps its top 1%, and the notes say why."""
    torch.manual_seed(0)
    result = ts.prune(Scaled().eval(), {"scope": "global", "sparsity": 0.9})
    rows = {row["name"]: row for row in result.report.stages[0].layers}
    assert rows["c2"]["nonzeros"] == 12 and rows["c1"]["nonzeros"] > 0 and rows["fc"]["nonzeros"] > 0
    assert any(
        note.startswith("c2: every weight fell under the global threshold; it keeps its 12 highest-scored (1%)") for note in result.report.stages[0].notes
    )


def test_an_encoder_decoder_language_model_is_scored_on_its_labels_as_they_are():
    """T5's decoder positions line up with its labels: they are scored unshifted (they used to be shifted by one, 80
    of 96 tokens scored, and against the encoder's mask). Without the decoder's inputs the error says how to build
    them (it used to be Hugging Face's own "exactly one of input_ids or inputs_embeds")."""
    transformers = pytest.importorskip("transformers")
    from torchslim.data.embedded import load_digits

    pixels = (load_digits()["test"][0].reshape(-1, 64)[:24] * 4 + 8).clamp(0, 16).long() + 2  # digits' pixels as tokens
    config = transformers.T5Config(vocab_size=20, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    batches = []
    for start in range(0, 24, 8):
        source, labels = pixels[start : start + 8, :32].contiguous(), pixels[start : start + 8, 32:].contiguous()
        decoder = model.prepare_decoder_input_ids_from_labels(labels=labels)
        batches.append({"input_ids": source, "attention_mask": torch.ones_like(source), "decoder_input_ids": decoder, "labels": labels})
    metrics = ts.evaluate(model, batches, task="language-modeling")
    with torch.no_grad():
        own = sum(model(**batch).loss.item() for batch in batches) / len(batches)
    assert metrics["tokens"] == 24 * 32
    assert metrics["perplexity"] == pytest.approx(float(torch.tensor(own).exp()), rel=1e-4)
    with pytest.raises(TorchslimError, match="T5ForConditionalGeneration is an encoder-decoder model; give each batch the decoder's inputs"):
        ts.evaluate(model, [{"input_ids": b["input_ids"], "labels": b["labels"]} for b in batches], task="language-modeling")


class ScaledOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Backbone()

    def forward(self, x, scale: float = 0.5, features: bool = False):
        return self.body(x) * scale


def test_a_forward_with_a_number_default_exports_with_that_default(digits, tmp_path):
    """``forward(x, scale: float = 0.5)``: the TorchScript exporter made ``scale`` an input of the graph, and the
    file then asked for it ("Required inputs ['onnx::Cast_1'] are missing"); the default is used now."""
    x = digits.test.inputs[:4]
    torch.manual_seed(0)
    model = ScaledOutput().eval()
    exported = ts.export(model, "onnx", x, path=tmp_path / "scaled.onnx").model
    assert torch.allclose(exported(digits.test.inputs[:9]), model(digits.test.inputs[:9]), atol=1e-4)
    quantized = ts.quantize(model, {"method": "onnxruntime"}, data=digits).model
    assert ts.evaluate(quantized, digits)["examples"] == len(digits.test.inputs)


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def test_a_batch_key_the_forward_does_not_take_is_named_with_where_labels_go(digits):
    """``{"x": ..., "y": ...}`` batches: channel pruning called ``forward(x, y=...)`` and failed on Python's own
    "unexpected keyword argument 'y'"."""
    batches = [{"x": digits.test.inputs[:32], "y": digits.test.targets[:32]}]
    message = r"the batch's 'y' is not an argument of Named.forward\(x\): a mapping's entries are passed by name, and its labels go under one of"
    with pytest.raises(TorchslimError, match=message):
        ts.prune_channels(Named(), {"ratio": 0.5}, data=batches)
    renamed = [{"x": batch["x"], "label": batch["y"]} for batch in batches]
    assert ts.prune_channels(Named(), {"ratio": 0.5}, data=renamed).model.fc1.out_features == 16


def test_data_names_the_key_its_mapping_batches_hold_targets_under(digits):
    batches = [{"x": digits.train.inputs[i : i + 64], "y": digits.train.targets[i : i + 64]} for i in range(0, 512, 64)]
    test = [{"x": digits.test.inputs[:200], "y": digits.test.targets[:200]}]
    torch.manual_seed(0)
    model = Named()
    data = ts.Data(train=batches, eval=test, targets="y")
    tuned = ts.prune_channels(model, {"ratio": 0.5}, data=data, finetune={"epochs": 3, "optimizer": "adam", "lr": 1e-2}).model
    metrics = ts.evaluate(tuned, data)
    assert metrics["examples"] == 200 and metrics["accuracy"] > 0.5  # trained and scored on the "y" labels
    assert metrics["accuracy"] == ts.evaluate(tuned, [{"x": test[0]["x"], "labels": test[0]["y"]}])["accuracy"]
    with pytest.raises(TorchslimError, match=r"Data\(targets='mask'\): a batch has no 'mask' \(its keys: 'x', 'y'\)"):
        ts.evaluate(tuned, ts.Data(train=test, targets="mask"))
    # a task of the user's reads the batch as given, the targets under their own key
    task = ts.Task.custom(
        loss=lambda model, batch: F.cross_entropy(model(batch["x"]), batch["y"]),
        evaluate=lambda model, batches: {"hits": float(sum((model(b["x"]).argmax(1) == b["y"]).sum() for b in batches))},
        metric="hits",
        higher_is_better=True,
    )
    tuned = ts.prune_channels(model, {"ratio": 0.5}, data=data, task=task, finetune={"epochs": 3, "optimizer": "adam", "lr": 1e-2}).model
    assert ts.evaluate(tuned, data, task=task)["hits"] > 100  # of 200 (chance: 20)


def test_an_empty_loader_and_a_double_precision_model_get_errors_that_say_what_is_wrong(tmp_path):
    with pytest.raises(TorchslimError, match=r"the data \(no separate evaluation data was given\) gives no batches \(an empty loader"):
        ts.evaluate(Named(), [])
    with pytest.raises(TorchslimError, match="the model holds float64 weights, which torchslim's files do not store; cast it to float32"):
        ts.save(Named().double(), tmp_path / "double.safetensors")
    assert not (tmp_path / "double.safetensors").exists()


class Audio(nn.Module):
    """An audio-style model that applies weight_norm and spectral_norm itself, in both of torch's forms."""

    def __init__(self, width: int = 8):
        super().__init__()
        from torch.nn.utils import parametrizations, spectral_norm, weight_norm

        self.width = width
        self.a = weight_norm(nn.Conv1d(1, width, 3, padding=1))
        self.b = spectral_norm(nn.Conv1d(width, width, 3, padding=1))
        self.c = parametrizations.weight_norm(nn.Conv1d(width, 1, 3, padding=1))

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def test_a_model_that_applies_weight_and_spectral_norm_itself_saves_and_loads_back(digits, tmp_path):
    """The file stores the weights the norms compute; the rebuilt architecture, which applies the norms again, has
    them folded where the file stores the plain weight (a hook-based weight_norm failed on weight_g / weight_v)."""
    x = digits.test.inputs[:4].reshape(4, 1, 64)  # each digit as a signal of 64 samples
    torch.manual_seed(0)
    model = Audio()
    model(x)  # spectral_norm's power iteration moves its vectors
    model.eval()
    loaded = ts.load(ts.save(model, tmp_path / "audio.safetensors"), trust_factory=True)
    assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_review_edges_a_frozen_layer_in_a_replaced_stack_an_endless_generator_a_two_tensor_dict_export(digits, tmp_path):
    """A stack swapped for a shorter one keeps each layer's own flags (one frozen layer used to freeze the whole new
    stack); evaluation of an endless generator stops at ``limit``; a model returning ``{"mu", "sigma"}`` exports both
    (the scoring rule for dict outputs does not apply to what an exporter writes); ``train(inplace=True)`` runs on a
    hook-based weight_norm model (nothing is copied)."""
    from torch.nn.utils import weight_norm

    from torchslim.core.selector import set_module

    stack = nn.Sequential(nn.ModuleList([nn.Linear(4, 4) for _ in range(4)]))
    stack[0][3].requires_grad_(False)
    set_module(stack, "0", nn.ModuleList(list(stack[0])[:3]))
    assert all(p.requires_grad for p in stack.parameters())

    def endless():
        while True:
            yield digits.test.inputs[:8].reshape(8, -1), digits.test.targets[:8]

    assert ts.evaluate(Named(), endless(), limit=16)["examples"] == 16

    class Gaussian(Named):
        def forward(self, x):
            h = super().forward(x)
            return {"mu": h, "sigma": h.exp()}

    x = digits.test.inputs[:4]
    model = Gaussian().eval()
    exported = ts.export(model, "onnx", x, path=tmp_path / "gaussian.onnx").model
    assert all(torch.allclose(exported(x)[key], model(x)[key], atol=1e-4) for key in ("mu", "sigma"))

    normed = Named()
    weight_norm(normed.fc1)
    trained = ts.train(normed, digits, {"epochs": 1}, inplace=True, progress=False).model
    assert trained is normed


def test_a_batch_size_a_dataloader_overrides_is_named_in_the_notes(digits):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(digits.train.inputs, digits.train.targets), batch_size=32)
    notes = ts.train(Named(), loader, {"epochs": 1, "batch_size": 256}, progress=False).report.stages[0].notes
    assert "batch_size 256 left unused: the batches are the data's own (a DataLoader's batch size is its own)" in notes
    assert not any("left unused" in note for note in ts.train(Named(), loader, {"epochs": 1}, progress=False).report.stages[0].notes)


def test_a_linear_over_a_sequence_input_gets_no_note_about_its_axis():
    """The model input's channel axis is a guess (axis 1): a Linear reading a (batch, time, features) input is fine."""
    result = ts.narrow(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), 0.5, example_input=torch.randn(3, 5, 8))
    assert result.model[0].out_features == 8
    assert not any("not on the last axis" in note or "could not follow" in note for note in result.report.stages[0].notes)


def test_gpt2s_mlp_neurons_go_through_its_tanh_gelu_and_the_model_reloads(tmp_path):
    """GPT-2's GELU is 0.5 x (1 + tanh(c (x + 0.044715 x ** 3))): the power, and x added to a function of itself,
    kept every MLP neuron (the add was taken for a residual stream)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 8))
    result = ts.prune_channels(gpt, {"ratio": 0.5, "prune_residual": False}, example_input={"input_ids": ids})
    rows = {row["name"]: (row["before"], row["after"]) for row in result.report.stages[0].layers}
    assert rows["transformer.h.0.mlp.c_fc"] == ("32->128", "32->64") and rows["transformer.h.1.mlp.c_proj"] == ("128->32", "64->32")
    assert result.model.config.n_inner == 64
    assert same_after_save_pretrained(result.model, ids, tmp_path)


@pytest.mark.parametrize("importance", ["l1", "wanda"])
def test_gpt2s_attention_heads_are_pruned_whole_and_the_model_reloads(tmp_path, importance):
    """GPT-2 writes queries, keys and values side by side from one Conv1D (c_attn) and reads the heads back through a
    transposed Conv1D (c_proj): its heads could not be pruned. A head is now its columns in each third of c_attn and
    its rows of c_proj, and split_size / num_heads follow."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=128)  # no field for the heads changes
    gpt = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    data = [{"input_ids": ids, "labels": ids}] * 2 if importance == "wanda" else None
    config = {"ratio": 0.0, "prune_residual": False, "head_ratio": 0.5, "importance": importance}
    result = ts.prune_channels(gpt, config, data=data, example_input={"input_ids": ids})
    rows = {row["name"]: (row["before"], row["after"]) for row in result.report.stages[0].layers}
    assert rows["transformer.h.0.attn"] == ("4 heads", "2 heads") and rows["transformer.h.1.attn.c_attn"] == ("32->96", "32->48")
    attention = result.model.transformer.h[1].attn
    assert (attention.num_heads, attention.split_size, tuple(attention.c_proj.weight.shape)) == (2, 16, (16, 32))
    reference = copy.deepcopy(gpt)  # the original with the removed heads' c_proj rows zeroed computes the same
    for block, pruned in zip(reference.transformer.h, result.model.transformer.h):
        heads = block.attn.c_attn.weight[:, :32].reshape(32, 4, 8)
        kept = [h for h in range(4) if any(torch.equal(heads[:, h], pruned.attn.c_attn.weight[:, 8 * k : 8 * k + 8]) for k in range(2))]
        assert len(kept) == 2
        with torch.no_grad():
            for head in set(range(4)) - set(kept):
                block.attn.c_proj.weight[8 * head : 8 * head + 8] = 0
    with torch.no_grad():
        assert torch.allclose(result.model(ids).logits, reference(ids).logits, atol=1e-5)
    loaded = ts.load(ts.save(result.model, tmp_path / "gpt2-heads.safetensors"))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, result.model(ids).logits, atol=1e-5)
    assert any("save with torchslim.save" in note for note in result.report.stages[0].notes)


def test_gpt2_narrowed_with_its_heads_gets_a_config_of_that_head_count(tmp_path):
    """Narrowing GPT-2's residual stream with its heads left 2 heads of 8 in the modules while the config kept n_head 4
    beside the new n_embd 16: 4 x 4 = 2 x 8 gave the same shapes, and from_pretrained built 4 heads of 4."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    with torch.no_grad():
        for block in gpt.transformer.h:
            block.attn.c_attn.weight.mul_(25)  # sharp attention, where the head split shows
    ids = torch.randint(0, 64, (2, 8))
    narrowed = ts.narrow(gpt, {"width": 0.5, "heads": True}, example_input={"input_ids": ids}).model
    assert narrowed.transformer.h[0].attn.num_heads == 2 and (narrowed.config.n_embd, narrowed.config.n_head) == (16, 2)
    assert same_after_save_pretrained(narrowed, ids, tmp_path)


class Twice(nn.Module):
    """One layer applied twice in a row (weights shared across depth)."""

    def __init__(self):
        super().__init__()
        self.inp, self.shared, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.out(F.relu(self.shared(F.relu(self.shared(F.relu(self.inp(x)))))))


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.head = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for _ in range(3):
            x = x + F.relu(self.conv(x))
        return self.head(x.mean((2, 3)))


def test_a_layer_run_several_times_is_pruned_as_one_with_what_it_reads(digits):
    """The calls of a shared layer read and write the same rows and columns: its input channels, its output channels
    and those of the layers feeding it are one set. It was left intact with a shape error."""
    x = torch.randn(4, 8)
    result = ts.prune_channels(Twice().eval(), {"ratio": 0.5}, example_input=x)
    pruned = result.model
    assert (pruned.inp.out_features, pruned.shared.in_features, pruned.shared.out_features) == (8, 8, 8)
    assert not any(note.startswith("left intact: channels") for note in result.report.stages[0].notes)
    images = digits.test.inputs[:4]
    conv = ts.prune_channels(SharedConv().eval(), {"ratio": 0.5}, example_input=images).model
    assert (conv.stem.out_channels, conv.conv.in_channels, conv.conv.out_channels) == (4, 4, 4) and conv(images).shape == (4, 10)


def test_saving_a_model_with_a_users_forward_hook_warns_that_the_file_has_no_hooks(tmp_path):
    """A hook that scaled an output was dropped by save without a word: the loaded model computed something else."""
    import warnings

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def double(module, inputs, output):
        return output * 2

    model[0].register_forward_hook(double)
    with pytest.warns(UserWarning, match=r"not forward hooks; the loaded model runs without 0: .*double"):
        ts.save(model, tmp_path / "hooked.safetensors")
    plain = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own reparametrizations are not a user's hooks
        ts.save(plain, tmp_path / "plain.safetensors")
