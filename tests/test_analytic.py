"""The Gaussian-mixture test bed is exact: denoiser, score, marginal, ODE solver, distances."""

from __future__ import annotations

import math

import pytest
import torch

from diffsweep.analytic import (
    GaussianMixture,
    gaussian_frechet_distance,
    mmd_to_mixture,
    rms_error,
    sliced_wasserstein,
)

pytestmark = pytest.mark.usefixtures("single_thread")




@pytest.fixture
def mixture_1d() -> GaussianMixture:
    return GaussianMixture(torch.tensor([0.2, 0.5, 0.3]), torch.tensor([[-2.0], [0.5], [3.0]]),
                           torch.tensor([0.3, 0.1, 0.6]))


@pytest.fixture
def mixture_3d() -> GaussianMixture:
    """Diagonal (anisotropic) components: exercises the (K, d) variance path."""
    gen = torch.Generator().manual_seed(3)
    means = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 1.5
    variances = 0.05 + torch.rand(4, 3, generator=gen, dtype=torch.float64)
    return GaussianMixture(torch.tensor([1.0, 2.0, 3.0, 4.0]), means, variances)


def test_constructor_validates_shapes() -> None:
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.ones(2), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.ones(3), torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 2), torch.tensor([1.0, 0.0]))
    ring = GaussianMixture.ring(8, radius=1.0, std=0.1)
    assert (ring.dim, ring.num_components) == (2, 8)
    torch.testing.assert_close(ring.variances, torch.full((8, 2), 0.01, dtype=torch.float64))


def test_denoiser_matches_monte_carlo_posterior_mean(mixture_1d: GaussianMixture) -> None:
    """E[x0 | x~] by importance weighting exact prior samples with the Gaussian likelihood."""
    gen = torch.Generator().manual_seed(0)
    x0 = mixture_1d.sample(400_000, gen)[:, 0]
    for sigma in (0.3, 1.0, 2.5):
        x_tilde = torch.tensor([[-2.5], [-0.7], [0.4], [1.8], [4.0]], dtype=torch.float64)
        log_lik = -0.5 * ((x_tilde - x0[None]) / sigma) ** 2  # (5, n)
        weights = torch.softmax(log_lik, dim=1)
        monte_carlo = (weights * x0[None]).sum(1)
        ess = 1 / weights.pow(2).sum(1)
        posterior_std = (weights * (x0[None] - monte_carlo[:, None]) ** 2).sum(1).sqrt()
        # standard error of a self-normalised estimate ~ posterior std / sqrt(ESS)
        tolerance = 5 * posterior_std / ess.sqrt()
        exact = mixture_1d(x_tilde, sigma)[:, 0]
        assert ((exact - monte_carlo).abs() < tolerance).all(), (sigma, exact, monte_carlo,
                                                                 tolerance)
        assert float(tolerance.max()) < 0.05  # the check has teeth


def test_denoiser_limits(mixture_3d: GaussianMixture) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64) * 3
    torch.testing.assert_close(mixture_3d(x, 0.0), x, rtol=0, atol=1e-14)
    torch.testing.assert_close(mixture_3d(x, 1e-4), x, rtol=0, atol=1e-6)
    big = 1e7
    x_big = x * big
    expected = mixture_3d.mean().expand(16, 3)
    torch.testing.assert_close(mixture_3d(x_big, big), expected, rtol=0, atol=1e-5)


def test_denoiser_shapes_dtypes_and_per_row_sigma(mixture_3d: GaussianMixture) -> None:
    """Image-shaped x~ is flattened; sigma~ may be per row; the caller's dtype comes back."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    sigmas = torch.tensor([0.1, 0.5, 1.0, 2.0, 8.0], dtype=torch.float64)
    per_row = mixture_3d(x, sigmas)
    one_by_one = torch.cat([mixture_3d(x[i:i + 1], float(sigmas[i])) for i in range(5)])
    torch.testing.assert_close(per_row, one_by_one, rtol=0, atol=1e-14)
    image_shaped = mixture_3d(x.reshape(5, 3, 1, 1).float(), sigmas.float())
    assert image_shaped.shape == (5, 3, 1, 1) and image_shaped.dtype == torch.float32
    torch.testing.assert_close(image_shaped.reshape(5, 3).double(), per_row, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="3-dimensional"):
        mixture_3d(torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        mixture_3d(x, torch.ones(4))


@pytest.mark.parametrize("sigma", [0.05, 0.4, 1.0, 5.0])
def test_tweedie_score_matches_autograd_of_log_marginal(mixture_3d: GaussianMixture,
                                                        sigma: float) -> None:
    gen = torch.Generator().manual_seed(4)
    x = mixture_3d.sample(32, gen, sigma=sigma).requires_grad_(True)
    (autograd_score,) = torch.autograd.grad(mixture_3d.log_prob(x, sigma).sum(), x)
    x = x.detach()
    tweedie = (mixture_3d(x, sigma) - x) / sigma**2
    torch.testing.assert_close(autograd_score, tweedie, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mixture_3d.score(x, sigma), tweedie, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mixture_3d.ode_velocity(x, sigma),
                               (x - mixture_3d(x, sigma)) / sigma, rtol=1e-9, atol=1e-9)


def test_log_prob_is_the_convolved_marginal(mixture_1d: GaussianMixture) -> None:
    """log p_sigma integrates to 1 and matches a histogram of x0 + sigma * eps samples."""
    sigma = 0.7
    grid = torch.linspace(-12, 14, 20001, dtype=torch.float64)[:, None]
    density = mixture_1d.log_prob(grid, sigma).exp()
    assert abs(float(torch.trapezoid(density, grid[:, 0])) - 1) < 1e-9
    samples = mixture_1d.sample(200_000, torch.Generator().manual_seed(5), sigma=sigma)[:, 0]
    edges = torch.linspace(-4, 5, 19, dtype=torch.float64)
    counts = torch.histc(samples, bins=18, min=-4, max=5) / samples.numel()
    centers = (edges[:-1] + edges[1:]) / 2
    expected = mixture_1d.log_prob(centers[:, None], sigma).exp() * (edges[1] - edges[0])
    assert (counts - expected).abs().max() < 0.004  # bin midpoint rule + sampling noise


def test_exact_moments_and_responsibilities(mixture_3d: GaussianMixture) -> None:
    samples = mixture_3d.sample(400_000, torch.Generator().manual_seed(6))
    torch.testing.assert_close(samples.mean(0), mixture_3d.mean(), rtol=0, atol=0.01)
    torch.testing.assert_close(torch.cov(samples.T), mixture_3d.covariance(), rtol=0, atol=0.02)
    resp = mixture_3d.responsibilities(samples[:100], 0.5)
    torch.testing.assert_close(resp.sum(1), torch.ones(100, dtype=torch.float64))


@pytest.mark.slow  # > 5 s: runs in .ci/run's slow step
def test_probability_flow_is_converged_and_transports_marginals() -> None:
    """The reference ODE solution: step-converged, and it maps p_sigma_max to the data."""
    mixture = GaussianMixture.ring(8, radius=1.0, std=0.15)
    gen = torch.Generator().manual_seed(7)
    x_start = mixture.sample(64, gen, sigma=40.0)
    fine = mixture.probability_flow(x_start, 40.0, 0.0, steps_per_unit_log_sigma=400)
    default = mixture.probability_flow(x_start, 40.0, 0.0)
    assert rms_error(default, fine) < 1e-9
    # sigma_end > 0 stops there; continuing from there reaches the same end point.
    middle = mixture.probability_flow(x_start, 40.0, 0.3)
    torch.testing.assert_close(mixture.probability_flow(middle, 0.3, 0.0), default, rtol=0,
                               atol=1e-8)
    # Distributional: the flow of exact marginal samples is distributed as the data.
    x_start = mixture.sample(2000, gen, sigma=40.0)
    flowed = mixture.probability_flow(x_start, 40.0, 0.0, steps_per_unit_log_sigma=50)
    assert abs(mmd_to_mixture(flowed, mixture, bandwidth=0.2)) < 2e-3
    shrunk = mixture.mean() + 0.8 * (flowed - mixture.mean())
    assert mmd_to_mixture(shrunk, mixture, bandwidth=0.2) > 2e-2


def test_distances_are_zero_for_truth_and_positive_for_wrong_samples() -> None:
    mixture = GaussianMixture.ring(8, radius=1.0, std=0.1)
    gen = torch.Generator().manual_seed(8)
    truth = mixture.sample(4000, gen)
    other_truth = mixture.sample(4000, gen)
    blurred = truth + 0.1 * torch.randn(truth.shape, generator=gen, dtype=torch.float64)
    mean, cov = mixture.mean(), mixture.covariance()
    assert gaussian_frechet_distance(truth, mean, cov) < 2e-3
    assert gaussian_frechet_distance(1.1 * truth, mean, cov) > 1e-2  # sees scale, not blur
    assert abs(mmd_to_mixture(truth, mixture, 0.1)) < 5e-4  # floor ~1e-4 at n = 4000
    assert mmd_to_mixture(blurred, mixture, 0.1) > 2e-3  # ~4e-3
    assert sliced_wasserstein(truth, other_truth, generator=gen) < 0.06  # floor ~0.035
    assert sliced_wasserstein(1.3 * truth, other_truth, generator=gen) > 0.15
    # MMD's data-side terms are exact: compare with a sample-based V-statistic on a small case.
    a = mixture.sample(300, gen)
    b = mixture.sample(3000, gen)
    h2 = 0.3**2

    def kernel_mean(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.exp(-torch.cdist(u, v) ** 2 / (2 * h2)).mean()

    kaa = torch.exp(-torch.cdist(a, a) ** 2 / (2 * h2))
    sampled = (kaa.sum() - 300) / (300 * 299) - 2 * kernel_mean(a, b) + kernel_mean(b, b)
    assert abs(mmd_to_mixture(a, mixture, 0.3) - float(sampled)) < 2e-3
    assert math.isclose(rms_error(truth, truth), 0.0)
