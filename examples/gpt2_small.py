"""GPT-2 small's shape for ``graphopt plan``: 12 layers, d_model 768, 12 heads, 50257 tokens, 1024 positions.

    graphopt plan examples/gpt2_small.py --budget 8GB --hardware l4
    graphopt plan examples/gpt2_small.py --set batch=16

The decoder is ``examples.gpt.GPT`` (learned positions, pre-LayerNorm, GELU MLP, untied
head: 163 M parameters, where GPT-2 ties its head to the embedding for 124 M); fp32,
batch 8 x 1024 tokens, the loss is the mean cross-entropy.
"""

from __future__ import annotations

import torch

try:
    from examples.gpt import GPT, GPTConfig
except ImportError:  # run from inside examples/
    from gpt import GPT, GPTConfig


def build(
    batch: int = 8,
    seq: int = 1024,
    n_layers: int = 12,
    d_model: int = 768,
    n_heads: int = 12,
    vocab: int = 50257,
    dropout: float = 0.0,
) -> tuple[GPT, tuple[torch.Tensor, torch.Tensor]]:
    """The model and ``(idx, targets)`` such that ``model(*example_inputs)`` is the scalar loss.

    Tensors are made on the current default device: under ``torch.device("meta")`` (what
    ``graphopt plan`` does) nothing is allocated.
    """
    config = GPTConfig(vocab=vocab, d_model=d_model, n_heads=n_heads, n_layers=n_layers, seq=seq, dropout=dropout)
    model = GPT(config)
    idx = torch.randint(0, vocab, (batch, seq))
    targets = torch.randint(0, vocab, (batch, seq))
    return model, (idx, targets)
