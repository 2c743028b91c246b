"""Latent diffusion data: a source that encodes another source once with a frozen VAE.

Pieces
------
- :class:`LatentSource` is an :class:`~diffsweep.data.base.ImageSource` over an inner (pixel)
  source and a :class:`~diffsweep.data.vae.LatentVAE`. Served by the one
  :class:`~diffsweep.data.datamodule.ImageDataModule`, it yields model-space latents
  ``(z - shift) * scale`` of shape (latent_channels, R/f, R/f); ``decode`` runs the VAE decoder,
  and FID's real images and fingerprints come from the inner source (``pixel_source``).
- :class:`LatentCache`: one split of one source encoded by one VAE, on disk::

      <cache_dir>/<split>-<key>/
          manifest.json   commit marker, written last (atomically)
          mean.npy        (N, C, h, w) posterior mean, raw (unscaled) VAE latents, float16|float32
          std.npy         (N, C, h, w) posterior std, raw
          labels.npy      (N,) int64
      <cache_dir>/<split>-<key>.lock   (held while encoding/validating)

  ``key`` hashes the *identity*: format version, VAE (pretrained id/path, subfolder, revision,
  hash of the encode-relevant config, hash of the weights, compute dtype), the inner source's
  ``fingerprint(split)``, image shape, latent shape and storage dtype. A different identity gets
  a different directory, so a changed VAE/dataset/resolution re-encodes without touching an old
  valid cache. ``scaling_factor``/``shift_factor`` are *not* part of the key: the cache holds raw
  latents and the factors are applied when latents are served; the manifest records the VAE's
  values and the latents' statistics (``stats.suggested_scaling_factor`` = 1/std, the LDM recipe
  for a custom VAE).
- Encoding writes ``*.npy.partial`` memmaps and a ``progress.json`` (committed every
  ``checkpoint_every`` batches: memmaps flushed + fsynced, then progress replaced atomically). An
  interrupted encode resumes from the last committed chunk; the finished files are renamed into
  place and ``manifest.json`` is written last, so a directory without a valid manifest is never
  used. A manifest that does not match its files (bad JSON, truncated/missing npy, wrong
  size/shape/dtype) raises :class:`CorruptLatentCacheError` naming the file
  (``on_corrupt="error"``) or is rebuilt with a warning (``on_corrupt="rebuild"``).
- Checksums: the manifest records the sha256 of each finished ``.npy`` file (latents, std and
  labels, header included) and a ``checksum`` of its own contents (identity, files, statistics,
  VAE factors: :func:`manifest_checksum`); ``progress.json`` records the sha256 of each committed
  chunk of the partial arrays. Every use checks them: a file changed after it was written, even
  into finite values of the right shape, is a :class:`CorruptLatentCacheError` (``on_corrupt``
  decides: refused in one line or re-encoded with a warning naming the file), a resumed encode
  whose committed rows changed starts over, and a cache written before checksums were kept
  (:class:`UntrustedLatentCacheError`) is re-encoded with a warning whatever ``on_corrupt`` says.
  Hashing reads every byte once per process and split (one sha256 pass, ~0.6 s per GB on a core
  with SHA extensions: 0.5 s for 50k 4x32x32 float16 latents and their std, 0.82 GB), outside the
  cache's lock so that the ranks of a node hash in parallel. A checksum detects changed files,
  not a forger who recomputes it: keep ``cache_dir`` writable by you only.
- :class:`LatentDataset` serves whole batches through ``__getitems__``. With posterior sampling
  item ``i`` of epoch ``e`` is ``mean_i + std_i * eps`` with ``eps`` = :func:`posterior_noise`
  of (seed, e, i) alone, so it does not depend on batch layout, process count or workers. The
  dataset is ``epoch_indexed``: the DataModule's sampler hands it ``(epoch, index)`` pairs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from diffsweep.data.base import ImageSource, PreBatched, check_choice, check_split, collate
from diffsweep.data.vae import LatentVAE
from diffsweep.files import (
    atomic_write_json,
    bytes_sha256,
    file_lock,
    fsync_directory,
    fsync_file,
    read_file_sha256,
    replace_atomically,
    stable_hash,
)
from diffsweep.hydra_utils import register_resolvers

register_resolvers()  # configs/data/latents.yaml uses ${diffsweep.div:...}

__all__ = [
    "FORMAT_VERSION",
    "CorruptLatentCacheError",
    "LatentCache",
    "LatentDataset",
    "LatentSource",
    "UntrustedLatentCacheError",
    "item_seeds",
    "manifest_checksum",
    "posterior_noise",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ARRAYS = ("mean", "std", "labels")
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
ON_CORRUPT = ("error", "rebuild")
_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller elementwise ops run on one thread


class CorruptLatentCacheError(RuntimeError):
    """A latent cache directory has a manifest but its contents do not match it."""


class UntrustedLatentCacheError(CorruptLatentCacheError):
    """A latent cache written before checksums were kept: nothing proves its files are what was
    encoded, so it is re-encoded."""


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of a manifest's contents as JSON stores them (sorted keys; without its
    ``checksum`` and the ``directory`` a reader adds)."""
    stored = json.loads(json.dumps({key: value for key, value in manifest.items()
                                    if key not in ("checksum", "directory")}, default=str))
    return stable_hash(stored)


def _rows_sha256(array: np.ndarray, start: int, stop: int) -> str:
    """sha256 of rows ``start:stop`` of an array (its raw bytes)."""
    return bytes_sha256(np.ascontiguousarray(array[start:stop]).tobytes())


class NonFiniteLatentsError(ValueError):
    """The VAE encoded NaN/inf latents (or ones the storage dtype cannot hold); nothing of that
    batch was written to the cache."""


# ---------------------------------------------------------------------------------------------
# posterior noise: a function of (seed, epoch, index) alone
# ---------------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 (Steele et al. 2014) of uint64 values: a bijective, well-mixed hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def item_seeds(seed: int, epochs: Any, indices: Any) -> list[int]:
    """Generator seeds of the items ``indices`` drawn in ``epochs`` (scalars or arrays that
    broadcast; flattened): the top 32 bits of
    ``splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ index)``.

    32 bits because torch's CPU generator (mt19937) keeps only the low 32 bits of a seed; two
    (epoch, index) pairs share their noise with probability 2**-32.
    """
    with np.errstate(over="ignore"):
        state = _splitmix64(np.asarray(seed, dtype=np.int64).astype(np.uint64))
        state = _splitmix64(state ^ np.asarray(epochs, dtype=np.int64).astype(np.uint64))
        state = _splitmix64(state ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
    return (state >> np.uint64(32)).reshape(-1).tolist()


def posterior_noise(seed: int, epochs: Any, indices: Any, shape: Sequence[int],
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal noise float32 ``(B, *shape)``: row ``j`` is ``torch.randn(shape)`` from a
    CPU generator seeded with :func:`item_seeds` of ``(seed, epochs[j], indices[j])``.

    Each row depends on its own (seed, epoch, index) only: not on the other items of the batch,
    their order, the number of processes or of loader workers. One small generator call per item
    (about 4k values for a 4x32x32 latent) costs a few microseconds, comparable to one batched
    ``randn``; ``out`` (contiguous, float32) is filled in place when given.
    """
    seeds = item_seeds(seed, epochs, indices)
    shape = tuple(int(s) for s in shape)
    if out is None:
        out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    if tuple(out.shape) != (len(seeds), *shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(len(seeds), *shape)}")
    generator = torch.Generator()
    for row, item_seed in zip(out, seeds):
        generator.manual_seed(item_seed)
        row.normal_(generator=generator)
    return out


# ---------------------------------------------------------------------------------------------
# the on-disk cache
# ---------------------------------------------------------------------------------------------
class LatentCache:
    """One encoded split. ``identity`` (a JSON-able dict) determines ``key`` and the directory.

    Args:
        root: the cache root (``cache_dir``).
        split: split name (part of the directory name, for humans).
        identity: everything that determines the cached values (see module doc).
        count, latent_shape, storage_dtype: expected array sizes: mean/std are
            (count, *latent_shape) of ``storage_dtype``, labels (count,) int64.
    """

    def __init__(self, root: str | os.PathLike[str], split: str, identity: Mapping[str, Any],
                 count: int, latent_shape: Sequence[int], storage_dtype: str) -> None:
        check_choice("storage_dtype", storage_dtype, tuple(STORAGE_DTYPES))
        self.root = Path(root)
        self.split = split
        self.identity = {"format_version": FORMAT_VERSION, **dict(identity)}
        self.key = stable_hash(self.identity, 16)
        self.dir = self.root / f"{split}-{self.key}"
        self.count = int(count)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.storage_dtype = storage_dtype

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.npy"

    def partial(self, name: str) -> Path:
        return self.dir / f"{name}.npy.partial"

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    @property
    def lock_path(self) -> Path:
        return self.root / f"{self.split}-{self.key}.lock"

    def _expected(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        if name == "labels":
            return (self.count,), np.dtype(np.int64)
        return (self.count, *self.latent_shape), np.dtype(STORAGE_DTYPES[self.storage_dtype])

    # -- validation
    def read_manifest(self, hash_files: bool = True) -> dict[str, Any] | None:
        """The manifest if this cache is complete and consistent, ``None`` if there is none.

        ``hash_files=False`` leaves out the one check that reads every byte (the files' sha256:
        :meth:`files_problem`), for a caller that runs it outside the cache's lock.

        Raises:
            CorruptLatentCacheError: naming the offending file, when a manifest exists but it or
                the arrays are broken (bad JSON, wrong identity, missing/truncated/mis-sized npy)
                or changed since they were written (a checksum does not match).
            UntrustedLatentCacheError: when the manifest holds no checksums (written before
                they were kept).
        """
        path = self.manifest_path
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptLatentCacheError(f"{path}: manifest is not valid JSON ({err})") from err
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise CorruptLatentCacheError(f"{path}: format_version {version!r} != {FORMAT_VERSION}")
        if "checksum" not in manifest:
            raise UntrustedLatentCacheError(f"{path}: written without checksums (by an earlier "
                                            f"diffsweep), so its latents are untrusted")
        if manifest["checksum"] != manifest_checksum(manifest):
            raise CorruptLatentCacheError(f"{path}: manifest checksum mismatch (its contents "
                                          f"changed after it was written)")
        if manifest.get("key") != self.key or manifest.get("identity") != json.loads(
                json.dumps(self.identity, default=str)):
            raise CorruptLatentCacheError(f"{path}: manifest identity does not match directory "
                                          f"key {self.key}")
        if manifest.get("count") != self.count:
            raise CorruptLatentCacheError(f"{path}: count {manifest.get('count')} != dataset "
                                          f"size {self.count}")
        for name in ARRAYS:
            array_path = self.path(name)
            shape, dtype = self._expected(name)
            if not array_path.exists():
                raise CorruptLatentCacheError(f"{array_path}: missing (listed in {path})")
            size = array_path.stat().st_size
            want = manifest.get("files", {}).get(name, {}).get("bytes")
            if size != want:
                raise CorruptLatentCacheError(f"{array_path}: {size} bytes, manifest says {want} "
                                              "(truncated or replaced?)")
            try:
                array = np.load(array_path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as err:
                raise CorruptLatentCacheError(f"{array_path}: unreadable npy ({err})") from err
            if array.shape != shape or array.dtype != dtype:
                raise CorruptLatentCacheError(f"{array_path}: shape {array.shape} dtype "
                                              f"{array.dtype}, expected {shape} {dtype}")
            del array
        problem = self.files_problem(manifest) if hash_files else None
        if problem is not None:
            raise CorruptLatentCacheError(problem)
        return manifest

    def files_problem(self, manifest: Mapping[str, Any]) -> str | None:
        """Which array file no longer has the sha256 ``manifest`` recorded for it (a line naming
        it), or None when all do. Reads every byte (~0.6 s per GB)."""
        for name in ARRAYS:
            array_path = self.path(name)
            try:
                digest = read_file_sha256(array_path)
            except OSError as err:
                return f"{array_path}: unreadable ({err})"
            if digest != manifest["files"][name].get("sha256"):
                return (f"{array_path}: sha256 differs from the one {self.manifest_path} recorded "
                        f"(changed after it was written)")
        return None

    def invalidate(self) -> None:
        """Remove the commit marker first, then everything else in the directory."""
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path.unlink()
            fsync_directory(self.dir)
        if self.dir.exists():
            shutil.rmtree(self.dir)

    # -- building
    def build(self, dataset: Dataset, vae: LatentVAE, *, batch_size: int, device: torch.device,
              checkpoint_every: int, progress: bool,
              manifest_extra: Mapping[str, Any]) -> dict[str, Any]:
        """Encode ``dataset`` (items ``(image (C,H,W) in [-1,1], label)``) into this cache.

        Resumes from ``progress.json`` when it matches; returns the committed manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        start, sums, chunks = self._resume_point()
        if start == 0:
            for name in ARRAYS:  # stale final files of an uncommitted build
                self.path(name).unlink(missing_ok=True)
        arrays = {}
        for name in ARRAYS:
            shape, dtype = self._expected(name)
            arrays[name] = np.lib.format.open_memmap(self.partial(name),
                                                     mode="r+" if start else "w+",
                                                     dtype=dtype, shape=shape)
        if start:
            log.info("latent cache %s: resuming encode at %d/%d", self.dir, start, self.count)
        else:
            log.info("latent cache %s: encoding %d images with %s", self.dir, self.count, vae.name)
        channels = self.latent_shape[0]
        sums = sums or {"n": 0, "sum": [0.0] * channels, "sumsq": [0.0] * channels,
                        "var_sum": [0.0] * channels}
        acc = {k: np.asarray(v, dtype=np.float64) for k, v in sums.items() if k != "n"}
        n_stat = int(sums["n"])
        loader = DataLoader(Subset(dataset, range(start, self.count)) if start else dataset,
                            batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)
        vae.to(device)
        done, since_commit, started = start, 0, time.perf_counter()
        with _progress_bar(progress, f"encode {self.split}", self.count, start) as advance:
            for images, labels in loader:
                size = images.shape[0]
                if done + size > self.count:
                    raise ValueError(f"dataset yielded more than its len() = {self.count} items")
                mean, std = vae.encode(images)
                if tuple(mean.shape[1:]) != self.latent_shape:
                    raise ValueError(f"VAE produced latents of shape {tuple(mean.shape[1:])}, "
                                     f"expected {self.latent_shape}")
                mean_np, std_np = mean.cpu().numpy(), std.cpu().numpy()
                self._check_finite(mean_np, std_np, vae, images, done)
                arrays["mean"][done:done + size] = mean_np
                arrays["std"][done:done + size] = std_np
                arrays["labels"][done:done + size] = torch.as_tensor(labels).reshape(-1).numpy()
                acc["sum"] += mean_np.sum(axis=(0, 2, 3), dtype=np.float64)
                acc["sumsq"] += np.square(mean_np, dtype=np.float64).sum(axis=(0, 2, 3))
                acc["var_sum"] += np.square(std_np, dtype=np.float64).sum(axis=(0, 2, 3))
                n_stat += size * int(np.prod(self.latent_shape[1:]))
                done += size
                since_commit += 1
                advance(size)
                if since_commit >= checkpoint_every and done < self.count:
                    self._commit_progress(arrays, done, n_stat, acc, chunks)
                    since_commit = 0
        if done != self.count:
            raise ValueError(f"dataset yielded {done} items, expected len() = {self.count}")
        vae.to("cpu")

        # finalize: data durable -> renamed into place -> manifest (commit marker) -> no progress
        for array in arrays.values():
            array.flush()
        del arrays
        for name in ARRAYS:
            replace_atomically(self.partial(name), self.path(name))
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "identity": self.identity,
            "split": self.split,
            "count": self.count,
            "shape": [self.count, *self.latent_shape],
            "dtype": self.storage_dtype,
            "files": {name: {"file": self.path(name).name, "bytes": self.path(name).stat().st_size,
                             "sha256": read_file_sha256(self.path(name))}
                      for name in ARRAYS},
            "stats": _latent_stats(acc, n_stat),
            "encode_seconds": round(time.perf_counter() - started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **dict(manifest_extra),
        }
        manifest["checksum"] = manifest_checksum(manifest)
        atomic_write_json(self.manifest_path, manifest)
        (self.dir / PROGRESS).unlink(missing_ok=True)
        log.info("latent cache %s: committed %d latents", self.dir, self.count)
        return manifest

    def _check_finite(self, mean: np.ndarray, std: np.ndarray, vae: LatentVAE,
                      images: torch.Tensor, start: int) -> None:
        """Refuse a batch (items ``start..``) whose posterior mean/std is NaN/inf or beyond what
        ``storage_dtype`` holds: a cache of such latents makes every training loss NaN."""
        items = f"items {start}..{start + mean.shape[0] - 1} of the {self.split} split"
        for name, values in (("mean", mean), ("std", std)):
            if not np.isfinite(values).all():
                source = ("the images themselves hold NaN/inf: check the image data "
                          "(data.source.images)" if not torch.isfinite(images).all() else
                          f"the images are finite: check the VAE's weights and compute dtype "
                          f"(data.source.vae.dtype={vae.dtype_name}; float32 avoids float16 "
                          f"overflow)")
                raise NonFiniteLatentsError(
                    f"VAE {vae.name} encoded a non-finite posterior {name} (NaN/inf) for {items}; "
                    f"refusing to write them to the latent cache {self.dir}: {source}.")
        limit = float(np.finfo(STORAGE_DTYPES[self.storage_dtype]).max)
        largest = max(float(np.abs(mean).max(initial=0.0)), float(np.abs(std).max(initial=0.0)))
        if largest > limit:
            raise NonFiniteLatentsError(
                f"VAE {vae.name} encoded latents up to |{largest:.4g}| for {items}, beyond "
                f"data.source.storage_dtype={self.storage_dtype} (max {limit:.4g}): they would be "
                f"stored as inf in {self.dir}; set data.source.storage_dtype=float32.")

    def _commit_progress(self, arrays: dict[str, np.memmap], done: int, n_stat: int,
                         acc: dict[str, np.ndarray], chunks: list[dict[str, Any]]) -> None:
        """Make rows ``..done`` durable and record them in ``progress.json``, with the sha256 of
        each array's rows since the previous commit appended to ``chunks``."""
        start = chunks[-1]["end"] if chunks else 0
        for name in ARRAYS:
            arrays[name].flush()
            fsync_file(self.partial(name))
        chunks.append({"end": done, "sha256": {name: _rows_sha256(arrays[name], start, done)
                                               for name in ARRAYS}})
        atomic_write_json(self.dir / PROGRESS, {
            "key": self.key, "count": self.count, "shape": [self.count, *self.latent_shape],
            "dtype": self.storage_dtype, "done": done,
            "sums": {"n": n_stat, **{k: v.tolist() for k, v in acc.items()}},
            "chunks": chunks,
        })

    def _resume_point(self) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
        """(items already encoded, running stats, committed chunks) from a matching
        ``progress.json`` whose chunks' checksums the partial arrays still match, else
        (0, None, []) after deleting any leftovers."""
        progress_path = self.dir / PROGRESS
        try:
            progress = json.loads(progress_path.read_text())
            usable = (progress["key"] == self.key and progress["count"] == self.count
                      and progress["shape"] == [self.count, *self.latent_shape]
                      and progress["dtype"] == self.storage_dtype
                      and 0 < int(progress["done"]) < self.count)
            for name in ARRAYS:
                shape, dtype = self._expected(name)
                array = np.load(self.partial(name), mmap_mode="r")
                usable = usable and array.shape == shape and array.dtype == dtype
                del array
            if usable:
                chunks = progress.get("chunks")
                problem = self._chunks_problem(chunks, int(progress["done"]))
                if problem is None:
                    return int(progress["done"]), progress["sums"], chunks
                log.warning("latent cache %s: %s; restarting encode", self.dir, problem)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
            log.warning("latent cache %s: ignoring unusable progress (%s); restarting encode",
                        self.dir, err)
        progress_path.unlink(missing_ok=True)
        for name in ARRAYS:
            self.partial(name).unlink(missing_ok=True)
        return 0, None, []

    def _chunks_problem(self, chunks: Any, done: int) -> str | None:
        """Why the partial arrays' committed rows cannot be trusted (None: each chunk recorded
        in ``progress.json`` still has its sha256, and the chunks cover rows ``0..done``)."""
        if not isinstance(chunks, list) or not chunks:
            return (f"{self.dir / PROGRESS} records no chunk checksums (an encode by an earlier "
                    f"diffsweep): its encoded rows are untrusted")
        start = 0
        arrays = {name: np.load(self.partial(name), mmap_mode="r") for name in ARRAYS}
        try:
            for chunk in chunks:
                end = int(chunk["end"])
                if not start < end <= done:
                    return (f"{self.dir / PROGRESS}: a chunk ends at {end}, outside "
                            f"{start + 1}..{done}")
                for name in ARRAYS:
                    if _rows_sha256(arrays[name], start, end) != chunk["sha256"][name]:
                        return (f"{self.partial(name)}: rows {start}..{end - 1} differ from "
                                f"their checksum in {self.dir / PROGRESS} (changed after they "
                                f"were committed)")
                start = end
        finally:
            del arrays
        if start != done:
            return f"{self.dir / PROGRESS}: its chunks cover {start} rows, not done={done}"
        return None


def _latent_stats(acc: dict[str, np.ndarray], n_stat: int) -> dict[str, Any]:
    """Per-channel statistics of the raw latents and the LDM scaling factor 1/std."""
    mean_c = acc["sum"] / n_stat
    var_c = acc["sumsq"] / n_stat - mean_c ** 2
    posterior_var = acc["var_sum"] / n_stat
    total_std = float(np.sqrt(np.mean(var_c + posterior_var + mean_c ** 2 - np.mean(mean_c) ** 2)))
    return {
        "channel_mean": mean_c.tolist(),
        "channel_std_of_mean": np.sqrt(np.maximum(var_c, 0)).tolist(),
        "channel_posterior_std_rms": np.sqrt(posterior_var).tolist(),
        "suggested_scaling_factor": 1.0 / total_std if total_std > 0 else 1.0,
    }


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int, completed: int) -> Iterator[Any]:
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn()) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------------------------
class LatentDataset(Dataset):
    """Cached latents of one split as a Dataset of model-space ``(x, label)``.

    ``x = (z - shift) * scale`` with ``z`` the posterior mean, or with ``sample_posterior``
    ``z = mean + std * eps``, ``eps`` = :func:`posterior_noise` of (seed, epoch, index).

    Indices are plain ints (epoch = the ``epoch`` attribute, default 0) or ``(epoch, index)``
    pairs (:class:`~diffsweep.data.sampling.EpochIndex`, what ``GlobalBatchSampler`` yields for an
    ``epoch_indexed`` dataset). ``ds[i]`` -> ``(x (C,h,w) float32, label int64 scalar)``;
    ``ds.__getitems__(indices)`` (the DataLoader's batched fetch) -> one
    :class:`~diffsweep.data.base.PreBatched` ``(x (B,C,h,w), labels (B,))`` in the given order.
    Memmaps are opened lazily and dropped on pickling, so each loader worker opens its own.
    """

    epoch_indexed = True

    def __init__(self, directory: str | os.PathLike[str], scaling_factor: float,
                 shift_factor: float = 0.0, sample_posterior: bool = False, seed: int = 0) -> None:
        self.directory = Path(directory)
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.sample_posterior = bool(sample_posterior)
        self.seed = int(seed)
        self.epoch = 0
        self._arrays: dict[str, np.ndarray] | None = None
        self._len = int(np.load(self.directory / "labels.npy", mmap_mode="r").shape[0])

    def _open(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: np.load(self.directory / f"{name}.npy", mmap_mode="r")
                            for name in ARRAYS}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return self._len

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self._open()["mean"].shape[1:])

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, item = index if isinstance(index, tuple) else (self.epoch, index)
        item = int(item) + self._len if int(item) < 0 else int(item)
        x, labels = self.batch([item], [epoch])
        return x[0], labels[0]

    def __getitems__(self, indices: Sequence[int | tuple[int, int]]) -> PreBatched:
        pairs = np.asarray(indices, dtype=np.int64)
        if pairs.ndim == 2:
            return PreBatched(*self.batch(pairs[:, 1], pairs[:, 0]))
        return PreBatched(*self.batch(pairs))

    def batch(self, indices: Any, epochs: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x float32 (B,C,h,w), labels int64 (B,))`` of ``indices`` (int64 (B,)) drawn in
        ``epochs`` (scalar or (B,); default: the ``epoch`` attribute), in the given order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        count = indices.shape[0]
        if count and (indices.min() < 0 or indices.max() >= self._len):
            raise IndexError(f"latent indices must be in [0, {self._len}), got "
                             f"{indices.min()}..{indices.max()}")
        arrays = self._open()
        selection: Any = indices
        if count and indices[-1] - indices[0] == count - 1 and np.all(np.diff(indices) == 1):
            selection = slice(int(indices[0]), int(indices[0]) + count)  # contiguous: one read
        mean = _read(arrays["mean"], selection)  # stored dtype
        out = torch.empty(mean.shape, dtype=torch.float32)
        std = None
        if self.sample_posterior:
            std = _read(arrays["std"], selection)
            posterior_noise(self.seed, self.epoch if epochs is None else epochs, indices,
                            mean.shape[1:], out=out)
        # Elementwise work in chunks below torch's parallel grain size: one thread, so it neither
        # competes with the training step's threads nor suffers OpenMP oversubscription.
        step = max(1, _GRAIN // max(1, out[0].numel())) if count else 1
        for start in range(0, count, step):
            chunk = out[start:start + step]
            if std is None:
                chunk.copy_(mean[start:start + step])
            else:
                chunk.mul_(std[start:start + step]).add_(mean[start:start + step])
            if self.shift_factor:
                chunk.sub_(self.shift_factor)
            chunk.mul_(self.scaling_factor)
        return out, _read(arrays["labels"], selection).to(torch.int64)


def _read(array: np.ndarray, selection: slice | np.ndarray) -> torch.Tensor:
    """Rows of a read-only memmap as a tensor of its own (a slice is a view of the file: copy it;
    fancy indexing already returns a copy)."""
    rows = array[selection]
    return torch.from_numpy(np.array(rows) if isinstance(selection, slice) else np.asarray(rows))


# ---------------------------------------------------------------------------------------------
# the source
# ---------------------------------------------------------------------------------------------
class LatentSource(ImageSource):
    """Latents of an image source, encoded once per split by a frozen VAE and cached on disk.

    Args:
        images: the inner pixel source (an :class:`ImageSource`, or an ``ImageDataModule`` whose
            ``source`` is used: that is what ``configs/data/latents.yaml`` nests).
        vae: the frozen VAE (lives here, outside the LightningModule: EMA never copies it).
        cache_dir: cache root; each (split, identity) gets its own subdirectory.
        sample_posterior: training (``augment``) items are ``mean + std * eps``, a fresh ``eps``
            each epoch from (seed, epoch, index) (EDM2); else the mean. Validation serves the mean.
        seed: posterior-noise seed.
        storage_dtype: ``float16`` (half the disk/page cache) or ``float32``.
        encode_batch_size, encode_device: encoding pass (device ``None``: cuda if available).
        decode_batch_size: latents per VAE decode call in :meth:`decode`.
        checkpoint_every: commit encode progress every this many batches (resume granularity).
        on_corrupt: ``error`` (raise :class:`CorruptLatentCacheError` naming the file) or
            ``rebuild`` (log a warning, delete and re-encode).
        progress: show a rich progress bar while encoding.

    ``channels`` (latent channels) and ``resolution`` (image resolution / VAE downsampling) are
    model space; ``pixel_shape`` is the inner images' shape. Only the VAE's config is read in
    ``__init__``; datasets are encoded on first use (``prepare`` encodes both splits).
    """

    name = "latents"

    def __init__(self, images: Any, vae: LatentVAE,
                 cache_dir: str | os.PathLike[str] = ".cache/latents",
                 sample_posterior: bool = True, seed: int = 0, storage_dtype: str = "float16",
                 encode_batch_size: int = 64, encode_device: str | None = None,
                 decode_batch_size: int = 32, checkpoint_every: int = 20,
                 on_corrupt: str = "error", progress: bool = True) -> None:
        if not isinstance(images, ImageSource):
            images = getattr(images, "source", images)
        if not isinstance(images, ImageSource):
            raise TypeError(f"LatentSource images must be an ImageSource (or an ImageDataModule), "
                            f"got {type(images).__name__}")
        if not isinstance(vae, LatentVAE):
            raise TypeError(f"LatentSource vae must be a LatentVAE, got {type(vae).__name__}")
        self.on_corrupt = check_choice("on_corrupt", on_corrupt, ON_CORRUPT)
        self.storage_dtype = check_choice("storage_dtype", storage_dtype, tuple(STORAGE_DTYPES))
        for key, value in (("encode_batch_size", encode_batch_size),
                           ("decode_batch_size", decode_batch_size),
                           ("checkpoint_every", checkpoint_every)):
            if int(value) < 1:
                raise ValueError(f"{key}={value} must be >= 1")
        self.images = images
        self.vae = vae
        self.pixel_shape = (int(images.channels), int(images.resolution), int(images.resolution))
        self.vae.bind_image_channels(self.pixel_shape[0])
        factor = self.vae.downsample_factor
        if images.resolution % factor:
            raise ValueError(f"image resolution {images.resolution} is not divisible by the VAE's "
                             f"downsampling factor {factor} ({self.vae.name})")
        self.channels = self.vae.latent_channels
        self.resolution = int(images.resolution) // factor
        self.latent_shape = (self.channels, self.resolution, self.resolution)
        self.cache_dir = Path(cache_dir)
        self.sample_posterior = bool(sample_posterior)
        self.seed = int(seed)
        self.encode_batch_size = int(encode_batch_size)
        self.encode_device = encode_device
        self.decode_batch_size = int(decode_batch_size)
        self.checkpoint_every = int(checkpoint_every)
        self.progress = bool(progress)
        self._manifests: dict[str, dict[str, Any]] = {}
        self._datasets: dict[tuple[str, bool], LatentDataset] = {}
        self._prepared_images = False

    @property
    def pixel_source(self) -> ImageSource:
        """The inner image source: FID's real images and fingerprints come from it."""
        return self.images

    # -- cache management
    def _image_dataset(self, split: str) -> Dataset:
        """The inner split *without* train-time augmentation (encoding must be deterministic)."""
        if not self._prepared_images:
            self.images.prepare()
            self._prepared_images = True
        return self.images.load(split, augment=False)

    def cache(self, split: str) -> LatentCache:
        """The :class:`LatentCache` of ``split`` (computes the identity: hashes the VAE weights)."""
        dataset = self._image_dataset(check_split(split))
        identity = {
            "vae": self.vae.identity(),
            "dataset_fingerprint": self.images.fingerprint(split),
            "image_shape": list(self.pixel_shape),
            "latent_shape": list(self.latent_shape),
            "storage_dtype": self.storage_dtype,
        }
        return LatentCache(self.cache_dir, split, identity, len(dataset), self.latent_shape,
                           self.storage_dtype)

    def ensure_cache(self, split: str) -> dict[str, Any]:
        """The manifest of a valid cache of ``split``, encoding (or resuming) first if needed."""
        if split in self._manifests:
            return self._manifests[split]
        cache = self.cache(split)
        with file_lock(cache.lock_path):
            manifest, built = self._valid_or_built(cache, split, hash_files=False)
        # The files' checksums are read without the lock, so that the ranks of a node check a
        # large cache in parallel; on a mismatch (or a rebuild by another process meanwhile)
        # everything is checked again under the lock, where on_corrupt decides.
        if not built and cache.files_problem(manifest) is not None:
            with file_lock(cache.lock_path):
                manifest, built = self._valid_or_built(cache, split, hash_files=True)
        if not built:
            log.info("latent cache %s: reusing %d latents", cache.dir, manifest["count"])
        manifest["directory"] = str(cache.dir)
        self._manifests[split] = manifest
        return manifest

    def _valid_or_built(self, cache: LatentCache, split: str,
                        hash_files: bool) -> tuple[dict[str, Any], bool]:
        """(the manifest of ``cache``, whether it was encoded now): a valid cache's, else (a
        corrupt one with ``on_corrupt=rebuild``, an untrusted one written before checksums, or
        none) after encoding. Raises a one-line CorruptLatentCacheError for a corrupt cache with
        ``on_corrupt=error``. The caller holds the cache's lock."""
        try:
            manifest = cache.read_manifest(hash_files=hash_files)
        except UntrustedLatentCacheError as err:
            log.warning("latent cache %s: %s; deleting it and re-encoding", cache.dir, err)
            cache.invalidate()
            manifest = None
        except CorruptLatentCacheError as err:
            if self.on_corrupt == "error":
                raise CorruptLatentCacheError(
                    f"corrupt latent cache: {err}. Delete {cache.dir} or set "
                    "data.source.on_corrupt=rebuild.") from err
            log.warning("corrupt latent cache (%s): deleting %s and re-encoding", err, cache.dir)
            cache.invalidate()
            manifest = None
        if manifest is not None:
            return manifest, False
        return cache.build(
            self._image_dataset(split), self.vae, batch_size=self.encode_batch_size,
            device=self._encode_device(), checkpoint_every=self.checkpoint_every,
            progress=self.progress,
            manifest_extra={"vae_name": self.vae.name, "vae_config": self.vae.config,
                            "scaling_factor": self.vae.scaling_factor,
                            "shift_factor": self.vae.shift_factor,
                            "resolution": self.resolution,
                            "image_resolution": int(self.images.resolution)}), True

    def manifest(self, split: str) -> dict[str, Any]:
        """The committed manifest of ``split`` (encodes if needed)."""
        return self.ensure_cache(split)

    def _encode_device(self) -> torch.device:
        if self.encode_device:
            return torch.device(self.encode_device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- ImageSource contract
    def prepare(self) -> None:
        """Prepare the inner source (downloads) and encode both splits (one process per node)."""
        for split in ("train", "val"):
            self.ensure_cache(split)

    def load(self, split: str, augment: bool = False) -> LatentDataset:
        """Cached latents of ``split`` (encoded on first use); posterior samples when ``augment``
        and ``sample_posterior``."""
        sample = self.sample_posterior and bool(augment)
        key = (check_split(split), sample)
        if key not in self._datasets:
            manifest = self.ensure_cache(split)
            self._datasets[key] = LatentDataset(manifest["directory"], self.vae.scaling_factor,
                                                self.vae.shift_factor, sample_posterior=sample,
                                                seed=self.seed)
        return self._datasets[key]

    def fingerprint(self, split: str) -> str:
        """sha256 of what ``load(split)`` serves: the cache identity (VAE, inner fingerprint,
        shapes, dtype) and the served scaling. FID uses ``pixel_source.fingerprint`` instead."""
        cache = self.cache(split)
        return stable_hash({"source": self.name, "split": split, "identity": cache.identity,
                            "scaling_factor": self.vae.scaling_factor,
                            "shift_factor": self.vae.shift_factor,
                            "sample_posterior": self.sample_posterior, "seed": self.seed})

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents (B, C, h, w) -> images (B, *pixel_shape) in [-1, 1] on x.device
        (the VAE moves there lazily; batches of ``decode_batch_size``)."""
        return self.vae.decode(x, batch_size=self.decode_batch_size,
                               out_channels=self.pixel_shape[0])

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> model-space latents, uncached (tools and tests)."""
        mean, std = self.vae.encode(images)
        z = mean
        if sample:
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.vae.scale(z)

    def __repr__(self) -> str:
        return f"LatentSource(images={self.images!r}, vae={self.vae!r})"
