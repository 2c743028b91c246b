"""Training losses: one small object per formulation, a function of the denoiser (EDM ``loss.py``).

For a clean batch ``x0`` (B, C, H, W), per-sample noise levels ``sigma~`` (B,) and standard normal
noise ``eps``, the noisy input is ``x~ = x0 + sigma~ * eps`` (sigma-space; for VP ``x~ = x_t /
alpha``). The net is called once, through :meth:`diffsweep.denoiser.Denoiser.net_output`, and its
raw output is regressed on the prediction type's target (:meth:`Denoiser.training_target`: eps,
x0, v or the flow velocity). A loss returns the *per-sample* loss (B,); the caller averages it, so
a per-sigma weight multiplies each sample's squared error:

    loss_i = weight(sigma~_i) * mean_over_pixels (F_theta(x~_i) - target_i)^2

``weighting=None`` is the uniform MSE on the target: DDPM's L_simple for eps-prediction.

One currency: x0 terms
----------------------
At fixed x~ every prediction type is an affine reparametrisation of ``x0_hat``, so the unit MSE on
each target is a multiple of the x0 error, ``||out - target||^2 = c(sigma~) ||x0_hat - x0||^2``
(:func:`target_x0_weight`, with ``SNR = 1 / sigma~^2`` and the schedule's ``sigma_d``):

    ============== ======================================== ===================================
    prediction     target                                   c(sigma~) (x0 weight of its MSE)
    ============== ======================================== ===================================
    epsilon        eps                                      SNR
    sample         x0                                       1
    v_prediction   a eps - s x0 / sigma_d (unit variance)   SNR + 1 / sigma_d^2
    velocity       eps - x0 (flow matching)                 (1 + 1 / sigma~)^2 = (1 + sqrt SNR)^2
    ============== ======================================== ===================================

(v: ``eps = s (u x~) + a v`` gives ``eps err = a v err`` and ``x0 err = sigma~ eps err``, so
``c = 1 / (sigma~ a)^2 = (sigma~^2 + sigma_d^2) / (sigma~ sigma_d)^2``; velocity: ``x0_hat = x_t -
s v`` with ``s = sigma~ / (1 + sigma~)`` gives ``c = 1 / s^2``.)

A :class:`LossWeighting` is *defined* by its weight in x0 terms, ``w(sigma~)`` (the row of
``DESIGN.md``'s table), and the loss applies ``w / c`` to the target's MSE, so the objective
``w ||x0_hat - x0||^2`` is the same whatever the net predicts. Identities that follow (all
tested in ``tests/test_loss_weightings.py``):

- uniform v-MSE = eps-MSE weighted by ``(SNR + 1) / SNR = 1 / alpha^2`` (VP, ``sigma_d = 1``)
  = x0-MSE weighted by ``SNR + 1``. The reverse of the often-quoted "v-loss = eps-loss x SNR /
  (SNR + 1)": it is v-MSE *weighted by* ``SNR / (SNR + 1)`` that equals uniform eps-MSE
  (denoising-diffusion-pytorch's default ``pred_v`` objective).
- EDM's ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2`` equals the x0 weight of the
  v-MSE for every ``sigma_d``: EDM's loss is the *uniform* v_prediction MSE. Our ``v_prediction``
  is EDM's preconditioning exactly, with ``F_theta = -v``: ``x0_hat = c_skip x~ + c_out (-v)``,
  ``c_skip = sigma_d^2 / (sigma^2 + sigma_d^2)``, ``c_out = sigma sigma_d / sqrt(sigma^2 +
  sigma_d^2)``, ``c_in = 1 / sqrt(sigma^2 + sigma_d^2)`` (the net's input), ``c_noise = ln(sigma)
  / 4`` (``EDMSchedule``); EDM's target ``(x0 - c_skip x~) / c_out = -v``.
- ``sigmoid`` with bias b = ``soft_min_snr`` with ``gamma = e^b``:
  ``SNR sigmoid(b - log SNR) = 1 / (sigma~^2 + e^-b)``; k-diffusion's soft-min-SNR is the case
  ``b = -2 log sigma_d``.

Weightings
----------
- :class:`MinSNRWeighting` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  Weighting Strategy"): ``w = min(SNR, gamma)``; eps: ``min(SNR, gamma) / SNR``; v (VP):
  ``min(SNR, gamma) / (SNR + 1)`` (diffusers' ``--snr_gamma``).
- :class:`SoftMinSNRWeighting` (Crowson et al. 2024, k-diffusion ``soft-min-snr``):
  ``w = 1 / (sigma~^2 + 1 / gamma)``, the harmonic soft minimum of SNR and gamma; k-diffusion's
  ``gamma = 1 / sigma_d^2`` (its weight on the F-target, ``(sigma sigma_d)^2 / (sigma^2 +
  sigma_d^2)^2``, is this row for v_prediction).
- :class:`EDMWeighting` (Karras et al. 2022, "Elucidating the Design Space...", Eq. 8 / Table 1):
  ``w = lambda(sigma) = (sigma~^2 + sigma_d^2) / (sigma~ sigma_d)^2``: unit weight on the F-target.
- :class:`SigmoidWeighting` (Kingma & Gao 2023, "Understanding Diffusion Objectives as the ELBO
  with Simple Data Augmentation"): eps weight ``sigmoid(b - log SNR)``, i.e.
  ``w = SNR sigmoid(b - log SNR)``. The weight multiplies each sample's loss at the schedule's
  training density p(lambda) of ``lambda = log SNR``; the paper's ``w(lambda)`` weights the
  integral over lambda, so in its terms this objective is ``sigmoid(b - lambda) p(lambda)`` (the
  paper's objective would divide by p(lambda), which our schedules do not expose).
- :class:`TargetMSEWeighting`: the uniform MSE of another target (e.g. uniform eps-MSE while the
  net predicts v, denoising-diffusion-pytorch's ``pred_v``): ``w = c_target(sigma~)``.

A plain callable ``weighting(sigma~ (B,) float64, schedule) -> (B,)`` (:class:`Weighting`) is
taken as a raw weight on the target's MSE, whatever the prediction type.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from diffsweep.denoiser import PREDICTION_TYPES, Denoiser, append_dims
from diffsweep.schedules import NoiseSchedule

#: Largest sigma~_max of a schedule an ``epsilon``-predicting net may be sampled from.
#: ``x0_hat = x~ - sigma~ eps_hat`` multiplies the net's error by sigma~ (the other prediction
#: types by at most ``max(1, sigma_d)``); the VP tables reach 157 (linear) to 2e4 (cosine),
#: flow matching with its default ``t_max = 1 - 1e-9`` reaches 1e9.
EPSILON_MAX_SIGMA = 1e6

#: noise levels (per decade) at which :func:`check_formulation` evaluates a weighting
_CHECK_POINTS_PER_DECADE = 8


class Weighting(Protocol):
    """A raw per-sample weight (B,) on the target's MSE for noise levels ``sigma~`` (B,)."""

    def __call__(self, sigma: Tensor, schedule: NoiseSchedule) -> Tensor: ...


def target_x0_weight(prediction_type: str, sigma: Tensor, sigma_data: float = 1.0) -> Tensor:
    """``c(sigma~)`` with ``||out - target||^2 = c ||x0_hat - x0||^2`` at fixed x~ (float64, (B,)).

    ``epsilon``: ``1 / sigma~^2`` (SNR); ``sample``: 1; ``v_prediction``: ``1 / sigma~^2 +
    1 / sigma_d^2``; ``velocity``: ``(1 + 1 / sigma~)^2``. See the module docstring.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if prediction_type == "epsilon":
        return sigma.pow(-2)
    if prediction_type == "sample":
        return torch.ones_like(sigma)
    if prediction_type == "v_prediction":
        return sigma.pow(-2) + 1.0 / sigma_data**2
    if prediction_type == "velocity":
        return (1 + sigma.reciprocal()).square()
    raise ValueError(f"No x0 weight is known for prediction_type {prediction_type!r}; weightings "
                     f"convert between {', '.join(PREDICTION_TYPES)} (add the new type's row to "
                     f"diffsweep.loss.target_x0_weight).")


class LossWeighting(ABC):
    """A loss weighting defined in x0 terms: the objective ``w(sigma~) ||x0_hat - x0||^2``.

    Subclasses implement :meth:`x0_weight`; calling the weighting with the prediction type gives
    the weight on that target's MSE, ``w / c_target`` (:func:`target_x0_weight`), so one config
    means one objective for every prediction type.
    """

    #: the config name (``configs/loss/<name>.yaml``), used in error messages
    name: str = "weighting"

    @abstractmethod
    def x0_weight(self, sigma: Tensor, schedule: NoiseSchedule) -> Tensor:
        """``w(sigma~)`` (float64, shape of sigma) in x0 terms."""

    def __call__(self, sigma: Tensor, schedule: NoiseSchedule, prediction_type: str) -> Tensor:
        """The weight (float64, shape of sigma) on the MSE of ``prediction_type``'s target."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (self.x0_weight(sigma, schedule)
                / target_x0_weight(prediction_type, sigma, schedule.sigma_data))

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_positive(value: float | None, key: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if value is None or not math.isfinite(float(value)) or float(value) <= 0:
        raise ValueError(f"{key}={value!r} must be a finite number > 0"
                         f"{' or null' if allow_none else ''}.")
    return float(value)


def _snr(sigma: Tensor) -> Tensor:
    return torch.as_tensor(sigma, dtype=torch.float64).pow(-2)


class MinSNRWeighting(LossWeighting):
    """Min-SNR-gamma (Hang et al. 2023): ``w = min(SNR, gamma)`` in x0 terms.

    Args:
        gamma: the clamp (the paper's default 5).
    """

    name = "min_snr"

    def __init__(self, gamma: float = 5.0) -> None:
        self.gamma = _check_positive(gamma, "loss.weighting.gamma")

    def x0_weight(self, sigma: Tensor, schedule: NoiseSchedule) -> Tensor:
        return _snr(sigma).clamp(max=self.gamma)


class SoftMinSNRWeighting(LossWeighting):
    """Soft-min-SNR (k-diffusion): ``w = 1 / (sigma~^2 + 1 / gamma) = 1 / (1/SNR + 1/gamma)``.

    Args:
        gamma: the soft clamp; None: ``1 / sigma_d^2`` of the schedule (k-diffusion's
            ``soft-min-snr``, whose F-target weight is ``(sigma sigma_d)^2 / (sigma^2 +
            sigma_d^2)^2``).
    """

    name = "soft_min_snr"

    def __init__(self, gamma: float | None = None) -> None:
        self.gamma = _check_positive(gamma, "loss.weighting.gamma", allow_none=True)

    def x0_weight(self, sigma: Tensor, schedule: NoiseSchedule) -> Tensor:
        inverse_gamma = schedule.sigma_data**2 if self.gamma is None else 1.0 / self.gamma
        return (torch.as_tensor(sigma, dtype=torch.float64).square() + inverse_gamma).reciprocal()


class EDMWeighting(LossWeighting):
    """EDM (Karras et al. 2022): ``w = lambda = (sigma~^2 + sigma_d^2) / (sigma~ sigma_d)^2``,
    unit weight on the F-target (= uniform v_prediction MSE).

    Args:
        sigma_data: sigma_d; None: the schedule's (EDM: 0.5, VP: 1).
    """

    name = "edm"

    def __init__(self, sigma_data: float | None = None) -> None:
        self.sigma_data = _check_positive(sigma_data, "loss.weighting.sigma_data", allow_none=True)

    def x0_weight(self, sigma: Tensor, schedule: NoiseSchedule) -> Tensor:
        data = schedule.sigma_data if self.sigma_data is None else self.sigma_data
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return sigma.pow(-2) + 1.0 / data**2


class SigmoidWeighting(LossWeighting):
    """Sigmoid weighting (Kingma & Gao 2023): eps weight ``sigmoid(b - log SNR)``;
    ``w = SNR sigmoid(b - log SNR) = 1 / (sigma~^2 + e^-b)`` in x0 terms.

    Args:
        bias: b, the log-SNR where the weight crosses over from eps-MSE (below) to
            ``e^b`` x0-MSE (above).
    """

    name = "sigmoid"

    def __init__(self, bias: float = 0.0) -> None:
        if not math.isfinite(float(bias)):
            raise ValueError(f"loss.weighting.bias={bias!r} must be a finite number.")
        self.bias = float(bias)

    def x0_weight(self, sigma: Tensor, schedule: NoiseSchedule) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return (sigma.square() + math.exp(-self.bias)).reciprocal()


class TargetMSEWeighting(LossWeighting):
    """The uniform MSE of ``target`` whatever the net predicts: ``w = c_target(sigma~)``.

    ``target=epsilon`` with ``v_prediction`` is denoising-diffusion-pytorch's default objective
    (v-MSE weighted by ``SNR / (SNR + 1)`` on VP).

    Args:
        target: a prediction type whose unit MSE is the objective.
    """

    name = "target_mse"

    def __init__(self, target: str = "epsilon") -> None:
        if target not in PREDICTION_TYPES:
            raise ValueError(f"loss.weighting.target={target!r}; choose one of "
                             f"{', '.join(PREDICTION_TYPES)}.")
        self.target = target

    def x0_weight(self, sigma: Tensor, schedule: NoiseSchedule) -> Tensor:
        return target_x0_weight(self.target, sigma, schedule.sigma_data)


class DenoisingLoss:
    """Mean squared error of the net's raw output against its prediction target, per sample.

    Args:
        weighting: a :class:`LossWeighting` (an objective in x0 terms, converted to the
            denoiser's prediction type), a raw :class:`Weighting` callable ``(sigma~,
            schedule) -> (B,)`` on the target's MSE, or None (uniform on the target).
    """

    def __init__(self, weighting: LossWeighting | Weighting | Callable[[Tensor, NoiseSchedule],
                 Tensor] | None = None) -> None:
        if weighting is not None and not callable(weighting):
            raise ValueError(f"loss.weighting must be a LossWeighting (configs/loss/*.yaml), a "
                             f"callable (sigma, schedule) -> weight, or null; got {weighting!r}.")
        self.weighting = weighting

    def sample_weight(self, sigma: Tensor, denoiser: Denoiser) -> Tensor | None:
        """The weight (float64, (B,)) on each sample's target MSE; None when uniform."""
        if self.weighting is None:
            return None
        if isinstance(self.weighting, LossWeighting):
            return self.weighting(sigma, denoiser.schedule, denoiser.prediction_type)
        return torch.as_tensor(self.weighting(sigma, denoiser.schedule))

    def x0_weight(self, sigma: Tensor, denoiser: Denoiser) -> Tensor:
        """The objective in x0 terms: ``w(sigma~)``, loss ``= w ||x0_hat - x0||^2`` (float64)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        weight = self.sample_weight(sigma, denoiser)
        c = target_x0_weight(denoiser.prediction_type, sigma, denoiser.schedule.sigma_data)
        return c if weight is None else weight.to(torch.float64).cpu() * c

    def __call__(self, denoiser: Denoiser, x0: Tensor, sigma: Tensor, noise: Tensor,
                 class_labels: Tensor | None = None) -> Tensor:
        """Per-sample loss (B,) in float32.

        Args:
            denoiser: net + schedule + prediction type.
            x0: clean samples (B, C, H, W).
            sigma: sigma~ per sample (B,) (float64; any device).
            noise: standard normal noise shaped like x0.
            class_labels: (B,) labels for a class-conditional net (null label where dropped).
        """
        sigma_x = append_dims(sigma.to(device=x0.device, dtype=x0.dtype), x0.ndim)
        x_tilde = x0 + sigma_x * noise
        output, _ = denoiser.net_output(x_tilde, sigma, class_labels)
        target = denoiser.training_target(x0, noise, sigma)
        per_sample = (output.float() - target.float()).square().flatten(1).mean(1)
        weight = self.sample_weight(sigma, denoiser)
        if weight is not None:
            per_sample = per_sample * weight.to(device=per_sample.device, dtype=per_sample.dtype)
        return per_sample

    def __repr__(self) -> str:
        return f"DenoisingLoss(weighting={self.weighting!r})"


def _check_sigmas(schedule: NoiseSchedule) -> Tensor:
    """Noise levels spanning the schedule's range (float64, log-spaced, both ends included)."""
    low, high = float(schedule.sigma_min), float(schedule.sigma_max)
    if not (0 < low <= high < math.inf):
        return torch.tensor([low, high], dtype=torch.float64)
    decades = max(math.log10(high / low), 1e-9)
    count = max(2, int(math.ceil(decades * _CHECK_POINTS_PER_DECADE)) + 1)
    return torch.logspace(math.log10(low), math.log10(high), count, dtype=torch.float64)


def check_formulation(loss: Any, denoiser: Denoiser) -> None:
    """Refuse prediction/schedule/weighting combinations that make no sense, before training.

    - ``epsilon`` prediction on a schedule whose sigma~_max exceeds :data:`EPSILON_MAX_SIGMA`
      (flow matching with ``t_max`` near 1): ``x0_hat = x~ - sigma~ eps_hat`` multiplies the net's
      error by sigma~ (1e9 there), so the first sampling steps diverge. Every other type is
      bounded: ``|d x0_hat / d out|`` is 1 (sample), ``sigma~ sigma_d / sqrt(sigma~^2 +
      sigma_d^2) <= sigma_d`` (v_prediction) or ``sigma~ / (1 + sigma~) < 1`` (velocity), so
      ``velocity`` and ``v_prediction`` are allowed on every schedule.
    - a :class:`LossWeighting` must know the prediction type's x0 weight, and its weight on the
      target must be finite and >= 0 over the schedule's noise range ``[sigma_min, sigma_max]``.

    Loss objects other than :class:`DenoisingLoss` are checked for the first rule only (or by
    their own ``check(denoiser)`` method if they have one).
    """
    schedule, prediction_type = denoiser.schedule, denoiser.prediction_type
    if prediction_type == "epsilon" and schedule.sigma_max > EPSILON_MAX_SIGMA:
        raise ValueError(
            f"module.denoiser.prediction_type=epsilon cannot be sampled from "
            f"{type(schedule).__name__} with sigma~_max={schedule.sigma_max:.3g} (> "
            f"{EPSILON_MAX_SIGMA:.0e}): x0_hat = x~ - sigma~ eps_hat multiplies the net's error by "
            f"sigma~. Use prediction_type=velocity, v_prediction or sample, or lower the "
            f"schedule's t_max (flow: scheduler.t_max=0.999).")
    own_check = getattr(loss, "check", None)
    if callable(own_check):
        own_check(denoiser)
        return
    if not isinstance(loss, DenoisingLoss) or not isinstance(loss.weighting, LossWeighting):
        return
    sigma = _check_sigmas(schedule)
    name = loss.weighting.name
    try:
        weight = loss.weighting(sigma, schedule, prediction_type)
    except ValueError as error:
        raise ValueError(f"loss={name} with module.denoiser.prediction_type={prediction_type}: "
                         f"{error}") from None
    bad = ~(torch.isfinite(weight) & (weight >= 0))
    if bool(bad.any()):
        where = float(sigma[bad][0])
        raise ValueError(
            f"loss={name} ({loss.weighting!r}) gives weight {float(weight[bad][0])!r} on the "
            f"{prediction_type} target at sigma~={where:.4g} of {type(schedule).__name__} (range "
            f"{schedule.sigma_min:.4g}..{schedule.sigma_max:.4g}); weights must be finite and >= 0 "
            f"over the schedule's noise range.")


__all__ = ["DenoisingLoss", "EDMWeighting", "EPSILON_MAX_SIGMA", "LossWeighting",
           "MinSNRWeighting", "SigmoidWeighting", "SoftMinSNRWeighting", "TargetMSEWeighting",
           "Weighting", "check_formulation", "target_x0_weight"]
