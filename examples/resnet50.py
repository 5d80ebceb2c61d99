"""A ResNet-50-shaped CNN in plain torch, for ``graphopt plan``: batch 32 of 224x224 RGB images.

    graphopt plan examples/resnet50.py --budget 6GB --hardware rtx4090
    graphopt plan examples/resnet50.py --set batch=64 classes=100

A 7x7 stem and max-pool, then bottleneck stages of 3, 4, 6 and 3 blocks (1x1, 3x3, 1x1
convolutions, expansion 4, BatchNorm and ReLU, projection shortcuts where the shape
changes), global average pooling and a linear classifier: 25.6 M parameters, fp32.
``loss_fn`` is the cross-entropy against labels made from the logits' shape (their
values do not matter for a memory plan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as functional
from torch import nn

EXPANSION = 4
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, first stride)


class Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = width * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = functional.relu(self.bn1(self.conv1(x)))
        out = functional.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return functional.relu(out + self.shortcut(x))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, in_channels = [], 64
        for width, blocks, stride in STAGES:
            layers = []
            for index in range(blocks):
                layers.append(Bottleneck(in_channels, width, stride if index == 0 else 1))
                in_channels = width * EXPANSION
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.classifier = nn.Linear(in_channels, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(images))
        return self.classifier(torch.flatten(functional.adaptive_avg_pool2d(features, 1), 1))


def loss_fn(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class 0 for every image: the labels' values do not change memory."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return functional.cross_entropy(logits, labels)


def build(batch: int = 32, image_size: int = 224, classes: int = 1000):
    """``(model, (images,), loss_fn)``; tensors are made on the current default device
    (under ``torch.device("meta")``, what ``graphopt plan`` does, nothing is allocated)."""
    model = ResNet50(classes)
    images = torch.randn(batch, 3, image_size, image_size)
    return model, (images,), loss_fn
