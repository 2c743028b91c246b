"""Throughput of the cached-latent training loader (latents served per second).

Builds a synthetic cache (random posterior mean/std, no VAE) of ``--n`` latents of shape
``--shape`` in the on-disk format of ``diffsweep.data.latents``, then times full epochs of the same
loader ``LatentDataModule.train_dataloader`` builds (LatentBatchSampler -> LatentDataset, DataLoader
with batch_size=None), with and without posterior sampling::

    python experiments/benchmarks/latent_loader.py                    # 50k x 4x32x32, float16
    python experiments/benchmarks/latent_loader.py --dtype float32 --workers 0 2 --threads 1

Target: >= 20,000 latents/s for 4x32x32 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from diffsweep.data.latents import LatentBatchSampler, LatentDataset


def build_cache(directory: Path, n: int, shape: tuple[int, ...], dtype: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, scale, offset in (("mean", 1.0, 0.0), ("std", 0.05, 0.1)):
        arr = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=dtype, shape=(n, *shape))
        for i in range(0, n, 4096):
            m = min(4096, n - i)
            arr[i : i + m] = (offset + scale * np.abs(rng.standard_normal((m, *shape), dtype=np.float32))).astype(dtype)
        arr.flush()
        del arr
    np.save(directory / "labels.npy", rng.integers(0, 10, n, dtype=np.int64))


def time_epochs(directory: Path, sample_posterior: bool, batch_size: int, workers: int, epochs: int) -> float:
    ds = LatentDataset(directory, scaling_factor=0.18215, shift_factor=0.0, sample_posterior=sample_posterior, seed=0)
    sampler = LatentBatchSampler(len(ds), batch_size, shuffle=True, drop_last=True, seed=0)
    loader = DataLoader(ds, batch_size=None, sampler=sampler, num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch (page cache, worker start)
        pass
    count = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            count += x.shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--shape", type=int, nargs=3, default=[4, 32, 32])
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t = time.perf_counter()
        build_cache(d, args.n, tuple(args.shape), args.dtype)
        print(f"cache: {args.n} x {tuple(args.shape)} {args.dtype} built in {time.perf_counter() - t:.1f}s; "
              f"batch {args.batch_size}, torch threads {torch.get_num_threads()}")
        for workers in args.workers:
            for sample_posterior in (False, True):
                rate = time_epochs(d, sample_posterior, args.batch_size, workers, args.epochs)
                print(f"workers={workers} sample_posterior={str(sample_posterior):5s}: {rate:10,.0f} latents/s")


if __name__ == "__main__":
    main()
