"""Shared pieces of the image data layer: the source interface, an in-memory dataset, helpers.

An *image source* knows how to find/decode one kind of data (scikit-learn digits, a folder of
image files, MNIST idx files, CIFAR-10 batches, VAE latents of another source) and returns a
map-style ``torch.utils.data.Dataset`` per split whose items are ``(x, label)``: ``x`` float32
``(C, H, W)`` in model space (images in ``[-1, 1]``), ``label`` int64 scalar (``-1`` when the data
has no labels). The :class:`~diffsweep.data.datamodule.ImageDataModule` turns any source into
Lightning dataloaders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import default_collate

from diffsweep.files import stable_hash

SPLITS: tuple[str, ...] = ("train", "val")


def check_split(split: str) -> str:
    """Return ``split`` if it is a known split, else raise ``ValueError`` naming the choices."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return split


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    """Validate a string option against ``choices`` (``ValueError`` naming them otherwise)."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")
    return value


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train/val partition of ``range(n)``.

    A seeded permutation picks ``round(n * val_fraction)`` (at least 1 when ``val_fraction > 0``)
    validation indices; both index sets are returned sorted (int64). ``val_fraction == 0`` means
    "no held-out data": the validation split is then the whole training set.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    everything = torch.arange(n, dtype=torch.int64)
    if val_fraction == 0.0 or n < 2:
        return everything, everything
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val = perm[:n_val].sort().values
    train = perm[n_val:].sort().values
    return train, val


def fingerprint_of(**fields: Any) -> str:
    """sha256 hex digest of a JSON encoding (sorted keys) of ``fields`` (:func:`stable_hash`)."""
    return stable_hash(fields)


def uint8_to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[-1, 1]`` (exact for 0 and 255)."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


class ImageSource(ABC):
    """Where images come from. One subclass per kind of data.

    Contract:
      * ``name``, ``channels``, ``resolution`` are plain attributes available after construction
        (nothing is read from disk in ``__init__``).
      * ``prepare()`` does one-time work that must run on one process only (downloads).
      * ``load(split, augment)`` returns a Dataset of ``(x, label)``: x float32 ``(C, R, R)`` in
        model space, label int64 scalar (-1 = unlabeled). ``augment`` enables train-time random
        transforms (only sources that have any use it). Results may be cached by the source.
      * ``fingerprint(split)`` is a sha256 hex string over the source name, split, resolution,
        channels, item count, every option that changes what ``load`` serves, and a cheap content
        digest.
      * ``decode(x)`` maps model-space batches ``(B, C, R, R)`` to images in ``[-1, 1]`` of
        ``pixel_source``'s shape (a clamp for pixel sources).
      * ``pixel_source`` is the source whose images ``decode`` produces (``self`` for pixel
        sources); FID's real images and fingerprints come from it.
    """

    name: str = "source"
    channels: int
    resolution: int

    def prepare(self) -> None:  # noqa: B027 - an optional hook; the no-op default is the point
        """One-time, single-process preparation (e.g. download). Default: nothing."""

    @abstractmethod
    def load(self, split: str, augment: bool = False) -> Dataset:
        """Dataset of ``(x, label)`` for ``split`` (see the class contract)."""

    @abstractmethod
    def fingerprint(self, split: str) -> str:
        """Stable sha256 hex digest identifying what ``load(split)`` serves (see class contract)."""

    @property
    def pixel_source(self) -> ImageSource:
        """The source of the images that :meth:`decode` reproduces: this one, for pixel data."""
        return self

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> images in ``[-1, 1]``: for pixel data just a clamp."""
        return x.clamp(-1.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels}, resolution={self.resolution})"


class TensorImageDataset(Dataset):
    """In-memory images + labels, with batched indexing (no per-item Python work).

    Args:
        images: ``(N, C, H, W)``; uint8 in ``[0, 255]`` or float32 in ``[-1, 1]``.
        labels: int64 ``(N,)``.
        random_flip: flip each returned image horizontally with probability 1/2 (uses torch's
            global RNG, which DataLoader seeds per worker).

    ``ds[i]`` returns ``(x (C,H,W) float32, label int64 scalar)``. ``ds.__getitems__(indices)``
    (used by ``DataLoader``) returns one :class:`PreBatched` that :func:`collate` passes through,
    so a batch costs one fancy-index instead of ``batch_size`` item calls plus a stack.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, random_flip: bool = False):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"images must be uint8 or float32, got {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)
        self.random_flip = random_flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        return uint8_to_unit(x) if x.dtype == torch.uint8 else x.clone()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._convert(self.images[index])
        if self.random_flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> PreBatched:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self._convert(self.images[idx])
        if self.random_flip:
            flip = torch.rand(len(idx)) < 0.5
            x[flip] = x[flip].flip(-1)
        return PreBatched(x, self.labels[idx])


class PreBatched:
    """A batch already assembled by a dataset's ``__getitems__`` (see :func:`collate`)."""

    __slots__ = ("x", "labels")

    def __init__(self, x: torch.Tensor, labels: torch.Tensor):
        self.x = x
        self.labels = labels


def collate(data: Any) -> Any:
    """DataLoader ``collate_fn``: passes :class:`PreBatched` through as ``[x, labels]``, otherwise
    ``default_collate`` (which also yields ``[x, labels]`` for a list of ``(x, label)`` items)."""
    if isinstance(data, PreBatched):
        return [data.x, data.labels]
    return default_collate(data)
