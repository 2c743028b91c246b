"""Real-image feature statistics, computed once and cached.

Statistics are keyed by (cache version, dataset fingerprint, split, image shape, extractor
identity incl. its weights hash, image count, kept features) and stored as ``.npz`` with the key
inside, written atomically (:func:`diffsweep.files.atomic_write_bytes`), with a sha256
``checksum`` of everything else it holds (mean, covariance, count, key, feature sample: each
array's name, dtype, shape and bytes; :func:`stats_checksum`). A cache file that cannot be read,
holds non-finite values, was computed under another key, has no checksum (written before
checksums were kept: untrusted) or whose contents no longer match its checksum (edited or
corrupted after it was written) is recomputed (with a warning naming the file and why), never
reused. The checksum detects a changed file, not a forger who recomputes it: whoever can write
the cache folder can also write a matching checksum (keep ``cache_dir`` writable by you only).

Besides mean and covariance, ``features > 0`` keeps a uniform random sample of that many real
feature vectors (reservoir sampling with a fixed seed, in the same pass over the images) for KID
and precision/recall, which need the vectors themselves.

With ``world_size > 1`` (``torch.distributed`` initialised) the ranks agree on whether every one
of them found a valid cache; if not, each extracts the features of its shard of the real images
(``datamodule.real_images(..., rank=, world_size=)``), the float64 sums are all-reduced, the
ranks' feature samples (each its share of ``features``) are gathered, and rank 0 writes the
cache. Every rank must then call :func:`load_or_compute_real_stats`.
"""
from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffsweep.files import atomic_write_bytes, bytes_sha256, stable_hash
from diffsweep.metrics.extractors.base import extract_features, image_chunks, module_device
from diffsweep.metrics.frechet import GaussianStats

log = logging.getLogger(__name__)

#: bump when the statistics or the file layout change
CACHE_VERSION = 1


#: seed of the reservoir sample of real features (rank r adds r)
FEATURES_SEED = 0


def real_stats_key(datamodule: Any, split: str, extractor: nn.Module,
                   max_count: int | None, features: int = 0) -> dict:
    """What the cached real statistics depend on (``features``: real feature vectors kept)."""
    key = {"version": CACHE_VERSION, "dataset": datamodule.fingerprint(split), "split": split,
           "image_shape": [int(s) for s in getattr(datamodule, "pixel_shape",
                                                   datamodule.image_shape)],
           "extractor": extractor.identity, "max_count": max_count}
    if features:
        key["features"] = int(features)
    return key


def key_json(key: dict) -> str:
    """The canonical JSON of a key, stored inside the cache file."""
    return json.dumps(key, sort_keys=True)


def real_stats_path(cache_dir: str | os.PathLike, key: dict) -> Path:
    """``<cache_dir>/real-<extractor kind>-<split>-<16 hex of the key's hash>.npz``."""
    kind = str(key["extractor"]).split(":")[0].split("-")[0]
    return Path(cache_dir).expanduser() / f"real-{kind}-{key['split']}-{stable_hash(key, 16)}.npz"


#: The name of the checksum array in a cache file (:func:`stats_checksum` of the other arrays).
CHECKSUM = "checksum"


def stats_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over ``arrays`` in name order: each name, dtype, shape and bytes. Any change of a
    value, a shape or a dtype changes it."""
    chunks = []
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        chunks += [name.encode(), f"|{array.dtype.str}|{array.shape}|".encode(), array.tobytes()]
    return bytes_sha256(*chunks)


def save_stats(path: str | os.PathLike, stats: GaussianStats) -> None:
    """Atomically write ``stats`` (and its key) as ``.npz`` with their :func:`stats_checksum`."""
    buffer = io.BytesIO()
    arrays = {"mean": stats.mean.cpu().numpy(), "cov": stats.cov.cpu().numpy(),
              "count": np.array(stats.count, dtype=np.int64), "key": np.array(stats.key)}
    if stats.features is not None:
        arrays["features"] = stats.features.float().cpu().numpy()
    np.savez(buffer, **arrays, **{CHECKSUM: np.array(stats_checksum(arrays))})
    atomic_write_bytes(path, buffer.getvalue())


def load_stats(path: str | os.PathLike, expected_key: str | None = None) -> GaussianStats:
    """Read and validate cached statistics.

    Raises:
        ValueError: (with the reason) when the file is unreadable, has no checksum (written
            before checksums were kept) or one its contents do not match (changed after it was
            written), is inconsistent, non-finite or was computed under another key than
            ``expected_key``.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: np.asarray(archive[name]) for name in archive.files}
    except Exception as error:  # noqa: BLE001 - truncated zip, missing arrays, garbage...
        raise ValueError(f"unreadable ({type(error).__name__}: {error})") from error
    if CHECKSUM not in arrays:
        raise ValueError("no checksum: written by an earlier diffsweep without one, so untrusted")
    recorded = str(arrays.pop(CHECKSUM))
    if stats_checksum(arrays) != recorded:
        raise ValueError("checksum mismatch: its contents changed after it was written (edited "
                         "or corrupted)")
    try:
        mean, cov = arrays["mean"], arrays["cov"]
        count, key = int(arrays["count"]), str(arrays["key"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"unreadable ({type(error).__name__}: {error})") from error
    features = arrays.get("features")
    if expected_key is not None and key != expected_key:
        raise ValueError(f"fingerprint mismatch: cached {key}, expected {expected_key}")
    d = mean.shape[0] if mean.ndim == 1 else -1
    if d < 1 or cov.shape != (d, d):
        raise ValueError(f"bad shapes mean {mean.shape}, cov {cov.shape}")
    if count < 2 or not (np.isfinite(mean).all() and np.isfinite(cov).all()):
        raise ValueError("non-finite values or count < 2")
    wanted = int(json.loads(key).get("features", 0)) if key.startswith("{") else 0
    if wanted and features is None:
        raise ValueError("the feature sample is missing")
    if features is not None:
        if features.ndim != 2 or features.shape[1] != d or not np.isfinite(features).all():
            raise ValueError(f"bad feature sample of shape {features.shape}")
        features = torch.from_numpy(features.astype(np.float32))
    return GaussianStats(torch.from_numpy(mean).double(), torch.from_numpy(cov).double(), count,
                         key, features)


class FeatureReservoir:
    """A uniform random sample of at most ``capacity`` rows of a stream of ``(B, D)`` feature
    batches (reservoir sampling, Algorithm R), reproducible from ``seed``; kept as float32 on the
    CPU."""

    def __init__(self, capacity: int, seed: int = FEATURES_SEED) -> None:
        if int(capacity) < 0:
            raise ValueError(f"FeatureReservoir capacity must be >= 0, got {capacity}.")
        self.capacity = int(capacity)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.seen = 0
        self._rows: Tensor | None = None

    def add(self, features: Tensor) -> None:
        """Offer the rows of ``features`` ``(B, D)`` in order."""
        batch = features.detach().float().cpu()
        if self.capacity == 0 or batch.shape[0] == 0:
            self.seen += batch.shape[0]
            return
        if self._rows is None:
            self._rows = torch.empty(0, batch.shape[1])
        fill = min(self.capacity - self._rows.shape[0], batch.shape[0])
        if fill > 0:
            self._rows = torch.cat([self._rows, batch[:fill]])
        rest = batch[fill:]
        if rest.shape[0]:
            positions = torch.arange(self.seen + fill, self.seen + batch.shape[0],
                                     dtype=torch.float64)
            draws = torch.rand(rest.shape[0], generator=self.generator, dtype=torch.float64)
            slots = torch.floor(draws * (positions + 1)).long()
            for index in torch.nonzero(slots < self.capacity).flatten().tolist():
                self._rows[slots[index]] = rest[index]  # in order: a later row wins a slot
        self.seen += batch.shape[0]

    def result(self) -> Tensor:
        """The sample ``(min(capacity, seen), D)``."""
        if self._rows is None:
            return torch.empty(0, 0)
        return self._rows.clone()


def _gather_rows(local: Tensor, device: torch.device) -> Tensor:
    """All ranks' ``(n_r, D)`` rows concatenated in rank order (rows may differ in number)."""
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(count) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(counts, count)
    width = torch.tensor([local.shape[1] if local.numel() else 0], device=device)
    torch.distributed.all_reduce(width, op=torch.distributed.ReduceOp.MAX)
    longest = int(max(int(c) for c in counts))
    padded = torch.zeros(longest, int(width), device=device)
    if local.numel():
        padded[:local.shape[0]] = local.to(device)
    gathered = [torch.zeros_like(padded) for _ in counts]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([rows[:int(c)] for rows, c in zip(gathered, counts)]).cpu()


@torch.no_grad()
def feature_sums(extractor: nn.Module, batches: Iterable[Tensor], batch_size: int = 250,
                 device: torch.device | str | None = None,
                 reservoir: FeatureReservoir | None = None) -> tuple[Tensor, Tensor, int]:
    """``(sum f (D,), sum f f^T (D, D), n)`` in float64 on ``device`` over batches of ``[-1, 1]``
    images (zeros and 0 for no images); the features are also offered to ``reservoir``."""
    device = torch.device(device) if device is not None else module_device(extractor)
    d = int(extractor.num_features)
    total = torch.zeros(d, dtype=torch.float64, device=device)
    outer = torch.zeros(d, d, dtype=torch.float64, device=device)
    count = 0
    for chunk in image_chunks(batches, batch_size):
        features = extract_features(extractor, chunk, batch_size, device)
        total += features.sum(0)
        outer += features.T @ features
        count += features.shape[0]
        if reservoir is not None:
            reservoir.add(features)
    return total, outer, count


@torch.no_grad()
def compute_stats(extractor: nn.Module, batches: Iterable[Tensor], batch_size: int = 250,
                  device: torch.device | str | None = None, key: str = "") -> GaussianStats:
    """Statistics (on the CPU) of the features of batches of ``[-1, 1]`` images."""
    total, outer, count = feature_sums(extractor, batches, batch_size, device)
    if count == 0:
        raise ValueError("No real images to compute FID statistics from.")
    return GaussianStats.from_sums(total.cpu(), outer.cpu(), count, key)


def _distributed(world_size: int) -> bool:
    if world_size <= 1:
        return False
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"world_size={world_size} needs torch.distributed to be initialised "
                           "(every rank computes its shard of the real statistics).")
    return True


def _try_load(path: Path, expected_key: str) -> GaussianStats | None:
    if not path.exists():
        return None
    try:
        return load_stats(path, expected_key)
    except ValueError as error:
        log.warning("FID: cached real statistics %s are invalid (%s); recomputing.", path, error)
        return None


def load_or_compute_real_stats(datamodule: Any, extractor: nn.Module,
                               cache_dir: str | os.PathLike, split: str = "train",
                               max_count: int | None = None, batch_size: int = 250,
                               device: torch.device | str | None = None, rank: int = 0,
                               world_size: int = 1, features: int = 0) -> GaussianStats:
    """Real statistics (on the CPU) for (datamodule, split, extractor), from the cache when valid.

    ``datamodule`` needs ``fingerprint(split)``, ``image_shape`` and ``real_images(split,
    max_count, batch_size=, rank=, world_size=)``. ``max_count``: at most this many real images
    (None: all). ``features``: also keep a random sample of this many real feature vectors
    (``GaussianStats.features``). With ``world_size > 1`` every rank must call this (see the
    module docstring).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
    if int(features) < 0:
        raise ValueError(f"features must be >= 0, got {features}.")
    key = real_stats_key(datamodule, split, extractor, max_count, int(features))
    expected = key_json(key)
    path = real_stats_path(cache_dir, key)
    device = torch.device(device) if device is not None else module_device(extractor)
    distributed = _distributed(world_size)
    stats = _try_load(path, expected)
    if distributed:  # compute unless every rank has a valid cache (all ranks take the same path)
        loaded = torch.tensor(int(stats is not None), device=device)
        torch.distributed.all_reduce(loaded, op=torch.distributed.ReduceOp.MIN)
        if not int(loaded):
            stats = None
    if stats is not None:
        log.info("FID: real statistics loaded from %s (%d images, %s)", path, stats.count,
                 key["extractor"])
        return stats
    log.info("FID: computing real statistics for %s [%s] with %s (rank %d of %d)...",
             key["dataset"], split, key["extractor"], rank, world_size)
    batches = datamodule.real_images(split, max_count, batch_size=batch_size, rank=rank,
                                     world_size=world_size)
    share, remainder = divmod(int(features), world_size)  # this rank's part of the sample
    reservoir = (FeatureReservoir(share + (rank < remainder), FEATURES_SEED + rank)
                 if features else None)
    total, outer, count = feature_sums(extractor, batches, batch_size, device, reservoir)
    sample = reservoir.result() if reservoir is not None else None
    if distributed:
        counts = torch.tensor(count, dtype=torch.float64, device=device)
        for tensor in (total, outer, counts):
            torch.distributed.all_reduce(tensor)
        count = int(counts.item())
        if sample is not None:
            sample = _gather_rows(sample, device)
    if count == 0:
        raise ValueError(f"No real images in split {split!r} to compute FID statistics from.")
    stats = GaussianStats.from_sums(total.cpu(), outer.cpu(), count, expected)
    stats.features = sample
    if rank == 0:
        save_stats(path, stats)
        log.info("FID: real statistics (%d images) cached at %s", stats.count, path)
    return stats


__all__ = ["CACHE_VERSION", "CHECKSUM", "FEATURES_SEED", "FeatureReservoir", "compute_stats",
           "feature_sums", "key_json",
           "load_or_compute_real_stats", "load_stats", "real_stats_key", "real_stats_path",
           "save_stats", "stats_checksum"]
