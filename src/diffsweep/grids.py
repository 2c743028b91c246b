"""Sampling grids: a decreasing sequence of sigma~ values that ends at 0.

Discrete spacings pick training indices the way diffusers' ``set_timesteps`` does and map them to
sigma~ with the schedule's table (linear interpolation in sigma~ between entries, as diffusers'
``np.interp``):

- ``leading``, ``trailing``, ``linspace``: ``DDIMScheduler`` / ``DDPMScheduler`` (integer indices;
  ``linspace`` is rounded);
- ``linspace_frac``: ``EulerDiscreteScheduler`` / Heun / LMS ``linspace`` (fractional indices,
  float32 ``linspace(0, N-1, n)``, no rounding).

``karras`` (rho = 7), ``uniform_t`` and ``log_snr`` work for any schedule. ``auto`` resolves to
``leading`` for discrete schedules and ``karras`` for continuous ones (:func:`resolve_spacing`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from diffsweep.schedules import NoiseSchedule

DISCRETE_SPACINGS = ("leading", "trailing", "linspace", "linspace_frac")
CONTINUOUS_SPACINGS = ("karras", "uniform_t", "log_snr")
SPACINGS = ("auto",) + DISCRETE_SPACINGS + CONTINUOUS_SPACINGS


def check_spacing(spacing: str) -> None:
    """Raise a ValueError naming the valid spacings if ``spacing`` is not one of them."""
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}.")


def resolve_spacing(schedule: NoiseSchedule, spacing: str) -> str:
    """``auto`` -> ``leading`` for a discrete schedule, ``karras`` for a continuous one."""
    check_spacing(spacing)
    if spacing == "auto":
        return "leading" if schedule.discrete else "karras"
    return spacing


def discrete_timesteps(num_train_timesteps: int, num_steps: int, spacing: str,
                       steps_offset: int = 0) -> Tensor:
    """Training indices visited by a ``num_steps`` sampler, decreasing, as diffusers' DDIM picks them.

    ``leading``: ``arange(num_steps) * (N // num_steps) + steps_offset``; ``trailing``:
    ``round(arange(N, 0, -N / num_steps)) - 1``; ``linspace``: ``round(linspace(0, N - 1, num_steps))``;
    ``linspace_frac``: float32 ``linspace(0, N - 1, num_steps)`` unrounded (Euler/Heun/LMS).
    Returns float64 of shape ``(num_steps,)``.
    """
    n = num_train_timesteps
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    if num_steps > n:
        raise ValueError(f"num_steps={num_steps} exceeds the schedule's {n} training indices; "
                         f"use at most {n} steps or a continuous spacing "
                         f"({', '.join(CONTINUOUS_SPACINGS)}).")
    if spacing == "leading":
        step_ratio = n // num_steps
        timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1] + steps_offset
    elif spacing == "trailing":
        step_ratio = n / num_steps
        timesteps = np.round(np.arange(n, 0, -step_ratio)) - 1
    elif spacing == "linspace":
        timesteps = np.linspace(0, n - 1, num_steps).round()[::-1]
    elif spacing == "linspace_frac":
        timesteps = np.linspace(0, n - 1, num_steps, dtype=np.float32)[::-1]
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

    Raises ValueError for an unknown spacing, ``num_steps < 1``, or a discrete spacing on a
    continuous schedule / with more steps than training indices. ``spacing="auto"`` is resolved
    with :func:`resolve_spacing`.
    """
    spacing = resolve_spacing(schedule, spacing)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
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
