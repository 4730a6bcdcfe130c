"""Structured pruning of Llama-architecture models: gated MLP neurons (SwiGLU), grouped key/value attention heads and
the residual stream through RMSNorm are removed physically; the Hugging Face config follows, so ``save_pretrained`` /
``from_pretrained`` round-trip; the importance for gated neurons ranks them better than chance on a trained model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import torchslim as ts
from tests import zoo
from tests.test_zoo import _text_batches

transformers = pytest.importorskip("transformers")

MLP = {"include": [r"re:.*\.mlp\..*"]}


def _logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(**batch).logits for batch in batches])


def test_llama_heads_neurons_and_hidden_width_go_and_save_pretrained_round_trips(tmp_path):
    torch.manual_seed(0)
    model = zoo.llama().eval()
    data = _text_batches()
    result = ts.prune_channels(model, {"ratio": 0.25, "head_ratio": 0.5}, data=data, task="language-modeling")
    pruned = result.model.eval()
    attention, mlp = pruned.model.layers[0].self_attn, pruned.model.layers[0].mlp
    # 4 query heads sharing 2 key/value heads: a unit is one key/value head with its 2 query heads
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (32, 16, 32)
    assert mlp.up_proj.out_features == mlp.gate_proj.out_features == mlp.down_proj.in_features == 96
    assert pruned.model.embed_tokens.embedding_dim == pruned.model.norm.weight.numel() == attention.q_proj.in_features == 48
    assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()  # still tied
    config = pruned.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (48, 96, 2, 1, 16)
    assert any("config updated for save_pretrained" in note for note in result.report.stages[0].notes)
    assert model.config.hidden_size == 64 and model.model.layers[0].mlp.up_proj.out_features == 128  # the input model is untouched
    expected = _logits(pruned, data)
    pruned.save_pretrained(tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(_logits(reloaded, data), expected)
    ts.save(pruned, tmp_path / "pruned.safetensors")
    torch.testing.assert_close(_logits(ts.load(tmp_path / "pruned.safetensors").eval(), data), expected)
    generated = pruned.generate(data[0]["input_ids"][:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 14)


def test_rmsnorm_is_followed_and_mlp_only_pruning_keeps_the_outputs_of_zeroed_neurons():
    torch.manual_seed(0)
    model = zoo.llama().eval()
    data = _text_batches()
    from torchslim.pruning.tracing import trace

    graph = trace(model, data[0])
    assert not [u for u in graph.unsupported if "layernorm" in u or "norm" in u.split(":")[0]]
    hidden = [g for g in graph.groups() if any(p.module == "model.norm" for p in g.members)]
    assert len(hidden) == 64 and all(g.joined for g in hidden)  # the residual stream: RMSNorm scales are members
    result = ts.prune_channels(model, {"ratio": 0.5, "prune_residual": False, "layers": MLP}, data=data)
    assert result.model.config.hidden_size == 64 and result.model.config.intermediate_size == 64
    assert result.report.stages[0].metrics["groups_removed"] == 2 * 64


def test_wanda_ranks_gated_neurons_and_grouped_heads_by_what_they_add_to_the_output():
    torch.manual_seed(0)
    model = zoo.llama().eval()
    data = _text_batches()
    with torch.no_grad():  # neuron 3 of layer 0 reads almost nothing but writes a lot: weight norms miss it
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[3] *= 0.05
        mlp.up_proj.weight[3] *= 0.05
        mlp.down_proj.weight[:, 3] *= 2000.0
    kept = {}
    for importance in ("l1", "wanda"):
        result = ts.prune_channels(model, {"ratio": 0.25, "importance": importance, "prune_residual": False, "layers": MLP}, data=data)
        pruned = result.model.model.layers[0].mlp.down_proj.weight
        kept[importance] = bool((pruned.abs().amax(dim=0) > 50 * pruned.abs().amax(dim=0).median()).any())
    assert kept == {"l1": False, "wanda": True}
    heads = ts.prune_channels(model, {"head_ratio": 0.5, "importance": "wanda"}, data=data, task="language-modeling")
    assert heads.report.stages[0].metrics["heads_removed"] == 4  # query heads: one key/value unit of two per layer, two query heads each
    with pytest.raises(ts.ConfigError, match="needs calibration data"):
        ts.prune_channels(model, {"head_ratio": 0.5, "importance": "wanda"}, example_input=data[0])


def test_a_config_that_cannot_describe_the_widths_is_left_and_the_note_says_so(tmp_path):
    torch.manual_seed(0)
    model = zoo.llama().eval()
    data = _text_batches()
    overrides = {"model.layers.0.mlp.gate_proj": 0.5, "model.layers.0.mlp.up_proj": 0.5}
    result = ts.prune_channels(model, {"ratio": 0.25, "prune_residual": False, "layers": MLP, "overrides": overrides}, data=data)
    notes = " ".join(result.report.stages[0].notes)
    assert "the MLP width differs between layers" in notes and "torchslim.save" in notes
    assert result.model.config.intermediate_size == 128  # left as it was
    path = ts.save(result.model, tmp_path / "uneven.safetensors")
    torch.testing.assert_close(_logits(ts.load(path).eval(), data), _logits(result.model.eval(), data))


def _trained_llama():
    """A tiny Llama trained for a few hundred steps on this project's own text (bytes)."""
    text = b"".join(Path(__file__).parents[2].joinpath(name).read_bytes() for name in ("README.md", "CONTRIBUTING.md"))
    codes = torch.tensor([min(b, 127) for b in text], dtype=torch.long)
    length = 64
    count = (codes.numel() - 1) // length
    windows = codes[: count * length].reshape(count, length)
    split = int(0.85 * count)
    train = [{"input_ids": windows[i : i + 16]} for i in range(0, split, 16)]
    evaluation = [{"input_ids": windows[i : i + 16]} for i in range(split, count, 16)]
    torch.manual_seed(0)
    model = zoo.llama(128, intermediate=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(400):
        batch = train[step % len(train)]
        loss = model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), ts.Data(train=train, eval=evaluation)


@pytest.mark.slow
def test_on_a_trained_llama_wanda_neurons_cost_less_perplexity_than_random_ones():
    model, data = _trained_llama()
    base = ts.evaluate(model, data, task="language-modeling")["perplexity"]

    def change(importance: str, seed: int = 0) -> float:
        config = {"ratio": 0.1, "importance": importance, "prune_residual": False, "layers": MLP, "seed": seed}
        pruned = ts.prune_channels(model, config, data=data, task="language-modeling").model
        return ts.evaluate(pruned, data, task="language-modeling")["perplexity"] - base

    randoms = [change("random", seed) for seed in range(3)]
    assert 0 <= change("wanda") < min(randoms)


def _pretrained_lm() -> Path | None:
    folder = Path(os.environ.get("TORCHSLIM_LLM_DIR", Path.home() / ".cache" / "torchslim" / "smollm2-135m-instruct"))
    return folder if (folder / "config.json").is_file() and (folder / "shakespeare-ids.pt").is_file() else None


@pytest.mark.slow
def test_on_a_pretrained_lm_removing_the_least_important_5_percent_costs_less_than_a_random_5_percent():
    folder = _pretrained_lm()
    if folder is None:
        pytest.skip("no pretrained causal LM here: python -m benchmarks.llm --prepare fetches one (or set TORCHSLIM_LLM_DIR)")
    ids = torch.load(folder / "shakespeare-ids.pt")
    split = int(0.9 * ids.numel())
    evaluation = ts.data.token_windows(ids, 256, max_tokens=2048, batch_size=4, start=split)
    calibration = [{"input_ids": ids[i * 2048 : (i + 1) * 2048].reshape(8, 256)} for i in range(2)]
    data = ts.Data(train=calibration, eval=evaluation)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base = ts.evaluate(model, evaluation, task="language-modeling")["perplexity"]
    perplexity = {}
    for importance in ("wanda", "random"):
        config = {"ratio": 0.05, "importance": importance, "prune_residual": False, "layers": MLP, "calibration_batches": 2}
        pruned = ts.prune_channels(model, config, data=data, task="language-modeling").model
        perplexity[importance] = ts.evaluate(pruned, evaluation, task="language-modeling")["perplexity"]
    assert perplexity["wanda"] - base < 0.5 * (perplexity["random"] - base)
