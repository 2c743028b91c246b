"""Time FID of N generated 16x16 samples against cached real statistics, per feature extractor.

Sampling is excluded (random images stand in for samples). Reports, per extractor:
features (extractor forward over N images) and statistics (float64 sums + Fréchet distance).
Target: <= 60 s for N = 2000 excluding sampling.

    python experiments/benchmarks/fid_time.py                 # tiny, classifier, inception
    python experiments/benchmarks/fid_time.py --threads 2 --inception-images 64

Inception uses the real weights when $DIFFSWEEP_INCEPTION_WEIGHTS (or the torch hub cache) has
them, else torch-fidelity's architecture with random weights: the same FLOPs, so the same speed.
Its feature time is measured on --inception-images images and extrapolated to N (marked "~").
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from diffsweep.metrics.extractors.base import extract_features
from diffsweep.metrics.extractors.classifier import load_or_train_classifier
from diffsweep.metrics.extractors.inception import InceptionFeatureExtractor, InceptionWeightsError
from diffsweep.metrics.extractors.tiny import TinyFeatureExtractor
from diffsweep.metrics.frechet import GaussianStats
from diffsweep.metrics.metric import FrechetDistance


class DigitsDM:
    """sklearn digits at 16x16 (enough of the DataModule contract to train the classifier)."""

    def __init__(self, resolution: int = 16):
        from sklearn.datasets import load_digits
        from torch.utils.data import TensorDataset

        d = load_digits()
        x = torch.from_numpy(d.images).float().unsqueeze(1) / 8 - 1
        self.x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                                 align_corners=False, antialias=True).clamp(-1, 1)
        self.y = torch.from_numpy(d.target).long()
        self.image_shape = tuple(self.x.shape[1:])
        self._ds = TensorDataset

    def fingerprint(self, split):
        return f"bench-digits-{split}-{self.image_shape}"

    def dataset(self, split):
        n = len(self.x) - 180
        sl = slice(0, n) if split == "train" else slice(n, None)
        return self._ds(self.x[sl], self.y[sl])

    def real_images(self, split, max_count=None, batch_size=None, rank=0, world_size=1):
        yield self.x[:max_count][rank::world_size]


def time_one(name: str, extractor: torch.nn.Module, n: int, batch_size: int, measure_n: int,
             real: GaussianStats) -> dict:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 1, 16, 16, generator=g) * 2 - 1
    m = min(n, measure_n)
    extract_features(extractor, images[:2], batch_size)  # warm-up
    t0 = time.perf_counter()
    f = extract_features(extractor, images[:m], batch_size)
    t_feat = (time.perf_counter() - t0) * n / m
    if m < n:  # extrapolated: tile the measured features for the statistics step
        f = f.repeat((n + m - 1) // m, 1)[:n] + 1e-3 * torch.randn(n, f.shape[1], dtype=f.dtype)
    t0 = time.perf_counter()
    metric = FrechetDistance(f.shape[1], real)
    for i in range(0, n, batch_size):
        metric.update(f[i:i + batch_size])
    value = float(metric.compute())
    t_stats = time.perf_counter() - t0
    return {"extractor": name, "dim": f.shape[1], "features_s": t_feat, "img_per_s": n / t_feat,
            "stats_s": t_stats, "total_s": t_feat + t_stats, "extrapolated": m < n, "fid": value}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for these small kernels on a busy 2-core box)")
    p.add_argument("--inception-images", type=int, default=32,
                   help="images actually run through Inception (time is extrapolated to N)")
    p.add_argument("--extractors", default="tiny,classifier,inception")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.num_samples
    rows = []
    cache = tempfile.mkdtemp(prefix="fid_bench_")
    for name in args.extractors.split(","):
        note = ""
        t0 = time.perf_counter()
        if name == "tiny":
            ex = TinyFeatureExtractor()
        elif name == "classifier":
            dm = DigitsDM()
            ex = load_or_train_classifier(dm, cache)
            note = (f"trained once in {time.perf_counter() - t0:.1f}s (acc {ex.accuracy:.3f}), "
                    "cached")
        elif name == "inception":
            try:
                ex = InceptionFeatureExtractor(download=False)
                note = "real weights"
            except InceptionWeightsError:
                ex = InceptionFeatureExtractor(random_weights=True)
                note = "random weights (no weights file here); same speed"
        else:
            raise SystemExit(f"unknown extractor {name}")
        measure = args.inception_images if name == "inception" else n
        # cached real statistics: any valid stats of the right size (their values do not change
        # the timing); computed here from random features, excluded from the timing
        d = ex.num_features
        real = GaussianStats.from_features(torch.randn(max(2 * d, 256), d, dtype=torch.float64))
        row = time_one(name, ex, n, args.batch_size, measure, real)
        row["note"] = note
        rows.append(row)
        print(f"  done {name}: {row['total_s']:.1f}s", file=sys.stderr)

    print(f"\nFID timing: {n} generated 1x16x16 images vs cached real stats, sampling excluded; "
          f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs\n")
    hdr = (f"{'extractor':<11}{'D':>6}{'features s':>13}{'img/s':>9}{'stats s':>9}{'total s':>10}"
           "  <=60s  note")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        tilde = "~" if r["extrapolated"] else " "
        ok = "yes" if r["total_s"] <= 60 else "NO"
        print(f"{r['extractor']:<11}{r['dim']:>6}{tilde}{r['features_s']:>12.2f}{r['img_per_s']:>9.1f}"
              f"{r['stats_s']:>9.2f}{tilde}{r['total_s']:>9.1f}  {ok:<5}  {r['note']}")
    print("\n~ = extrapolated from --inception-images images.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
