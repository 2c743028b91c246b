"""The Fréchet distance between two Gaussians, and Gaussian feature statistics.

The one implementation of the FID formula in diffsweep: the FID metric and
:func:`diffsweep.analytic.gaussian_frechet_distance` both call :func:`frechet_distance`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite ``(D, D)`` matrix via ``eigh``
    (symmetrised first; negative rounding-error eigenvalues clamped to 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> Tensor:
    """``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1 C2)^1/2)`` in float64, a 0-d float64 tensor.

    ``mean*`` are ``(D,)``, ``cov*`` ``(D, D)`` PSD. Uses ``tr (C1 C2)^1/2 = tr (C1^1/2 C2
    C1^1/2)^1/2`` with symmetric eigendecompositions: exact for PSD matrices (singular ones too)
    and better conditioned than ``eigvals(C1 @ C2)`` or ``scipy.linalg.sqrtm``. Computed on
    ``cov1``'s device.
    """
    mean1, cov1 = (torch.as_tensor(t, dtype=torch.float64) for t in (mean1, cov1))
    device = cov1.device
    mean1 = mean1.to(device)
    mean2, cov2 = (torch.as_tensor(t, dtype=torch.float64).to(device) for t in (mean2, cov2))
    root1 = sqrtm_psd(cov1)
    middle = root1 @ cov2 @ root1
    trace_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    difference = mean1 - mean2
    return difference.dot(difference) + cov1.trace() + cov2.trace() - 2 * trace_covmean


@dataclass
class GaussianStats:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of ``count`` feature vectors;
    ``key`` names what they were computed from (the real-statistics cache key); ``features``: a
    uniform random sample ``(M, D)`` (float32) of the vectors themselves, for KID and
    precision/recall (None: not kept)."""

    mean: Tensor
    cov: Tensor
    count: int
    key: str = ""
    features: Tensor | None = None

    @classmethod
    def from_sums(cls, total: Tensor, outer: Tensor, count: int, key: str = "") -> GaussianStats:
        """From ``sum f`` ``(D,)``, ``sum f f^T`` ``(D, D)`` and ``n`` (at least 2)."""
        n = int(count)
        if n < 2:
            raise ValueError(f"Need at least 2 feature vectors for a covariance, got {n}.")
        total, outer = total.double(), outer.double()
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        return cls(mean, (cov + cov.T) / 2, n, key)

    @classmethod
    def from_features(cls, features: Tensor, key: str = "") -> GaussianStats:
        """From features ``(N, D)``."""
        f = features.double()
        return cls.from_sums(f.sum(0), f.T @ f, f.shape[0], key)

    @property
    def num_features(self) -> int:
        return int(self.mean.shape[0])

    def frechet_distance(self, other: GaussianStats) -> float:
        return float(frechet_distance(self.mean, self.cov, other.mean, other.cov))


__all__ = ["GaussianStats", "frechet_distance", "sqrtm_psd"]
