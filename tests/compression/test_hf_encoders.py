"""Hugging Face models that are not causal language models (encoders, encoder-decoders, audio and image models):
after structured pruning or activation substitution, ``save_pretrained`` reloads the model that runs, or the notes
say why it cannot and how to keep it describable."""

from __future__ import annotations

import pytest
import torch

import torchslim as ts

transformers = pytest.importorskip("transformers")


def _ids(batch: int = 4, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _reloaded(model, path):
    model.save_pretrained(path)
    return type(model).from_pretrained(path).eval()


def test_bert_style_heads_pruned_with_the_residual_reload_as_the_same_heads(tmp_path):
    """RoBERTa at ratio 0.5 and head_ratio 0.5 keeps 2 heads of 8 (of 4 heads of 8). The config was given
    hidden_size 16 but kept 4 heads, and from_pretrained loaded the same-shaped weights into 4 heads of 4: another
    function (logits 1.8e-3 off), with no error. Head counts are now read from BERT-style attention too, and a config
    is accepted only where the model it builds has the pruned modules' head counts and sizes as well as their shapes."""
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.RobertaForTokenClassification(config).eval()
    batches = [{**_ids(seed=i), "labels": torch.randint(0, 3, (4, 12), generator=torch.Generator().manual_seed(i))} for i in range(4)]
    result = ts.prune_channels(model, {"ratio": 0.5, "head_ratio": 0.5}, data=batches)
    pruned = result.model.eval()
    attention = pruned.roberta.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.attention_head_size) == (2, 8)
    assert any("num_attention_heads=2" in note for note in result.report.stages[0].notes)
    reloaded = _reloaded(pruned, tmp_path / "roberta")
    assert reloaded.roberta.encoder.layer[0].attention.self.num_attention_heads == 2
    with torch.no_grad():
        assert torch.equal(pruned(**_ids(seed=9)).logits, reloaded(**_ids(seed=9)).logits)


def test_heads_the_config_cannot_describe_leave_it_as_it_was_with_a_note(tmp_path):
    """Heads removed with the residual kept: 2 heads of 8 beside a width of 32, which BertConfig derives as 16 a
    head. The config is left, and the note says to save with ts.save."""
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    result = ts.prune_channels(model, {"ratio": 0.0, "head_ratio": 0.5, "prune_residual": False}, example_input=_ids())
    assert result.model.encoder.layer[0].attention.self.num_attention_heads == 2
    assert result.model.config.num_attention_heads == 4
    assert any("the config cannot describe the pruned model" in note for note in result.report.stages[0].notes)


def test_a_pruned_pooler_is_named_with_the_override_that_keeps_the_config_true(tmp_path):
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    pruned = ts.prune_channels(model, {"ratio": 0.5}, example_input=_ids())
    assert any("leave that layer whole (overrides: {'bert.pooler.dense': 0.0})" in note for note in pruned.report.stages[0].notes)
    kept = ts.prune_channels(model, {"ratio": 0.5, "overrides": {"bert.pooler.dense": 0.0}}, example_input=_ids())
    reloaded = _reloaded(kept.model.eval(), tmp_path / "bert")
    with torch.no_grad():
        assert torch.equal(kept.model(**_ids(seed=3)).logits, reloaded(**_ids(seed=3)).logits)


def test_t5s_feed_forward_width_follows_into_d_ff(tmp_path):
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    example = {**_ids(), "decoder_input_ids": _ids(length=5, seed=1)["input_ids"]}
    result = ts.prune_channels(model, {"ratio": 0.5, "prune_residual": False}, example_input=example)
    assert result.model.config.d_ff == 32 and any("d_ff=32" in note for note in result.report.stages[0].notes)
    reloaded = _reloaded(result.model.eval(), tmp_path / "t5")
    with torch.no_grad():
        assert torch.equal(result.model(**example).logits, reloaded(**example).logits)


def test_a_model_without_token_embeddings_prunes_and_says_what_its_config_cannot_hold():
    """ConvNext's get_input_embeddings raises NotImplementedError: prune_channels failed after the pruning itself."""
    config = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3, image_size=32)
    torch.manual_seed(0)
    model = transformers.ConvNextForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    result = ts.prune_channels(model, {"ratio": 0.5}, example_input={"pixel_values": pixels})
    assert any("the config cannot describe the pruned model" in note for note in result.report.stages[0].notes)
    assert result.model(pixel_values=pixels).logits.shape == (2, 3)


def test_distilberts_activation_field_follows_the_substitution(tmp_path):
    """DistilBERT names its activation ``activation``, not ``hidden_act``: the config kept "gelu" with no note, and
    save_pretrained reloaded the GELU model."""
    config = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64, num_labels=2)
    torch.manual_seed(0)
    model = transformers.DistilBertForSequenceClassification(config).eval()
    result = ts.substitute_activations(model, {"to": "relu"})
    assert "config.activation set to 'relu'" in result.report.stages[0].notes
    reloaded = _reloaded(result.model.eval(), tmp_path / "distilbert")
    assert isinstance(reloaded.distilbert.transformer.layer[0].ffn.activation, torch.nn.ReLU)
    with torch.no_grad():
        assert torch.equal(result.model(**_ids()).logits, reloaded(**_ids()).logits)


def _wav2vec2():
    config = transformers.Wav2Vec2Config(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_feat_extract_layers=2,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        classifier_proj_size=16,
        num_labels=2,
    )
    torch.manual_seed(0)
    return transformers.Wav2Vec2ForSequenceClassification(config).eval()


def test_every_activation_field_a_model_reads_is_set_and_only_those_that_hold(tmp_path):
    """Wav2Vec2's feature extractor reads ``feat_extract_activation``: replaced everywhere, both fields are set and the
    reloaded model is the one that ran. With the encoder's activations alone replaced, only ``hidden_act`` is (setting
    the other would turn the feature extractor's GELUs into ReLUs on reload)."""
    audio = {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(0))}
    everywhere = ts.substitute_activations(_wav2vec2(), {"to": "relu"})
    assert {"config.hidden_act set to 'relu'", "config.feat_extract_activation set to 'relu'"} <= set(everywhere.report.stages[0].notes)
    reloaded = _reloaded(everywhere.model.eval(), tmp_path / "all")
    with torch.no_grad():
        assert torch.equal(everywhere.model(**audio).logits, reloaded(**audio).logits)
    encoder = ts.substitute_activations(_wav2vec2(), {"to": "relu", "layers": {"include": ["wav2vec2.encoder.layers.*"]}})
    notes = encoder.report.stages[0].notes
    assert "config.hidden_act set to 'relu'" in notes and not any("feat_extract_activation" in note for note in notes)
    assert encoder.model.config.feat_extract_activation == "gelu"
    reloaded = _reloaded(encoder.model.eval(), tmp_path / "encoder")
    with torch.no_grad():
        assert torch.equal(encoder.model(**audio).logits, reloaded(**audio).logits)
    # the encoder's positional convolution reads feat_extract_activation too: no set of fields gives every module
    # as it runs, and the note names the one save_pretrained would reload otherwise
    mixed = ts.substitute_activations(_wav2vec2(), {"to": "relu", "layers": {"include": ["wav2vec2.encoder.*"]}})
    assert any(
        note.startswith("the config cannot name every activation as it runs: save_pretrained would reload wav2vec2.encoder.pos_conv_embed.activation")
        for note in mixed.report.stages[0].notes
    ), mixed.report.stages[0].notes


def test_t5_quantizes_to_native_int8_past_its_infinite_log():
    """T5's relative-position buckets take the log of a zero offset (-inf, masked out later): native-int8's calibration
    refused the whole model ("55 value(s) are NaN or Inf"). That tensor is now left to ONNX Runtime's calibration."""
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    batches = []
    for seed in range(4):
        ids = _ids(8, 10, seed)["input_ids"]
        labels = ids.flip(1)
        decoder = torch.cat([torch.zeros(8, 1, dtype=torch.long), labels[:, :-1]], 1)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "decoder_input_ids": decoder, "labels": labels})
    int8 = ts.quantize(model, {"method": "native-int8"}, data=batches).model
    batch = {key: value for key, value in batches[0].items() if key != "labels"}
    with torch.no_grad():
        expected = model(**batch).logits
        got = int8(**batch)
    got = got.logits if hasattr(got, "logits") else got[0] if isinstance(got, (tuple, list)) else got
    assert torch.isfinite(got).all()
    assert float((got - expected).norm() / expected.norm()) < 0.1


def test_alberts_embedding_and_feed_forward_widths_follow_into_the_config(tmp_path):
    """ALBERT's factorized embedding width (embedding_size) and its ffn / ffn_output width were not read, so the
    config stayed as it was and save_pretrained could not describe the pruned model."""
    config = transformers.AlbertConfig(
        vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, num_labels=2
    )
    torch.manual_seed(0)
    model = transformers.AlbertForSequenceClassification(config).eval()
    result = ts.prune_channels(model, {"ratio": 0.5, "overrides": {"albert.pooler": 0.0}}, example_input=_ids())
    assert "config updated for save_pretrained: embedding_size=8, intermediate_size=32" in result.report.stages[0].notes
    reloaded = _reloaded(result.model.eval(), tmp_path / "albert")
    with torch.no_grad():
        assert torch.equal(result.model(**_ids(seed=2)).logits, reloaded(**_ids(seed=2)).logits)
