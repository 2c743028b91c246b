"""KID and improved precision/recall of generated against real feature vectors, computed by
torch-fidelity's implementations (the same features as FID: any extractor works).

- :func:`kernel_inception_distance`: Bińkowski et al. 2018, the unbiased MMD² with the cubic
  polynomial kernel ``(x·y / D + 1)^3``, averaged over random subsets (``kid_subsets`` of
  ``kid_subset_size``, capped at the smaller set); torch-fidelity's ``kid_features_to_metric``.
- :func:`precision_recall`: Kynkäänniemi et al. 2019, k-NN manifolds of equal-size sets (the
  first ``min(N_fake, N_real)`` vectors of each); torch-fidelity's ``prc_features_to_metric``.

Both take ``(N, D)`` tensors. Real vectors come from the real-statistics cache
(``GaussianStats.features``, a uniform random sample), generated ones from
:class:`~diffsweep.metrics.metric.FeatureBank`.
"""
from __future__ import annotations

from torch import Tensor


def _check(fake: Tensor, real: Tensor, minimum: int, what: str) -> None:
    if fake.dim() != 2 or real.dim() != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"{what} needs (N, D) features of one width, got {tuple(fake.shape)} "
                         f"and {tuple(real.shape)}.")
    if min(fake.shape[0], real.shape[0]) < minimum:
        raise ValueError(f"{what} needs at least {minimum} generated and real feature vectors, got "
                         f"{fake.shape[0]} and {real.shape[0]}.")


def kernel_inception_distance(fake: Tensor, real: Tensor, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID over ``subsets`` random subsets of ``min(subset_size, N_fake, N_real)``
    vectors of each set (the subsets are drawn from ``seed``)."""
    from torch_fidelity.metric_kid import (
        KEY_METRIC_KID_MEAN,
        KEY_METRIC_KID_STD,
        kid_features_to_metric,
    )

    _check(fake, real, 2, "KID")
    size = int(min(subset_size, fake.shape[0], real.shape[0]))
    result = kid_features_to_metric(fake.double().cpu(), real.double().cpu(),
                                    kid_subsets=int(subsets), kid_subset_size=size,
                                    rng_seed=int(seed), verbose=False)
    return float(result[KEY_METRIC_KID_MEAN]), float(result[KEY_METRIC_KID_STD])


def precision_recall(fake: Tensor, real: Tensor, neighborhood: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
    """(precision, recall) with k = ``neighborhood`` nearest-neighbour radii, on the first
    ``min(N_fake, N_real)`` vectors of each set."""
    from torch_fidelity.metric_prc import (
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    _check(fake, real, int(neighborhood) + 1, "Precision/recall")
    count = int(min(fake.shape[0], real.shape[0]))
    result = prc_features_to_metric(fake[:count].float(), real[:count].float().to(fake.device),
                                    prc_neighborhood=int(neighborhood),
                                    prc_batch_size=int(batch_size), save_cpu_ram=False,
                                    verbose=False)
    return float(result[KEY_METRIC_PRECISION]), float(result[KEY_METRIC_RECALL])


__all__ = ["kernel_inception_distance", "precision_recall"]
