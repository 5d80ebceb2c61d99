"""A LLaMA-7B-shaped decoder in plain torch, for ``graphopt plan`` (build it on the meta device).

    graphopt plan examples/llama7b.py --budget 60GB --hardware h100
    graphopt plan examples/llama7b.py --set n_layers=4 seq=1024

32 pre-RMSNorm blocks of causal self-attention (32 heads, rotary position embeddings,
``scaled_dot_product_attention``) and a SwiGLU MLP (hidden 11008), d_model 4096, an
untied 32000-token head; bf16 weights, batch 1 x 4096 tokens. The loss is the mean
cross-entropy computed in float32, as most training code does. 6.74 B parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 32000
    d_model: int = 4096
    n_heads: int = 32
    n_layers: int = 32
    hidden: int = 11008
    seq: int = 4096
    rope: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    dtype: torch.dtype = torch.bfloat16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, as LLaMA does, then return to the weights' dtype.
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        if config.d_model % config.n_heads != 0:
            raise ValueError(f"d_model {config.d_model} is not a multiple of n_heads {config.n_heads}")
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.rope = config.rope
        kwargs = dict(bias=False, dtype=config.dtype)
        self.q = nn.Linear(config.d_model, config.d_model, **kwargs)
        self.k = nn.Linear(config.d_model, config.d_model, **kwargs)
        self.v = nn.Linear(config.d_model, config.d_model, **kwargs)
        self.o = nn.Linear(config.d_model, config.d_model, **kwargs)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, d_model = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

        query, key, value = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.rope:
            query = query * cos + rotate_half(query) * sin
            key = key * cos + rotate_half(key) * sin
        attended = functional.scaled_dot_product_attention(query, key, value, is_causal=True)
        return self.o(attended.transpose(1, 2).reshape(batch, seq, d_model))


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        kwargs = dict(bias=False, dtype=config.dtype)
        self.gate = nn.Linear(config.d_model, config.hidden, **kwargs)
        self.up = nn.Linear(config.d_model, config.hidden, **kwargs)
        self.down = nn.Linear(config.hidden, config.d_model, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps, config.dtype)
        self.attention = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, config.dtype)
        self.mlp = SwiGLU(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab, config.d_model, dtype=config.dtype)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = RMSNorm(config.d_model, config.norm_eps, config.dtype)
        self.lm_head = nn.Linear(config.d_model, config.vocab, bias=False, dtype=config.dtype)
        head_dim = config.d_model // config.n_heads
        inverse_frequency = 1.0 / config.rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(config.seq, dtype=torch.float32), inverse_frequency)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().to(config.dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(config.dtype), persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)``, or the mean cross-entropy when ``targets`` is given."""
        seq = idx.shape[1]
        if seq > self.config.seq:
            raise ValueError(f"sequence length {seq} exceeds the model's {self.config.seq} positions")
        cos, sin = self.cos[:seq], self.sin[:seq]
        x = self.embedding(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits
        return functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def build(
    batch: int = 1,
    seq: int = 4096,
    n_layers: int = 32,
    d_model: int = 4096,
    n_heads: int = 32,
    hidden: int = 11008,
    vocab: int = 32000,
    dtype: str = "bfloat16",
    rope: bool = True,
) -> tuple[Llama, tuple[torch.Tensor, torch.Tensor]]:
    """The model and ``(idx, targets)`` such that ``model(*example_inputs)`` is the scalar loss.

    Every tensor is made on the current default device: under ``torch.device("meta")``
    (what ``graphopt plan`` does) nothing is allocated.
    """
    config = LlamaConfig(
        vocab=vocab, d_model=d_model, n_heads=n_heads, n_layers=n_layers, hidden=hidden, seq=seq,
        rope=bool(rope), dtype=getattr(torch, dtype),
    )
    model = Llama(config)
    idx = torch.randint(0, vocab, (batch, seq))
    targets = torch.randint(0, vocab, (batch, seq))
    return model, (idx, targets)
