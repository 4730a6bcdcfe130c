"""Language models written by hand, as users write them: the block-by-block methods find the decoder stack (not a
layer's parallel heads or a mixture's experts), and a layer its block never calls (nn.MultiheadAttention's out_proj)
is named, never pruned by position or left to fail."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import torchslim as ts
from torchslim.llm.blocks import find_blocks


class Head(nn.Module):
    def __init__(self, width: int, size: int):
        super().__init__()
        self.key, self.query, self.value = (nn.Linear(width, size, bias=False) for _ in range(3))

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Block(nn.Module):
    """Karpathy's lecture GPT: attention as an nn.ModuleList of heads, run side by side on one input."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.heads = nn.ModuleList([Head(width, width // heads) for _ in range(heads)])
        self.proj, self.ff = nn.Linear(width, width), nn.Sequential(nn.Linear(width, 4 * width), nn.ReLU(), nn.Linear(4 * width, width))
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.proj(torch.cat([head(h) for head in self.heads], dim=-1))
        return x + self.ff(self.ln2(x))


class LectureGPT(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32, depth: int = 2):
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(16, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        x = self.embed(idx) + self.position(torch.arange(idx.shape[1]))
        return self.head(self.blocks(x))


class Expert(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class MixtureLayer(nn.Module):
    def __init__(self, width: int, experts: int = 4):
        super().__init__()
        self.attention = nn.Linear(width, width)
        self.router = nn.Linear(width, experts)
        self.experts = nn.ModuleList([Expert(width) for _ in range(experts)])

    def forward(self, x):
        x = x + self.attention(x)
        weights = self.router(x).softmax(-1)
        return x + sum(weights[..., i : i + 1] * expert(x) for i, expert in enumerate(self.experts))


class Mixture(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([MixtureLayer(width) for _ in range(3)])
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        x = self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class TorchEncoder(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        return self.head(self.encoder(self.embed(idx), mask=mask, is_causal=True))


def _text() -> ts.Data:
    ids = torch.randint(0, 64, (16 * 64,), generator=torch.Generator().manual_seed(0))
    return ts.Data(train=ts.data.token_windows(ids, 16, batch_size=8))


GPTQ = {"method": "gptq", "weights": {"bits": 4, "granularity": "group", "group_size": 8}, "calibration_batches": 4}


def test_the_decoder_stack_is_found_not_a_layers_heads_or_experts():
    """The longest ModuleList was taken: a block's 4 parallel heads (GPTQ then chained them and failed with a shape
    error) or a layer's 4 experts (each calibrated on the one before's output, the rest only rounded)."""
    torch.manual_seed(0)
    batch = next(iter(_text().train))
    assert find_blocks(LectureGPT(), batch)[0] == "blocks"
    assert find_blocks(Mixture(), batch)[0] == "layers"
    for model in (LectureGPT(), Mixture()):
        result = ts.quantize(model, GPTQ, data=_text(), task="language-modeling")
        assert result.report.stages[0].notes[0].startswith("GPTQ over 2 blocks" if isinstance(model, LectureGPT) else "GPTQ over 3 blocks")
        assert [row["name"] for row in result.report.stages[0].layers if row.get("method") == "round to nearest"] == ["head"]


def test_a_layer_its_block_never_calls_is_named_not_pruned_by_position():
    """nn.MultiheadAttention reads out_proj's weight without calling it: Wanda scored every column 0 and pruned the
    first half of every row (two whole heads), and GPTQ and SparseGPT failed ("a layer saw no calibration tokens")."""
    torch.manual_seed(0)
    model, text = TorchEncoder().eval(), _text()
    wanda = ts.prune(model, {"importance": "wanda", "sparsity": 0.5}, data=text)
    out_proj = wanda.model.encoder.layers[0].self_attn.out_proj
    assert float((out_proj.weight == 0).float().mean()) == 0.0
    assert any("never called these" in note and "encoder.layers.0.self_attn.out_proj" in note for note in wanda.report.stages[0].notes)
    assert float((wanda.model.encoder.layers[0].linear1.weight == 0).float().mean()) == 0.5
    gptq = ts.quantize(model, GPTQ, data=text, task="language-modeling")
    assert any(note.startswith("never called on the calibration batches") for note in gptq.report.stages[0].notes)
    sparse = ts.prune(model, {"solver": "sparsegpt", "sparsity": 0.5, "calibration_batches": 4}, data=text)
    assert any("never called on the calibration batches" in note for note in sparse.report.stages[0].notes)
    assert float((sparse.model.encoder.layers[1].linear2.weight == 0).float().mean()) == 0.5


def test_token_windows_are_scored_as_language_modeling_without_a_task():
    """The README's prune example passes no task: token windows were scored as classification of each token against
    itself ("accuracy 99.38%" at perplexity 259)."""
    torch.manual_seed(0)
    text = _text()
    assert "perplexity" in ts.evaluate(LectureGPT(), text)
    assert "perplexity" in ts.evaluate(LectureGPT(), text.train)
    pruned = ts.prune(LectureGPT(), {"solver": "sparsegpt", "sparsity": 0.5, "calibration_batches": 2}, data=text)
    assert any("perplexity" in note for note in pruned.report.stages[0].notes)


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(64, 32), nn.Linear(32, 32), nn.Linear(32, 64)

    def forward(self, idx):
        return self.head(torch.relu(self.mix(self.embed(idx))))


def test_a_model_without_repeated_blocks_is_said_to_be_calibrated_in_one_pass():
    text = _text()
    for notes in (
        ts.quantize(Flat(), GPTQ, data=text).report.stages[0].notes,
        ts.prune(Flat(), {"solver": "sparsegpt", "sparsity": 0.5, "calibration_batches": 2}, data=text).report.stages[0].notes,
    ):
        assert any(note.startswith("no repeated blocks found") for note in notes)
    assert not any(note.startswith("no repeated blocks found") for note in ts.quantize(LectureGPT(), GPTQ, data=text).report.stages[0].notes)
