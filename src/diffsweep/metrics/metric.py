"""``FrechetDistance``: a torchmetrics ``Metric`` of generated features against fixed real
statistics.

The generated side is held as sums (``sum f``, ``sum f f^T``, ``n``) with
``dist_reduce_fx="sum"``: under DDP each rank updates with its share of the samples and every rank
calls ``compute()``, which all-reduces the sums first. The real side is fixed buffers (from the
real-statistics cache). The metric takes *features*; the extractor lives outside it.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from diffsweep.metrics.frechet import GaussianStats, frechet_distance


class FrechetDistance(Metric):
    """FID between accumulated generated features and fixed real statistics.

    ``update(features)`` with ``(B, D)`` features; ``compute()`` -> 0-d float64 tensor.
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
        """Set the reference statistics (their feature count must match)."""
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
        """Statistics of the generated features accumulated so far (this rank's, unsynced)."""
        return GaussianStats.from_sums(self.fake_sum, self.fake_outer, int(self.fake_count))

    def compute(self) -> Tensor:
        if self.real_count < 2:
            raise RuntimeError("FrechetDistance has no real statistics: call set_real() first.")
        if int(self.fake_count) < 2:
            raise RuntimeError(f"FrechetDistance needs >= 2 generated samples, has "
                               f"{int(self.fake_count)}.")
        fake = self.fake_stats()
        return frechet_distance(fake.mean, fake.cov, self.real_mean, self.real_cov)


class FeatureBank(Metric):
    """The generated feature vectors themselves (for KID and precision/recall): ``update(features)``
    with ``(B, D)``; ``compute()`` -> ``(N, D)`` float32 of every rank's vectors (gathered under
    DDP, in rank order)."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, num_features: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_features = int(num_features)
        self.add_state("features", default=[], dist_reduce_fx="cat")

    def update(self, features: Tensor) -> None:
        f = features.detach().float()
        if f.dim() != 2 or f.shape[1] != self.num_features:
            raise ValueError(f"Expected features of shape (B, {self.num_features}), "
                             f"got {tuple(f.shape)}.")
        self.features.append(f)

    def compute(self) -> Tensor:
        state = self.features
        if isinstance(state, Tensor):  # after a DDP sync: already concatenated
            return state
        if not state:
            return torch.empty(0, self.num_features)
        return torch.cat(state)


__all__ = ["FeatureBank", "FrechetDistance"]
