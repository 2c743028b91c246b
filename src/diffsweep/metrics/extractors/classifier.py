"""``ClassifierFeatureExtractor``: penultimate-layer features of a small CNN trained once on the
data set's labels (digits, MNIST, Fashion-MNIST).

Classifier-FID is NOT comparable to published FID: it ranks samplers and schedules on small
labelled data sets, on a CPU. The trained weights are cached in ``cache_dir`` under a key of the
dataset fingerprint and every training setting; a cache entry that does not load cleanly is
retrained and rewritten atomically.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffsweep.files import atomic_torch_save, stable_hash, tensors_sha256
from diffsweep.metrics.extractors.base import FeatureExtractor, freeze

log = logging.getLogger(__name__)

#: bump when the architecture, the training loop or the cache layout changes
CACHE_VERSION = 2


class SmallClassifier(nn.Module):
    """A ~40k-parameter CNN on 16x16 inputs (anything else is resized); :meth:`features` is the
    ``feature_dim``-d penultimate layer."""

    RES = 16

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 feature_dim: int = 128) -> None:
        super().__init__()
        w = width
        self.in_channels = in_channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),      # 8x8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),            # 4x4
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(16 * w, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def prepare(self, images: Tensor) -> Tensor:
        """Images -> ``(B, in_channels, 16, 16)`` (gray <-> RGB by expand/mean, bilinear resize)."""
        x = images.float()
        channels = x.shape[1]
        if channels != self.in_channels:
            if channels == 1 and self.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif channels == 3 and self.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"Classifier takes {self.in_channels} channels, got {channels}.")
        if x.shape[-2:] != (self.RES, self.RES):
            x = F.interpolate(x, size=(self.RES, self.RES), mode="bilinear", align_corners=False)
        return x

    def features(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Tiny convs: 1 thread is ~10x faster than 2 contended ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _loader(dataset: Iterable, batch_size: int, **kwargs: Any):
    from torch.utils.data import DataLoader

    from diffsweep.data.base import collate  # imported here: diffsweep.data imports Lightning

    return DataLoader(dataset, batch_size=batch_size, num_workers=0, collate_fn=collate, **kwargs)


def train_classifier(dataset: Iterable, in_channels: int, num_classes: int = 10,
                     train_samples: int = 20000, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, width: int = 16) -> SmallClassifier:
    """Train :class:`SmallClassifier` on ``(x, label)`` items for ``train_samples`` examples seen
    (so MNIST and 8x8 digits cost about the same), Adam + one-cycle LR. Deterministic given
    ``seed`` on a CPU. Raises ValueError for unlabelled data (label -1) or a label >=
    ``num_classes``."""
    with _single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(in_channels, num_classes, width=width)
        loader = _loader(dataset, batch_size, shuffle=True, drop_last=True,
                         generator=torch.Generator().manual_seed(seed))
        if len(loader) == 0:
            raise ValueError(f"Data set too small to train the FID classifier (< {batch_size} "
                             "items).")
        steps = max(1, math.ceil(train_samples / batch_size))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
        model.train()
        step = 0
        while step < steps:
            for x, y in loader:
                y = torch.as_tensor(y).long()
                if (y < 0).any():
                    raise ValueError("The classifier FID extractor needs a labelled data set "
                                     "(digits, mnist, fashion_mnist); this one has label -1. Use "
                                     "metrics=fid (Inception) or metrics=fid_tiny.")
                if (y >= num_classes).any():
                    raise ValueError(f"Label {int(y.max())} >= num_classes={num_classes}; set "
                                     "metrics.fid.evaluator.extractor.num_classes.")
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if step >= steps:
                    break
    return freeze(model)


@torch.no_grad()
def classifier_accuracy(model: SmallClassifier, dataset: Iterable, max_items: int = 2000,
                        batch_size: int = 256) -> float:
    """Top-1 accuracy on the first ``max_items`` items of ``dataset`` (at batch granularity)."""
    correct = total = 0
    for x, y in _loader(dataset, batch_size, shuffle=False):
        y = torch.as_tensor(y).long()
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
        if total >= max_items:
            break
    return correct / max(total, 1)


class ClassifierFeatureExtractor(FeatureExtractor):
    """Penultimate-layer features of a trained :class:`SmallClassifier`.

    NOT comparable to published FID. Build it with :meth:`build` (loads or trains, cached).

    Args:
        classifier: the trained net.
        weights_sha256: :func:`diffsweep.files.tensors_sha256` of its state dict (the identity).
        accuracy: held-out accuracy, when known.
    """

    name = "classifier"
    comparable = False

    def __init__(self, classifier: SmallClassifier, weights_sha256: str,
                 accuracy: float | None = None) -> None:
        super().__init__()
        self.net = freeze(classifier)
        self.num_features = classifier.head.in_features
        self.weights_sha256 = weights_sha256
        self.accuracy = accuracy
        freeze(self)

    @property
    def identity(self) -> str:
        return f"classifier-v2-d{self.num_features}:{self.weights_sha256[:16]}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images)

    @classmethod
    def build(cls, *, datamodule: Any = None, cache_dir: str | os.PathLike | None = None,
              split: str = "train", eval_split: str | None = "val", num_classes: int = 10,
              train_samples: int = 20000, batch_size: int = 128, lr: float = 2e-3,
              seed: int = 0, width: int = 16) -> ClassifierFeatureExtractor:
        """The factory: :func:`load_or_train_classifier` (needs ``datamodule`` and
        ``cache_dir``)."""
        if datamodule is None:
            raise ValueError("The classifier feature extractor needs the datamodule (it trains "
                             "on its labels).")
        if cache_dir is None:
            raise ValueError("The classifier feature extractor needs a cache_dir.")
        return load_or_train_classifier(datamodule, cache_dir, split=split, eval_split=eval_split,
                                        num_classes=num_classes, train_samples=train_samples,
                                        batch_size=batch_size, lr=lr, seed=seed, width=width)


def classifier_cache_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """``<cache_dir>/classifier-<16 hex of the key's stable hash>.pt``."""
    return Path(cache_dir).expanduser() / f"classifier-{stable_hash(key, 16)}.pt"


def _load_cached(path: Path, key_json: str, model: SmallClassifier) -> ClassifierFeatureExtractor:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("key") != key_json:
        raise ValueError("cache key mismatch")
    model.load_state_dict(blob["state_dict"])
    sha = tensors_sha256(model.state_dict())
    if sha != blob.get("sha256"):
        raise ValueError("weights hash mismatch")
    log.info("FID classifier (NOT comparable to published FID) loaded from %s (held-out "
             "accuracy %s)", path, blob.get("accuracy"))
    return ClassifierFeatureExtractor(model, sha, blob.get("accuracy"))


def _pixel_dataset(datamodule: Any, split: str) -> Any:
    """The split's images in pixel space (latent data: the images before encoding)."""
    pixel_dataset = getattr(datamodule, "pixel_dataset", None)
    return pixel_dataset(split) if callable(pixel_dataset) else datamodule.dataset(split)


def load_or_train_classifier(datamodule: Any, cache_dir: str | os.PathLike, split: str = "train",
                             num_classes: int = 10, train_samples: int = 20000,
                             batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                             width: int = 16, eval_split: str | None = "val"
                             ) -> ClassifierFeatureExtractor:
    """The classifier extractor for ``datamodule`` (``image_shape``, ``fingerprint(split)``,
    ``dataset(split)``): loaded from ``cache_dir`` when an entry with the same key (dataset
    fingerprint + training settings) loads cleanly and its weights hash matches, else trained
    (seconds on a CPU) on ``split``, scored on ``eval_split`` (skipped when absent) and written
    atomically."""
    pixel_shape = [int(size) for size in getattr(datamodule, "pixel_shape", datamodule.image_shape)]
    channels = pixel_shape[0]
    key = {"version": CACHE_VERSION, "kind": "classifier", "dataset": datamodule.fingerprint(split),
           "split": split, "image_shape": pixel_shape,
           "num_classes": num_classes, "train_samples": train_samples, "batch_size": batch_size,
           "lr": lr, "seed": seed, "width": width}
    key_json = json.dumps(key, sort_keys=True)
    path = classifier_cache_path(cache_dir, key)
    if path.exists():
        try:
            return _load_cached(path, key_json, SmallClassifier(channels, num_classes, width=width))
        except Exception as error:  # noqa: BLE001 - any unreadable entry is retrained
            log.warning("FID classifier cache %s is unusable (%s: %s); retraining.",
                        path, type(error).__name__, error)
    log.info("Training the FID classifier on %s (%d examples seen)...", key["dataset"],
             train_samples)
    started = time.monotonic()
    model = train_classifier(_pixel_dataset(datamodule, split), channels, num_classes,
                             train_samples, batch_size, lr, seed, width)
    accuracy = None
    if eval_split:
        try:
            accuracy = classifier_accuracy(model, _pixel_dataset(datamodule, eval_split))
        except Exception as error:  # noqa: BLE001 - no such split: report without it
            log.info("FID classifier: no held-out accuracy (%s: %s)", type(error).__name__, error)
    sha = tensors_sha256(model.state_dict())
    atomic_torch_save({"key": key_json, "state_dict": model.state_dict(), "sha256": sha,
                       "accuracy": accuracy}, path)
    log.info("FID classifier trained in %.1fs (held-out accuracy %s), cached at %s. "
             "Classifier-FID is NOT comparable to published FID.", time.monotonic() - started,
             None if accuracy is None else f"{accuracy:.3f}", path)
    return ClassifierFeatureExtractor(model, sha, accuracy)


__all__ = ["ClassifierFeatureExtractor", "SmallClassifier", "classifier_accuracy",
           "classifier_cache_path", "load_or_train_classifier", "train_classifier"]
