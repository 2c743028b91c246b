"""Noise schedules: ``x_t = alpha(t) * x0 + sigma(t) * eps``.

Every schedule also exposes its *sigma-space* view (Karras et al. 2022): with
``x~ = x_t / alpha`` and ``sigma~ = sigma / alpha`` every schedule reads ``x~ = x0 + sigma~ * eps``,
so one sampler serves VP, VE and flow matching alike. Throughout this package ``sigma`` in a
sampler or a denoiser means ``sigma~``; ``alpha(t)`` / ``sigma(t)`` here are the schedule's own
x-space terms.

Tables and conversions are computed in float64; callers cast the results to the model's dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Integral, Real

import torch
from torch import Tensor

__all__ = [
    "NoiseSchedule",
    "DiscreteVPSchedule",
    "ContinuousVPSchedule",
    "VESchedule",
    "EDMSchedule",
    "FlowMatchingSchedule",
    "FLOW_DENSITIES",
    "flow_dynamic_shift",
    "discrete_betas",
    "rescale_zero_terminal_snr",
    "check_discrete_vp_arguments",
    "check_continuous_vp_arguments",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: The config node schedule arguments come from (``configs/scheduler/*.yaml``); error messages
#: name ``<SCHEDULE_KEY>.<argument>``.
SCHEDULE_KEY = "scheduler"


def _as_float64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


class NoiseSchedule(ABC):
    """A forward process ``x_t = alpha(t) x0 + sigma(t) eps`` and what the net is told about t.

    Subclasses define the x-space ``alpha``/``sigma``, the inverse ``t_of_sigma`` of ``sigma~(t)``,
    the training-time distribution of t (``sample_t``), and the noise conditioning ``c_noise``.
    All tensor methods are elementwise over any shape.
    """

    #: True for schedules defined on a table of training indices 0..N-1 (DDPM-style).
    discrete: bool = False
    #: Length of the training table for discrete schedules, else None.
    num_train_timesteps: int | None = None
    #: Data standard deviation assumed by the input scaling ``c_in`` (EDM's sigma_data).
    sigma_data: float = 1.0

    @property
    @abstractmethod
    def t_min(self) -> float:
        """Smallest t used for training and sampling."""

    @property
    @abstractmethod
    def t_max(self) -> float:
        """Largest t (the prior end)."""

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale alpha(t) (float64)."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale sigma(t) (float64), x-space."""

    def sigma_tilde(self, t: Tensor) -> Tensor:
        """Noise level in sigma-space, ``sigma(t) / alpha(t)`` (float64)."""
        t = _as_float64(t)
        return self.sigma(t) / self.alpha(t)

    @abstractmethod
    def t_of_sigma(self, sigma_tilde: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_tilde` (float64)."""

    @abstractmethod
    def sample_t(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        """Draw training times, shape ``(batch_size,)`` float64 on ``device``."""

    @abstractmethod
    def c_noise(self, t: Tensor) -> Tensor:
        """What the network is told about the noise level at time t."""

    @property
    def sigma_min(self) -> float:
        """Smallest sigma~ of the schedule (at ``t_min``)."""
        return float(self.sigma_tilde(_as_float64(self.t_min)))

    @property
    def sigma_max(self) -> float:
        """Largest sigma~ of the schedule (at ``t_max``)."""
        return float(self.sigma_tilde(_as_float64(self.t_max)))

    def c_in(self, sigma_tilde: Tensor) -> Tensor:
        """Input scale so the net sees ``c_in * x~`` with about unit variance.

        ``1 / sqrt(sigma~^2 + sigma_data^2)``; with ``sigma_data = 1`` (VP) this is alpha, so the
        net sees exactly ``x_t``.
        """
        sigma_tilde = _as_float64(sigma_tilde)
        return torch.rsqrt(sigma_tilde**2 + self.sigma_data**2)

    def prior_std(self, sigma_tilde: float) -> float:
        """Standard deviation of ``x~`` at noise level sigma~ under the prior the sampler
        starts from.

        VP samplers start from ``x_T ~ N(0, I)``, i.e. ``x~ = x_T / alpha`` with std
        ``sqrt(1 + sigma~^2)``; VE/EDM start from ``N(0, sigma_max^2 I)``.
        """
        return math.sqrt(1.0 + sigma_tilde**2)

    def training_sigma_tilde(self, batch_size: int, generator: torch.Generator | None = None,
                             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Draw ``(t, sigma~(t))`` for a training batch, both float64 of shape ``(batch_size,)``."""
        t = self.sample_t(batch_size, generator=generator, device=device)
        return t, self.sigma_tilde(t)

    def log_snr(self, t: Tensor) -> Tensor:
        """``log(alpha^2 / sigma^2) = -2 log sigma~(t)`` (float64; +inf where sigma~ = 0)."""
        return -2 * self.sigma_tilde(_as_float64(t)).log()


def _constructor_repr(obj: object, **arguments: object) -> str:
    """``ClassName(key=value, ...)`` with ``repr`` values: evaluates back to an equal schedule."""
    fields = ", ".join(f"{key}={value!r}" for key, value in arguments.items())
    return f"{type(obj).__name__}({fields})"


# --------------------------------------------------------------------------- discrete VP


def discrete_betas(beta_schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> Tensor:
    """The beta table of diffusers' ``DDPMScheduler`` for ``beta_schedule``, bit for bit.

    diffusers builds these tables in float32 (``torch.linspace(..., dtype=float32)``; the cosine
    betas in Python floats then cast); we reproduce that arithmetic exactly so that nets trained
    with diffusers (and their reference numbers) plug in, and return float64 from there on.
    """
    n = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(time: float) -> float:
            return math.cos((time + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=torch.float32,
        )
    else:
        raise ValueError(
            f"Unknown beta_schedule {beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}."
        )
    return betas


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_train_timesteps(num_train_timesteps: object, key: str) -> None:
    if not _is_integer(num_train_timesteps) or num_train_timesteps < 2:
        raise ValueError(f"{key}.num_train_timesteps={num_train_timesteps!r} is not allowed: the "
                         f"number of training noise levels is an integer >= 2 (e.g. 1000).")


def check_discrete_vp_arguments(beta_schedule: object, num_train_timesteps: object,
                                beta_start: object, beta_end: object,
                                key: str = SCHEDULE_KEY) -> None:
    """Raise a one-line ValueError naming ``<key>.<argument>``, its value and what is allowed:
    a known ``beta_schedule``, an integer ``num_train_timesteps >= 2`` and, for the linear
    schedules, ``0 < beta_start <= beta_end < 1`` (a beta outside (0, 1) puts ``alphas_cumprod``
    outside (0, 1] and the first training step is NaN; decreasing betas are almost always swapped
    ends). The cosine schedule ignores ``beta_start``/``beta_end``."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"{key}.beta_schedule={beta_schedule!r} is not allowed: choose one of "
                         f"{', '.join(BETA_SCHEDULES)}.")
    _check_train_timesteps(num_train_timesteps, key)
    if beta_schedule == "squaredcos_cap_v2":
        return
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not _is_real(value) or not 0 < value < 1:
            raise ValueError(f"{key}.{name}={value!r} is not allowed: a beta is a number in "
                             f"(0, 1) (DDPM: beta_start=0.0001, beta_end=0.02); outside it "
                             f"alphas_cumprod leaves (0, 1] and training is NaN from step 0.")
    if beta_end < beta_start:
        raise ValueError(f"{key}.beta_end={beta_end!r} is not allowed with {key}.beta_start="
                         f"{beta_start!r}: the betas must not decrease (beta_start <= beta_end; "
                         f"swapped?).")


def check_continuous_vp_arguments(beta_min: object, beta_max: object, eps_t: object,
                                  num_train_timesteps: object, key: str = SCHEDULE_KEY) -> None:
    """Raise a one-line ValueError naming ``<key>.<argument>``, its value and what is allowed:
    finite ``0 < beta_min <= beta_max`` (a negative rate makes alpha > 1 and sigma NaN),
    ``0 < eps_t < 1`` and an integer ``num_train_timesteps >= 2``."""
    for name, value in (("beta_min", beta_min), ("beta_max", beta_max)):
        if not _is_real(value) or not 0 < value < math.inf:
            raise ValueError(f"{key}.{name}={value!r} is not allowed: the VP SDE's beta(t) "
                             f"rates are finite numbers > 0 (Song et al.: beta_min=0.1, "
                             f"beta_max=20).")
    if beta_max < beta_min:
        raise ValueError(f"{key}.beta_max={beta_max!r} is not allowed with {key}.beta_min="
                         f"{beta_min!r}: beta(t) must not decrease (beta_min <= beta_max; "
                         f"swapped?).")
    _check_eps_t(eps_t, key)
    _check_train_timesteps(num_train_timesteps, key)


def _check_eps_t(eps_t: object, key: str) -> None:
    if not _is_real(eps_t) or not 0 < eps_t < 1:
        raise ValueError(f"{key}.eps_t={eps_t!r} is not allowed: eps_t must lie in (0, 1) (the "
                         f"smallest t of training and sampling).")


def _check_sigma_range(sigma_min: object, sigma_max: object, key: str) -> None:
    if not _is_real(sigma_min) or not 0 < sigma_min < math.inf:
        raise ValueError(f"{key}.sigma_min={sigma_min!r} is not allowed: need 0 < sigma_min < "
                         f"sigma_max (finite numbers).")
    if not _is_real(sigma_max) or not sigma_min < sigma_max < math.inf:
        raise ValueError(f"{key}.sigma_max={sigma_max!r} is not allowed with {key}.sigma_min="
                         f"{sigma_min!r}: need 0 < sigma_min < sigma_max (finite numbers).")


def _check_positive(name: str, value: object, key: str) -> None:
    if not _is_real(value) or not 0 < value < math.inf:
        raise ValueError(f"{key}.{name}={value!r} is not allowed: it must be a finite number > 0.")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last one is exactly 0.

    Same arithmetic (and dtype) as diffusers' ``rescale_zero_terminal_snr``.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = alphas_bar[1:] / alphas_bar[:-1]
    alphas = torch.cat([alphas_bar[0:1], alphas])
    return 1 - alphas


class DiscreteVPSchedule(NoiseSchedule):
    """DDPM-style VP schedule on training indices ``n = 0..N-1``.

    ``alpha(n) = sqrt(alphas_cumprod[n])``, ``sigma(n) = sqrt(1 - alphas_cumprod[n])``; training
    draws n uniformly from the integers; the net is told ``c_noise = n``. Between table entries
    ``sigma~(t)`` is interpolated linearly in sigma~ (as diffusers' ``set_timesteps`` does with
    ``np.interp``) and ``t_of_sigma`` is its exact inverse, so fractional grids tell the net the
    same fractional t diffusers' Euler-type schedulers pass.

    Args:
        beta_schedule: ``linear`` (DDPM), ``scaled_linear`` (Stable Diffusion) or
            ``squaredcos_cap_v2`` (cosine, Nichol & Dhariwal).
        num_train_timesteps: N.
        beta_start, beta_end: ends of the linear schedules (ignored by cosine).
        rescale_betas_zero_snr: rescale to zero terminal SNR (Lin et al. 2023). The last sigma~ is
            then infinite; as diffusers does for its sigma-space samplers, it is evaluated with
            ``alphas_cumprod[-1] = 2**-24``.
    """

    discrete = True

    def __init__(self, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02,
                 rescale_betas_zero_snr: bool = False) -> None:
        check_discrete_vp_arguments(beta_schedule, num_train_timesteps, beta_start, beta_end)
        self.beta_schedule = beta_schedule
        self.beta_start, self.beta_end = beta_start, beta_end
        self._set_betas(discrete_betas(beta_schedule, num_train_timesteps, beta_start, beta_end),
                        rescale_betas_zero_snr)
        self._check_no_underflow()

    def _check_no_underflow(self) -> None:
        """``alphas_cumprod`` must stay > 0 (float32, as diffusers computes it): large betas over
        many steps underflow to 0, i.e. sigma~ = inf (zero terminal SNR is meant to do that at
        the last index only, and is evaluated at 2**-24 there)."""
        checked = self.num_train_timesteps - int(self.rescale_betas_zero_snr)
        zero = (self.alphas_cumprod[:checked] <= 0).nonzero()
        if len(zero):
            key = SCHEDULE_KEY
            blame = ("num_train_timesteps" if self.beta_schedule == "squaredcos_cap_v2"
                     else "beta_end")
            raise ValueError(f"{key}.{blame}={getattr(self, blame)!r} is not allowed with "
                             f"{key}.num_train_timesteps={self.num_train_timesteps}: "
                             f"alphas_cumprod underflows to 0 at index {int(zero[0])} (sigma~ = "
                             f"inf, NaN in training); lower {key}.beta_end or "
                             f"{key}.num_train_timesteps (DDPM: 0.02 over 1000).")

    def _set_betas(self, betas: Tensor, rescale_betas_zero_snr: bool) -> None:
        """The tables of a float32 beta table (diffusers' arithmetic), held as float64."""
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        num_train_timesteps = len(betas)
        self.num_train_timesteps = num_train_timesteps
        self.rescale_betas_zero_snr = rescale_betas_zero_snr
        self.betas = betas.to(torch.float64)
        #: Exactly diffusers' ``alphas_cumprod`` (float32 arithmetic), held as float64.
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)
        alphas_cumprod = self.alphas_cumprod.clone()
        if rescale_betas_zero_snr:
            alphas_cumprod[-1] = 2.0**-24
        #: sigma~ at each training index, increasing in n.
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        increasing = bool((self.sigmas[1:] > self.sigmas[:-1]).all())
        self._monotone_len = num_train_timesteps if increasing else num_train_timesteps - 1

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    def sigma_tilde(self, t: Tensor) -> Tensor:
        t = _as_float64(t).clamp(self.t_min, self.t_max)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        weight = t - low
        return (1 - weight) * self.sigmas[low] + weight * self.sigmas[low + 1]

    def alpha(self, t: Tensor) -> Tensor:
        return torch.rsqrt(1 + self.sigma_tilde(t) ** 2)

    def sigma(self, t: Tensor) -> Tensor:
        sigma_tilde = self.sigma_tilde(t)
        return sigma_tilde * torch.rsqrt(1 + sigma_tilde**2)

    def t_of_sigma(self, sigma_tilde: Tensor) -> Tensor:
        """Exact inverse of :meth:`sigma_tilde` (linear in sigma~ between table entries).

        Table values map to their integer index exactly; sigma~ outside the table is clamped to
        ``[0, N - 1]``. (diffusers' ``_sigma_to_t`` interpolates in log sigma~ instead; the two
        agree on table entries and differ by < 0.05 index units in between (0.4 on the first
        interval of the cosine table).) With zero terminal SNR the table is not monotone at its end
        (sigma~[N-2] > sigma~[N-1] = 4096, as in diffusers): the increasing part ``0..N-2`` is
        inverted and ``sigma~[N-1]`` itself maps to ``N - 1``.
        """
        sigma_tilde = _as_float64(sigma_tilde)
        table = self.sigmas[: self._monotone_len]
        clamped = sigma_tilde.clamp(float(table[0]), float(table[-1]))
        high = torch.searchsorted(table, clamped.reshape(-1), right=False)
        high = high.clamp(1, len(table) - 1).reshape(clamped.shape)
        low = high - 1
        low_sigma, high_sigma = table[low], table[high]
        weight = ((clamped - low_sigma) / (high_sigma - low_sigma)).clamp(0, 1)
        t = low.to(torch.float64) + weight
        if self._monotone_len < self.num_train_timesteps:
            t = torch.where(sigma_tilde == self.sigmas[-1], float(self.num_train_timesteps - 1), t)
        return t

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        n = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator,
                          device=generator.device if generator is not None else device)
        return n.to(device=device, dtype=torch.float64)

    def c_noise(self, t: Tensor) -> Tensor:
        return _as_float64(t)

    def __repr__(self) -> str:
        return _constructor_repr(self, beta_schedule=self.beta_schedule,
                                 num_train_timesteps=self.num_train_timesteps,
                                 beta_start=self.beta_start, beta_end=self.beta_end,
                                 rescale_betas_zero_snr=self.rescale_betas_zero_snr)


# --------------------------------------------------------------------------- continuous


def _uniform(batch_size: int, low: float, high: float, generator: torch.Generator | None,
             device: torch.device | str) -> Tensor:
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64,
                   device=generator.device if generator is not None else device)
    return (low + (high - low) * u).to(device)


class _SDESchedule(NoiseSchedule):
    """Song et al.'s SDE schedules: t in [eps_t, 1], training t ~ U[eps_t, 1]."""

    eps_t: float

    @property
    def t_min(self) -> float:
        return self.eps_t

    @property
    def t_max(self) -> float:
        return 1.0

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        return _uniform(batch_size, self.eps_t, 1.0, generator, device)


class ContinuousVPSchedule(_SDESchedule):
    """Song et al.'s VP SDE: ``alpha(t) = exp(-t^2 (b1 - b0)/4 - t b0/2)``,
    ``sigma = sqrt(1 - alpha^2)``.

    Training t ~ U[eps_t, 1]; the net is told ``c_noise = (N - 1) t`` (999 t for N = 1000).
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps_t: float = 1e-3,
                 num_train_timesteps: int = 1000) -> None:
        check_continuous_vp_arguments(beta_min, beta_max, eps_t, num_train_timesteps)
        self.beta_min, self.beta_max, self.eps_t = beta_min, beta_max, eps_t
        self.c_noise_scale = num_train_timesteps - 1
        self._num_train_timesteps = num_train_timesteps

    def _log_alpha(self, t: Tensor) -> Tensor:
        t = _as_float64(t)
        return -(t**2) * (self.beta_max - self.beta_min) / 4 - t * self.beta_min / 2

    def alpha(self, t: Tensor) -> Tensor:
        return self._log_alpha(t).exp()

    def sigma(self, t: Tensor) -> Tensor:
        return (-torch.expm1(2 * self._log_alpha(t))).sqrt()

    def sigma_tilde(self, t: Tensor) -> Tensor:
        return torch.expm1(-2 * self._log_alpha(t)).sqrt()

    def t_of_sigma(self, sigma_tilde: Tensor) -> Tensor:
        # log(1 + sigma~^2) = -2 log alpha = t^2 (b1 - b0)/2 + t b0: solve the quadratic for t >= 0.
        rhs = torch.log1p(_as_float64(sigma_tilde) ** 2)
        quad = (self.beta_max - self.beta_min) / 2
        if quad == 0:
            return rhs / self.beta_min
        return (-self.beta_min + (self.beta_min**2 + 4 * quad * rhs).sqrt()) / (2 * quad)

    def c_noise(self, t: Tensor) -> Tensor:
        return self.c_noise_scale * _as_float64(t)

    def __repr__(self) -> str:
        return _constructor_repr(self, beta_min=self.beta_min, beta_max=self.beta_max,
                                 eps_t=self.eps_t, num_train_timesteps=self._num_train_timesteps)


class VESchedule(_SDESchedule):
    """Song et al.'s VE SDE: ``alpha = 1``, ``sigma(t) = sigma_min (sigma_max / sigma_min)^t``.

    Training t ~ U[eps_t, 1]; the net is told ``c_noise = log(sigma) / 4``; the input is scaled by
    ``1 / sqrt(sigma^2 + sigma_data^2)`` (EDM's c_in).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, eps_t: float = 1e-5,
                 sigma_data: float = 0.5) -> None:
        _check_sigma_range(sigma_min, sigma_max, SCHEDULE_KEY)
        _check_eps_t(eps_t, SCHEDULE_KEY)
        _check_positive("sigma_data", sigma_data, SCHEDULE_KEY)
        self._sigma_min, self._sigma_max, self.eps_t = sigma_min, sigma_max, eps_t
        self.sigma_data = sigma_data
        self._log_ratio = math.log(sigma_max / sigma_min)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_float64(t))

    def sigma(self, t: Tensor) -> Tensor:
        return self._sigma_min * torch.exp(_as_float64(t) * self._log_ratio)

    def t_of_sigma(self, sigma_tilde: Tensor) -> Tensor:
        return torch.log(_as_float64(sigma_tilde) / self._sigma_min) / self._log_ratio

    def c_noise(self, t: Tensor) -> Tensor:
        return self.sigma(t).log() / 4

    def prior_std(self, sigma_tilde: float) -> float:
        return sigma_tilde

    def __repr__(self) -> str:
        return _constructor_repr(self, sigma_min=self._sigma_min, sigma_max=self._sigma_max,
                                 eps_t=self.eps_t, sigma_data=self.sigma_data)


class EDMSchedule(NoiseSchedule):
    """Karras et al. 2022: ``alpha = 1``, ``sigma(t) = t``; training
    ``ln sigma ~ N(P_mean, P_std^2)``.

    The net is told ``c_noise = log(sigma) / 4`` and sees ``x / sqrt(sigma^2 + sigma_data^2)``.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, p_mean: float = -1.2,
                 p_std: float = 1.2, sigma_data: float = 0.5) -> None:
        _check_sigma_range(sigma_min, sigma_max, SCHEDULE_KEY)
        if not _is_real(p_mean) or not math.isfinite(p_mean):
            raise ValueError(f"{SCHEDULE_KEY}.p_mean={p_mean!r} is not allowed: the mean of "
                             f"ln(sigma) in training is a finite number (EDM: -1.2).")
        _check_positive("p_std", p_std, SCHEDULE_KEY)
        _check_positive("sigma_data", sigma_data, SCHEDULE_KEY)
        self._sigma_min, self._sigma_max = sigma_min, sigma_max
        self.p_mean, self.p_std, self.sigma_data = p_mean, p_std, sigma_data

    @property
    def t_min(self) -> float:
        return self._sigma_min

    @property
    def t_max(self) -> float:
        return self._sigma_max

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(_as_float64(t))

    def sigma(self, t: Tensor) -> Tensor:
        return _as_float64(t)

    def t_of_sigma(self, sigma_tilde: Tensor) -> Tensor:
        return _as_float64(sigma_tilde)

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        normal = torch.randn(batch_size, generator=generator, dtype=torch.float64,
                             device=generator.device if generator is not None else device)
        return (self.p_mean + self.p_std * normal).exp().to(device)

    def c_noise(self, t: Tensor) -> Tensor:
        return _as_float64(t).log() / 4

    def prior_std(self, sigma_tilde: float) -> float:
        return sigma_tilde

    def __repr__(self) -> str:
        return _constructor_repr(self, sigma_min=self._sigma_min, sigma_max=self._sigma_max,
                                 p_mean=self.p_mean, p_std=self.p_std, sigma_data=self.sigma_data)


# --------------------------------------------------------------------------- flow matching

#: Training-time densities of :class:`FlowMatchingSchedule` (diffusers' ``weighting_scheme``).
FLOW_DENSITIES = ("uniform", "logit_normal", "mode", "cosmap")
FLOW_TIME_SHIFT_TYPES = ("exponential", "linear")
#: ``mode_scale`` values for which ``f_mode`` is monotone (so the density exists on [0, 1]).
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))


def flow_dynamic_shift(image_seq_len: int, base_image_seq_len: int = 256,
                       max_image_seq_len: int = 4096, base_shift: float = 0.5,
                       max_shift: float = 1.15, time_shift_type: str = "exponential") -> float:
    """The static shift ``k`` that SD3/Flux-style resolution-dependent shifting amounts to.

    ``mu = base_shift + (max_shift - base_shift) (image_seq_len - base_image_seq_len) /
    (max_image_seq_len - base_image_seq_len)``, linear in the number of latent tokens (diffusers'
    ``calculate_shift`` in the Flux/SD3 pipelines). diffusers then maps the unshifted t with
    ``time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1)`` (``exponential``) or
    ``mu / (mu + 1/t - 1)`` (``linear``), which is the static shift
    ``k t / (1 + (k - 1) t)`` with ``k = exp(mu)`` or ``k = mu``.
    """
    if time_shift_type not in FLOW_TIME_SHIFT_TYPES:
        raise ValueError(f"Unknown time_shift_type {time_shift_type!r}; choose one of "
                         f"{', '.join(FLOW_TIME_SHIFT_TYPES)}.")
    if int(image_seq_len) != image_seq_len or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive integer (latent tokens per image), "
                         f"got {image_seq_len!r}.")
    if max_image_seq_len == base_image_seq_len:
        raise ValueError(f"max_image_seq_len must differ from base_image_seq_len, both are "
                         f"{base_image_seq_len}.")
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    mu = base_shift + slope * (image_seq_len - base_image_seq_len)
    if time_shift_type == "exponential":
        return math.exp(mu)
    if mu <= 0:
        raise ValueError(f"time_shift_type='linear' needs mu > 0, got mu={mu} for "
                         f"image_seq_len={image_seq_len}.")
    return mu


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow / flow matching (Liu et al. 2022; Lipman et al. 2022; Esser et al. 2024).

    ``x_t = (1 - s) x0 + s eps`` with the noise level ``s = s(t) = k t / (1 + (k - 1) t)``: ``t``
    is the schedule's time *before* the timestep shift ``k`` (diffusers' unshifted
    ``timesteps / N``), ``s`` is what diffusers' ``FlowMatchEulerDiscreteScheduler`` calls
    ``sigmas``. So ``alpha(t) = 1 - s``, ``sigma(t) = s`` (``k = 1``: ``alpha = 1 - t``,
    ``sigma = t``) and in sigma-space

        ``sigma~(t) = s / (1 - s) = k t / (1 - t)``,  ``t(sigma~) = sigma~ / (k + sigma~)``:

    the shift multiplies sigma~ by ``k`` (divides the SNR by ``k^2``), which is how SD3 moves
    training and sampling towards noise at higher resolutions (Esser et al. 2024,
    "resolution-dependent shifting": ``k = sqrt(m / n)`` for m vs n pixels; SD3 uses ``k = 3``).
    With ``use_dynamic_shifting`` (Flux) ``k`` follows the number of latent tokens, see
    :func:`flow_dynamic_shift`.

    What the net sees: ``c_in(sigma~) = 1 / (1 + sigma~) = 1 - s``, so ``c_in * x~ = x_t`` exactly
    (not the unit-variance ``1 / sqrt(sigma~^2 + sigma_data^2)`` of the other schedules: flow nets
    are trained on ``x_t``), and ``c_noise(t) = N s`` (``N = num_train_timesteps = 1000``): the
    ``timestep`` that ``FlowMatchEulerDiscreteScheduler`` passes to the SD3 transformer (Flux's
    pipeline passes ``s`` and its transformer multiplies by 1000). The sampler's prior is
    ``x_T ~ N(0, I)`` in x-space, so ``prior_std(sigma~) = 1 / alpha = 1 + sigma~``.

    Training time ``t = u`` with ``u`` drawn from ``density`` exactly as diffusers'
    ``compute_density_for_timestep_sampling`` draws it (same calls on the generator, float32; same
    seed, same u to float32 rounding), then clamped to ``[t_min, t_max]`` (Esser et al. 2024,
    Sec. 3.1, "tailored SNR samplers"):

    - ``uniform``: ``u ~ U(0, 1)``;
    - ``logit_normal``: ``u = sigmoid(n)``, ``n ~ N(logit_mean, logit_std^2)`` (SD3's best:
      ``logit_mean = 0``, ``logit_std = 1``);
    - ``mode``: ``u = 1 - v - mode_scale (cos^2(pi v / 2) - 1 + v)``, ``v ~ U(0, 1)`` (SD3 uses
      1.29; ``mode_scale`` in ``[-1, 2 / (pi - 2)]`` keeps it monotone);
    - ``cosmap``: ``u = 1 - 1 / (tan(pi v / 2) + 1)``, density ``2 / (pi (1 - 2u + 2u^2))``
      (``sigma~ = tan(pi v / 2)`` for k = 1: the cosine schedule's noise levels). diffusers has no
      cosmap *density*: its ``cosmap`` draws u uniformly and weights the loss by
      ``compute_loss_weighting_for_sd3('cosmap')``, which is exactly this density, so the two
      agree in expectation.

    The shift applies to training too (``s = s(u)``), as SD3 shifts its training distribution.
    diffusers' example training scripts index the scheduler's descending table with
    ``int(u N)``, i.e. train at ``s(1 - floor(u N) / N)``: identical in distribution up to the
    1/N discretisation for the four densities above, which are symmetric about 1/2, except
    ``logit_normal`` with ``logit_mean != 0``, whose sign is then flipped; here ``logit_mean > 0``
    favours noise, as in the SD3 paper.

    Range. ``t = 1`` is pure noise and ``sigma~ = inf``; diffusers' Euler grid starts there
    (``sigmas[0] = 1.0``). Our samplers need a finite start, so ``t_max = 1 - 1e-9`` by default
    (``sigma~_max = k 1e9``). Starting x~ at ``prior_std(sigma~_max) * noise`` then feeds the
    net exactly the noise itself and ``c_noise = N`` to float32 rounding, and the Euler step from
    there differs from the exact limit (``x~_1 = x0_hat + sigma~_1 * noise``) by ``~1e-9``: so
    Euler on the ``uniform_t`` grid *is* ``FlowMatchEulerDiscreteScheduler`` to float32 rounding
    (tests/test_flow.py). ``t_min`` (default None) is diffusers' last grid point before 0 in
    unshifted time: ``s_k(1 / N)`` for a static shift (diffusers shifts the table end, then
    shifts the grid again) and ``1 / N`` with dynamic shifting; training clamps to the same range.

    With ``t_max`` that close to 1, grids that follow sigma~ (``karras``, ``log_snr``) spend most
    steps at ``t > 0.99``, and an epsilon- or x0-predicting net must resolve x0 from eps at SNR
    ~1e-18. Heun takes an Euler step from such a start (``samplers.SIGMA_INFINITY``: its
    trapezoid would extrapolate by ``sigma~_max / sigma~_1`` there). Sample flow models with
    ``spacing=uniform_t``; for an epsilon-predicting net set ``t_max = 1 - 1 / N`` (diffusers'
    flow DPM-Solver/UniPC grids start there).

    Args:
        num_train_timesteps: N; the net is told ``c_noise = N s``.
        shift: static timestep shift ``k`` (SD3: 3.0); must stay 1.0 with dynamic shifting.
        use_dynamic_shifting: take ``k`` from ``image_seq_len`` (Flux), see
            :func:`flow_dynamic_shift`.
        image_seq_len: latent tokens per image (``(H / 8 / 2) * (W / 8 / 2)`` for Flux' VAE and
            2x2 patches); required with ``use_dynamic_shifting``.
        base_image_seq_len, max_image_seq_len, base_shift, max_shift, time_shift_type: the
            dynamic shift's line ``mu(image_seq_len)`` and map (diffusers' defaults).
        density: training-time density of u, one of :data:`FLOW_DENSITIES`.
        logit_mean, logit_std: ``logit_normal`` parameters.
        mode_scale: ``mode`` parameter.
        t_min, t_max: the range of t for sampling grids and training (see Range above).
        sigma_data: data std used by unit-variance conversions (``v_prediction`` targets, EDM-type
            loss weights); not by ``c_in``.
    """

    #: ``sampler.spacing=auto`` on this schedule: diffusers' FlowMatchEuler grid (uniform in t).
    auto_spacing = "uniform_t"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0,
                 use_dynamic_shifting: bool = False, image_seq_len: int | None = None,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096,
                 base_shift: float = 0.5, max_shift: float = 1.15,
                 time_shift_type: str = "exponential", density: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29,
                 t_min: float | None = None, t_max: float = 1 - 1e-9,
                 sigma_data: float = 1.0) -> None:
        key = SCHEDULE_KEY
        if not _is_integer(num_train_timesteps) or num_train_timesteps < 1:
            raise ValueError(f"{key}.num_train_timesteps={num_train_timesteps!r} is not allowed: "
                             f"num_train_timesteps must be a positive integer (the net is told "
                             f"N s).")
        if not _is_real(shift) or not 0 < shift < math.inf:
            raise ValueError(f"{key}.shift={shift!r} is not allowed: shift must be > 0 (1.0 = no "
                             f"shift, SD3: 3.0).")
        if density not in FLOW_DENSITIES:
            raise ValueError(f"{key}.density={density!r} is not allowed: choose one of "
                             f"{', '.join(FLOW_DENSITIES)}.")
        if not _is_real(logit_mean) or not math.isfinite(logit_mean):
            raise ValueError(f"{key}.logit_mean={logit_mean!r} is not allowed: logit_mean must be "
                             f"a finite number.")
        if not _is_real(logit_std) or not 0 < logit_std < math.inf:
            raise ValueError(f"{key}.logit_std={logit_std!r} is not allowed: logit_std must be > "
                             f"0.")
        low, high = MODE_SCALE_RANGE
        if not _is_real(mode_scale) or not low <= mode_scale <= high:
            raise ValueError(f"{key}.mode_scale={mode_scale!r} is not allowed: mode_scale must "
                             f"lie in [{low}, {high:.4f}] (f_mode monotone).")
        if time_shift_type not in FLOW_TIME_SHIFT_TYPES:
            raise ValueError(f"{key}.time_shift_type={time_shift_type!r} is not allowed: choose "
                             f"one of {', '.join(FLOW_TIME_SHIFT_TYPES)}.")
        _check_positive("sigma_data", sigma_data, key)
        if use_dynamic_shifting:
            if shift != 1.0:
                raise ValueError(f"{key}.shift={shift!r} is not allowed with "
                                 f"{key}.use_dynamic_shifting=true: they exclude each other (the "
                                 f"dynamic shift replaces the static one); set {key}.shift=1.0.")
            if image_seq_len is None:
                raise ValueError(f"{key}.image_seq_len=None is not allowed with "
                                 f"{key}.use_dynamic_shifting=true: use_dynamic_shifting=true "
                                 f"needs image_seq_len (latent tokens per image, e.g. 4096 for "
                                 f"Flux at 1024x1024).")
            for name, value in (("image_seq_len", image_seq_len),
                                ("base_image_seq_len", base_image_seq_len),
                                ("max_image_seq_len", max_image_seq_len)):
                if not _is_integer(value) or value < 1:
                    raise ValueError(f"{key}.{name}={value!r} is not allowed: {name} must be a "
                                     f"positive integer (latent tokens per image).")
            for name, value in (("base_shift", base_shift), ("max_shift", max_shift)):
                if not _is_real(value) or not math.isfinite(value):
                    raise ValueError(f"{key}.{name}={value!r} is not allowed: {name} must be a "
                                     f"finite number.")
            effective_shift = flow_dynamic_shift(image_seq_len, base_image_seq_len,
                                                 max_image_seq_len, base_shift, max_shift,
                                                 time_shift_type)
        else:
            effective_shift = float(shift)
        self._num_train_timesteps = int(num_train_timesteps)
        self.c_noise_scale = float(num_train_timesteps)
        #: The shift k actually applied (static ``shift`` or the dynamic one).
        self.shift = effective_shift
        self._static_shift = float(shift)
        self.use_dynamic_shifting = use_dynamic_shifting
        self.image_seq_len = image_seq_len
        self.base_image_seq_len, self.max_image_seq_len = base_image_seq_len, max_image_seq_len
        self.base_shift, self.max_shift = base_shift, max_shift
        self.time_shift_type = time_shift_type
        self.density = density
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.sigma_data = sigma_data
        if t_min is None:
            first = 1.0 / num_train_timesteps
            t_min = first if use_dynamic_shifting else self._shifted(first)
        if not (_is_real(t_min) and _is_real(t_max) and 0 < t_min < t_max < 1):
            name, value = (("t_min", t_min) if not (_is_real(t_min) and 0 < t_min < 1)
                           else ("t_max", t_max))
            raise ValueError(f"{key}.{name}={value!r} is not allowed: need 0 < t_min < "
                             f"t_max < 1 (t = 1 is pure noise, sigma~ = inf), got t_min={t_min}, "
                             f"t_max={t_max}.")
        self._t_min, self._t_max = float(t_min), float(t_max)

    def _shifted(self, t: float) -> float:
        return self.shift * t / (1 + (self.shift - 1) * t)

    @property
    def t_min(self) -> float:
        return self._t_min

    @property
    def t_max(self) -> float:
        return self._t_max

    def alpha(self, t: Tensor) -> Tensor:
        t = _as_float64(t)
        return (1 - t) / (1 + (self.shift - 1) * t)

    def sigma(self, t: Tensor) -> Tensor:
        """The noise level ``s = k t / (1 + (k - 1) t)`` (diffusers' ``sigmas``)."""
        t = _as_float64(t)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sigma_tilde(self, t: Tensor) -> Tensor:
        t = _as_float64(t)
        return self.shift * t / (1 - t)

    def t_of_sigma(self, sigma_tilde: Tensor) -> Tensor:
        """``sigma~ / (k + sigma~)``, written so that sigma~ = inf gives t = 1."""
        return 1 / (1 + self.shift / _as_float64(sigma_tilde))

    def c_noise(self, t: Tensor) -> Tensor:
        return self.c_noise_scale * self.sigma(t)

    def c_in(self, sigma_tilde: Tensor) -> Tensor:
        """``1 / (1 + sigma~) = alpha``: the net sees ``x_t = (1 - s) x~``, as flow nets expect."""
        return 1 / (1 + _as_float64(sigma_tilde))

    def prior_std(self, sigma_tilde: float) -> float:
        """``x_T ~ N(0, I)`` in x-space: ``x~ = x_T / alpha`` has std ``1 + sigma~``."""
        return 1.0 + sigma_tilde

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> Tensor:
        """u from :attr:`density` as diffusers draws it (in float32), clamped to [t_min, t_max]."""
        draw_device = generator.device if generator is not None else device
        if self.density == "logit_normal":
            normal = torch.normal(mean=self.logit_mean, std=self.logit_std, size=(batch_size,),
                                  generator=generator, device=draw_device, dtype=torch.float32)
            t = torch.sigmoid(normal.to(torch.float64))
        else:
            uniform = torch.rand(batch_size, generator=generator, device=draw_device,
                                 dtype=torch.float32).to(torch.float64)
            if self.density == "mode":
                t = 1 - uniform - self.mode_scale * (
                    torch.cos(math.pi * uniform / 2) ** 2 - 1 + uniform)
            elif self.density == "cosmap":
                t = 1 - 1 / (torch.tan(math.pi * uniform / 2) + 1)
            else:
                t = uniform
        return t.clamp(self._t_min, self._t_max).to(device)

    def __repr__(self) -> str:
        arguments: dict[str, object] = dict(num_train_timesteps=self._num_train_timesteps)
        if self.use_dynamic_shifting:
            arguments.update(use_dynamic_shifting=True, image_seq_len=self.image_seq_len,
                             base_image_seq_len=self.base_image_seq_len,
                             max_image_seq_len=self.max_image_seq_len,
                             base_shift=self.base_shift, max_shift=self.max_shift,
                             time_shift_type=self.time_shift_type)
        else:
            arguments.update(shift=self._static_shift)
        arguments.update(density=self.density)
        if self.density == "logit_normal":
            arguments.update(logit_mean=self.logit_mean, logit_std=self.logit_std)
        elif self.density == "mode":
            arguments.update(mode_scale=self.mode_scale)
        arguments.update(t_min=self._t_min, t_max=self._t_max, sigma_data=self.sigma_data)
        return _constructor_repr(self, **arguments)
