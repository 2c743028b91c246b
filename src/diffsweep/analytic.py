"""Gaussian-mixture data with its exact denoiser: a test bed for samplers and schedules.

For data ``x0 ~ sum_k w_k N(mu_k, diag(v_k))`` and ``x~ = x0 + sigma~ eps`` everything a sampler
needs is available in closed form (all in sigma-space, see :mod:`diffsweep.schedules`):

- the marginal ``p_sigma = sum_k w_k N(mu_k, diag(v_k + sigma^2))``
  (:meth:`GaussianMixture.log_prob`, :meth:`GaussianMixture.sample` with ``sigma > 0``), from which
  the exact initial noise at ``sigma_max`` is drawn;
- the responsibilities ``r_k(x~) = w_k N(x~; mu_k, v_k + sigma^2) / p_sigma(x~)`` (via logsumexp);
- the exact denoiser
  ``D(x~, sigma) = E[x0 | x~] = sum_k r_k (mu_k + v_k / (v_k + sigma^2) (x~ - mu_k))``;
- the score ``grad log p_sigma = -sum_k r_k (x~ - mu_k) / (v_k + sigma^2) = (D - x~) / sigma^2``
  (Tweedie);
- the probability-flow ODE ``dx~/dsigma = (x~ - D) / sigma = -sigma * score``, written in the second
  form so that it is finite down to ``sigma = 0``, and a high-accuracy float64 solver for it
  (:meth:`GaussianMixture.probability_flow`): the exact target a deterministic sampler
  approximates, starting from the same ``x~_T``.

Distribution distances between samples and the mixture: :func:`gaussian_frechet_distance`
(moments only, against the exact mean and covariance), :func:`mmd_to_mixture` (Gaussian-kernel
MMD^2 whose data-side terms are computed in closed form) and :func:`sliced_wasserstein`
(between two sample sets).

Shapes: ``d`` is the data dimension, ``K`` the number of components, ``B`` a batch. Parameters are
held in float64; the denoiser computes in float64 and returns the caller's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GaussianMixture",
    "gaussian_frechet_distance",
    "mmd_to_mixture",
    "sliced_wasserstein",
    "rms_error",
]


def _sigma_per_row(sigma: Tensor | float, batch_size: int, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """sigma~ as shape (B,) in ``dtype``; accepts a Python float, a scalar tensor or shape (B,)."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=device)
    if sigma.ndim == 0:
        return sigma.expand(batch_size)
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != batch_size:
        raise ValueError(f"sigma must be a scalar or have shape ({batch_size},), "
                         f"got shape {tuple(sigma.shape)}.")
    return sigma


class GaussianMixture:
    """``sum_k w_k N(mu_k, diag(v_k))`` in ``d`` dimensions, with its exact sigma-space denoiser.

    Args:
        weights: (K,) positive mixture weights (normalised here).
        means: (K, d) component means.
        variances: per-component variances, positive: a scalar (same isotropic variance for all),
            (K,) (isotropic per component) or (K, d) (diagonal).

    Calling the mixture is the denoiser: ``mixture(x~, sigma~) -> x0_hat`` (see :meth:`denoise`),
    so it plugs into every sampler of :mod:`diffsweep.samplers` as is.
    """

    def __init__(self, weights: Tensor, means: Tensor, variances: Tensor | float) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}.")
        num_components, dim = means.shape
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape[0] != num_components or bool((weights <= 0).any()):
            raise ValueError(f"weights must be {num_components} positive numbers, got {weights}.")
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if variances.ndim == 0:
            variances = variances.expand(num_components, dim)
        elif variances.ndim == 1 and variances.shape[0] == num_components:
            variances = variances[:, None].expand(num_components, dim)
        elif variances.shape != (num_components, dim):
            raise ValueError(f"variances must be a scalar, ({num_components},) or "
                             f"({num_components}, {dim}), got {tuple(variances.shape)}.")
        if bool((variances <= 0).any()):
            raise ValueError("variances must be positive (use a tiny variance for a point mass).")
        #: (K,) normalised weights.
        self.weights = weights / weights.sum()
        #: (K, d) component means.
        self.means = means.clone()
        #: (K, d) diagonal component variances.
        self.variances = variances.clone().contiguous()
        self._log_weights = self.weights.log()

    # ------------------------------------------------------------------ constructors

    @classmethod
    def ring(cls, num_modes: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
        """``num_modes`` equal-weight isotropic modes of std ``std`` evenly spaced
        on a 2-D circle."""
        angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls(torch.ones(num_modes), means, std**2)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        """Data dimension d."""
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        """Number of components K."""
        return self.means.shape[0]

    def mean(self) -> Tensor:
        """Exact data mean, (d,) float64."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Exact data covariance ``sum_k w_k (diag(v_k) + mu_k mu_k^T) - m m^T``, (d, d) float64."""
        mean = self.mean()
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + torch.diag(self.weights @ self.variances)
        return second - torch.outer(mean, mean)

    # ------------------------------------------------------------------ sampling and density

    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               sigma: float = 0.0) -> Tensor:
        """Draw ``num_samples`` from the marginal at ``sigma`` (the data for ``sigma = 0``).

        ``x~ = x0 + sigma * eps``: the mixture convolved with ``N(0, sigma^2 I)``, i.e. the exact
        distribution of ``x~`` a sampler should start from at ``sigmas[0]``. Returns
        (num_samples, d) float64. Deterministic given ``generator``'s state (it draws the
        component indices, then the component noise, then the diffusion noise).
        """
        components = torch.multinomial(self.weights, num_samples, replacement=True,
                                       generator=generator)
        noise = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        x0 = self.means[components] + self.variances[components].sqrt() * noise
        if sigma == 0:
            return x0
        eps = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64)
        return x0 + sigma * eps

    def _component_terms(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For x (B, d) float64 and sigma (B,): ``(x - mu_k, v_k + sigma^2, log w_k N_k(x))``.

        Shapes (B, K, d), (B, K, d), (B, K).
        """
        diff = x[:, None, :] - self.means[None]
        total_var = self.variances[None] + (sigma**2)[:, None, None]
        log_normal = -0.5 * (diff**2 / total_var + torch.log(2 * math.pi * total_var)).sum(-1)
        return diff, total_var, self._log_weights[None] + log_normal

    def _flatten(self, x: Tensor) -> Tensor:
        """(B, ...) with prod(...) == d -> (B, d) float64."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x has {flat.shape[1]} values per sample (shape {tuple(x.shape)}), "
                             f"but the mixture is {self.dim}-dimensional.")
        return flat

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """``log p_sigma(x~)`` for x~ of shape (B, ...) (prod(...) = d): returns (B,) float64.

        Differentiable in ``x`` (used for the Tweedie check against :meth:`score`).
        """
        flat = self._flatten(x)
        sigma_b = _sigma_per_row(sigma, flat.shape[0], torch.float64, flat.device)
        _, _, log_joint = self._component_terms(flat, sigma_b)
        return torch.logsumexp(log_joint, dim=1)

    def responsibilities(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Posterior component probabilities ``p(k | x~)`` at ``sigma``: (B, K) float64,
        rows sum to 1."""
        flat = self._flatten(x)
        sigma_b = _sigma_per_row(sigma, flat.shape[0], torch.float64, flat.device)
        _, _, log_joint = self._component_terms(flat, sigma_b)
        return torch.softmax(log_joint, dim=1)

    # ------------------------------------------------------------------ denoiser, score, ODE

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """The exact denoiser ``E[x0 | x~ = x0 + sigma~ eps]``.

        Args:
            x: x~ of shape (B, ...) with prod(...) = d (image-shaped tensors are flattened).
            sigma: sigma~ >= 0, a float, a scalar tensor or shape (B,).

        Returns:
            x0_hat with the shape and dtype of ``x`` (computed in float64). ``sigma = 0`` returns x.
        """
        flat = self._flatten(x)
        sigma_b = _sigma_per_row(sigma, flat.shape[0], torch.float64, flat.device)
        diff, total_var, log_joint = self._component_terms(flat, sigma_b)
        resp = torch.softmax(log_joint, dim=1)
        # Per-component posterior mean mu_k + v_k / (v_k + s^2) (x - mu_k) = x - s^2/(v_k+s^2)
        # (x-mu_k).
        shrink = (sigma_b**2)[:, None, None] / total_var
        posterior_means = flat[:, None, :] - shrink * diff
        x0 = (resp[:, :, None] * posterior_means).sum(1)
        return x0.reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``grad_x log p_sigma(x~) = -sum_k r_k (x~ - mu_k) / (v_k + sigma^2)``;
        shape and dtype of x."""
        flat = self._flatten(x)
        sigma_b = _sigma_per_row(sigma, flat.shape[0], torch.float64, flat.device)
        diff, total_var, log_joint = self._component_terms(flat, sigma_b)
        resp = torch.softmax(log_joint, dim=1)
        score = -(resp[:, :, None] * diff / total_var).sum(1)
        return score.reshape(x.shape).to(x.dtype)

    def ode_velocity(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Probability-flow ODE ``dx~/dsigma~ = (x~ - D(x~, sigma~)) / sigma~ = -sigma~ * score``.

        The score form is finite (and 0) at ``sigma = 0``. Shape and dtype of x.
        """
        flat = self._flatten(x)
        sigma_b = _sigma_per_row(sigma, flat.shape[0], torch.float64, flat.device)
        return (-sigma_b[:, None] * self._flatten(self.score(flat, sigma_b))).reshape(
            x.shape).to(x.dtype)

    @torch.no_grad()
    def probability_flow(self, x: Tensor, sigma_start: float, sigma_end: float = 0.0,
                         steps_per_unit_log_sigma: int = 200,
                         final_linear_steps: int = 32) -> Tensor:
        """Solve the probability-flow ODE from ``sigma_start`` to ``sigma_end`` to high accuracy.

        Classic RK4 in ``u = log sigma`` (``dx/du = -sigma^2 score``) with
        ``steps_per_unit_log_sigma`` steps per unit of u down to ``sigma_switch =
        max(sigma_end, 0.02 * sqrt(min variance))``; if ``sigma_end < sigma_switch`` the rest is
        RK4 linear in sigma (``dx/dsigma = -sigma score``, smooth down to 0) with
        ``final_linear_steps`` steps. All in float64. With the defaults the error on mixtures of
        unit scale is ~1e-11 (halving the step changes the result by less than that; see
        tests/test_analytic.py).

        Args:
            x: x~ at ``sigma_start``, shape (B, ...) with prod(...) = d.
            sigma_start: starting noise level (> sigma_end).
            sigma_end: target noise level (0 = the data end, the sample a sampler should return).

        Returns:
            x~ at ``sigma_end``, float64, shape of x.
        """
        if not sigma_start > sigma_end >= 0:
            raise ValueError(f"Need sigma_start > sigma_end >= 0, got {sigma_start}, {sigma_end}.")
        state = self._flatten(x).clone()
        sigma_switch = max(sigma_end, min(sigma_start, 0.02 * float(self.variances.min().sqrt())))

        def du(state: Tensor, log_sigma: float) -> Tensor:
            sigma = math.exp(log_sigma)
            return -(sigma**2) * self.score(state, sigma)

        if sigma_start > sigma_switch:
            u_start, u_end = math.log(sigma_start), math.log(sigma_switch)
            num = max(8, math.ceil((u_start - u_end) * steps_per_unit_log_sigma))
            state = _rk4(du, state, u_start, u_end, num)
        if sigma_end < sigma_switch:
            def ds(state: Tensor, sigma: float) -> Tensor:
                return -sigma * self.score(state, sigma)

            state = _rk4(ds, state, sigma_switch, sigma_end, final_linear_steps)
        return state.reshape(x.shape)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, d={self.dim})"


def _rk4(velocity, state: Tensor, t_start: float, t_end: float, num_steps: int) -> Tensor:
    """Classic 4th-order Runge-Kutta for ``dstate/dt = velocity(state, t)`` on a uniform grid."""
    h = (t_end - t_start) / num_steps
    for i in range(num_steps):
        t = t_start + i * h
        k1 = velocity(state, t)
        k2 = velocity(state + 0.5 * h * k1, t + 0.5 * h)
        k3 = velocity(state + 0.5 * h * k2, t + 0.5 * h)
        k4 = velocity(state + h * k3, t + h)
        state = state + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return state


# --------------------------------------------------------------------------- distances


def rms_error(samples: Tensor, reference: Tensor) -> float:
    """Root-mean-square per-sample Euclidean error ``sqrt(mean_b |x_b - ref_b|^2)``
    (paired rows)."""
    diff = samples.reshape(samples.shape[0], -1).double() - reference.reshape(
        reference.shape[0], -1).double()
    return float(diff.pow(2).sum(1).mean().sqrt())


def gaussian_frechet_distance(samples: Tensor, mean: Tensor, covariance: Tensor) -> float:
    """Fréchet distance between ``N(sample mean, sample cov)`` and ``N(mean, covariance)``.

    ``|m1 - m2|^2 + tr(C1 + C2 - 2 (C2^1/2 C1 C2^1/2)^1/2)`` (the FID formula, on raw coordinates,
    computed by :func:`diffsweep.metrics.frechet.frechet_distance`). ``samples`` (n, d); ``mean``
    (d,), ``covariance`` (d, d), e.g. a mixture's exact :meth:`GaussianMixture.mean` /
    :meth:`GaussianMixture.covariance`. Sees only two moments.
    """
    from diffsweep.metrics.frechet import frechet_distance

    flat = samples.reshape(samples.shape[0], -1).double()
    sample_cov = torch.cov(flat.T).reshape(flat.shape[1], flat.shape[1])
    return float(frechet_distance(mean, covariance, flat.mean(0), sample_cov))


def mmd_to_mixture(samples: Tensor, mixture: GaussianMixture, bandwidth: float) -> float:
    """Unbiased squared MMD between ``samples`` and the mixture, Gaussian kernel
    of width ``bandwidth``.

    ``k(x, y) = exp(-|x - y|^2 / (2 h^2))``. The two terms involving the mixture are exact
    (Gaussian integrals); only ``E k(x, x')`` over the samples is estimated (U-statistic), so for
    exact samples the estimate is unbiased around 0 with standard deviation ~ 1/n, and it can be
    slightly negative. ``samples`` (n, d) with n >= 2; returns MMD^2 (a float).
    """
    x = samples.reshape(samples.shape[0], -1).double()
    n, dim = x.shape
    if n < 2:
        raise ValueError("mmd_to_mixture needs at least 2 samples.")
    h2 = bandwidth**2
    # E_q k(x, x'), x != x'
    kxx = torch.cdist(x, x)  # (n, n), overwritten in place by the kernel values
    kxx.square_().mul_(-0.5 / h2).exp_()
    term_qq = (kxx.sum() - n) / (n * (n - 1))  # drop the diagonal, k(x, x) = 1
    # E_{y~p} k(x, y) = sum_k w_k prod_j sqrt(h2 / (h2 + v_kj)) exp(-(x_j - mu_kj)^2 / (2 (h2 +
    # v_kj)))
    var = mixture.variances[None] + h2
    log_terms = (0.5 * torch.log(h2 / var) - (x[:, None, :] - mixture.means[None]) ** 2
                 / (2 * var)).sum(-1)
    term_qp = torch.exp(log_terms + mixture._log_weights[None]).sum(1).mean()
    # E_{y,y'~p} k(y, y'): component pairs with variance v_k + v_l + h2.
    var_pair = mixture.variances[:, None, :] + mixture.variances[None, :, :] + h2
    diff_pair = mixture.means[:, None, :] - mixture.means[None, :, :]
    log_pair = (0.5 * torch.log(h2 / var_pair) - diff_pair**2 / (2 * var_pair)).sum(-1)
    term_pp = (torch.outer(mixture.weights, mixture.weights) * log_pair.exp()).sum()
    return float(term_qq - 2 * term_qp + term_pp)


def sliced_wasserstein(samples_a: Tensor, samples_b: Tensor, num_projections: int = 256,
                       generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance between two equal-size sample sets (n, d).

    ``sqrt(mean over random unit directions of W2^2 of the 1-D projections)``; 1-D W2 from sorted
    projections. Has a finite-sample floor ~ n^-1/2 even for two samples of the same law.
    """
    a = samples_a.reshape(samples_a.shape[0], -1).double()
    b = samples_b.reshape(samples_b.shape[0], -1).double()
    if a.shape != b.shape:
        raise ValueError(f"sample sets must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    directions = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    proj_a = (a @ directions).sort(0).values
    proj_b = (b @ directions).sort(0).values
    return float((proj_a - proj_b).pow(2).mean().sqrt())
