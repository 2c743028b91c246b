"""Feature extractors for FID.

Every extractor is a frozen ``nn.Module`` in eval mode that takes images in ``[-1, 1]``
(float, ``(B, C, H, W)``, any resolution, ``C`` in {1, 3}) and returns ``(B, D)`` float features.
Each has:

- ``name``: short kind (``inception``, ``tiny``, ``classifier``), used in file and log names;
- ``identity``: a string that changes whenever the features would change (architecture, input
  handling, weights hash); cached real statistics are keyed by it;
- ``num_features``: ``D`` (torchmetrics reads this attribute too);
- ``comparable``: True only for Inception, whose FID is comparable to published numbers.

Kinds:

- ``inception``: torch-fidelity's Inception-v3 (2048-d pool3), exactly as torchmetrics'
  ``FrechetInceptionDistance(feature=2048, antialias=False)`` runs it: images quantised to uint8,
  torch-fidelity's TF1-compatible bilinear resize to 299, no antialias. Weights come from
  ``weights=``, else ``$DIFFSWEEP_INCEPTION_WEIGHTS``, else the torch hub cache, else a download
  with a short timeout; offline with none of these -> :class:`InceptionWeightsError` naming the file.
- ``tiny``: a fixed-seed random conv net (64-d). No download, fast, deterministic. For tests and
  smoke runs only; its numbers mean nothing outside this repo.
- ``classifier``: a small CNN trained once on the dataset's labels (digits, MNIST, Fashion-MNIST),
  cached on disk keyed by the dataset fingerprint; features = penultimate layer. NOT comparable to
  published FID (an "FID-like" score for quick sampler comparisons on small data sets).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

#: torch-fidelity's Inception-v3 weights (converted from the 2015-12-05 TensorFlow FID graph).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "DIFFSWEEP_INCEPTION_WEIGHTS"
INCEPTION_CONFIG_KEY = "metrics.fid.inception_weights"

EXTRACTORS = ("inception", "tiny", "classifier")


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights file is missing and could not be downloaded."""


def to_uint8(images: Tensor) -> Tensor:
    """``[-1, 1]`` float images -> uint8 ``[0, 255]`` (round to nearest, as when saving PNGs)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_rgb(images: Tensor) -> Tensor:
    """Grayscale ``(B, 1, H, W)`` -> ``(B, 3, H, W)``; RGB passes through; anything else is an error."""
    if images.dim() != 4:
        raise ValueError(f"Expected images of shape (B, C, H, W), got {tuple(images.shape)}.")
    c = images.shape[1]
    if c == 3:
        return images
    if c == 1:
        return images.expand(-1, 3, -1, -1)
    raise ValueError(f"Feature extractors take 1- or 3-channel images, got {c} channels "
                     "(latents must be decoded with datamodule.decode first).")


def _freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


class FeatureExtractor(nn.Module):
    """Base class: frozen, always in eval mode."""

    name: str = "base"
    comparable: bool = False
    num_features: int

    @property
    def identity(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Never leaves eval mode."""
        return super().train(False)


# --------------------------------------------------------------------------------------------
# tiny
# --------------------------------------------------------------------------------------------
class TinyFeatureExtractor(FeatureExtractor):
    """Fixed-seed random conv features: resize to 32x32 -> 2 random convs -> 2x2 pool -> random
    projection to ``dim``. Deterministic (weights drawn from a private generator), no download."""

    name = "tiny"
    VERSION = 1

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.dim = int(dim)
        self.seed = int(seed)
        self.num_features = self.dim
        g = torch.Generator().manual_seed(self.seed)

        def rand(*shape: int, fan_in: int) -> Tensor:
            return torch.randn(*shape, generator=g) * math.sqrt(2.0 / fan_in)

        self.register_buffer("w1", rand(16, 3, 3, 3, fan_in=27))
        self.register_buffer("w2", rand(32, 16, 3, 3, fan_in=144))
        self.register_buffer("proj", rand(128, self.dim, fan_in=128))
        _freeze(self)

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


# --------------------------------------------------------------------------------------------
# inception
# --------------------------------------------------------------------------------------------
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file (memoised on path, size and mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def inception_hub_path() -> Path:
    """Where torch hub (and torch-fidelity) keep the downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _download(url: str, dst: str, timeout: float) -> None:
    """Download with a socket timeout so that an offline machine fails fast instead of hanging."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        torch.hub.download_url_to_file(url, dst, progress=False)
    finally:
        socket.setdefaulttimeout(old)


def missing_weights_message(reason: str = "") -> str:
    hub = inception_hub_path()
    return (
        "Inception-v3 weights for FID are not available"
        + (f" ({reason})" if reason else "")
        + ".\nOn a machine with internet access download\n"
        f"    {INCEPTION_URL}\n"
        f"(file name {INCEPTION_FILENAME}) and then either\n"
        f"  - put it at {hub} (the torch hub cache, found automatically), or\n"
        f"  - set the config key {INCEPTION_CONFIG_KEY}=/path/to/{INCEPTION_FILENAME}, or\n"
        f"  - export {INCEPTION_ENV}=/path/to/{INCEPTION_FILENAME}.\n"
        "Without Inception, use metrics=fid_classifier or metrics=fid_tiny "
        "(not comparable to published FID)."
    )


def resolve_inception_weights(weights: str | os.PathLike | None = None, download: bool = True,
                              timeout: float = 10.0) -> Path:
    """Find the Inception weights file: ``weights`` > ``$DIFFSWEEP_INCEPTION_WEIGHTS`` > torch hub
    cache > download into the torch hub cache (``timeout`` seconds per socket operation).

    Raises:
        InceptionWeightsError: with instructions, when none of these works.
    """
    for source, value in (("argument/config key " + INCEPTION_CONFIG_KEY, weights),
                          ("environment variable " + INCEPTION_ENV, os.environ.get(INCEPTION_ENV))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise InceptionWeightsError(missing_weights_message(f"{source} points to {path}, "
                                                                    "which does not exist"))
            return path
    hub = inception_hub_path()
    if hub.is_file():
        return hub
    if not download:
        raise InceptionWeightsError(missing_weights_message(f"{hub} does not exist and downloads "
                                                            "are disabled"))
    hub.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading Inception-v3 FID weights from %s to %s", INCEPTION_URL, hub)
    t0 = time.monotonic()
    try:
        _download(INCEPTION_URL, str(hub), timeout)
    except Exception as e:  # noqa: BLE001 - any failure means "offline" here
        raise InceptionWeightsError(missing_weights_message(
            f"download failed after {time.monotonic() - t0:.1f}s: {type(e).__name__}: {e}")) from e
    return hub


@contextlib.contextmanager
def _random_inception_init():
    """Build torch-fidelity's Inception without loading weights (for timing only)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, *a, **k: None):
        yield


class InceptionFeatureExtractor(FeatureExtractor):
    """2048-d Inception-v3 pool features, as torchmetrics' FID computes them with
    ``antialias=False`` (== torch-fidelity / the reference TF implementation's resize).

    Args:
        weights: local weights file (else env var, hub cache, download; see
            :func:`resolve_inception_weights`).
        download: allow a download when no file is found.
        timeout: socket timeout (seconds) for the download.
        random_weights: skip loading weights (benchmarks of throughput only; never for FID).
    """

    name = "inception"
    comparable = True

    def __init__(self, weights: str | os.PathLike | None = None, download: bool = True,
                 timeout: float = 10.0, random_weights: bool = False) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.num_features = 2048
        if random_weights:
            self.weights_path = None
            self.weights_sha256 = "random"
            with _random_inception_init():
                net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                         antialias=False)
        else:
            path = resolve_inception_weights(weights, download=download, timeout=timeout)
            self.weights_path = str(path)
            self.weights_sha256 = file_sha256(path)
            try:
                net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                         feature_extractor_weights_path=str(path), antialias=False)
            except Exception as e:  # noqa: BLE001
                raise InceptionWeightsError(missing_weights_message(
                    f"{path} could not be loaded: {type(e).__name__}: {e}")) from e
            log.info("FID: Inception-v3 weights %s (sha256 %s)", path, self.weights_sha256[:16])
        self.net = _freeze(net)
        _freeze(self)

    @property
    def identity(self) -> str:
        return f"inception-v3-tf2015-pool2048-noaa:{self.weights_sha256[:16]}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net(to_uint8(to_rgb(images)))


# --------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------
class SmallClassifier(nn.Module):
    """A ~40k-parameter CNN on 16x16 inputs (anything else is resized); ``features`` is the
    128-d penultimate layer."""

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
        x = images.float()
        c = x.shape[1]
        if c != self.in_channels:
            if c == 1 and self.in_channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif c == 3 and self.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"Classifier takes {self.in_channels} channels, got {c}.")
        if x.shape[-2:] != (self.RES, self.RES):
            x = F.interpolate(x, size=(self.RES, self.RES), mode="bilinear", align_corners=False)
        return x

    def features(self, images: Tensor) -> Tensor:
        return self.body(self.prepare(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


class ClassifierFeatureExtractor(FeatureExtractor):
    """Penultimate-layer features of a :class:`SmallClassifier` trained on the data set's labels.

    NOT comparable to published FID: use it to rank samplers/schedules on small data sets.
    Build it with :func:`load_or_train_classifier`.
    """

    name = "classifier"
    comparable = False

    def __init__(self, classifier: SmallClassifier, weights_sha256: str, accuracy: float | None = None):
        super().__init__()
        self.net = _freeze(classifier)
        self.num_features = classifier.head.in_features
        self.weights_sha256 = weights_sha256
        self.accuracy = accuracy
        _freeze(self)

    @property
    def identity(self) -> str:
        return f"classifier-v2-d{self.num_features}:{self.weights_sha256[:16]}"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.net.features(images)


def state_dict_sha256(state_dict: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace``."""
    from .fid import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _collate(data: Any) -> Any:
    """Pass through batches a dataset assembled itself (``__getitems__`` returning an object with
    ``x`` and ``labels``, as diffsweep's TensorImageDataset does); else ``default_collate``."""
    from torch.utils.data import default_collate

    if hasattr(data, "x") and hasattr(data, "labels"):
        return [data.x, data.labels]
    return default_collate(data)


def train_classifier(dataset: Iterable, in_channels: int, num_classes: int = 10,
                     train_samples: int = 20000, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, width: int = 16) -> SmallClassifier:
    """Train :class:`SmallClassifier` on ``(x, label)`` items for ``train_samples`` examples seen
    (so MNIST and 8x8 digits cost about the same). Deterministic given ``seed`` (CPU)."""
    with _single_thread():  # tiny convs: 1 thread is 10x faster than 2 contended ones
        return _train_classifier(dataset, in_channels, num_classes, train_samples, batch_size,
                                 lr, seed, width)


@contextlib.contextmanager
def _single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train_classifier(dataset, in_channels, num_classes, train_samples, batch_size, lr, seed,
                      width) -> SmallClassifier:
    from torch.utils.data import DataLoader

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallClassifier(in_channels, num_classes, width=width)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=g, drop_last=True,
                        num_workers=0, collate_fn=_collate)
    if len(loader) == 0:
        raise ValueError(f"Data set too small to train the FID classifier (< {batch_size} items).")
    steps = max(1, math.ceil(train_samples / batch_size))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    step = 0
    while step < steps:
        for x, y in loader:
            y = torch.as_tensor(y).long()
            if (y < 0).any():
                raise ValueError("The classifier FID extractor needs a labelled data set (digits, "
                                 "mnist, fashion_mnist); this one has label -1. Use "
                                 "metrics=fid (Inception) or metrics=fid_tiny.")
            if (y >= num_classes).any():
                raise ValueError(f"Label {int(y.max())} >= num_classes={num_classes}; "
                                 "set extractor_options.num_classes.")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return _freeze(model)


@torch.no_grad()
def classifier_accuracy(model: SmallClassifier, dataset, max_items: int = 2000,
                        batch_size: int = 256) -> float:
    from torch.utils.data import DataLoader

    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                   collate_fn=_collate):
        y = torch.as_tensor(y).long()
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
        if total >= max_items:
            break
    return correct / max(total, 1)


def load_or_train_classifier(datamodule, cache_dir: str | os.PathLike, split: str = "train",
                             num_classes: int = 10, train_samples: int = 20000,
                             batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                             width: int = 16, eval_split: str | None = "val"
                             ) -> ClassifierFeatureExtractor:
    """The classifier extractor for ``datamodule``: loaded from ``cache_dir`` when a cache entry
    with the same key (dataset fingerprint + training settings) exists and loads cleanly, else
    trained (seconds on CPU) and written atomically."""
    channels = int(datamodule.image_shape[0])
    key = {"version": 2, "kind": "classifier", "dataset": datamodule.fingerprint(split),
           "split": split, "image_shape": [int(s) for s in datamodule.image_shape],
           "num_classes": num_classes, "train_samples": train_samples, "batch_size": batch_size,
           "lr": lr, "seed": seed, "width": width}
    key_json = json.dumps(key, sort_keys=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / f"classifier-{digest}.pt"
    model = SmallClassifier(channels, num_classes, width=width)
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("key") != key_json:
                raise ValueError("cache key mismatch")
            model.load_state_dict(blob["state_dict"])
            sha = state_dict_sha256(model.state_dict())
            if sha != blob.get("sha256"):
                raise ValueError("weights hash mismatch")
            log.info("FID classifier (NOT comparable to published FID) loaded from %s "
                     "(held-out accuracy %s)", path, blob.get("accuracy"))
            return ClassifierFeatureExtractor(model, sha, blob.get("accuracy"))
        except Exception as e:  # noqa: BLE001
            log.warning("FID classifier cache %s is unusable (%s: %s); retraining.",
                        path, type(e).__name__, e)
    log.info("Training the FID classifier on %s (%d examples seen)...", key["dataset"], train_samples)
    t0 = time.monotonic()
    model = train_classifier(datamodule.dataset(split), channels, num_classes, train_samples,
                             batch_size, lr, seed, width)
    accuracy = None
    if eval_split:
        try:
            accuracy = classifier_accuracy(model, datamodule.dataset(eval_split))
        except Exception as e:  # noqa: BLE001 - no such split: report without it
            log.info("FID classifier: no held-out accuracy (%s: %s)", type(e).__name__, e)
    sha = state_dict_sha256(model.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"key": key_json, "state_dict": model.state_dict(), "sha256": sha,
                       "accuracy": accuracy}, path)
    log.info("FID classifier trained in %.1fs (held-out accuracy %s), cached at %s. "
             "Classifier-FID is NOT comparable to published FID.",
             time.monotonic() - t0, None if accuracy is None else f"{accuracy:.3f}", path)
    return ClassifierFeatureExtractor(model, sha, accuracy)


# --------------------------------------------------------------------------------------------
def build_feature_extractor(kind: str = "inception", *, datamodule=None,
                            cache_dir: str | os.PathLike | None = None,
                            inception_weights: str | os.PathLike | None = None,
                            download: bool = True, download_timeout: float = 10.0,
                            **options: Any) -> FeatureExtractor:
    """Build an extractor by name. ``options`` go to the extractor (tiny: ``dim``, ``seed``;
    classifier: ``num_classes``, ``train_samples``, ``batch_size``, ``lr``, ``seed``, ``width``,
    ``split``, ``eval_split``; inception: ``random_weights``)."""
    if kind == "inception":
        return InceptionFeatureExtractor(inception_weights, download=download,
                                         timeout=download_timeout, **options)
    if kind == "tiny":
        return TinyFeatureExtractor(**options)
    if kind == "classifier":
        if datamodule is None:
            raise ValueError("The classifier feature extractor needs the datamodule (its labels).")
        if cache_dir is None:
            raise ValueError("The classifier feature extractor needs a cache_dir.")
        return load_or_train_classifier(datamodule, cache_dir, **options)
    raise ValueError(f"Unknown feature extractor {kind!r}; choose one of {', '.join(EXTRACTORS)}.")
