"""scikit-learn's 8x8 handwritten digits (1797 images, shipped inside the package: no download)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffsweep.data.base import (
    ImageSource,
    TensorImageDataset,
    check_choice,
    check_split,
    fingerprint_of,
    split_indices,
)
from diffsweep.files import bytes_sha256

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


class DigitsSource(ImageSource):
    """``sklearn.datasets.load_digits``: 1797 grayscale 8x8 digits, pixel values 0..16.

    Images are scaled to ``[-1, 1]`` (``v / 8 - 1``) and resized from 8x8 to
    ``resolution`` x ``resolution`` with ``torch.nn.functional.interpolate``
    (``align_corners=False``, antialiased when shrinking; bicubic output is clamped to ``[-1, 1]``).
    Labels are the digit classes 0..9. The train/val split is a seeded permutation
    (``split_indices``), identical on every machine and run.

    Args:
        resolution: output side length in pixels (default 16; 8 keeps the originals).
        val_fraction: share of images held out as the ``val`` split (default 0.1 -> 180 images);
            0 makes ``val`` the whole training set.
        split_seed: seed of the train/val permutation.
        interpolation: ``bilinear`` (default), ``bicubic`` or ``nearest``.
    """

    name = "digits"
    channels = 1

    def __init__(
        self,
        resolution: int = 16,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        interpolation: str = "bilinear",
    ):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution = int(resolution)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.interpolation = check_choice("interpolation", interpolation, INTERPOLATIONS)
        split_indices(2, self.val_fraction, 0)  # validate val_fraction now, not at first use
        self._raw: tuple[np.ndarray, np.ndarray] | None = None
        self._cache: dict[str, TensorImageDataset] = {}

    def _raw_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 (1797, 8, 8) in 0..16, labels int64 (1797,))."""
        if self._raw is None:
            from sklearn.datasets import load_digits

            digits = load_digits()
            self._raw = (digits.images.astype(np.uint8), digits.target.astype(np.int64))
        return self._raw

    def _indices(self, split: str) -> torch.Tensor:
        n = self._raw_arrays()[0].shape[0]
        train, val = split_indices(n, self.val_fraction, self.split_seed)
        return train if check_split(split) == "train" else val

    def load(self, split: str, augment: bool = False) -> TensorImageDataset:
        """Dataset of ``(x (1, R, R) float32 in [-1, 1], label int64)``; ``augment`` is unused
        (flipping digits would change their meaning)."""
        check_split(split)
        if split not in self._cache:
            images, labels = self._raw_arrays()
            idx = self._indices(split).numpy()
            x = torch.from_numpy(images[idx]).to(torch.float32).unsqueeze(1) / 8.0 - 1.0
            if self.resolution != x.shape[-1]:
                mode = self.interpolation
                kwargs = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
                x = F.interpolate(x, size=(self.resolution, self.resolution), mode=mode, **kwargs)
                x = x.clamp_(-1.0, 1.0)
            self._cache[split] = TensorImageDataset(x.contiguous(), torch.from_numpy(labels[idx]))
        return self._cache[split]

    def fingerprint(self, split: str) -> str:
        """sha256 over name, split, resolution, interpolation, split parameters, count and the
        raw (pre-resize) bytes of the split's images."""
        images, _ = self._raw_arrays()
        idx = self._indices(split).numpy()
        content = bytes_sha256(np.ascontiguousarray(images[idx]).tobytes())
        return fingerprint_of(
            source=self.name,
            split=split,
            resolution=self.resolution,
            channels=self.channels,
            interpolation=self.interpolation,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            count=int(len(idx)),
            content=content,
        )
