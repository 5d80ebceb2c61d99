"""ViT-L/16's shape for ``graphopt plan``: 24 pre-LayerNorm blocks, d_model 1024, 16 heads,
224-pixel images in 16-pixel patches (197 tokens with the class token), batch 32, fp32.

    graphopt plan examples/vit_large.py --budget 20GB --hardware h100
    graphopt plan examples/vit_large.py --set batch=64

The model is ``bench.models.ViT`` (a strided-convolution patch embedding,
``nn.MultiheadAttention`` blocks with a GELU MLP, a linear head): 304 M parameters.
"""

from __future__ import annotations

import torch

try:
    from bench.models import ViT
except ImportError:  # run from inside examples/
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.models import ViT


def build(
    batch: int = 32, image: int = 224, patch: int = 16, d_model: int = 1024, depth: int = 24, heads: int = 16, classes: int = 1000
) -> tuple[ViT, tuple[torch.Tensor, torch.Tensor]]:
    """The model and ``(images, labels)`` such that ``model(*example_inputs)`` is the scalar loss.

    Tensors are made on the current default device: under ``torch.device("meta")`` (what
    ``graphopt plan`` does) nothing is allocated.
    """
    model = ViT(image, patch, d_model, depth, heads, classes)
    images = torch.randn(batch, 3, image, image)
    labels = torch.randint(0, classes, (batch,))
    return model, (images, labels)
