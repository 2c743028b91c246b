"""Samplers: short functions over a denoiser in sigma-space (k-diffusion style).

Every sampler has the signature ``fn(denoiser, x, sigmas, generator=None, **options) -> x0`` where

- ``denoiser(x~, sigma~) -> x0_hat`` (see :mod:`diffsweep.denoiser`),
- ``x`` is the starting point ``x~_T`` at ``sigmas[0]`` (shape (B, ...), the model's dtype),
- ``sigmas`` is a decreasing float64 grid ending at 0 (see :mod:`diffsweep.grids`),
- ``generator`` drives all noise a stochastic sampler draws (on ``x.device``).

The result is the sample at sigma~ = 0, i.e. in data space for every schedule (on a grid that stops
above 0, the sample x~ at ``sigmas[-1]``). Samplers never convert prediction types; that happens
in the denoiser.

Zero-length steps. A grid may repeat a value (diffusers' ``final_sigmas_type="sigma_min"`` grids
repeat their last sigma; hand-built grids; timesteps rounded to integers): the step between equal
values has zero length. Every sampler skips it (no network call, no noise, no entry in a multistep
history), with one exception: UniPC's final corrector. So a grid with repeats samples exactly
(bitwise) as the same grid with the repeats removed, with that grid's NFE, except that on a grid
ending in a repeated value ``s > 0`` after a step that moves, UniPC evaluates the net at ``s`` and
applies UniC to the step that ended there: one more evaluation, as diffusers does
(:func:`sample_unipc`). :meth:`SamplerMethod.nfe_on` counts exactly the evaluations made. The grids
of :mod:`diffsweep.grids` never repeat; :func:`diffsweep.grids.check_sigma_grid` refuses an
increase.

What diffusers 0.42 does on a zero-length step ("same": the sample ours gives, checked by
tests/test_samplers_conformance.py on a grid whose last sigma is repeated):

- Euler, Heun, DPM-Solver++ 2M and 2M SDE: it evaluates the net and moves by zero (the factors
  ``sigma_next - sigma`` and ``expm1(-h)`` vanish; the SDE noise gets std 0): same, with one
  wasted evaluation (Heun: two). On a repeat mid-grid Euler and Heun are the same too, while
  DPM-Solver++'s next second-order step divides by the zero step (``r = h_prev / h``): NaN.
- UniPC: on a repeated final sigma (``use_karras_sigmas`` with ``final_sigmas_type="sigma_min"``)
  it evaluates the net and corrects the last step: same, with the same NFE. On a repeat mid-grid
  its next corrector returns NaN at order >= 2.
- Euler ancestral, LMS: diffusers' API never builds such a grid; their step on a grid whose last
  sigma is repeated (sigmas set by hand) moves by zero (``sigma_up = 0``; LMS weights integrate
  over an empty interval): same. LMS on a repeat mid-grid: NaN (its Lagrange basis divides by the
  zero step).
- DDIM, DDPM: diffusers has no zero-length step (DDIM steps from t to ``t - N // n``; DDPM refuses
  custom timesteps that do not decrease); ours skip it as Euler and ancestral sampling do.

Predicted-x0 clipping (``ddim``, ``ddpm``): ``clip_sample`` and dynamic ``thresholding`` act on
x0_hat exactly as diffusers' ``DDIMScheduler``/``DDPMScheduler`` do (:class:`X0Clipping`); x0 is the
same in x-space and sigma~-space (``x~ = x_t / alpha = x0 + sigma~ eps``), so the operation carries
over unchanged. It enters the step in one place, :func:`_ddim_steps`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from numbers import Real

import numpy as np
import torch
from torch import Tensor

from diffsweep.denoiser import DenoiserFn
from diffsweep.grids import check_num_steps, check_sigma_grid, check_spacing, sigma_grid
from diffsweep.schedules import NoiseSchedule

SamplerFn = Callable[..., Tensor]


def _noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like x, drawn in float32 when x is float64 (then upcast).

    Drawing in the model's dtype keeps the random stream independent of the state precision (and
    equal to diffusers' ``randn_tensor`` for the same generator).
    """
    dtype = torch.float32 if x.dtype == torch.float64 else x.dtype
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
    return noise.to(x.dtype)


def _denoise(denoiser: DenoiserFn, x: Tensor, sigma: float) -> Tensor:
    """``x0_hat`` at the scalar noise level ``sigma`` in x's dtype."""
    return denoiser(x, torch.tensor(sigma, dtype=torch.float64)).to(x.dtype)


def to_d(x: Tensor, sigma: float, x0: Tensor) -> Tensor:
    """The probability-flow ODE derivative ``dx~/dsigma~ = (x~ - x0_hat) / sigma~``."""
    return (x - x0) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part to ``sigma_down`` and fresh noise ``sigma_up``.

    ``sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2))``,
    ``sigma_down = sqrt(sigma_to^2 - sigma_up^2)``. In sigma-space this is exactly DDIM's
    ``sigma_t(eta)`` (Song et al. 2021, eq. 16); ``eta = 1`` is DDPM's posterior with the
    ``fixed_small`` variance.
    """
    if eta == 0 or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2)
                                             / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _check_eta(eta: float) -> None:
    if eta < 0:
        raise ValueError(f"sampler.eta must be >= 0 (0 = deterministic, 1 = DDPM/ancestral), "
                         f"got {eta}.")


def _steps(sigmas: Tensor) -> list[tuple[float, float]]:
    """``[(sigma_i, sigma_{i+1})]`` as Python floats (float64), zero-length steps left out.

    The one place a grid enters a sampler: it is checked (:func:`diffsweep.grids.check_sigma_grid`)
    and a repeated value's step ``(s, s)`` is dropped, so no sampler divides by a zero step length.
    """
    check_sigma_grid(sigmas)
    values = sigmas.tolist()
    return [(sigma, sigma_next) for sigma, sigma_next in zip(values[:-1], values[1:])
            if sigma_next < sigma]


@dataclass(frozen=True)
class X0Clipping:
    """What diffusers' ``DDPMScheduler``/``DDIMScheduler`` do to the predicted x0 (``step``, 4.).

    ``thresholding`` (dynamic thresholding, Saharia et al. 2022, Imagen): per sample, ``s`` = the
    ``dynamic_thresholding_ratio`` quantile of ``|x0|`` over all its elements, clamped to
    ``[1, sample_max_value]``; ``x0 <- clamp(x0, -s, s) / s``. Otherwise ``clip_sample``:
    ``x0 <- clamp(x0, -clip_sample_range, clip_sample_range)``. Thresholding takes precedence when
    both are on, as in diffusers. Neither on: the identity (:attr:`enabled` is False).
    """

    clip_sample: bool = False
    clip_sample_range: float = 1.0
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0

    def __post_init__(self) -> None:
        for name in ("clip_sample", "thresholding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"sampler.{name} must be true or false, "
                                 f"got {getattr(self, name)!r}.")
        if not _is_number(self.clip_sample_range) or not self.clip_sample_range > 0:
            raise ValueError(f"sampler.clip_sample_range must be > 0 (x0 is clamped to "
                             f"[-range, range]), got {self.clip_sample_range!r}.")
        ratio = self.dynamic_thresholding_ratio
        if not _is_number(ratio) or not 0 < ratio <= 1:
            raise ValueError(f"sampler.dynamic_thresholding_ratio must be in (0, 1] (the quantile "
                             f"of |x0| used as threshold), got {ratio!r}.")
        if not _is_number(self.sample_max_value) or not self.sample_max_value > 0:
            raise ValueError(f"sampler.sample_max_value must be > 0 (the largest threshold), "
                             f"got {self.sample_max_value!r}.")

    @classmethod
    def from_options(cls, options: dict) -> X0Clipping:
        """The clipping named by a sampler's keyword options (other keys are ignored)."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})

    @property
    def enabled(self) -> bool:
        return self.clip_sample or self.thresholding

    def __call__(self, x0: Tensor) -> Tensor:
        """The clipped x0, same shape and dtype as ``x0`` (B, ...)."""
        if self.thresholding:
            return dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        if self.clip_sample:
            return x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        return x0


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Imagen's dynamic thresholding of x0 (B, ...), as diffusers' ``_threshold_sample``.

    ``s = clamp(quantile(|x0_b|, ratio), 1, max_value)`` per sample b (over all its elements), then
    ``clamp(x0_b, -s, s) / s``; half precision is upcast to float32 for the quantile.
    """
    dtype = x0.dtype
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1)
    s = s.clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(dtype)


def _ddim_steps(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                generator: torch.Generator | None, eta: float,
                clipping: X0Clipping | None = None, eps_from_clipped: bool = True) -> Tensor:
    """The DDIM(eta) / ancestral update over a grid; the one place x0 clipping enters a step.

    ``x <- x0_c + (sigma_down / sigma) (x - x0_e) + sigma_up z`` with ``(sigma_down, sigma_up)``
    from :func:`ancestral_step`, ``x0_c = clipping(x0_hat)`` and ``x0_e`` the x0 the direction
    ``eps = (x - x0_e) / sigma`` is taken from: ``x0_c`` when ``eps_from_clipped`` (DDPM's
    posterior mean, which is affine in x0 and x_t; DDIM with ``use_clipped_model_output``), else the
    unclipped ``x0_hat`` (DDIM's default: the net's own eps). Without clipping both are ``x0_hat``:
    ``x0 + (sigma_down / sigma) (x - x0)``. One noise draw per step except the step to sigma~ = 0.
    A zero-length step is skipped (no evaluation, no noise draw): with ``sigma_next = sigma`` the
    update is ``x`` itself (``sigma_up = 0``, ``sigma_down = sigma``).
    """
    clip = clipping if clipping is not None and clipping.enabled else None
    for sigma, sigma_next in _steps(sigmas):
        x0 = _denoise(denoiser, x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if clip is None:
            x = x0 + (sigma_down / sigma) * (x - x0)
        else:
            x0_clipped = clip(x0)
            x = x0_clipped + (sigma_down / sigma) * (x - (x0_clipped if eps_from_clipped else x0))
        if sigma_up > 0:
            x = x + sigma_up * _noise_like(x, generator)
    return x


@torch.no_grad()
def sample_euler(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
    """Euler on the probability-flow ODE in sigma~; identical to DDIM with eta = 0.

    Written as ``x0 + (sigma_next / sigma) (x - x0)`` (DDIM's form), which rounds less than
    ``x + (sigma_next - sigma) d`` and is the same map. A zero-length step is skipped; diffusers'
    ``EulerDiscreteScheduler`` evaluates the net there and moves by ``dt = 0``: the same sample.
    """
    return _ddim_steps(denoiser, x, sigmas, generator, eta=0.0)


@torch.no_grad()
def sample_ancestral(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                     generator: torch.Generator | None = None, eta: float = 1.0) -> Tensor:
    """Euler to ``sigma_down``, then fresh noise of std ``sigma_up`` (see :func:`ancestral_step`).

    With ``eta = 1`` this is DDPM ancestral sampling (and diffusers' Euler ancestral); with
    ``0 <= eta <= 1`` it is DDIM(eta). One noise draw per step except the step to sigma~ = 0.
    A zero-length step is skipped (no evaluation, no noise draw); diffusers'
    ``EulerAncestralDiscreteScheduler`` step on one (a hand-set grid) moves by zero and adds noise
    of std ``sigma_up = 0``: the same sample.
    """
    _check_eta(eta)
    return _ddim_steps(denoiser, x, sigmas, generator, eta=eta)


@torch.no_grad()
def sample_ddim(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                generator: torch.Generator | None = None, eta: float = 0.0,
                clip_sample: bool = False, clip_sample_range: float = 1.0,
                thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                sample_max_value: float = 1.0, use_clipped_model_output: bool = False) -> Tensor:
    """DDIM (Song et al. 2021) in sigma-space: Euler for ``eta = 0``, ancestral otherwise.

    ``clip_sample``/``thresholding`` clip x0_hat each step (:class:`X0Clipping`) as diffusers'
    ``DDIMScheduler``: the step keeps the net's eps unless ``use_clipped_model_output``, which takes
    eps from the clipped x0 (GLIDE; diffusers' ``step(use_clipped_model_output=True)``).
    A zero-length step is skipped (diffusers' DDIM never takes one: it steps t -> t - N // n).
    """
    _check_eta(eta)
    clipping = X0Clipping(clip_sample, clip_sample_range, thresholding,
                          dynamic_thresholding_ratio, sample_max_value)
    _check_flag("use_clipped_model_output", use_clipped_model_output)
    return _ddim_steps(denoiser, x, sigmas, generator, eta=eta, clipping=clipping,
                       eps_from_clipped=use_clipped_model_output)


@torch.no_grad()
def sample_ddpm(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                generator: torch.Generator | None = None, eta: float = 1.0,
                clip_sample: bool = False, clip_sample_range: float = 1.0,
                thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                sample_max_value: float = 1.0) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020; ``fixed_small`` variance at ``eta = 1``).

    ``clip_sample``/``thresholding`` clip x0_hat each step (:class:`X0Clipping`) as diffusers'
    ``DDPMScheduler``, whose posterior mean ``c0 x0 + ct x_t`` then uses the clipped x0.
    A zero-length step is skipped (diffusers' DDPM refuses custom timesteps that repeat).
    """
    _check_eta(eta)
    clipping = X0Clipping(clip_sample, clip_sample_range, thresholding,
                          dynamic_thresholding_ratio, sample_max_value)
    return _ddim_steps(denoiser, x, sigmas, generator, eta=eta, clipping=clipping,
                       eps_from_clipped=True)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"sampler.{name} must be true or false, got {value!r}.")


#: Grid values at or above this sigma~ stand for the pole sigma~ = inf (2**24 ~ 1.7e7). From such a
#: point the net, which runs in float32, sees the pole itself: its input ``c_in x~ ~ x~ / sigma~ =
#: eps + x0 / sigma~`` holds the data below a float32 ulp. FlowMatchingSchedule's default
#: ``t_max = 1 - 1e-9`` (sigma~_max = k 1e9) represents t = 1 this way; every finite-range schedule
#: stays far below (cosine's table tops out at 2e4, zero terminal SNR at 4096, EDM at 80).
SIGMA_INFINITY = 2.0**24


def heun_plan(sigmas: Tensor, s_churn: float = 0.0, s_tmin: float = 0.0,
              s_tmax: float = float("inf")) -> list[tuple[float, float, float, bool]]:
    """The steps :func:`sample_heun` takes: ``(sigma, sigma_next, gamma, corrected)`` each.

    ``gamma`` is the churn of the step (``sigma_hat = sigma (1 + gamma)``); ``corrected`` says
    whether the step takes Heun's trapezoid (two evaluations) or stays an Euler step (one): Euler
    on a step that touches a pole of sigma~, to ``sigma_next = 0`` (EDM) or from ``sigma_hat >=``
    :data:`SIGMA_INFINITY`. Zero-length steps are left out (:func:`_steps`). The one description
    of the method's steps: the sampler and its NFE count (:func:`heun_nfe_on`) both read it.
    """
    steps = _steps(sigmas)
    plan = []
    for sigma, sigma_next in steps:
        gamma = (min(s_churn / len(steps), math.sqrt(2) - 1)
                 if s_churn > 0 and s_tmin <= sigma <= s_tmax else 0.0)
        sigma_hat = sigma * (1 + gamma)
        corrected = sigma_next > 0 and sigma_hat < SIGMA_INFINITY
        plan.append((sigma, sigma_next, gamma, corrected))
    return plan


@torch.no_grad()
def sample_heun(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                generator: torch.Generator | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> Tensor:
    """EDM Algorithm 2: Heun's 2nd-order method with optional churn; Euler to and from a pole.

    ``s_churn`` adds noise raising sigma by ``gamma = min(s_churn / num_steps, sqrt(2) - 1)``
    for sigma in ``[s_tmin, s_tmax]``; ``s_churn = 0`` is the deterministic Algorithm 1.

    Which steps are Euler steps, and why. With ``D`` the x0 prediction, ``d = (x~ - D) / sigma~``
    and ``r = sigma_hat / sigma_next``, Heun's step is exactly

        ``x_next = x / r + (1 - 1/r) (D_hat + (r / 2) (D_next - D_hat))``,

    while the exact step is ``x / r + (1 - 1/r) <D>`` with ``<D>`` an average of ``D`` along the
    path (weights ``sigma_next / (1 - 1/r) / sigma~^2``: a convex combination). Heun's trapezoid in
    sigma~ extrapolates the change of x0 by ``r / 2``; the Euler step (``<D> ~ D_hat``) never
    does. At the two poles of sigma~ the trapezoid has no limit: to ``sigma_next = 0`` the end
    derivative ``d_next`` is 0 / 0 (EDM and k-diffusion take the Euler step there), and from
    ``sigma_hat = inf`` (r = inf) the interval is unbounded: the correction
    ``((r - 1) / 2) (D_next - D_hat)`` grows without bound as the start approaches the pole,
    ``~ sigma_hat |dD| / (2 sigma_next)`` (errors 1e2-5e4 at 24-64 steps on flow's default grid,
    t_max = 1 - 1e-9, sigma~_max = k 1e9), while the Euler step from there tends to the exact
    limit ``D_inf + sigma_next eps`` (the first step of diffusers' FlowMatchEuler). So a step from
    a point at or above :data:`SIGMA_INFINITY`, which stands for the pole, is an Euler step too:
    the mirror image of EDM's last step. Its error, ``O(|dD|)`` with ``dD ~ 1 / sigma_next`` far
    above the data's scale, reaches x0 damped by another ``~1 / sigma_next``, so the method stays
    2nd order (measured 1.9-2.1 on flow grids, tests/test_flow.py). Every other step is EDM's,
    bit for bit: on grids below :data:`SIGMA_INFINITY` (every VP, VE and EDM grid; flow with
    ``k t_max / (1 - t_max) < 2**24``, e.g. ``t_max = 1 - 1/N``) this is EDM Algorithm 2
    unchanged. NFE: two per step, one on a step to 0 or from the pole: ``2 num_steps - 1`` below
    the pole, ``2 num_steps - 2`` on a flow grid from it (:func:`heun_nfe_on`,
    :meth:`Sampler.nfe_on`).

    A zero-length step is skipped (:func:`heun_plan`); diffusers' ``HeunDiscreteScheduler``
    (custom timesteps that repeat) evaluates the net twice there and moves by ``dt = 0``: the
    same sample.
    """
    for sigma, sigma_next, gamma, corrected in heun_plan(sigmas, s_churn, s_tmin, s_tmax):
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * _noise_like(x, generator)
        d = to_d(x, sigma_hat, _denoise(denoiser, x, sigma_hat))
        x_euler = x + (sigma_next - sigma_hat) * d
        if not corrected:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigma_next, _denoise(denoiser, x_euler, sigma_next))
            x = x + (sigma_next - sigma_hat) * (d + d_next) / 2
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                    generator: torch.Generator | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep in ``lambda = -log sigma~``.

    ``x <- r x + (1 - r) (x0 + (h / 2 h_prev) (x0 - x0_prev))`` with ``r = sigma_next / sigma``,
    ``h = log(sigma / sigma_next)``; first order (DDIM) on the first step and on the final step to
    sigma~ = 0, as diffusers' ``DPMSolverMultistepScheduler`` (``lower_order_final``) does.
    A zero-length step is skipped; diffusers evaluates the net on a repeated final sigma
    (``final_sigmas_type="sigma_min"``) and moves by ``expm1(-h) = 0``: the same sample.
    """
    x0_prev, h_prev = None, None
    for sigma, sigma_next in _steps(sigmas):
        x0 = _denoise(denoiser, x, sigma)
        if sigma_next == 0:
            return x0
        h, ratio = math.log(sigma / sigma_next), sigma_next / sigma
        direction = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
        x = ratio * x + (1 - ratio) * direction
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                        generator: torch.Generator | None = None, eta: float = 1.0,
                        s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(2M) SDE, midpoint solver type (diffusers ``sde-dpmsolver++``, k-diffusion).

    With ``e = exp(-(1 + eta) h)``: ``x <- r exp(-eta h) x + (1 - e) (x0 + (h / 2 h_prev) (x0 -
    x0_prev)) + sigma_next sqrt(1 - exp(-2 eta h)) s_noise z``. ``eta = 1`` is diffusers' solver,
    ``eta = 0`` is :func:`sample_dpmpp_2m`. First order on the first step; the step to 0 returns x0.
    A zero-length step is skipped (no evaluation, no noise draw); diffusers evaluates the net on a
    repeated final sigma and moves by zero, its noise scaled by 0: the same sample.
    """
    _check_eta(eta)
    x0_prev, h_prev = None, None
    for sigma, sigma_next in _steps(sigmas):
        x0 = _denoise(denoiser, x, sigma)
        if sigma_next == 0:
            return x0
        h = math.log(sigma / sigma_next)
        one_minus_e = -math.expm1(-(1 + eta) * h)
        direction = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)
        x = (sigma_next / sigma) * math.exp(-eta * h) * x + one_minus_e * direction
        if eta > 0:
            noise_std = sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise
            x = x + noise_std * _noise_like(x, generator)
        x0_prev, h_prev = x0, h
    return x


def _unipc_coefficients(h: float, rks: list[float], order: int, predictor: bool) -> list[float]:
    """UniPC-bh2 weights (Zhao et al. 2023; diffusers' ``multistep_uni_{p,c}_bh_update``).

    ``rks``: ``(lambda_k - lambda_s0) / h`` of the ``order - 1`` older points. Predictor: the
    weights of the ``order - 1`` divided differences (0.5 for order 2). Corrector: ``order``
    weights, the last one for the new evaluation (0.5 for order 1).
    """
    if predictor and order == 2:
        return [0.5]
    if not predictor and order == 1:
        return [0.5]
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = b_h / hh - 1
    factorial, b = 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    nodes = np.array(list(rks) + [1.0])
    matrix = np.stack([nodes ** (i - 1) for i in range(1, order + 1)])
    if predictor:
        return np.linalg.solve(matrix[:-1, :-1], np.array(b[:-1])).tolist()
    return np.linalg.solve(matrix, np.array(b)).tolist()


def _unipc_update(x: Tensor, sigma: float, sigma_next: float, history: list[tuple[float, Tensor]],
                  order: int, x0_new: Tensor | None = None) -> Tensor:
    """One UniPC-bh2 step from ``x`` at ``sigma`` (= history[-1]) to ``sigma_next``.

    ``history``: ``(lambda, x0)`` pairs, newest last, the newest at ``sigma``. Predictor when
    ``x0_new`` is None, else the corrector with the evaluation ``x0_new`` at ``sigma_next``.
    In sigma-space: ``x <- r x + (1 - r) (x0 + sum_k rho_k D_k)`` with ``r = sigma_next / sigma``.
    """
    ratio = sigma_next / sigma
    if sigma_next == 0:
        return history[-1][1]
    lambda_s0, x0 = history[-1]
    h = math.log(sigma / sigma_next)
    older = history[-order:-1][::-1]  # newest first: s1, s2, ...
    rks = [(lam - lambda_s0) / h for lam, _ in older]
    diffs = [(m - x0) / rk for rk, (_, m) in zip(rks, older)]
    rhos = _unipc_coefficients(h, rks, order, predictor=x0_new is None)
    if x0_new is not None:
        diffs.append(x0_new - x0)
    direction = x0
    for rho, diff in zip(rhos, diffs):
        direction = direction + rho * diff
    return ratio * x + (1 - ratio) * direction


@torch.no_grad()
def sample_unipc(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
                 generator: torch.Generator | None = None, order: int = 2) -> Tensor:
    """UniPC (Zhao et al. 2023), bh2, data prediction, as diffusers' ``UniPCMultistepScheduler``.

    Each step: evaluate x0 at the current point, correct the current point with it (UniC, reusing
    that evaluation; not on the first step), then predict the next point (UniP). The order warms
    up from 1 and drops near the end (``lower_order_final``): ``min(order, i + 1, num_steps - i)``;
    the step to sigma~ = 0 returns x0 and no corrector follows it. NFE = num_steps.

    Zero-length steps are skipped, except a repeated final value ``s > 0`` after a step that moves
    (:func:`unipc_has_final_corrector`; diffusers' grids with ``final_sigmas_type="sigma_min"``):
    that step evaluates x0 at ``s``, corrects the point the last step predicted with it (UniC, at
    that step's order) and returns the corrected point; its own predictor, over ``h = 0``, is the
    identity (in diffusers too: ``expm1(-h) = 0`` multiplies every term). It counts as a step for
    ``lower_order_final``, so the step before it keeps its order, and its evaluation counts in the
    NFE (num_steps = the grid's intervals). This is diffusers' ``UniPCMultistepScheduler`` on such
    a grid. Mid-grid a repeat changes nothing: the evaluation it would make at ``s`` is the one
    the next step makes anyway (diffusers returns NaN there at order >= 2).
    """
    _check_unipc_order(order)
    steps = _steps(sigmas)
    final_corrector = unipc_has_final_corrector(sigmas)
    num_steps = len(steps) + final_corrector
    history: list[tuple[float, Tensor]] = []
    x_last, last_order = x, 1
    for i, (sigma, sigma_next) in enumerate(steps):
        x0 = _denoise(denoiser, x, sigma)
        if history:
            x = _unipc_update(x_last, steps[i - 1][0], sigma, history, last_order, x0_new=x0)
        history = (history + [(-math.log(sigma), x0)])[-order:]
        last_order = min(order, i + 1, num_steps - i)
        x_last = x
        x = _unipc_update(x, sigma, sigma_next, history, last_order)
    if final_corrector:
        sigma_from, sigma = steps[-1]
        x = _unipc_update(x_last, sigma_from, sigma, history, last_order,
                          x0_new=_denoise(denoiser, x, sigma))
    return x


def unipc_has_final_corrector(sigmas: Tensor) -> bool:
    """Whether :func:`sample_unipc` ends with a corrector on ``sigmas``: the grid ends with a
    zero-length step at ``sigma~ > 0`` (its last value repeated) that follows a step that moves."""
    check_sigma_grid(sigmas)
    values = sigmas.tolist()
    return (len(values) >= 2 and values[-1] == values[-2] > 0
            and any(b < a for a, b in zip(values[:-1], values[1:])))


def _check_unipc_order(order: int) -> None:
    if order not in (2, 3):
        raise ValueError(f"sampler.order must be one of 2, 3 for unipc; got {order!r}.")


def lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Weight of the derivative ``j`` steps back in the ``order``-step LMS update from sigmas[i].

    ``int_{sigmas[i]}^{sigmas[i+1]} L_j(s) ds`` with
    ``L_j(s) = prod_{k != j} (s - sigmas[i-k]) / (sigmas[i-j] - sigmas[i-k])`` over ``k < order``:
    the Lagrange basis integrated exactly (Gauss-Legendre, ``order`` nodes).
    """
    nodes, weights = np.polynomial.legendre.leggauss(max(order, 1))
    lo, hi = sigmas[i], sigmas[i + 1]
    s = (hi - lo) / 2 * nodes + (hi + lo) / 2
    basis = np.ones_like(s)
    for k in range(order):
        if k != j:
            basis *= (s - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((hi - lo) / 2 * np.sum(weights * basis))


@torch.no_grad()
def sample_lms(denoiser: DenoiserFn, x: Tensor, sigmas: Tensor,
               generator: torch.Generator | None = None, order: int = 4) -> Tensor:
    """Linear multistep in sigma~ (k-diffusion / diffusers' ``LMSDiscreteScheduler``).

    ``x <- x + sum_j c_j d_{i-j}`` over the last ``min(i + 1, order)`` derivatives
    ``d = (x - x0) / sigma``, with ``c_j`` from :func:`lms_coefficient`. A zero-length step is
    skipped (its derivative does not enter the history); diffusers' ``LMSDiscreteScheduler`` step
    on a repeated final sigma (a hand-set grid) weights every derivative by an integral over an
    empty interval, 0: the same sample.
    """
    _check_lms_order(order)
    steps = _steps(sigmas)
    sigma_list = [sigma for sigma, _ in steps] + [sigma_next for _, sigma_next in steps[-1:]]
    derivatives: list[Tensor] = []
    for i, (sigma, _) in enumerate(steps):
        derivatives = (derivatives + [to_d(x, sigma, _denoise(denoiser, x, sigma))])[-order:]
        current = len(derivatives)
        for j, d in enumerate(reversed(derivatives)):
            x = x + lms_coefficient(sigma_list, i, current, j) * d
    return x


def _check_lms_order(order: int) -> None:
    if int(order) != order or order < 1:
        raise ValueError(f"sampler.order must be an integer >= 1 for lms (default 4), "
                         f"got {order!r}.")


def _one_per_moving_step(sigmas: Tensor, options: dict) -> int:
    """One evaluation per step that moves; zero-length steps make none (:func:`_steps`)."""
    return len(_steps(sigmas))


@dataclass(frozen=True)
class SamplerMethod:
    """A registered sampler: its function, NFE for a step count, and whether it draws noise.

    ``nfe(num_steps)`` is the count for ``num_steps`` steps on a grid of distinct values ending at
    0 below the pole sigma~ = inf (every grid of :mod:`diffsweep.grids` but flow's from the pole);
    ``evaluations(sigmas, options)`` counts the evaluations the sampler makes on a particular grid
    (:meth:`nfe_on`): none on a zero-length step, Heun one fewer on an Euler step from the pole
    (:func:`heun_plan`), UniPC one for its final corrector (:func:`unipc_has_final_corrector`).
    """

    fn: SamplerFn
    nfe: Callable[[int], int]
    stochastic: bool = False
    evaluations: Callable[[Tensor, dict], int] = _one_per_moving_step

    def nfe_on(self, sigmas: Tensor, options: dict | None = None) -> int:
        """Network evaluations on the grid ``sigmas`` with the sampler's ``options``."""
        return self.evaluations(sigmas, dict(options or {}))


def _one_per_step(num_steps: int) -> int:
    return num_steps


def _heun_nfe(num_steps: int) -> int:
    """Two evaluations a step, one on the Euler step to sigma~ = 0 (grids below the pole)."""
    return 2 * num_steps - 1


def _heun_evaluations(sigmas: Tensor, options: dict) -> int:
    """Evaluations Heun makes on ``sigmas``: two per corrected step of :func:`heun_plan`, one per
    Euler step (to sigma~ = 0, from the pole), none on a zero-length step."""
    churn = {key: options[key] for key in ("s_churn", "s_tmin", "s_tmax") if key in options}
    return sum(2 if corrected else 1 for *_, corrected in heun_plan(sigmas, **churn))


def _unipc_evaluations(sigmas: Tensor, options: dict) -> int:
    """Evaluations UniPC makes on ``sigmas``: one per step that moves, one for its final
    corrector."""
    return len(_steps(sigmas)) + unipc_has_final_corrector(sigmas)


def heun_nfe_on(sigmas: Tensor, **options) -> int:
    """Network evaluations :func:`sample_heun` makes on ``sigmas`` with ``options``."""
    return SAMPLERS["heun"].nfe_on(sigmas, options)


#: name -> method. ``ddpm`` is ancestral sampling with eta = 1 (plus DDPM's x0 clipping options).
SAMPLERS: dict[str, SamplerMethod] = {
    "euler": SamplerMethod(sample_euler, _one_per_step),
    "ddim": SamplerMethod(sample_ddim, _one_per_step),
    "ddpm": SamplerMethod(sample_ddpm, _one_per_step, stochastic=True),
    "euler_ancestral": SamplerMethod(sample_ancestral, _one_per_step, stochastic=True),
    "heun": SamplerMethod(sample_heun, _heun_nfe, evaluations=_heun_evaluations),
    "dpmpp_2m": SamplerMethod(sample_dpmpp_2m, _one_per_step),
    "dpmpp_2m_sde": SamplerMethod(sample_dpmpp_2m_sde, _one_per_step, stochastic=True),
    "unipc": SamplerMethod(sample_unipc, _one_per_step, evaluations=_unipc_evaluations),
    "lms": SamplerMethod(sample_lms, _one_per_step),
}


def get_sampler_method(name: str) -> SamplerMethod:
    """Look up a sampler by name; a ValueError names the valid choices."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"Unknown sampler {name!r}; choose one of "
                         f"{', '.join(sorted(SAMPLERS))}.") from None


def option_names(method: str) -> tuple[str, ...]:
    """The keyword options the sampler ``method`` accepts (its function's parameters after
    ``denoiser, x, sigmas, generator``)."""
    parameters = inspect.signature(get_sampler_method(method).fn).parameters
    return tuple(name for name in parameters if name not in ("denoiser", "x", "sigmas",
                                                             "generator"))


def _check_options(method: str, options: dict) -> None:
    """Validate sampler options early (at config time) with messages naming the valid values."""
    allowed = option_names(method)
    for key in options:
        if key not in allowed:
            raise ValueError(f"sampler.{key} is not an option of the {method} sampler; its "
                             f"options are: {', '.join(allowed) or 'none'}.")
    if "eta" in options:
        _check_eta(options["eta"])
    if method == "unipc":
        _check_unipc_order(options.get("order", 2))
    if method == "lms":
        _check_lms_order(options.get("order", 4))
    if "clip_sample" in allowed:
        X0Clipping.from_options(options)
    if "use_clipped_model_output" in options:
        _check_flag("use_clipped_model_output", options["use_clipped_model_output"])


def state_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype samplers keep x~ in: float64 (float32 on MPS, which has no float64).

    At sigma~ ~ 100 a float32 x~ carries about 7 bits less than the x-space x_t = c_in x~ that
    diffusers' schedulers integrate; float64 elementwise updates cost well under 1% of a net call.
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class Sampler:
    """A configured sampler: method + grid. Built by Hydra from ``configs/sampler/*.yaml``.

    Args:
        method: a key of :data:`SAMPLERS`.
        num_steps: number of steps (grid intervals); NFE depends on the method (:attr:`nfe`).
        spacing: grid spacing (see :mod:`diffsweep.grids`); ``auto`` = ``leading`` for discrete
            schedules, ``karras`` for continuous ones.
        rho: Karras grid exponent (``spacing=karras`` only).
        steps_offset: added to ``leading`` discrete timesteps (Stable Diffusion uses 1).
        **options: passed to the sampler function (e.g. ``eta``, ``s_churn``, ``order``,
            ``clip_sample``); :func:`option_names` lists a method's.

    Raises ValueError (naming the valid choices) for an unknown method, spacing or option, a
    ``num_steps`` :func:`diffsweep.grids.check_num_steps` refuses, ``eta < 0``, a unipc order not
    in {2, 3}, an lms order < 1 or bad clipping options (:class:`X0Clipping`); grid errors (a
    discrete spacing on a continuous schedule, more steps than training indices) surface in
    :meth:`sigmas`.
    """

    def __init__(self, method: str = "ddim", num_steps: int = 50, spacing: str = "auto",
                 rho: float = 7.0, steps_offset: int = 0, **options) -> None:
        self.method_name = method
        self.method = get_sampler_method(method)
        check_spacing(spacing)
        self.num_steps = check_num_steps(num_steps)
        _check_options(method, options)
        self.spacing = spacing
        self.rho = rho
        self.steps_offset = steps_offset
        self.options = dict(options)

    @property
    def name(self) -> str:
        """Short name for logs: ``<method>_<num_steps>``."""
        return f"{self.method_name}_{self.num_steps}"

    @property
    def nfe(self) -> int:
        """Network evaluations per sample for this method and step count, on a grid below the pole
        sigma~ = inf; :meth:`nfe_on` counts them on a schedule's grid (Heun from flow's default
        ``t_max``, which stands for t = 1, makes one fewer)."""
        return self.method.nfe(self.num_steps)

    def nfe_on(self, schedule: NoiseSchedule) -> int:
        """Network evaluations per sample on ``schedule``'s grid (:meth:`sigmas`), as the sampler
        makes them (:meth:`SamplerMethod.nfe_on`): :attr:`nfe`, or fewer from the pole (Heun)."""
        return self.method.nfe_on(self.sigmas(schedule), self.options)

    def sigmas(self, schedule: NoiseSchedule) -> Tensor:
        """The float64 sigma~ grid (``num_steps + 1`` values, last 0) for ``schedule``."""
        return sigma_grid(schedule, self.num_steps, self.spacing, self.rho, self.steps_offset)

    @torch.no_grad()
    def __call__(self, denoiser: DenoiserFn, schedule: NoiseSchedule, shape: tuple[int, ...],
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, noise: Tensor | None = None) -> Tensor:
        """Draw ``shape`` samples in ``dtype``; deterministic given ``generator``'s state.

        ``noise``: the standard normal starting noise (shape ``shape``, on ``device``); drawn from
        ``generator`` when None. ``generator`` also drives a stochastic sampler's per-step noise.
        The state x~ is held in :func:`state_dtype` (float64) between net calls; the net runs in
        its own dtype (see :class:`diffsweep.denoiser.Denoiser`).
        """
        sigmas = self.sigmas(schedule)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        x = noise.to(state_dtype(device)) * schedule.prior_std(float(sigmas[0]))
        x = self.method.fn(denoiser, x, sigmas, generator=generator, **self.options)
        return x.to(dtype)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options.items())
        return (f"Sampler({self.method_name!r}, num_steps={self.num_steps}, "
                f"spacing={self.spacing!r}{opts})")
