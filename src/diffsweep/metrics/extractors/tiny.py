"""``TinyFeatureExtractor``: fixed-seed random conv features for tests and smoke runs.

No download, fast, deterministic; its numbers mean nothing outside this repo (NOT comparable to
published FID).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from diffsweep.metrics.extractors.base import FeatureExtractor, freeze, to_rgb


class TinyFeatureExtractor(FeatureExtractor):
    """Resize to 32x32 -> 2 random convs -> 2x2 pool -> random projection to ``dim`` -> tanh.

    Args:
        dim: feature dimension ``D``.
        seed: seed of the weights (drawn from a private generator; part of :attr:`identity`).
    """

    name = "tiny"
    VERSION = 1

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"tiny extractor dim must be >= 1, got {dim}.")
        self.dim = int(dim)
        self.seed = int(seed)
        self.num_features = self.dim
        generator = torch.Generator().manual_seed(self.seed)

        def draw(*shape: int, fan_in: int) -> Tensor:
            return torch.randn(*shape, generator=generator) * math.sqrt(2.0 / fan_in)

        self.register_buffer("w1", draw(16, 3, 3, 3, fan_in=27))
        self.register_buffer("w2", draw(32, 16, 3, 3, fan_in=144))
        self.register_buffer("proj", draw(128, self.dim, fan_in=128))
        freeze(self)

    @property
    def identity(self) -> str:
        return f"tiny-v{self.VERSION}-d{self.dim}-seed{self.seed}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = to_rgb(images.float())
        if x.shape[-2:] != (32, 32):
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        x = F.relu(F.conv2d(x, self.w1, padding=1))
        x = F.relu(F.conv2d(x, self.w2, stride=2, padding=1))
        x = F.adaptive_avg_pool2d(x, 2).flatten(1)  # (B, 128)
        return torch.tanh(x @ self.proj)


__all__ = ["TinyFeatureExtractor"]
