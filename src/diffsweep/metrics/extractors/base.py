"""The feature-extractor contract and the helpers every extractor uses.

An extractor is a frozen ``nn.Module``, always in eval mode, that maps images in ``[-1, 1]``
(float ``(B, C, H, W)``, any resolution, ``C`` in {1, 3}) to ``(B, D)`` float features. It has:

- ``name``: short kind (``inception``, ``tiny``, ``classifier``), used in file and log names;
- ``identity``: a string that changes whenever the features would change (architecture, input
  handling, weights hash); cached real statistics are keyed by it;
- ``num_features``: ``D``;
- ``comparable``: True only for Inception, whose FID is comparable to published numbers.

Factory protocol: an extractor is built by ``factory(datamodule=..., cache_dir=...)``, where the
factory is ``SomeExtractor.build`` with its options bound (a Hydra config with ``_partial_:
true``). ``build`` of a data-independent extractor ignores both; the classifier trains on the
datamodule's labels and caches itself under ``cache_dir``. :class:`~diffsweep.metrics.evaluator.
FIDEvaluator` calls the factory once, in ``prepare``, so building a config is always cheap.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

#: ``factory(datamodule=..., cache_dir=...) -> FeatureExtractor``
ExtractorFactory = Callable[..., "FeatureExtractor"]


def to_uint8(images: Tensor) -> Tensor:
    """``[-1, 1]`` float images -> uint8 ``[0, 255]`` (round to nearest, as when saving PNGs)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_rgb(images: Tensor) -> Tensor:
    """Grayscale ``(B, 1, H, W)`` -> ``(B, 3, H, W)``; RGB passes through; anything else is an
    error."""
    if images.dim() != 4:
        raise ValueError(f"Expected images of shape (B, C, H, W), got {tuple(images.shape)}.")
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"Feature extractors take 1- or 3-channel images, got {channels} channels "
                     "(latents must be decoded with datamodule.decode first).")


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode; returns ``module``."""
    module.requires_grad_(False)
    module.eval()
    return module


class FeatureExtractor(nn.Module):
    """Base class: frozen, always in eval mode (see the module docstring for the contract)."""

    name: str = "base"
    comparable: bool = False
    num_features: int

    @classmethod
    def build(cls, *, datamodule: Any = None, cache_dir: str | os.PathLike | None = None,
              **options: Any) -> FeatureExtractor:
        """The factory: ``cls(**options)``; data-independent extractors ignore ``datamodule``
        and ``cache_dir`` (subclasses that need them override this)."""
        return cls(**options)

    @property
    def identity(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Never leaves eval mode."""
        return super().train(False)


def module_device(module: nn.Module) -> torch.device:
    """Device of the first parameter or buffer (CPU for a module without tensors)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def image_chunks(batches: Iterable[Tensor | tuple | list], batch_size: int) -> Iterator[Tensor]:
    """Re-chunk batches (tensors, or ``(x, label)`` pairs) into ``(<= batch_size, C, H, W)``."""
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        for start in range(0, batch.shape[0], batch_size):
            yield batch[start:start + batch_size]


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor | Iterable[Tensor],
                     batch_size: int = 250, device: torch.device | str | None = None) -> Tensor:
    """Features ``(N, D)`` in float64 on ``device`` (default: the extractor's) of images in
    ``[-1, 1]`` (one tensor or an iterable of batches), ``batch_size`` images per forward."""
    if isinstance(images, Tensor):
        images = [images]
    device = torch.device(device) if device is not None else module_device(extractor)
    features = [extractor(x.to(device)).double() for x in image_chunks(images, batch_size)]
    if not features:
        raise ValueError("No images to extract features from.")
    return torch.cat(features)


__all__ = ["ExtractorFactory", "FeatureExtractor", "extract_features", "freeze", "image_chunks",
           "module_device", "to_rgb", "to_uint8"]
