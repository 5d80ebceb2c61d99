"""The benchmark models, built from configurations (no downloads), each with a scalar-loss forward.

    bench_model = build_model("llama", suite="cpu", size="full")
    loss = bench_model.module(*bench_model.inputs); loss.backward()

Every model exposes ``blocks``, the ``nn.ModuleList`` of its repeated blocks, so the
checkpointing configurations can wrap each block the same way on every model. Shapes
depend on the suite: the CPU suite shrinks layers, widths and sequences so that a whole
sweep fits in 20 minutes on a 2-core machine; the GPU suite uses the published shapes
(Llama3-1B at batch 4 x 2048 in bf16). ``size="quick"`` shrinks further for a smoke run.
Each model's ``shape`` string says what was built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as functional
from torch import nn

SIZES = ("quick", "full")


@dataclass
class BenchModel:
    name: str
    module: nn.Module  # forward(*inputs) returns the scalar training loss
    inputs: tuple[torch.Tensor, ...]
    blocks: nn.ModuleList  # the repeated blocks that full/selective checkpointing wraps
    shape: str  # what was built, for the results table


# ---------------------------------------------------------------- language models


def _token_batch(vocab: int, batch: int, seq: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random tokens and next-token targets (a generator seeded with 0)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    return tokens.to(device), targets.to(device)


def build_gpt(suite: str, size: str) -> BenchModel:
    """The repository's 4-layer bench GPT (``examples/gpt.py``), at a batch that suits the suite."""
    from examples.gpt import build

    batch, seq = {"quick": (2, 128), "full": (4, 256)}[size] if suite == "cpu" else (8, 512)
    model, inputs = build(batch=batch, seq=seq)
    device = _device(suite)
    return BenchModel(
        name="gpt",
        module=model.to(device),
        inputs=tuple(t.to(device) for t in inputs),
        blocks=model.blocks,
        shape=f"examples.gpt: 4 layers, d 256, 4 heads, vocab 2048, batch {batch} x {seq}, fp32",
    )


class HuggingFaceLoss(nn.Module):
    """A causal language model whose forward is the mean next-token cross-entropy."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # No key/value cache: training does not use it, and a recomputing checkpoint would append to it twice.
        logits = self.model(input_ids=tokens, use_cache=False).logits
        return functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build_gpt2(suite: str, size: str) -> BenchModel:
    """Hugging Face GPT-2 small's width (d 768, 12 heads, vocab 50257); fewer layers on CPU."""
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, batch, seq = {"quick": (1, 1, 64), "full": (2, 2, 256)}[size] if suite == "cpu" else (12, 8, 1024)
    config = GPT2Config(
        n_layer=layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    hf_model = GPT2LMHeadModel(config)
    device = _device(suite)
    return BenchModel(
        name="gpt2",
        module=HuggingFaceLoss(hf_model).to(device),
        inputs=_token_batch(config.vocab_size, batch, seq, device),
        blocks=hf_model.transformer.h,
        shape=f"HF GPT2LMHeadModel: {layers} of 12 layers, d 768, 12 heads, vocab 50257, tied head, "
        f"batch {batch} x {seq}, fp32",
    )


def build_llama(suite: str, size: str) -> BenchModel:
    """A Hugging Face ``LlamaForCausalLM``: small on CPU, Llama3-1B's shape in bf16 on GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if suite == "gpu":
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)  # fmt: skip
        batch, seq, dtype = 4, 2048, torch.bfloat16
    else:
        layers, batch, seq = {"quick": (1, 1, 64), "full": (2, 4, 256)}[size]
        shape = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=layers, num_attention_heads=8,
                     num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False)  # fmt: skip
        dtype = torch.float32
    config = LlamaConfig(**shape, max_position_embeddings=seq, attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    hf_model = LlamaForCausalLM(config).to(dtype)
    device = _device(suite)
    described = ", ".join(f"{key} {value}" for key, value in shape.items())
    return BenchModel(
        name="llama",
        module=HuggingFaceLoss(hf_model).to(device),
        inputs=_token_batch(config.vocab_size, batch, seq, device),
        blocks=hf_model.model.layers,
        shape=f"HF LlamaForCausalLM: {described}, batch {batch} x {seq}, {str(dtype).removeprefix('torch.')}",
    )


# ---------------------------------------------------------------- vision models


class Bottleneck(nn.Module):
    """ResNet-50's block: 1x1 reduce, 3x3, 1x1 expand (x4), BatchNorm, a projected shortcut when shapes change."""

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )  # fmt: skip
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-50's layout (stages of 3, 4, 6, 3 bottlenecks) at a chosen base width, with a cross-entropy loss."""

    def __init__(self, base_width: int, stage_depths: tuple[int, ...], classes: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(base_width), nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )  # fmt: skip
        blocks, channels = [], base_width
        for stage, depth in enumerate(stage_depths):
            width = base_width * 2**stage
            for index in range(depth):
                blocks.append(Bottleneck(channels, width, stride=2 if index == 0 and stage > 0 else 1))
                channels = 4 * width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return functional.cross_entropy(self.head(x.mean(dim=(2, 3))), labels)


class ViTBlock(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d_model)
        self.attention = nn.MultiheadAttention(d_model, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.attention_norm(x)
        x = x + self.attention(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.mlp_norm(x))


class ViT(nn.Module):
    """A ViT: patch embedding by a strided convolution, a class token, pre-LayerNorm blocks, a linear head."""

    def __init__(self, image: int, patch: int, d_model: int, depth: int, heads: int, classes: int):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, d_model, patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.position_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d_model) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(d_model, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(len(images), -1, -1), patches], dim=1) + self.position_embedding
        for block in self.blocks:
            x = block(x)
        return functional.cross_entropy(self.head(self.final_norm(x[:, 0])), labels)


def _image_batch(batch: int, image: int, classes: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image, image, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return images.to(device), labels.to(device)


def build_resnet(suite: str, size: str) -> BenchModel:
    """ResNet-50's layout; a quarter of its width and 64-pixel images on CPU, the real ResNet-50 on GPU."""
    if suite == "gpu":
        base_width, depths, batch, image = 64, (3, 4, 6, 3), 64, 224
    else:
        base_width, depths, batch, image = {"quick": (8, (1, 1, 1, 1), 4, 32), "full": (16, (3, 4, 6, 3), 16, 64)}[size]
    model = ResNet(base_width, depths, classes=1000)
    device = _device(suite)
    return BenchModel(
        name="resnet",
        module=model.to(device),
        inputs=_image_batch(batch, image, 1000, device),
        blocks=model.blocks,
        shape=f"bottleneck ResNet: stages {list(depths)}, base width {base_width}, BatchNorm, "
        f"batch {batch} x 3 x {image} x {image}, fp32",
    )


def build_vit(suite: str, size: str) -> BenchModel:
    """A ViT: ViT-Tiny's width on 64-pixel images on CPU, ViT-B/16 at 224 pixels on GPU."""
    if suite == "gpu":
        image, patch, d_model, depth, heads, batch = 224, 16, 768, 12, 12, 64
    else:
        image, patch, d_model, depth, heads, batch = {
            "quick": (32, 8, 64, 1, 2, 4),
            "full": (64, 8, 192, 4, 3, 16),
        }[size]
    model = ViT(image, patch, d_model, depth, heads, classes=1000)
    device = _device(suite)
    return BenchModel(
        name="vit",
        module=model.to(device),
        inputs=_image_batch(batch, image, 1000, device),
        blocks=model.blocks,
        shape=f"ViT: patch {patch}, d {d_model}, {depth} layers, {heads} heads, "
        f"batch {batch} x 3 x {image} x {image}, fp32",
    )


MODELS: dict[str, Callable[[str, str], BenchModel]] = {
    "gpt": build_gpt,
    "gpt2": build_gpt2,
    "llama": build_llama,
    "resnet": build_resnet,
    "vit": build_vit,
}


def build_model(name: str, *, suite: str, size: str) -> BenchModel:
    """The named model for `suite` ("cpu" or "gpu") at `size` ("quick" or "full"), seeded with 0."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    torch.manual_seed(0)
    bench_model = MODELS[name](suite, size)
    bench_model.module.train()
    return bench_model


def _device(suite: str) -> str:
    return "cuda" if suite == "gpu" else "cpu"
