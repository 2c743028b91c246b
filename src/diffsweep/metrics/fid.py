"""FID with cached real statistics.

- :func:`frechet_distance`: the Fréchet distance between two Gaussians in float64
  (eigen-decomposition, symmetric form: ``tr sqrt(C1 C2) = tr sqrt(C1^1/2 C2 C1^1/2)``).
- :class:`GaussianStats`: mean, covariance, count (+ the cache key they were computed under).
- :class:`FrechetDistance`: a torchmetrics ``Metric`` holding the generated side as sums
  (``sum f``, ``sum f f^T``, ``n``; ``dist_reduce_fx="sum"``, so it syncs across DDP ranks;
  every rank must call ``compute()``) and the real side as fixed buffers from the cache.
  It takes *features*: the extractor lives outside (on the FID callback), never on the
  LightningModule, so that EMA weight averaging never copies it.
- :func:`load_or_compute_real_stats`: real statistics computed once per (dataset fingerprint,
  split, image shape, extractor identity incl. weights hash, image count), cached as ``.npz``
  with the key stored inside; a mismatched or unreadable cache is recomputed with a warning;
  writes are atomic (temp file + ``os.replace``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

log = logging.getLogger(__name__)

CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------
def _sqrtm_psd(mat: Tensor) -> Tensor:
    w, v = torch.linalg.eigh((mat + mat.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """``||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^1/2)`` in float64 (returns a 0-d float64 tensor).

    Uses ``tr (C1 C2)^1/2 = tr (C1^1/2 C2 C1^1/2)^1/2`` with symmetric eigendecompositions, which
    is exact for PSD matrices and better conditioned than ``eigvals(C1 @ C2)`` or ``sqrtm``.
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, cov1, cov2))
    cov2 = cov2.to(cov1.device)
    s1 = _sqrtm_psd(cov1)
    m = s1 @ cov2 @ s1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2.to(mu1.device)
    return diff.dot(diff) + cov1.trace() + cov2.trace() - 2 * tr_covmean


@dataclass
class GaussianStats:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64, unbiased) of ``count`` feature vectors."""

    mean: Tensor
    cov: Tensor
    count: int
    key: str = ""

    @classmethod
    def from_sums(cls, total: Tensor, outer: Tensor, count: int, key: str = "") -> "GaussianStats":
        n = int(count)
        if n < 2:
            raise ValueError(f"Need at least 2 feature vectors for a covariance, got {n}.")
        total, outer = total.double(), outer.double()
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        return cls(mean, (cov + cov.T) / 2, n, key)

    @classmethod
    def from_features(cls, features: Tensor, key: str = "") -> "GaussianStats":
        f = features.double()
        return cls.from_sums(f.sum(0), f.T @ f, f.shape[0], key)

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    def frechet_distance(self, other: "GaussianStats") -> float:
        return float(frechet_distance(self.mean, self.cov, other.mean, other.cov))


# --------------------------------------------------------------------------------------------
# metric
# --------------------------------------------------------------------------------------------
class FrechetDistance(Metric):
    """FID between accumulated generated features and fixed real statistics.

    ``update(features)`` with ``(B, D)`` features; ``compute()`` -> 0-d float64 tensor.
    States are sums with ``dist_reduce_fx="sum"``: under DDP each rank updates with its share of
    samples and every rank calls ``compute()``, which all-reduces them first.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, num_features: int, real: GaussianStats | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        d = int(num_features)
        self.num_features = d
        self.add_state("fake_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fake_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fake_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.register_buffer("real_mean", torch.zeros(d, dtype=torch.float64), persistent=False)
        self.register_buffer("real_cov", torch.zeros(d, d, dtype=torch.float64), persistent=False)
        self.real_count = 0
        if real is not None:
            self.set_real(real)

    def set_real(self, real: GaussianStats) -> None:
        if real.num_features != self.num_features:
            raise ValueError(f"Real statistics have {real.num_features} features, the metric "
                             f"{self.num_features}.")
        self.real_mean = real.mean.to(self.real_mean.device, torch.float64)
        self.real_cov = real.cov.to(self.real_cov.device, torch.float64)
        self.real_count = int(real.count)

    def update(self, features: Tensor) -> None:
        f = features.detach().to(self.fake_sum.device, torch.float64)
        if f.dim() != 2 or f.shape[1] != self.num_features:
            raise ValueError(f"Expected features of shape (B, {self.num_features}), "
                             f"got {tuple(f.shape)}.")
        self.fake_sum += f.sum(0)
        self.fake_outer += f.T @ f
        self.fake_count += f.shape[0]

    def fake_stats(self) -> GaussianStats:
        return GaussianStats.from_sums(self.fake_sum, self.fake_outer, int(self.fake_count))

    def compute(self) -> Tensor:
        if self.real_count < 2:
            raise RuntimeError("FrechetDistance has no real statistics: call set_real() first.")
        if int(self.fake_count) < 2:
            raise RuntimeError(f"FrechetDistance needs >= 2 generated samples, has "
                               f"{int(self.fake_count)}.")
        fake = self.fake_stats()
        return frechet_distance(fake.mean, fake.cov, self.real_mean, self.real_cov)


# --------------------------------------------------------------------------------------------
# feature extraction
# --------------------------------------------------------------------------------------------
def _chunks(batches: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        for i in range(0, batch.shape[0], batch_size):
            yield batch[i:i + batch_size]


@torch.no_grad()
def extract_features(extractor: torch.nn.Module, images: Tensor | Iterable[Tensor],
                     batch_size: int = 250, device: torch.device | str | None = None) -> Tensor:
    """Features ``(N, D)`` (float64, on CPU) of images in ``[-1, 1]`` (a tensor or batches)."""
    if isinstance(images, Tensor):
        images = [images]
    device = torch.device(device) if device is not None else next(
        iter(list(extractor.parameters()) + list(extractor.buffers())), torch.empty(0)).device
    out = [extractor(x.to(device)).double().cpu() for x in _chunks(images, batch_size)]
    if not out:
        raise ValueError("No images to extract features from.")
    return torch.cat(out)


@torch.no_grad()
def compute_stats(extractor: torch.nn.Module, batches: Iterable[Tensor], batch_size: int = 250,
                  device: torch.device | str | None = None, key: str = "") -> GaussianStats:
    """Stream batches of ``[-1, 1]`` images through ``extractor``; float64 sums -> stats."""
    total = outer = None
    n = 0
    for x in _chunks(batches, batch_size):
        f = extract_features(extractor, x, batch_size, device)
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
        n += f.shape[0]
    if total is None:
        raise ValueError("No real images to compute FID statistics from.")
    return GaussianStats.from_sums(total, outer, n, key)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path`` and ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches are shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def real_stats_key(datamodule, split: str, extractor, max_count: int | None) -> dict:
    """What the cached real statistics depend on."""
    return {"version": CACHE_VERSION, "dataset": datamodule.fingerprint(split), "split": split,
            "image_shape": [int(s) for s in datamodule.image_shape],
            "extractor": extractor.identity, "max_count": max_count}


def key_json(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def real_stats_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    digest = hashlib.sha256(key_json(key).encode()).hexdigest()[:16]
    kind = str(key["extractor"]).split(":")[0].split("-")[0]
    return Path(cache_dir).expanduser() / f"real-{kind}-{key['split']}-{digest}.npz"


def save_stats(path: str | os.PathLike, stats: GaussianStats) -> None:
    """Atomically write ``stats`` (and its key) as ``.npz``."""
    buf = io.BytesIO()
    np.savez(buf, mean=stats.mean.cpu().numpy(), cov=stats.cov.cpu().numpy(),
             count=np.array(stats.count, dtype=np.int64), key=np.array(stats.key))
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: str | os.PathLike, expected_key: str | None = None) -> GaussianStats:
    """Read and validate cached stats. Raises ValueError (with the reason) when the file is
    corrupt, inconsistent, or was computed under another key."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mean, cov = np.asarray(z["mean"]), np.asarray(z["cov"])
            count, key = int(z["count"]), str(z["key"])
    except Exception as e:  # noqa: BLE001 - truncated zip, missing arrays, garbage...
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from e
    if expected_key is not None and key != expected_key:
        raise ValueError(f"fingerprint mismatch: cached {key}, expected {expected_key}")
    d = mean.shape[0] if mean.ndim == 1 else -1
    if d < 1 or cov.shape != (d, d):
        raise ValueError(f"bad shapes mean {mean.shape}, cov {cov.shape}")
    if count < 2 or not (np.isfinite(mean).all() and np.isfinite(cov).all()):
        raise ValueError("non-finite values or count < 2")
    return GaussianStats(torch.from_numpy(mean).double(), torch.from_numpy(cov).double(), count, key)


def load_or_compute_real_stats(datamodule, extractor, cache_dir: str | os.PathLike,
                               split: str = "train", max_count: int | None = None,
                               batch_size: int = 250, device: torch.device | str | None = None
                               ) -> GaussianStats:
    """Real statistics for (datamodule, split, extractor), from cache when valid.

    A cache file whose stored key differs, or which cannot be read, is recomputed (and a warning
    logged), never reused. ``max_count``: use at most this many real images (None: all).
    """
    key = real_stats_key(datamodule, split, extractor, max_count)
    kj = key_json(key)
    path = real_stats_path(cache_dir, key)
    if path.exists():
        try:
            stats = load_stats(path, kj)
            log.info("FID: real statistics loaded from %s (%d images, %s)", path, stats.count,
                     key["extractor"])
            return stats
        except ValueError as e:
            log.warning("FID: cached real statistics %s are invalid (%s); recomputing.", path, e)
    log.info("FID: computing real statistics for %s [%s] with %s...", key["dataset"], split,
             key["extractor"])
    stats = compute_stats(extractor, datamodule.real_images(split, max_count), batch_size, device,
                          key=kj)
    save_stats(path, stats)
    log.info("FID: real statistics (%d images) cached at %s", stats.count, path)
    return stats
