"""A small GPT-style decoder, with no dependency but torch, for graphopt's tests and benchmarks.

    model, example_inputs = build()
    loss = model(*example_inputs)  # scalar mean cross-entropy
    loss.backward()

Token and learned position embeddings, pre-LayerNorm blocks (causal self-attention through
``scaled_dot_product_attention``, then a Linear-GELU-Linear MLP), a final LayerNorm and an
untied language-model head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 2048
    d_model: int = 256
    n_heads: int = 4
    n_layers: int = 4
    seq: int = 512
    dropout: float = 0.0
    mlp_ratio: int = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.d_model % config.n_heads != 0:
            raise ValueError(f"d_model {config.d_model} is not a multiple of n_heads {config.n_heads}")
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        self.out_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape
        head_dim = d_model // self.n_heads
        # (batch, seq, 3, heads, head_dim) -> three (batch, heads, seq, head_dim)
        qkv = self.qkv(x).view(batch, seq, 3, self.n_heads, head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        attended = functional.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        attended = attended.transpose(1, 2).reshape(batch, seq, d_model)
        return self.out_dropout(self.out(attended))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.up = nn.Linear(config.d_model, hidden)
        self.activation = nn.GELU()
        self.down = nn.Linear(hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.activation(self.up(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = CausalSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab, config.d_model)
        self.position_embedding = nn.Embedding(config.seq, config.d_model)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)``, or the mean cross-entropy loss when ``targets`` is given."""
        seq = idx.shape[1]
        if seq > self.config.seq:
            raise ValueError(f"sequence length {seq} exceeds the model's {self.config.seq} positions")
        positions = torch.arange(seq, device=idx.device)
        x = self.embedding_dropout(self.token_embedding(idx) + self.position_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits
        return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build(
    batch: int = 8,
    seq: int = 512,
    n_layers: int = 4,
    d_model: int = 256,
    n_heads: int = 4,
    vocab: int = 2048,
    dropout: float = 0.0,
) -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    """A GPT and ``(idx, targets)`` inputs such that ``model(*example_inputs)`` is the scalar loss.

    Parameters use torch's global generator (seed it for reproducible weights); the inputs
    come from a generator seeded with 0, so they are the same on every call.
    """
    config = GPTConfig(vocab=vocab, d_model=d_model, n_heads=n_heads, n_layers=n_layers, seq=seq, dropout=dropout)
    model = GPT(config)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, seq), generator=generator, dtype=torch.int64)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator, dtype=torch.int64)
    return model, (idx, targets)
