"""Throughput of the cached-latent training loader (latents served per second).

Builds a synthetic cache (random posterior mean/std, no VAE) of ``--n`` latents of shape
``--shape`` in the on-disk format of ``diffsweep.data.latents``, then times full epochs of the very
loader ``ImageDataModule.train_dataloader`` builds for a ``LatentSource``
(``GlobalBatchSampler`` yielding ``(epoch, index)`` pairs -> ``LatentDataset.__getitems__`` ->
``collate``, in a ``ResumableDataLoader``), with and without posterior sampling (one seeded
generator call per item: noise from (seed, epoch, index) alone), and prints the margin over a
training step's consumption (``--train-rate``, img/s)::

    python experiments/benchmarks/latent_loader.py                    # 50k x 4x32x32, float16
    python experiments/benchmarks/latent_loader.py --dtype float32 --workers 0 2 --threads 1

Target: >= 20,000 latents/s for 4x32x32 on a 2-core CPU, with posterior sampling; the fastest
training step measured here (unet_tiny 16x16, bf16, 2 threads; experiments/benchmarks/README.md)
consumes ~800 img/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from diffsweep.data.base import ImageSource
from diffsweep.data.datamodule import ImageDataModule
from diffsweep.data.latents import LatentDataset


def build_cache(directory: Path, n: int, shape: tuple[int, ...], dtype: str, seed: int = 0) -> None:
    """mean.npy, std.npy (N, *shape) of ``dtype`` and labels.npy (N,) int64, as a cache holds."""
    rng = np.random.default_rng(seed)
    for name, scale, offset in (("mean", 1.0, 0.0), ("std", 0.05, 0.1)):
        array = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype,
                                          shape=(n, *shape))
        for start in range(0, n, 4096):
            count = min(4096, n - start)
            values = offset + scale * np.abs(rng.standard_normal((count, *shape), dtype=np.float32))
            array[start:start + count] = values.astype(dtype)
        array.flush()
        del array
    np.save(directory / "labels.npy", rng.integers(0, 10, n, dtype=np.int64))


class CachedLatents(ImageSource):
    """A source serving an already built cache directory (what ``LatentSource.load`` returns)."""

    name = "cached_latents"

    def __init__(self, directory: Path, shape: tuple[int, int, int],
                 sample_posterior: bool) -> None:
        self.directory, self.sample_posterior = directory, sample_posterior
        self.channels, self.resolution = shape[0], shape[1]

    def load(self, split: str, augment: bool = False) -> Dataset:
        return LatentDataset(self.directory, scaling_factor=0.18215, shift_factor=0.0,
                             sample_posterior=self.sample_posterior and augment, seed=0)

    def fingerprint(self, split: str) -> str:
        return str(self.directory)


def time_epochs(directory: Path, shape: tuple[int, int, int], sample_posterior: bool,
                batch_size: int, workers: int, epochs: int) -> float:
    """Latents per second over ``epochs`` epochs, after one warm-up epoch."""
    dm = ImageDataModule(CachedLatents(directory, shape, sample_posterior), batch_size=batch_size,
                         num_workers=workers, seed=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up epoch (page cache, worker start)
        pass
    count = 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            count += x.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="latents in the cache")
    parser.add_argument("--shape", type=int, nargs=3, default=[4, 32, 32], help="latent C H W")
    parser.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                        help="cache storage dtype")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch size")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="loader workers")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--train-rate", type=float, default=800.0,
                        help="img/s a training step consumes, for the margin column")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        build_cache(directory, args.n, shape, args.dtype)
        print(f"cache: {args.n} x {shape} {args.dtype} built in "
              f"{time.perf_counter() - started:.1f}s; batch {args.batch_size}, "
              f"torch threads {torch.get_num_threads()}")
        for workers in args.workers:
            for sample_posterior in (False, True):
                rate = time_epochs(directory, shape, sample_posterior, args.batch_size, workers,
                                   args.epochs)
                print(f"workers={workers} sample_posterior={str(sample_posterior):5s}: "
                      f"{rate:10,.0f} latents/s = {rate / args.train_rate:6.1f}x a "
                      f"{args.train_rate:,.0f} img/s training step")


if __name__ == "__main__":
    main()
