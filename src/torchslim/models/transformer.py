"""A small decoder-only character-level transformer (GPT-style) for the language-model work."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/out projections (prunable by head).

    ``attention_macs`` counts the two attention matmuls (QK^T and AV) for the MACs counter.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        head_dim = head_dim or embed_dim // num_heads
        if head_dim * num_heads != embed_dim and head_dim == embed_dim // num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner)
        self.k_proj = nn.Linear(embed_dim, inner)
        self.v_proj = nn.Linear(embed_dim, inner)
        self.out_proj = nn.Linear(inner, embed_dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.dropout(F.softmax(scores, dim=-1), self.dropout, self.training)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.out_proj(out)

    def attention_macs(self, x: torch.Tensor) -> int:
        """MACs of QK^T and AV for one input of this shape (per batch element)."""
        _, length, _ = x.shape
        return 2 * self.num_heads * length * length * self.head_dim

    def channel_rule(self, graph, name: str, inputs: list, output: torch.Tensor) -> None:  # a ChannelGraph
        """Structured pruning: q/k/v read the input channels; out_proj produces the output channels; each head (its
        q/k/v rows and out_proj columns) may be removed whole."""
        graph.attention(name, self, inputs, ("q_proj", "k_proj", "v_proj"), self.num_heads, self.head_dim, output_projection="out_proj", output=output)


class Block(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, mlp_hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(embed_dim)
        self.attn = CausalSelfAttention(embed_dim, num_heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, mlp_hidden)
        self.proj = nn.Linear(mlp_hidden, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.proj(F.gelu(self.fc(self.ln2(x)))))


class CharTransformer(nn.Module):
    """Decoder-only transformer over characters: token + position embeddings, pre-LN blocks, a linear head.

    Example:
        >>> model = CharTransformer(vocab_size=65, block_size=32, layers=2, embed_dim=64, heads=4)
        >>> model(torch.zeros(3, 32, dtype=torch.long)).shape
        torch.Size([3, 32, 65])
    """

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 128,
        layers: int = 4,
        embed_dim: int = 128,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.token_embedding = nn.Embedding(vocab_size, embed_dim)
        self.position_embedding = nn.Embedding(block_size, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, heads, mlp_ratio * embed_dim, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, length = ids.shape  # (B, T)
        if length > self.block_size:
            raise ValueError(f"sequence of {length} tokens exceeds block_size {self.block_size}")
        positions = torch.arange(length, device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, vocab)
