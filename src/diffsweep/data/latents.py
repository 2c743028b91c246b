"""Latent diffusion data: encode an image dataset once with a VAE, train on cached latents.

Pieces
------
- :class:`LatentDataModule` wraps any image DataModule (docs/INTERFACES.md contract) and a
  :class:`~diffsweep.data.vae.LatentVAE`. It serves model-space latents
  ``(z - shift) * scale`` of shape (B, latent_channels, H/f, W/f) and decodes samples back to
  images in [-1, 1] (``decode``); FID real images come from the inner image module.
- :class:`LatentCache`: one split of one dataset encoded by one VAE, on disk::

      <cache_dir>/<split>-<key>/
          manifest.json   commit marker, written last (atomically)
          mean.npy        (N, C, h, w) posterior mean, raw (unscaled) VAE latents, float16|float32
          std.npy         (N, C, h, w) posterior std, raw
          labels.npy      (N,) int64
      <cache_dir>/<split>-<key>.lock   (flock while encoding/validating)

  ``key`` hashes the *identity*: format version, VAE (pretrained id/path, subfolder, revision,
  hash of the encode-relevant config, hash of the weights, compute dtype), the inner dataset's
  ``fingerprint(split)``, image shape, latent shape and storage dtype. A different identity gets
  a different directory, so a changed VAE/dataset/resolution re-encodes without touching an old
  valid cache. ``scaling_factor``/``shift_factor`` are *not* part of the key: the cache holds
  raw latents and the factors are applied when latents are served (so they can be overridden
  without re-encoding); the manifest records the VAE's values and the latents' statistics
  (``stats.suggested_scaling_factor`` = 1/std, the LDM recipe for a custom VAE).
- Encoding writes ``*.npy.partial`` files and a ``progress.json`` (committed every
  ``checkpoint_every`` batches: memmaps flushed + fsynced, then progress replaced atomically).
  An interrupted encode resumes from the last committed chunk; the final files are renamed into
  place and ``manifest.json`` is written last, so a directory without a valid manifest is never
  used. A manifest that exists but does not match its files (bad JSON, truncated/missing npy,
  wrong size/shape/dtype) raises :class:`CorruptLatentCacheError` naming the file
  (``on_corrupt="error"``, the default) or is rebuilt with a warning (``on_corrupt="rebuild"``).
- :class:`LatentDataset` + :class:`LatentBatchSampler`: batches are served whole (the sampler
  yields ``(sorted index array, noise seed)``; the DataLoader runs with ``batch_size=None``), so
  there is no per-item Python work. With ``sample_posterior`` each training batch draws
  ``z = mean + std * eps`` with ``eps`` from a generator seeded by (seed, epoch, batch index):
  the same seed gives the same latents regardless of ``num_workers``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from diffsweep.data.vae import LatentVAE
from diffsweep.hydra_utils import register_resolvers

register_resolvers()  # configs/data/latents.yaml uses ${diffsweep.div:...}

__all__ = [
    "FORMAT_VERSION",
    "CorruptLatentCacheError",
    "LatentCache",
    "LatentDataset",
    "LatentBatchSampler",
    "LatentDataModule",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ARRAYS = ("mean", "std", "labels")
_STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}


class CorruptLatentCacheError(RuntimeError):
    """A latent cache directory has a manifest but its contents do not match it."""


# ---------------------------------------------------------------------------------------------
# Hydra / OmegaConf resolver
# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# small file-system helpers
# ---------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported on every platform / file system
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to a temp name in the same directory, fsync, ``os.replace``, fsync the dir."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``) so two processes never encode the same cache."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no locking
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _noise_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)


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

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str,
        identity: Mapping[str, Any],
        count: int,
        latent_shape: Sequence[int],
        storage_dtype: str,
    ) -> None:
        if storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={storage_dtype!r}; choose one of {sorted(_STORAGE_DTYPES)}")
        self.root = Path(root)
        self.split = split
        self.identity = {"format_version": FORMAT_VERSION, **dict(identity)}
        self.key = _hash(self.identity)
        self.dir = self.root / f"{split}-{self.key}"
        self.count = int(count)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.storage_dtype = storage_dtype

    # -- paths
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
        return (self.count, *self.latent_shape), np.dtype(_STORAGE_DTYPES[self.storage_dtype])

    # -- validation
    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest if this cache is complete and consistent, ``None`` if there is none.

        Raises:
            CorruptLatentCacheError: naming the offending file, when a manifest exists but it or
                the arrays are broken (bad JSON, wrong identity, missing/truncated/mis-sized npy).
        """
        mpath = self.manifest_path
        if not mpath.exists():
            return None
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptLatentCacheError(f"{mpath}: manifest is not valid JSON ({err})") from err
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            raise CorruptLatentCacheError(
                f"{mpath}: format_version {manifest.get('format_version') if isinstance(manifest, dict) else None!r}"
                f" != {FORMAT_VERSION}"
            )
        if manifest.get("key") != self.key or manifest.get("identity") != json.loads(
            json.dumps(self.identity, default=str)
        ):
            raise CorruptLatentCacheError(f"{mpath}: manifest identity does not match directory key {self.key}")
        if manifest.get("count") != self.count:
            raise CorruptLatentCacheError(
                f"{mpath}: count {manifest.get('count')} != dataset size {self.count}"
            )
        for name in ARRAYS:
            p = self.path(name)
            shape, dtype = self._expected(name)
            if not p.exists():
                raise CorruptLatentCacheError(f"{p}: missing (listed in {mpath})")
            size = p.stat().st_size
            want = manifest.get("files", {}).get(name, {}).get("bytes")
            if size != want:
                raise CorruptLatentCacheError(f"{p}: {size} bytes, manifest says {want} (truncated or replaced?)")
            try:
                arr = np.load(p, mmap_mode="r")
            except (ValueError, OSError, EOFError) as err:
                raise CorruptLatentCacheError(f"{p}: unreadable npy ({err})") from err
            if arr.shape != shape or arr.dtype != dtype:
                raise CorruptLatentCacheError(
                    f"{p}: shape {arr.shape} dtype {arr.dtype}, expected {shape} {dtype}"
                )
            del arr
        return manifest

    def invalidate(self) -> None:
        """Remove the commit marker first, then everything else in the directory."""
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path.unlink()
            _fsync_dir(self.dir)
        if self.dir.exists():
            shutil.rmtree(self.dir)

    # -- building
    def build(
        self,
        dataset: Dataset,
        vae: LatentVAE,
        *,
        batch_size: int,
        device: torch.device,
        checkpoint_every: int,
        progress: bool,
        manifest_extra: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Encode ``dataset`` (items ``(image (C,H,W) in [-1,1], label)``) into this cache.

        Resumes from ``progress.json`` when it matches; returns the committed manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        start, sums = self._resume_point()
        if start == 0:
            for name in ARRAYS:  # stale final files of an uncommitted build
                with contextlib.suppress(FileNotFoundError):
                    self.path(name).unlink()
        arrays = {}
        for name in ARRAYS:
            shape, dtype = self._expected(name)
            mode = "r+" if start > 0 else "w+"
            arrays[name] = np.lib.format.open_memmap(self.partial(name), mode=mode, dtype=dtype, shape=shape)
        if start > 0:
            log.info("latent cache %s: resuming encode at %d/%d", self.dir, start, self.count)
        else:
            log.info("latent cache %s: encoding %d images with %s", self.dir, self.count, vae.name)

        c = self.latent_shape[0]
        if sums is None:
            sums = {"n": 0, "sum": [0.0] * c, "sumsq": [0.0] * c, "var_sum": [0.0] * c}
        acc = {k: np.asarray(v, dtype=np.float64) for k, v in sums.items() if k != "n"}
        n_stat = int(sums["n"])

        loader = DataLoader(
            Subset(dataset, range(start, self.count)) if start else dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=0,
            collate_fn=_collate,
        )
        vae.to(device)
        done = start
        since_commit = 0
        t0 = time.perf_counter()
        with _progress_bar(progress, f"encode {self.split}", total=self.count, completed=start) as advance:
            for batch in loader:
                images, labels = batch[0], batch[1]
                b = images.shape[0]
                if done + b > self.count:
                    raise ValueError(f"dataset yielded more than its len() = {self.count} items")
                mean, std = vae.encode(images)
                if tuple(mean.shape[1:]) != self.latent_shape:
                    raise ValueError(
                        f"VAE produced latents of shape {tuple(mean.shape[1:])}, expected {self.latent_shape}"
                    )
                m = mean.cpu().numpy()
                s = std.cpu().numpy()
                arrays["mean"][done : done + b] = m
                arrays["std"][done : done + b] = s
                arrays["labels"][done : done + b] = torch.as_tensor(labels).reshape(-1).numpy()
                acc["sum"] += m.sum(axis=(0, 2, 3), dtype=np.float64)
                acc["sumsq"] += np.square(m, dtype=np.float64).sum(axis=(0, 2, 3))
                acc["var_sum"] += np.square(s, dtype=np.float64).sum(axis=(0, 2, 3))
                n_stat += b * int(np.prod(self.latent_shape[1:]))
                done += b
                since_commit += 1
                advance(b)
                if since_commit >= checkpoint_every and done < self.count:
                    self._commit_progress(arrays, done, n_stat, acc)
                    since_commit = 0
        if done != self.count:
            raise ValueError(f"dataset yielded {done} items, expected len() = {self.count}")
        vae.to("cpu")

        # finalize: data durable -> rename into place -> manifest (commit marker) -> drop progress
        for name in ARRAYS:
            arrays[name].flush()
        del arrays
        for name in ARRAYS:
            _fsync_file(self.partial(name))
            os.replace(self.partial(name), self.path(name))
        _fsync_dir(self.dir)
        mean_c = acc["sum"] / n_stat
        var_c = acc["sumsq"] / n_stat - mean_c**2
        post_var = acc["var_sum"] / n_stat
        total_std = float(np.sqrt(np.mean(var_c + post_var + mean_c**2 - np.mean(mean_c) ** 2)))
        manifest = {
            "format_version": FORMAT_VERSION,
            "key": self.key,
            "identity": self.identity,
            "split": self.split,
            "count": self.count,
            "shape": [self.count, *self.latent_shape],
            "dtype": self.storage_dtype,
            "files": {name: {"file": self.path(name).name, "bytes": self.path(name).stat().st_size} for name in ARRAYS},
            "stats": {
                "channel_mean": mean_c.tolist(),
                "channel_std_of_mean": np.sqrt(np.maximum(var_c, 0)).tolist(),
                "channel_posterior_std_rms": np.sqrt(post_var).tolist(),
                "suggested_scaling_factor": 1.0 / total_std if total_std > 0 else 1.0,
            },
            "encode_seconds": round(time.perf_counter() - t0, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **dict(manifest_extra),
        }
        _atomic_write_json(self.manifest_path, manifest)
        with contextlib.suppress(FileNotFoundError):
            (self.dir / PROGRESS).unlink()
        log.info("latent cache %s: committed %d latents", self.dir, self.count)
        return manifest

    def _commit_progress(self, arrays: dict[str, np.memmap], done: int, n_stat: int, acc: dict[str, np.ndarray]) -> None:
        for name in ARRAYS:
            arrays[name].flush()
            _fsync_file(self.partial(name))
        _atomic_write_json(
            self.dir / PROGRESS,
            {
                "key": self.key,
                "count": self.count,
                "shape": [self.count, *self.latent_shape],
                "dtype": self.storage_dtype,
                "done": done,
                "sums": {"n": n_stat, **{k: v.tolist() for k, v in acc.items()}},
            },
        )

    def _resume_point(self) -> tuple[int, dict[str, Any] | None]:
        """(items already encoded, running stats) from a matching ``progress.json``, else (0, None)
        after deleting any leftovers."""
        ppath = self.dir / PROGRESS
        try:
            prog = json.loads(ppath.read_text())
            ok = (
                prog["key"] == self.key
                and prog["count"] == self.count
                and prog["shape"] == [self.count, *self.latent_shape]
                and prog["dtype"] == self.storage_dtype
                and 0 < int(prog["done"]) < self.count
            )
            for name in ARRAYS:
                shape, dtype = self._expected(name)
                arr = np.load(self.partial(name), mmap_mode="r")
                ok = ok and arr.shape == shape and arr.dtype == dtype
                del arr
            if ok:
                return int(prog["done"]), prog["sums"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
            log.warning("latent cache %s: ignoring unusable progress (%s); restarting encode", self.dir, err)
        with contextlib.suppress(FileNotFoundError):
            ppath.unlink()
        for name in ARRAYS:
            with contextlib.suppress(FileNotFoundError):
                self.partial(name).unlink()
        return 0, None


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int, completed: int) -> Iterator[Any]:
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    ) as bar:
        task = bar.add_task(description, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)


# ---------------------------------------------------------------------------------------------
# serving
# ---------------------------------------------------------------------------------------------
class LatentDataset(Dataset):
    """Cached latents as a Dataset.

    ``ds[i]`` -> ``(x (C,h,w) float32, label int64 scalar tensor)`` (the INTERFACES contract);
    ``ds[(indices, noise_seed)]`` / ``ds[indices]`` -> a whole batch
    ``(x (B,C,h,w) float32, labels (B,) int64)``, which is what :class:`LatentBatchSampler` feeds.
    ``x = (z - shift) * scale`` where ``z`` is the posterior mean, or with ``sample_posterior``
    ``z = mean + std * eps``, ``eps`` from ``noise_seed`` (single items: from (seed, epoch, i)).

    Memmaps are opened lazily and dropped on pickling, so workers each open their own.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        scaling_factor: float,
        shift_factor: float = 0.0,
        sample_posterior: bool = False,
        seed: int = 0,
    ) -> None:
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
            self._arrays = {name: np.load(self.directory / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
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

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -self._len <= i < self._len:
                raise IndexError(f"index {i} out of range for {self._len} latents")
            i %= self._len
            x, y = self.get_batch(np.array([i]), _noise_seed(self.seed, self.epoch, i, 1 << 40))
            return x[0], y[0]
        if isinstance(index, tuple) and len(index) == 2:
            indices, noise_seed = index
        else:
            indices, noise_seed = index, None
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if noise_seed is None:
            noise_seed = _noise_seed(self.seed, self.epoch, int(hashlib.sha1(idx.tobytes()).hexdigest()[:12], 16))
        return self.get_batch(idx, int(noise_seed))

    def get_batch(self, indices: np.ndarray, noise_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather ``indices`` (int64 (B,), sorted is fastest) -> ``(x float32 (B,C,h,w), labels (B,))``."""
        arrays = self._open()
        n = indices.shape[0]
        if n and indices[-1] - indices[0] == n - 1 and np.all(np.diff(indices) == 1):
            sel: Any = slice(int(indices[0]), int(indices[0]) + n)  # contiguous: a plain slice
        else:
            sel = indices
        mean = torch.from_numpy(_owned(arrays["mean"][sel]))  # stored dtype, (B, C, h, w)
        out = torch.empty(mean.shape, dtype=torch.float32)
        std = eps = None
        if self.sample_posterior:
            std = torch.from_numpy(_owned(arrays["std"][sel]))
            eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(noise_seed))
        # Elementwise work in chunks below torch's parallel grain size (32768 elements): runs
        # single-threaded, so it neither fights the training step's threads nor suffers OpenMP
        # oversubscription (2 threads on a busy 2-core box were ~10x slower than 1).
        step = max(1, _GRAIN // max(1, out[0].numel()))
        scale, shift = self.scaling_factor, self.shift_factor
        for i in range(0, n, step):
            o = out[i : i + step]
            o.copy_(mean[i : i + step])  # float16 -> float32
            if std is not None:
                o.addcmul_(std[i : i + step], eps[i : i + step])  # z = mean + std * eps
            if shift:
                o.sub_(shift)
            o.mul_(scale)  # (z - shift) * scale
        labels = torch.from_numpy(_owned(arrays["labels"][sel]).astype(np.int64, copy=False))
        return out, labels


_GRAIN = 32768  # at::internal::GRAIN_SIZE


def _owned(a: np.ndarray) -> np.ndarray:
    """``a`` as a writable in-memory ndarray (a slice of a read-only memmap is a view: copy it;
    fancy indexing already returned a copy)."""
    if not a.flags.writeable or isinstance(a, np.memmap):
        return np.array(a)
    return a


class LatentBatchSampler(Sampler):
    """Yields ``(indices, noise_seed)`` per batch for :class:`LatentDataset` (DataLoader with
    ``batch_size=None``).

    ``indices`` is a sorted int64 array (sorted for memmap locality; order within a batch does
    not matter for SGD). Shuffling is a permutation from (seed, epoch); ``noise_seed`` derives
    from (seed, epoch, batch index). Each ``__iter__`` uses ``self.epoch`` and then advances it;
    ``set_epoch`` (Lightning calls it, also through its DistributedSamplerWrapper under DDP)
    sets it explicitly.
    """

    def __init__(self, num_items: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last) and self.num_items >= self.batch_size
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        epoch = self.epoch
        self.epoch += 1
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items, dtype=np.int64)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.shuffle:
                idx = np.sort(idx)
            yield idx.astype(np.int64, copy=False), _noise_seed(self.seed, epoch, b)


# ---------------------------------------------------------------------------------------------
# the DataModule
# ---------------------------------------------------------------------------------------------
class LatentDataModule(pl.LightningDataModule):
    """Latents of an image DataModule, encoded once by a frozen VAE and cached on disk.

    Args:
        image_data: the inner image DataModule (INTERFACES.md contract: ``dataset(split)``,
            ``fingerprint(split)``, ``image_shape``, ``resolution``, ``real_images``), or a config
            with ``_target_`` (instantiated with Hydra).
        vae: a :class:`LatentVAE`, or a mapping of its keyword arguments.
        cache_dir: cache root; each (split, identity) gets its own subdirectory.
        channels, resolution: optional declared latent channels / resolution (Hydra configs
            interpolate them for the model); ValueError if they disagree with VAE + image data.
        batch_size, val_batch_size: GLOBAL batch sizes (divided by the DDP world size in
            ``setup``, as ImageDataModule does); val defaults to batch_size.
        num_workers, pin_memory: DataLoader options (0 workers is fast enough for most cases;
            pin_memory None = when training on CUDA).
        sample_posterior: training batches draw ``mean + std * eps`` (EDM2); else the mean.
            Validation always serves the mean.
        seed: shuffling / posterior-noise seed.
        storage_dtype: ``float16`` (default; half the disk/page cache) or ``float32``.
        encode_batch_size, encode_device: encoding pass (device default: cuda if available).
        decode_batch_size: batch size of :meth:`decode`.
        checkpoint_every: commit encode progress every this many batches (resume granularity).
        on_corrupt: ``error`` (raise CorruptLatentCacheError naming the file) or ``rebuild``
            (log a warning, delete and re-encode).
        progress: show a rich progress bar while encoding.
        drop_last: drop the last incomplete training batch.

    Attributes (available right after construction): ``channels``, ``resolution``,
    ``image_shape`` = (latent channels, h, w) (model space), ``pixel_shape`` = inner image shape,
    ``vae``, ``image_data``.
    """

    def __init__(
        self,
        image_data: Any,
        vae: LatentVAE | Mapping[str, Any],
        cache_dir: str | os.PathLike[str] = ".cache/latents",
        channels: int | None = None,
        resolution: int | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        sample_posterior: bool = True,
        seed: int = 0,
        storage_dtype: str = "float16",
        encode_batch_size: int = 64,
        encode_device: str | None = None,
        decode_batch_size: int = 32,
        checkpoint_every: int = 20,
        on_corrupt: str = "error",
        progress: bool = True,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        if on_corrupt not in ("error", "rebuild"):
            raise ValueError(f"on_corrupt={on_corrupt!r}; choose 'error' or 'rebuild'")
        if storage_dtype not in _STORAGE_DTYPES:
            raise ValueError(f"storage_dtype={storage_dtype!r}; choose one of {sorted(_STORAGE_DTYPES)}")
        if _is_mapping(image_data) and "_target_" in image_data:
            from hydra.utils import instantiate

            image_data = instantiate(image_data)
        if _is_mapping(vae):
            from omegaconf import OmegaConf

            kw = OmegaConf.to_container(vae, resolve=True) if not isinstance(vae, dict) else dict(vae)
            kw.pop("_target_", None)
            kw.pop("_convert_", None)
            vae = LatentVAE(**kw)
        self.image_data = image_data
        self.vae: LatentVAE = vae
        self.pixel_shape = tuple(int(s) for s in image_data.image_shape)
        self.vae.bind_image_channels(self.pixel_shape[0])

        f = self.vae.downsample_factor
        h, w = self.pixel_shape[1:]
        if h % f or w % f:
            raise ValueError(
                f"image resolution {h}x{w} is not divisible by the VAE's downsampling factor {f} ({self.vae.name})"
            )
        self.channels = self.vae.latent_channels
        self.resolution = int(image_data.resolution) // f
        self.image_shape = (self.channels, h // f, w // f)
        if channels is not None and int(channels) != self.channels:
            raise ValueError(f"data.channels={channels} but the VAE {self.vae.name} has {self.channels} latent channels")
        if resolution is not None and int(resolution) != self.resolution:
            raise ValueError(
                f"data.resolution={resolution} but images of resolution {image_data.resolution} encode to "
                f"{self.resolution} (VAE downsampling {f})"
            )
        self.cache_dir = Path(cache_dir)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = pin_memory
        self.world_size = 1
        self.sample_posterior = bool(sample_posterior)
        self.seed = int(seed)
        self.storage_dtype = storage_dtype
        self.encode_batch_size = int(encode_batch_size)
        self.encode_device = encode_device
        self.decode_batch_size = int(decode_batch_size)
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.on_corrupt = on_corrupt
        self.progress = bool(progress)
        self.drop_last = bool(drop_last)
        self._inner_prepared = False
        self._manifests: dict[str, dict[str, Any]] = {}
        self._datasets: dict[str, LatentDataset] = {}

    # -- cache management
    def _prepare_inner(self) -> None:
        if not self._inner_prepared:
            prep = getattr(self.image_data, "prepare_data", None)
            if callable(prep):
                prep()
            self._inner_prepared = True

    def _image_dataset(self, split: str) -> Dataset:
        """The inner split *without* train-time augmentation (encoding must be deterministic)."""
        self._prepare_inner()
        try:
            return self.image_data.dataset(split, augment=False)
        except TypeError:  # an image DataModule whose dataset() has no augment option
            return self.image_data.dataset(split)

    def cache(self, split: str) -> LatentCache:
        """The :class:`LatentCache` descriptor for ``split`` (computes the identity; loads the VAE)."""
        dataset = self._image_dataset(split)
        identity = {
            "vae": self.vae.identity(),
            "dataset_fingerprint": self.image_data.fingerprint(split),
            "image_shape": list(self.pixel_shape),
            "latent_shape": list(self.image_shape),
            "storage_dtype": self.storage_dtype,
        }
        return LatentCache(self.cache_dir, split, identity, len(dataset), self.image_shape, self.storage_dtype)

    def ensure_cache(self, split: str) -> dict[str, Any]:
        """Return the manifest of a valid cache for ``split``, encoding (or resuming) if needed."""
        if split in self._manifests:
            return self._manifests[split]
        cache = self.cache(split)
        with _locked(cache.lock_path):
            try:
                manifest = cache.read_manifest()
            except CorruptLatentCacheError as err:
                if self.on_corrupt == "error":
                    raise CorruptLatentCacheError(
                        f"corrupt latent cache: {err}. Delete {cache.dir} or set data.on_corrupt=rebuild."
                    ) from err
                log.warning("corrupt latent cache (%s): deleting %s and re-encoding", err, cache.dir)
                cache.invalidate()
                manifest = None
            if manifest is None:
                manifest = cache.build(
                    self._image_dataset(split),
                    self.vae,
                    batch_size=self.encode_batch_size,
                    device=self._encode_device(),
                    checkpoint_every=self.checkpoint_every,
                    progress=self.progress,
                    manifest_extra={
                        "vae_name": self.vae.name,
                        "vae_config": self.vae.config,
                        "scaling_factor": self.vae.scaling_factor,
                        "shift_factor": self.vae.shift_factor,
                        "resolution": self.resolution,
                        "image_resolution": int(self.image_data.resolution),
                    },
                )
            else:
                log.info("latent cache %s: reusing %d latents", cache.dir, manifest["count"])
        manifest["directory"] = str(cache.dir)
        self._manifests[split] = manifest
        return manifest

    def _encode_device(self) -> torch.device:
        if self.encode_device:
            return torch.device(self.encode_device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- Lightning hooks
    def prepare_data(self) -> None:
        """Encode the train and val splits (Lightning runs this once per node, before setup)."""
        for split in ("train", "val"):
            self.ensure_cache(split)

    def setup(self, stage: str | None = None) -> None:
        """Per-rank batch sizes from ``trainer.world_size`` (``batch_size`` is GLOBAL, as in
        ImageDataModule). Caches are opened (and, outside Lightning, built) on first use."""
        trainer = getattr(self, "trainer", None)
        self.world_size = int(trainer.world_size) if trainer is not None else 1
        for name in ("batch_size", "val_batch_size"):
            if getattr(self, name) % self.world_size:
                raise ValueError(
                    f"data.{name}={getattr(self, name)} is the GLOBAL batch size and must be "
                    f"divisible by the number of processes ({self.world_size})"
                )

    # -- INTERFACES contract
    def dataset(self, split: str) -> LatentDataset:
        """Cached latents of ``split`` (encoded on first use). Posterior sampling for ``train`` only."""
        if split not in self._datasets:
            manifest = self.ensure_cache(split)
            self._datasets[split] = LatentDataset(
                manifest["directory"],
                scaling_factor=self.vae.scaling_factor,
                shift_factor=self.vae.shift_factor,
                sample_posterior=self.sample_posterior and split == "train",
                seed=self.seed,
            )
        return self._datasets[split]

    def _loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        """Whole-batch loading: ``LatentBatchSampler`` -> ``LatentDataset[(indices, seed)]``.

        Under DDP Lightning wraps the sampler in its DistributedSamplerWrapper, which deals the
        batches out to the ranks; each batch is ``batch_size // world_size`` (per rank)."""
        ds = self.dataset(split)
        per_rank = max(1, batch_size // self.world_size)
        sampler = LatentBatchSampler(len(ds), per_rank, shuffle=shuffle, drop_last=drop_last, seed=self.seed)
        pin = self.pin_memory
        if pin is None:
            trainer = getattr(self, "trainer", None)
            try:
                pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
            except Exception:  # noqa: BLE001 - strategy not set up yet
                pin = False
        return DataLoader(
            ds,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=bool(pin),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches ``(latents float32 (B,C,h,w), labels int64 (B,))``."""
        return self._loader("train", self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        """Ordered batches of posterior means."""
        return self._loader("val", self.val_batch_size, shuffle=False, drop_last=False)

    def fingerprint(self, split: str) -> str:
        """The *image* dataset's fingerprint: ``real_images`` are the inner images, so FID
        statistics are shared with pixel-space runs. See :meth:`latent_fingerprint`."""
        return self.image_data.fingerprint(split)

    def latent_fingerprint(self, split: str) -> str:
        """Identity of the cached latents (the cache key)."""
        return self.cache(split).key

    def real_images(self, split: str, max_count: int | None = None, **kwargs: Any) -> Iterator[torch.Tensor]:
        """Real images for FID (B, *pixel_shape) in [-1, 1]: delegated to the inner image
        DataModule (extra keyword arguments, e.g. ``rank``/``world_size``, pass through)."""
        return self.image_data.real_images(split, max_count, **kwargs)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space latents (B, C, h, w) -> images (B, *pixel_shape) in [-1, 1], on x.device.

        The VAE is moved to ``x.device`` lazily and decodes in batches of ``decode_batch_size``."""
        return self.vae.decode(x, batch_size=self.decode_batch_size, out_channels=self.pixel_shape[0])

    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> model-space latents (uncached; for tools and tests)."""
        mean, std = self.vae.encode(images)
        z = mean
        if sample:
            z = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.vae.scale(z)

    def manifest(self, split: str) -> dict[str, Any]:
        """The committed manifest of ``split`` (encodes if needed)."""
        return self.ensure_cache(split)


def _collate(data: Any) -> Any:
    """Batch collation for the encode pass: image datasets may pre-batch via ``__getitems__``
    (diffsweep.data.base.PreBatched, with ``.x``/``.labels``); otherwise ``default_collate``."""
    if hasattr(data, "x") and hasattr(data, "labels"):
        return [data.x, data.labels]
    from torch.utils.data import default_collate

    return default_collate(data)


def _is_mapping(obj: Any) -> bool:
    if isinstance(obj, Mapping):
        return True
    try:
        from omegaconf import DictConfig

        return isinstance(obj, DictConfig)
    except ImportError:  # pragma: no cover
        return False
