"""Net + schedule -> a denoiser in sigma-space (preconditioning, EDM Table 1 style).

A network ``net(x_in, c_noise, class_labels=None) -> output`` is wrapped as

    ===========  ======================================  =============================
    term         value                                   note
    ===========  ======================================  =============================
    c_in         1 / sqrt(sigma~^2 + sigma_data^2)        VP: sigma_data = 1 -> x_t
    c_noise      schedule.c_noise(schedule.t_of_sigma)    n, 999 t or log(sigma)/4
    eps_hat      by prediction type (below)
    x0_hat       x~ - sigma~ * eps_hat
    ===========  ======================================  =============================

Prediction types are converted to eps here and nowhere else (a = alpha, s = sigma in x-space):
``epsilon``: eps = out; ``sample`` (x0): eps = (x~ - out) / sigma~; ``v_prediction``:
``v = a eps - s x0 / sigma_data`` with ``a = c_in sigma_data``, ``s = c_in sigma~`` (for VP exactly
``alpha eps - sigma x0``), so ``eps = s * x_in + a * v``.

Precision: x~ may be held in a wider dtype than the net runs in (the samplers keep their state in
float64: at sigma~ ~ 100 a float32 x~ loses about 7 bits that x_t = c_in x~ does not). The net's
input is cast to the net's dtype (:attr:`Denoiser.net_dtype`); eps and ``x0_hat = x~ - sigma~ eps``
are computed in x~'s dtype.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import Tensor, nn

from diffsweep.schedules import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

#: The sampler-facing contract: ``denoiser(x~, sigma~) -> x0_hat``, x~ of shape (B, ...) and
#: sigma~ a scalar tensor or of shape (B,).
DenoiserFn = Callable[[Tensor, Tensor], Tensor]


def append_dims(value: Tensor, ndim: int) -> Tensor:
    """Reshape ``value`` of shape (B,) or () to broadcast against a tensor of ``ndim`` dims."""
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


class Denoiser(nn.Module):
    """Wrap ``net`` so that ``denoiser(x~, sigma~) -> x0_hat`` for any schedule.

    Args:
        net: module called as ``net(x_in, c_noise)`` or ``net(x_in, c_noise, class_labels)``,
            returning a tensor shaped like ``x_in``.
        schedule: the noise schedule the net was trained with.
        prediction_type: what the net outputs: ``epsilon``, ``sample`` or ``v_prediction``.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of "
                             f"{', '.join(PREDICTION_TYPES)}.")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type

    @property
    def net_dtype(self) -> torch.dtype:
        """The dtype the net is fed: that of its first floating parameter or buffer, else float32."""
        for tensor in itertools.chain(self.net.parameters(), self.net.buffers()):
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32

    def _sigma_batch(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """sigma~ as a float64 CPU tensor of shape (B,): schedule tables live on the CPU, and the
        per-sample terms computed from them are moved to x's device afterwards."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).cpu()
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        return sigma

    def net_inputs(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_in * x~, c_noise, c_in)`` for a batch; c_noise and c_in of shape (B,).

        ``c_in * x~`` is computed in x~'s dtype and returned in :attr:`net_dtype`; c_noise is float32.
        """
        sigma = self._sigma_batch(x, sigma)
        c_in = self.schedule.c_in(sigma).to(x.device)
        c_noise = self.schedule.c_noise(self.schedule.t_of_sigma(sigma))
        x_in = (x * append_dims(c_in, x.ndim).to(x.dtype)).to(self.net_dtype)
        return x_in, c_noise.to(device=x.device, dtype=torch.float32), c_in

    def eps_from_output(self, output: Tensor, x: Tensor, sigma: Tensor, c_in: Tensor) -> Tensor:
        """Convert the net's raw output to eps in x~'s dtype (see the module docstring)."""
        output = output.to(x.dtype)
        if self.prediction_type == "epsilon":
            return output
        sigma_b = append_dims(sigma, x.ndim).to(device=x.device, dtype=x.dtype)
        if self.prediction_type == "sample":
            return (x - output) / sigma_b.clamp_min(1e-20)
        # Unit-variance form: with a = c_in * sigma_data, s = sigma~ * c_in (a^2 + s^2 = 1) the input
        # is x_in = a * (x0 / sigma_data) + s * eps and v = a * eps - s * x0 / sigma_data, so
        # eps = s * x_in + a * v. For VP (sigma_data = 1) this is the usual v = alpha eps - sigma x0.
        c_in_b = append_dims(c_in, x.ndim).to(x.dtype)
        return (sigma_b * c_in_b) * (c_in_b * x) + (c_in_b * self.schedule.sigma_data) * output

    def eps(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """Predicted noise ``eps_hat`` for x~ at sigma~, same shape as x."""
        sigma_batch = self._sigma_batch(x, sigma)
        x_in, c_noise, c_in = self.net_inputs(x, sigma_batch)
        if class_labels is None:
            output = self.net(x_in, c_noise)
        else:
            output = self.net(x_in, c_noise, class_labels)
        return self.eps_from_output(output, x, sigma_batch, c_in)

    def forward(self, x: Tensor, sigma: Tensor | float,
                class_labels: Tensor | None = None) -> Tensor:
        """``x0_hat = x~ - sigma~ * eps_hat``."""
        sigma_batch = self._sigma_batch(x, sigma)
        eps = self.eps(x, sigma_batch, class_labels)
        return x - append_dims(sigma_batch, x.ndim).to(device=x.device, dtype=x.dtype) * eps

    def training_target(self, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        """What the net's output is regressed on for this prediction type."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        c_in = append_dims(self.schedule.c_in(sigma), x0.ndim).to(device=x0.device, dtype=x0.dtype)
        sigma_b = append_dims(sigma, x0.ndim).to(device=x0.device, dtype=x0.dtype)
        data = self.schedule.sigma_data
        return c_in * data * eps - (sigma_b * c_in / data) * x0


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance as a denoiser: ``x0_uncond + scale * (x0_cond - x0_uncond)``.

    Guiding x0 equals guiding eps (``eps_uncond + scale * (eps_cond - eps_uncond)``) since x0 is
    affine in eps at fixed x~, sigma~. The unconditional branch uses ``null_label`` (the label the
    net was trained with under label dropout); both branches run in one batched call.
    """

    def __init__(self, denoiser: Denoiser, class_labels: Tensor, guidance_scale: float,
                 null_label: int) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.class_labels = class_labels
        self.guidance_scale = guidance_scale
        self.null_label = null_label

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma_batch = self.denoiser._sigma_batch(x, sigma)
        null = torch.full_like(self.class_labels, self.null_label)
        x0 = self.denoiser(torch.cat([x, x]), torch.cat([sigma_batch, sigma_batch]),
                           torch.cat([self.class_labels, null]))
        x0_cond, x0_uncond = x0.chunk(2)
        return x0_uncond + self.guidance_scale * (x0_cond - x0_uncond)
