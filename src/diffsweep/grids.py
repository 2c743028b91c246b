"""Sampling grids: a decreasing sequence of sigma~ values that ends at 0.

Discrete spacings pick training indices the way diffusers' ``set_timesteps`` does and map them to
sigma~ with the schedule's table (linear interpolation in sigma~ between entries, as diffusers'
``np.interp``):

- ``leading``, ``trailing``, ``linspace``: ``DDIMScheduler`` / ``DDPMScheduler`` (integer indices;
  ``linspace`` is rounded);
- ``linspace_frac``: ``EulerDiscreteScheduler`` / Heun / LMS ``linspace`` (fractional indices,
  float32 ``linspace(0, N-1, n)``, no rounding);
- ``quadratic``: the DDIM paper's quadratic tau for CIFAR-10 (Song et al. 2021, Appendix D.2;
  ``int(linspace(0, sqrt(0.8 N), n) ** 2)`` in their code). For large ``n`` it repeats small
  indices (4 repeats at n = 100, N = 1000): DDIM runs those as identity steps and counts them in
  its S; here they are zero-length steps that the samplers skip, and ``nfe`` counts S as DDIM's
  Table 1 does.

``karras`` (rho = 7), ``uniform_t`` and ``log_snr`` work for any schedule. ``auto`` resolves to
``leading`` for discrete schedules and ``karras`` for continuous ones (:func:`resolve_spacing`).

Every grid built here but ``quadratic`` is strictly decreasing for ``1 <= num_steps <= N`` (N
training indices); a grid a caller builds by hand must be non-increasing (:func:`check_sigma_grid`),
and a repeated value is a zero-length step, which every sampler skips but UniPC's final corrector
(see :mod:`diffsweep.samplers`).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from torch import Tensor

from diffsweep.schedules import NoiseSchedule

DISCRETE_SPACINGS = ("leading", "trailing", "linspace", "linspace_frac", "quadratic")
CONTINUOUS_SPACINGS = ("karras", "uniform_t", "log_snr")
SPACINGS = ("auto",) + DISCRETE_SPACINGS + CONTINUOUS_SPACINGS


def check_spacing(spacing: str) -> None:
    """Raise a ValueError naming the valid spacings if ``spacing`` is not one of them."""
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}.")


def check_num_steps(num_steps: int) -> int:
    """``num_steps`` as an int, or a ValueError naming ``sampler.num_steps`` (integer >= 1).

    The one check of the step count: :class:`diffsweep.samplers.Sampler`, :func:`sigma_grid` and
    :func:`discrete_timesteps` all call it. Integral floats (``10.0``) are accepted; bools are not.
    """
    integral = (isinstance(num_steps, Integral)
                or (isinstance(num_steps, Real) and float(num_steps).is_integer()))
    if isinstance(num_steps, bool) or not integral or num_steps < 1:
        raise ValueError(f"sampler.num_steps must be an integer >= 1 (grid intervals), "
                         f"got {num_steps!r}.")
    return int(num_steps)


def check_sigma_grid(sigmas: Tensor) -> None:
    """Raise a ValueError unless ``sigmas`` is a 1-D, finite, non-negative, non-increasing grid.

    Repeated values are allowed (zero-length steps, which the samplers skip but UniPC's final
    corrector); an increase, a
    negative or a non-finite value, or another shape is an error naming the offending entries.
    """
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 1:
        shape = tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(f"A sigma grid must be a 1-D tensor of at least one value "
                         f"(decreasing, ending at 0), got {shape}.")
    values = sigmas.tolist()
    for i, value in enumerate(values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"Sigma grids hold finite values >= 0; sigmas[{i}] = {value}. "
                             f"Build grids with diffsweep.grids.sigma_grid or end them at 0.")
    for i, (value, next_value) in enumerate(zip(values[:-1], values[1:])):
        if next_value > value:
            raise ValueError(f"A sigma grid must be non-increasing (samplers integrate from "
                             f"sigmas[0] down to 0), but sigmas[{i}] = {value} < "
                             f"sigmas[{i + 1}] = {next_value}; sort it in decreasing order.")


def resolve_spacing(schedule: NoiseSchedule, spacing: str) -> str:
    """``auto`` -> the schedule's own ``auto_spacing`` if it names one (flow matching:
    ``uniform_t``, diffusers' FlowMatchEuler grid), else ``leading`` for a discrete schedule and
    ``karras`` for a continuous one."""
    check_spacing(spacing)
    if spacing == "auto":
        own = getattr(schedule, "auto_spacing", None)
        if own is not None:
            return own
        return "leading" if schedule.discrete else "karras"
    return spacing


def discrete_timesteps(num_train_timesteps: int, num_steps: int, spacing: str,
                       steps_offset: int = 0) -> Tensor:
    """Training indices visited by a ``num_steps`` sampler, decreasing,
    as diffusers' DDIM picks them.

    ``leading``: ``arange(num_steps) * (N // num_steps) + steps_offset``; ``trailing``:
    ``round(arange(N, 0, -N / num_steps)) - 1``; ``linspace``:
    ``round(linspace(0, N - 1, num_steps))``;
    ``linspace_frac``: float32 ``linspace(0, N - 1, num_steps)`` unrounded (Euler/Heun/LMS);
    ``quadratic``: ``floor(linspace(0, sqrt(0.8 N), num_steps) ** 2)`` (DDIM's CIFAR-10 tau).
    Returns float64 of shape ``(num_steps,)``, within ``[0, N - 1]``, strictly decreasing except
    for ``quadratic``'s repeated small indices (non-increasing).

    ``trailing`` keeps the first ``num_steps`` values of diffusers' ``arange(N, 0, -N / n)``:
    for some step counts (62 of 1..1000 for N = 1000: 61, 103, ..., 769, ..., 998) float rounding
    gives that arange an extra entry, timestep -1, and diffusers 0.42 runs ``num_steps + 1`` steps.
    """
    n = num_train_timesteps
    num_steps = check_num_steps(num_steps)
    if num_steps > n:
        raise ValueError(f"sampler.num_steps={num_steps} exceeds the schedule's {n} training "
                         f"indices; use at most {n} steps or a continuous spacing "
                         f"({', '.join(CONTINUOUS_SPACINGS)}).")
    if spacing == "leading":
        step_ratio = n // num_steps
        timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        step_ratio = n / num_steps
        timesteps = np.round(np.arange(n, 0, -step_ratio)[:num_steps]) - 1
    elif spacing == "linspace":
        timesteps = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif spacing == "linspace_frac":
        timesteps = np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1]
    elif spacing == "quadratic":
        timesteps = np.floor(np.linspace(0, np.sqrt(n * 0.8), num_steps) ** 2)[::-1]
    else:
        raise ValueError(f"Spacing {spacing!r} is not a discrete spacing; choose one of "
                         f"{', '.join(DISCRETE_SPACINGS)}.")
    if timesteps.max() > n - 1:
        raise ValueError(f"steps_offset={steps_offset} pushes the {spacing} grid past the last "
                         f"training index {n - 1}; lower steps_offset or num_steps.")
    return torch.from_numpy(timesteps.astype(np.float64).copy())


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: ``(max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho``."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_grid(schedule: NoiseSchedule, num_steps: int, spacing: str, rho: float = 7.0,
               steps_offset: int = 0) -> Tensor:
    """The sigma~ grid for ``num_steps`` steps: float64 of shape ``(num_steps + 1,)``, last entry 0.

    Raises ValueError for an unknown spacing, a ``num_steps`` that :func:`check_num_steps`
    refuses, or a discrete spacing on a continuous schedule / with more steps than training
    indices. ``spacing="auto"`` is resolved with :func:`resolve_spacing`.
    """
    spacing = resolve_spacing(schedule, spacing)
    num_steps = check_num_steps(num_steps)
    if spacing in DISCRETE_SPACINGS:
        if not schedule.discrete:
            raise ValueError(f"Spacing {spacing!r} needs a discrete schedule (linear, "
                             f"scaled_linear, cosine); for {type(schedule).__name__} use one of "
                             f"{', '.join(CONTINUOUS_SPACINGS)}.")
        timesteps = discrete_timesteps(schedule.num_train_timesteps, num_steps, spacing,
                                       steps_offset)
        sigmas = schedule.sigma_tilde(timesteps)
    elif spacing == "karras":
        sigmas = karras_sigmas(schedule.sigma_min, schedule.sigma_max, num_steps, rho)
    elif spacing == "uniform_t":
        t = torch.linspace(schedule.t_max, schedule.t_min, num_steps, dtype=torch.float64)
        sigmas = schedule.sigma_tilde(t)
    else:  # log_snr: lambda = -log sigma~ uniform
        log_sigmas = torch.linspace(np.log(schedule.sigma_max), np.log(schedule.sigma_min),
                                    num_steps, dtype=torch.float64)
        sigmas = log_sigmas.exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])
