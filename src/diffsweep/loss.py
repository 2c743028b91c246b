"""Training losses: one small object per formulation, a function of the denoiser (EDM ``loss.py``).

For a clean batch ``x0`` (B, C, H, W), per-sample noise levels ``sigma~`` (B,) and standard normal
noise ``eps``, the noisy input is ``x~ = x0 + sigma~ * eps`` (sigma-space; for VP ``x~ = x_t /
alpha``). The net is called once, through :meth:`diffsweep.denoiser.Denoiser.net_output`, and its
raw output is regressed on the prediction type's target (:meth:`Denoiser.training_target`: eps,
x0 or v). A loss returns the *per-sample* loss (B,); the caller averages it, so a per-sigma
weighting ``lambda(sigma~)`` multiplies each sample's squared error:

    loss_i = lambda(sigma~_i) * mean_over_pixels (F_theta(x~_i) - target_i)^2

``weighting=None`` is DDPM's L_simple for eps-prediction (uniform weight on the eps error).
A weighting is any callable ``weighting(sigma~ (B,) float64, schedule) -> (B,)``.
"""

from __future__ import annotations

from typing import Callable, Protocol

from torch import Tensor

from diffsweep.denoiser import Denoiser, append_dims
from diffsweep.schedules import NoiseSchedule


class Weighting(Protocol):
    """A per-sample loss weight ``lambda(sigma~)`` (B,) for noise levels ``sigma~`` (B,)."""

    def __call__(self, sigma: Tensor, schedule: NoiseSchedule) -> Tensor: ...


class DenoisingLoss:
    """Mean squared error of the net's raw output against its prediction target, per sample.

    Args:
        weighting: per-sigma weight (None: uniform).
    """

    def __init__(self, weighting: Weighting | Callable[[Tensor, NoiseSchedule], Tensor] | None = None
                 ) -> None:
        self.weighting = weighting

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
        if self.weighting is not None:
            weight = self.weighting(sigma, denoiser.schedule)
            per_sample = per_sample * weight.to(device=per_sample.device, dtype=per_sample.dtype)
        return per_sample

    def __repr__(self) -> str:
        return f"DenoisingLoss(weighting={self.weighting!r})"


__all__ = ["DenoisingLoss", "Weighting"]
