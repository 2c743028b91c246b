"""Net + schedule -> a denoiser in sigma-space (preconditioning, EDM Table 1 style).

A network ``net(x_in, c_noise, class_labels=None) -> output`` is wrapped as

    ===========  ======================================  =====================================
    term         value                                   note
    ===========  ======================================  =====================================
    c_in         schedule.c_in(sigma~)                   1 / sqrt(sigma~^2 + sigma_data^2):
                                                         VP (sigma_data = 1) -> x_t; flow:
                                                         1 / (1 + sigma~) -> x_t
    c_noise      schedule.c_noise(schedule.t_of_sigma)   n, 999 t, log(sigma)/4 or 1000 s
    x0_hat       by prediction type (below)
    ===========  ======================================  =====================================

Prediction types are converted here and nowhere else (x~ = x0 + sigma~ eps; a = alpha, s = sigma
in x-space):

- ``epsilon``: ``eps = out``, ``x0 = x~ - sigma~ eps``.
- ``sample`` (x0): ``x0 = out``, ``eps = (x~ - out) / sigma~``.
- ``v_prediction`` (Salimans & Ho 2022, DDPM's v): ``v = a eps - s x0 / sigma_data`` with the
  unit-variance ``a = sigma_data u``, ``s = sigma~ u``, ``u = 1 / sqrt(sigma~^2 + sigma_data^2)``
  (``a^2 + s^2 = 1``; for VP exactly ``alpha eps - sigma x0``), so ``eps = s (u x~) + a v``.
  ``u`` is the other schedules' ``c_in``; it is computed here, so v keeps this meaning for flow.
- ``velocity`` (flow matching, Lipman et al. 2022; diffusers' ``flow_prediction``): the velocity
  ``v = eps - x0 = d x_t / d s`` of ``x_t = (1 - s) x0 + s eps``. In sigma-space, with
  ``s = sigma~ / (1 + sigma~)`` and ``x_t = x~ / (1 + sigma~)`` (exactly the flow net's input):
  ``x0 = x_t - s v``, ``eps = x_t + (1 - s) v``. Not DDPM's v: that one is the derivative along
  the VP circle, ``d x_t / d phi`` with ``phi = atan(sigma / alpha)``, and weights eps and x0 by
  ``alpha`` and ``sigma``; the flow velocity weights both by 1. The conversion holds for any
  schedule (it only uses sigma~); with :class:`~diffsweep.schedules.FlowMatchingSchedule` the net
  sees ``x_t`` and ``c_noise = 1000 s`` as diffusers' flow models do.

Precision: x~ may be held in a wider dtype than the net runs in (the samplers keep their state in
float64: at sigma~ ~ 100 a float32 x~ loses about 7 bits that x_t = c_in x~ does not). The net's
input is cast to the net's dtype (:attr:`Denoiser.net_dtype`); eps and x0_hat are computed in x~'s
dtype. ``x0_hat`` is computed directly from the output (:meth:`Denoiser.x0_from_output`), not
through eps, for ``sample`` and ``velocity``: at the flow's sigma~_max ~ 1e9, ``x~ - sigma~ eps``
would cancel ~9 digits.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffsweep.schedules import FlowMatchingSchedule, NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "velocity")

#: The sampler-facing contract: ``denoiser(x~, sigma~) -> x0_hat``, x~ of shape (B, ...) and
#: sigma~ a scalar tensor or of shape (B,).
DenoiserFn = Callable[[Tensor, Tensor], Tensor]


def append_dims(value: Tensor, ndim: int) -> Tensor:
    """Reshape ``value`` of shape (B,) or () to broadcast against a tensor of ``ndim`` dims."""
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def default_prediction_type(schedule: NoiseSchedule) -> str:
    """The prediction type ``auto`` means: ``velocity`` on a flow-matching schedule (its own
    formulation), else ``v_prediction`` (EDM's F-target up to sign: bounded targets and unit
    weight at every sigma, the recipe that won the time-to-quality race)."""
    return "velocity" if isinstance(schedule, FlowMatchingSchedule) else "v_prediction"


class Denoiser(nn.Module):
    """Wrap ``net`` so that ``denoiser(x~, sigma~) -> x0_hat`` for any schedule.

    Args:
        net: module called as ``net(x_in, c_noise)`` or ``net(x_in, c_noise, class_labels)``,
            returning a tensor shaped like ``x_in``.
        schedule: the noise schedule the net was trained with.
        prediction_type: what the net outputs: ``epsilon``, ``sample``, ``v_prediction`` (DDPM's v)
            or ``velocity`` (flow matching's ``eps - x0``); see the module docstring. ``auto``:
            :func:`default_prediction_type` of the schedule.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule,
                 prediction_type: str = "epsilon") -> None:
        super().__init__()
        if prediction_type == "auto":
            prediction_type = default_prediction_type(schedule)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of "
                             f"auto, {', '.join(PREDICTION_TYPES)}.")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type

    @property
    def device(self) -> torch.device:
        """The device of the net's first parameter or buffer (CPU for a net without tensors)."""
        for tensor in itertools.chain(self.net.parameters(), self.net.buffers()):
            return tensor.device
        return torch.device("cpu")

    @property
    def num_classes(self) -> int | None:
        """The net's class count when it is class-conditional (its null label), else None."""
        return getattr(self.net, "num_classes", None)

    def with_net(self, net: nn.Module) -> Denoiser:
        """The same preconditioning over another net computing the same function (e.g. a
        compiled copy)."""
        return Denoiser(net, self.schedule, self.prediction_type)

    @property
    def net_dtype(self) -> torch.dtype:
        """The dtype the net is fed: that of its first floating parameter or buffer,
        else float32."""
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

        ``c_in * x~`` is computed in x~'s dtype and returned in :attr:`net_dtype`;
        c_noise is float32.
        """
        sigma = self._sigma_batch(x, sigma)
        c_in = self.schedule.c_in(sigma).to(x.device)
        c_noise = self.schedule.c_noise(self.schedule.t_of_sigma(sigma))
        x_in = (x * append_dims(c_in, x.ndim).to(x.dtype)).to(self.net_dtype)
        return x_in, c_noise.to(device=x.device, dtype=torch.float32), c_in

    def eps_from_output(self, output: Tensor, x: Tensor, sigma: Tensor, c_in: Tensor) -> Tensor:
        """Convert the net's raw output to eps in x~'s dtype (see the module docstring).

        ``sigma``: sigma~ (B,) float64 (CPU); ``c_in``: the input scale the net was fed with, as
        :meth:`net_output` returns it (the built-in types need only sigma~).
        """
        output = output.to(x.dtype)
        if self.prediction_type == "epsilon":
            return output
        sigma_b = append_dims(sigma, x.ndim).to(device=x.device, dtype=x.dtype)
        if self.prediction_type == "sample":
            return (x - output) / sigma_b.clamp_min(1e-20)
        if self.prediction_type == "velocity":
            # eps = x_t + (1 - s) v = (x~ + v) / (1 + sigma~).
            return (x + output) * self._flow_alpha(sigma, x)
        # Unit-variance form: with a = u * sigma_data, s = sigma~ * u (a^2 + s^2 = 1),
        # u = 1 / sqrt(sigma~^2 + sigma_data^2), the unit-variance input is u x~ = a * (x0 /
        # sigma_data) + s * eps and v = a * eps - s * x0 / sigma_data, so eps = s * (u x~) + a * v.
        # For VP (sigma_data = 1) this is the usual v = alpha eps - sigma x0.
        unit = append_dims(self._unit_scale(sigma), x.ndim).to(device=x.device, dtype=x.dtype)
        return (sigma_b * unit) * (unit * x) + (unit * self.schedule.sigma_data) * output

    def x0_from_output(self, output: Tensor, x: Tensor, sigma: Tensor, c_in: Tensor) -> Tensor:
        """Convert the net's raw output to ``x0_hat`` in x~'s dtype (see the module docstring).

        ``epsilon`` and ``v_prediction``: ``x~ - sigma~ eps``; ``sample``: the output itself;
        ``velocity``: ``x_t - s v`` with ``x_t = x~ / (1 + sigma~)``, ``s = sigma~ / (1 + sigma~)``.
        """
        if self.prediction_type == "sample":
            return output.to(x.dtype)
        if self.prediction_type == "velocity":
            alpha = self._flow_alpha(sigma, x)
            noise_level = append_dims(sigma, x.ndim).to(device=x.device, dtype=x.dtype) * alpha
            return alpha * x - noise_level * output.to(x.dtype)
        eps = self.eps_from_output(output, x, sigma, c_in)
        return x - append_dims(sigma, x.ndim).to(device=x.device, dtype=x.dtype) * eps

    def _unit_scale(self, sigma: Tensor) -> Tensor:
        """The unit-variance scale ``1 / sqrt(sigma~^2 + sigma_data^2)``
        (float64, sigma's device)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.rsqrt(sigma**2 + self.schedule.sigma_data**2)

    @staticmethod
    def _flow_alpha(sigma: Tensor, like: Tensor) -> Tensor:
        """``1 / (1 + sigma~) = 1 - s`` broadcast against ``like`` (its device and dtype)."""
        alpha = 1 / (1 + torch.as_tensor(sigma, dtype=torch.float64))
        return append_dims(alpha, like.ndim).to(device=like.device, dtype=like.dtype)

    def net_output(self, x: Tensor, sigma: Tensor | float,
                   class_labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The net's raw output for x~ at sigma~ and the c_in it was fed with (B,).

        The one place the net is called: sampling converts the output with
        :meth:`x0_from_output` (or :meth:`eps_from_output`), training regresses it on
        :meth:`training_target`.
        """
        x_in, c_noise, c_in = self.net_inputs(x, sigma)
        if class_labels is None:
            return self.net(x_in, c_noise), c_in
        return self.net(x_in, c_noise, class_labels), c_in

    def eps(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """Predicted noise ``eps_hat`` for x~ at sigma~, same shape as x."""
        sigma_batch = self._sigma_batch(x, sigma)
        output, c_in = self.net_output(x, sigma_batch, class_labels)
        return self.eps_from_output(output, x, sigma_batch, c_in)

    def forward(self, x: Tensor, sigma: Tensor | float,
                class_labels: Tensor | None = None) -> Tensor:
        """``x0_hat`` for x~ at sigma~ (:meth:`x0_from_output`), shape and dtype of x."""
        sigma_batch = self._sigma_batch(x, sigma)
        output, c_in = self.net_output(x, sigma_batch, class_labels)
        return self.x0_from_output(output, x, sigma_batch, c_in)

    def training_target(self, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
        """What the net's output is regressed on for this prediction type.

        ``epsilon``: eps; ``sample``: x0; ``v_prediction``: ``a eps - s x0 / sigma_data``
        (unit-variance a, s of sigma~); ``velocity``: ``eps - x0``. Shapes of x0; sigma~ (B,).
        """
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "velocity":
            return eps - x0
        unit = append_dims(self._unit_scale(sigma), x0.ndim).to(device=x0.device, dtype=x0.dtype)
        sigma_b = append_dims(sigma, x0.ndim).to(device=x0.device, dtype=x0.dtype)
        data = self.schedule.sigma_data
        return unit * data * eps - (sigma_b * unit / data) * x0


class LabelledDenoiser(nn.Module):
    """A denoiser with class labels bound: ``denoiser(x~, sigma~) -> x0_hat`` for those labels."""

    def __init__(self, denoiser: Denoiser, class_labels: Tensor) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.class_labels = class_labels

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        return self.denoiser(x, sigma, self.class_labels)


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
