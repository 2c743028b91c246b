"""Flow matching as a fourth family: :class:`FlowMatchingSchedule` + the ``velocity`` prediction.

Conformance with diffusers (a dev dependency; nothing is downloaded):

- ``FlowMatchEulerDiscreteScheduler.set_timesteps``' sigmas and timesteps are our ``uniform_t``
  grid and ``c_noise``, for static and dynamic (Flux) shifts;
- its ``step`` loop is our Euler sampler over the velocity denoiser: "FlowMatchEuler is Euler in
  sigma~";
- ``compute_density_for_timestep_sampling`` draws the same u as :meth:`sample_t` for the same
  seed; ``cosmap`` (a loss weighting there, a density here) agrees in distribution;
- ``compute_loss_weighting_for_sd3`` equals the sigma~ forms written in docs/FLOW.md.

Tolerances: diffusers holds sigmas and timesteps in float32 (one ulp is 6e-8 at s ~ 1 and 6.1e-5
at timestep 1000) and runs its loop in float32; we compute in float64.

Distribution checks use the Kolmogorov-Smirnov distance written with torch (no scipy needed): for
n samples against an exact CDF, or n against m, the distance exceeds
``sqrt(ln(2 / a) / 2) * sqrt(1/n + 1/m)`` with probability below ``a``; we use ``a = 1e-4``
(2.23 sqrt(1/n + 1/m)), and each check is shown to reject the wrong distribution.

Solvers: on flow grids the exact Gaussian-mixture denoiser of :mod:`diffsweep.analytic` (flow is
just another sigma~ range there) gives the convergence of Euler, Heun, DPM-Solver++(2M), UniPC and
LMS, as in tests/test_sampler_order.py. The default grid starts at sigma~_max = k 1e9, which
stands for the pole sigma~ = inf (:data:`diffsweep.samplers.SIGMA_INFINITY`): Heun takes the
Euler step from it (EDM's trapezoid there extrapolates x0 by sigma~_0 / (2 sigma~_1) ~ 1e7).
"""

from __future__ import annotations

import ast
import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from diffsweep.analytic import GaussianMixture, rms_error
from diffsweep.denoiser import Denoiser
from diffsweep.grids import sigma_grid
from diffsweep.samplers import SAMPLERS, SIGMA_INFINITY, Sampler, heun_nfe_on, heun_plan, to_d
from diffsweep.schedules import DiscreteVPSchedule, FlowMatchingSchedule, flow_dynamic_shift

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.training_utils import (  # noqa: E402
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

REPO = Path(__file__).resolve().parents[1]
N = 1000
SIGMA_ULP = 1.2e-7      # two float32 ulps below 1
TIMESTEP_ULP = 1.3e-4   # two float32 ulps at 1000
KS_FACTOR = math.sqrt(math.log(2 / 1e-4) / 2)  # 2.23: KS rejection at level 1e-4


@functools.cache
def diffusers_calculate_shift():
    """diffusers' own ``calculate_shift`` (Flux pipeline), read from its source: importing the
    pipeline module needs ``transformers``, which the shift formula does not."""
    path = Path(diffusers.__file__).parent / "pipelines" / "flux" / "pipeline_flux.py"
    tree = ast.parse(path.read_text())
    node = next(item for item in tree.body
                if isinstance(item, ast.FunctionDef) and item.name == "calculate_shift")
    namespace: dict = {}
    exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace["calculate_shift"]


def noise_levels(schedule: FlowMatchingSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' ``sigmas`` (the noise level s) of a sigma~ grid; the final 0 stays 0."""
    return sigmas / (1 + sigmas)


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_flow_formulas_match_design(shift):
    schedule = FlowMatchingSchedule(shift=shift)
    t = torch.linspace(schedule.t_min, schedule.t_max, 101, dtype=torch.float64)
    s = shift * t / (1 + (shift - 1) * t)  # SD3's shifted timestep
    torch.testing.assert_close(schedule.sigma(t), s, rtol=1e-14, atol=0)
    torch.testing.assert_close(schedule.alpha(t), 1 - s, rtol=1e-7, atol=1e-15)
    torch.testing.assert_close(schedule.alpha(t) + schedule.sigma(t), torch.ones_like(t),
                               rtol=0, atol=1e-15)
    sigma_tilde = schedule.sigma_tilde(t)
    torch.testing.assert_close(sigma_tilde, shift * t / (1 - t), rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma_tilde[:-1], (s / (1 - s))[:-1], rtol=1e-9, atol=0)
    torch.testing.assert_close(schedule.c_noise(t), 1000 * s, rtol=1e-14, atol=0)
    torch.testing.assert_close(schedule.c_in(sigma_tilde), schedule.alpha(t), rtol=1e-12, atol=0)
    middle = float(sigma_tilde[50])
    assert schedule.prior_std(middle) == pytest.approx(1 / float(schedule.alpha(t[50])))
    assert float(schedule.t_of_sigma(torch.tensor(math.inf))) == 1.0
    assert float(schedule.t_of_sigma(torch.tensor(0.0))) == 0.0
    if shift == 1.0:  # DESIGN's row as written: alpha = 1 - t, sigma = t
        assert torch.equal(schedule.alpha(t), 1 - t) and torch.equal(schedule.sigma(t), t)


def test_shift_multiplies_sigma_tilde():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    base = FlowMatchingSchedule().sigma_tilde(t)
    torch.testing.assert_close(FlowMatchingSchedule(shift=3.0).sigma_tilde(t), 3 * base,
                               rtol=1e-14, atol=0)


def test_range_defaults_follow_diffusers():
    """t_max = 1 - 1e-9; t_min is diffusers' last grid point: s_k(1/N) static, 1/N dynamic."""
    static = FlowMatchingSchedule(shift=3.0)
    assert static.t_max == 1 - 1e-9
    assert static.t_min == pytest.approx(3 * 0.001 / (1 + 2 * 0.001), rel=1e-15)
    assert static.sigma_max == pytest.approx(3e9, rel=1e-7)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert static.t_min == pytest.approx(reference.sigma_min, rel=1e-7)
    dynamic = FlowMatchingSchedule(use_dynamic_shifting=True, image_seq_len=4096)
    assert dynamic.t_min == 0.001


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 777])
def test_dynamic_shift_is_diffusers_time_shift(time_shift_type, image_seq_len):
    mu = diffusers_calculate_shift()(image_seq_len)
    schedule = FlowMatchingSchedule(use_dynamic_shifting=True, image_seq_len=image_seq_len,
                                    time_shift_type=time_shift_type)
    assert schedule.shift == pytest.approx(math.exp(mu) if time_shift_type == "exponential"
                                           else mu, rel=1e-12)
    assert schedule.shift == flow_dynamic_shift(image_seq_len, time_shift_type=time_shift_type)
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True,
                                                time_shift_type=time_shift_type)
    t = np.linspace(0.001, 0.999, 99)
    expected = torch.from_numpy(np.asarray(reference.time_shift(mu, 1.0, t), dtype=np.float64))
    torch.testing.assert_close(schedule.sigma(torch.from_numpy(t)), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(shift=0.0), "shift must be > 0"),
    (dict(density="beta"), "uniform, logit_normal, mode, cosmap"),
    (dict(logit_std=0.0), "logit_std"),
    (dict(mode_scale=2.0), r"mode_scale must lie in \[-1.0, 1.75"),
    (dict(use_dynamic_shifting=True), "needs image_seq_len"),
    (dict(use_dynamic_shifting=True, image_seq_len=4096, shift=3.0), "exclude each other"),
    (dict(use_dynamic_shifting=True, image_seq_len=0), "image_seq_len must be a positive"),
    (dict(time_shift_type="cubic"), "exponential, linear"),
    (dict(t_max=1.0), "0 < t_min < t_max < 1"),
    (dict(t_min=0.5, t_max=0.4), "0 < t_min < t_max < 1"),
    (dict(num_train_timesteps=0), "num_train_timesteps"),
])
def test_bad_flow_arguments_name_key_and_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowMatchingSchedule(**kwargs)


# --------------------------------------------------------------------------- grids


@pytest.mark.parametrize("shift", [1.0, 1.5, 3.0, 6.0])
@pytest.mark.parametrize("num_steps", [1, 2, 5, 28, 50])
def test_uniform_t_grid_equals_flow_match_euler(shift, num_steps):
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(num_steps)
    schedule = FlowMatchingSchedule(shift=shift)
    sigmas = sigma_grid(schedule, num_steps, "uniform_t")
    assert sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0
    torch.testing.assert_close(noise_levels(schedule, sigmas).float(), reference.sigmas,
                               rtol=0, atol=SIGMA_ULP)
    timesteps = schedule.c_noise(schedule.t_of_sigma(sigmas[:-1]))
    torch.testing.assert_close(timesteps.float(), reference.timesteps, rtol=0, atol=TIMESTEP_ULP)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096, 777])
@pytest.mark.parametrize("num_steps", [1, 4, 28])
def test_uniform_t_grid_equals_flow_match_euler_with_dynamic_shifting(image_seq_len, num_steps):
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    reference.set_timesteps(num_steps, mu=diffusers_calculate_shift()(image_seq_len))
    schedule = FlowMatchingSchedule(use_dynamic_shifting=True, image_seq_len=image_seq_len)
    sigmas = sigma_grid(schedule, num_steps, "uniform_t")
    torch.testing.assert_close(noise_levels(schedule, sigmas).float(), reference.sigmas,
                               rtol=0, atol=SIGMA_ULP)
    timesteps = schedule.c_noise(schedule.t_of_sigma(sigmas[:-1]))
    torch.testing.assert_close(timesteps.float(), reference.timesteps, rtol=0, atol=TIMESTEP_ULP)


@pytest.mark.parametrize("num_steps", [1, 4, 28, 50])
def test_flux_pipeline_grid_is_uniform_t_down_to_zero(num_steps):
    """The Flux pipeline passes ``sigmas = linspace(1, 1/n, n)``: t uniform from t_max to 0 in
    ``n + 1`` points (no fixed t_min). No spacing of grids.py gives it yet (see docs/FLOW.md);
    this pins the formula such a spacing needs: ``sigma~(linspace(t_max, 0, n + 1))``."""
    image_seq_len = 4096
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps),
                            mu=diffusers_calculate_shift()(image_seq_len))
    schedule = FlowMatchingSchedule(use_dynamic_shifting=True, image_seq_len=image_seq_len)
    t = torch.linspace(schedule.t_max, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = schedule.sigma_tilde(t)
    assert sigmas[-1] == 0
    # diffusers rounds the unshifted grid to float32 before shifting (slope k = 3.2 at s -> 0)
    torch.testing.assert_close(noise_levels(schedule, sigmas).float(), reference.sigmas,
                               rtol=0, atol=4 * SIGMA_ULP)


# --------------------------------------------------------------------------- the Euler loop


class LinearVelocity(nn.Module):
    """A fixed velocity field, affine in x with time-dependent terms: ``v(x, timestep)``."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(0.3 * torch.randn(dim, dim, generator=generator))
        self.bias = nn.Parameter(torch.randn(dim, generator=generator))
        self.time_gain = nn.Parameter(torch.randn(dim, generator=generator))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        s = timestep.reshape(-1, 1) / 1000
        return x @ self.weight.T + self.bias * (1 + s) + s * self.time_gain * x


def flow_match_euler(net: nn.Module, noise: torch.Tensor, num_steps: int, **scheduler_kwargs
                     ) -> torch.Tensor:
    """diffusers' denoising loop (as in its SD3/Flux pipelines) with ``net`` as the transformer."""
    mu = scheduler_kwargs.pop("mu", None)
    scheduler = FlowMatchEulerDiscreteScheduler(**scheduler_kwargs)
    scheduler.set_timesteps(num_steps, mu=mu)
    x = noise.clone()
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            velocity = net(x, timestep.expand(x.shape[0]))
            x = scheduler.step(velocity, timestep, x).prev_sample
    return x


CASES = {
    "shift1": (dict(), dict()),
    "shift3": (dict(shift=3.0), dict(shift=3.0)),
    "dynamic1024": (dict(use_dynamic_shifting=True, image_seq_len=1024),
                    dict(use_dynamic_shifting=True, mu="calculate_shift(1024)")),
}


def _scheduler_kwargs(case: str) -> dict:
    kwargs = dict(CASES[case][1])
    if kwargs.get("mu") == "calculate_shift(1024)":
        kwargs["mu"] = diffusers_calculate_shift()(1024)
    return kwargs


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("num_steps", [1, 2, 10, 50])
def test_euler_over_velocity_denoiser_is_flow_match_euler(case, num_steps):
    """Same noise, same net: our float64 Euler in sigma~ on the uniform_t grid, started at
    ``prior_std(sigma~_max) * noise``, equals diffusers' float32 loop to float32 rounding."""
    net = LinearVelocity()
    noise = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    reference = flow_match_euler(net, noise, num_steps, **_scheduler_kwargs(case))
    schedule = FlowMatchingSchedule(**CASES[case][0])
    ours = Sampler("euler", num_steps=num_steps, spacing="uniform_t")(
        Denoiser(net, schedule, "velocity"), schedule, (8, 6), noise=noise)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)


def test_euler_loop_check_sees_a_start_at_t_max_below_one():
    """The tolerance above is tight enough to see t_max: a start at 1 - 1/N instead of ~1 fails."""
    net = LinearVelocity()
    noise = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    reference = flow_match_euler(net, noise, 10)
    schedule = FlowMatchingSchedule(t_max=1 - 1 / N)
    ours = Sampler("euler", num_steps=10, spacing="uniform_t")(
        Denoiser(net, schedule, "velocity"), schedule, (8, 6), noise=noise)
    assert float((ours - reference).abs().max()) > 1e-4


# --------------------------------------------------------------------------- training densities


def ks_to_cdf(samples: torch.Tensor, cdf) -> float:
    """One-sample Kolmogorov-Smirnov distance of ``samples`` to the exact ``cdf`` (a function)."""
    values = samples.sort().values.double()
    n = values.numel()
    exact = cdf(values)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(ranks / n - exact, exact - (ranks - 1) / n).max())


def ks_two_sample(samples: torch.Tensor, other: torch.Tensor,
                  other_weights: torch.Tensor | None = None) -> float:
    """Kolmogorov-Smirnov distance between the empirical CDF of ``samples`` and the (optionally
    weighted) empirical CDF of ``other``."""
    samples, other = samples.double(), other.double()
    points = torch.cat([samples, other]).sort().values
    cdf = torch.searchsorted(samples.sort().values, points, right=True) / samples.numel()
    order = other.argsort()
    weights = (torch.ones_like(other) if other_weights is None else other_weights.double())[order]
    cumulative = torch.cat([weights.new_zeros(1), weights.cumsum(0) / weights.sum()])
    other_cdf = cumulative[torch.searchsorted(other[order], points, right=True)]
    return float((cdf - other_cdf).abs().max())


def cosmap_cdf(t: torch.Tensor) -> torch.Tensor:
    """CDF of SD3's cosmap density 2 / (pi (1 - 2t + 2t^2)): (2 / pi) atan(t / (1 - t))."""
    return 2 / math.pi * torch.atan(t / (1 - t))


DENSITIES = [
    ("uniform", {}, "none", {}),
    ("logit_normal", dict(logit_mean=0.0, logit_std=1.0), "logit_normal",
     dict(logit_mean=0.0, logit_std=1.0)),
    ("logit_normal", dict(logit_mean=0.5, logit_std=0.8), "logit_normal",
     dict(logit_mean=0.5, logit_std=0.8)),
    ("mode", dict(mode_scale=1.29), "mode", dict(mode_scale=1.29)),
    ("mode", dict(mode_scale=-0.5), "mode", dict(mode_scale=-0.5)),
]


@pytest.mark.parametrize("density,ours,scheme,theirs", DENSITIES,
                         ids=[f"{d[0]}{d[1]}" for d in DENSITIES])
def test_training_draws_equal_diffusers_density_for_the_same_seed(density, ours, scheme, theirs):
    schedule = FlowMatchingSchedule(density=density, **ours)
    t = schedule.sample_t(4096, generator=torch.Generator().manual_seed(7))
    u = compute_density_for_timestep_sampling(scheme, 4096, **theirs,
                                              generator=torch.Generator().manual_seed(7))
    expected = u.double().clamp(schedule.t_min, schedule.t_max)
    torch.testing.assert_close(t, expected, rtol=0, atol=5e-7)
    assert float((t - u.double()).abs().gt(1e-3).double().mean()) < 0.01  # the clamp is rare


def test_cosmap_density_is_diffusers_cosmap_weighting_in_distribution():
    """diffusers' ``cosmap`` draws u uniformly and weights the loss by
    compute_loss_weighting_for_sd3('cosmap', u), which is the density of our ``cosmap`` draws."""
    n = 200_000
    schedule = FlowMatchingSchedule(density="cosmap", t_min=1e-6)
    t = schedule.sample_t(n, generator=torch.Generator().manual_seed(0))
    u = compute_density_for_timestep_sampling("cosmap", n,
                                              generator=torch.Generator().manual_seed(1))
    weights = compute_loss_weighting_for_sd3("cosmap", sigmas=u)
    effective = float(weights.sum() ** 2 / (weights**2).sum())
    bound = KS_FACTOR * math.sqrt(1 / n + 1 / effective)
    assert ks_two_sample(t, u, weights) < bound
    assert ks_to_cdf(t, cosmap_cdf) < KS_FACTOR / math.sqrt(n)
    # power: the same check rejects the unweighted uniform draws
    assert ks_two_sample(t, u) > 3 * bound


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_logit_normal_t_is_edm_lognormal_sigma_tilde(shift):
    """log sigma~ = logit(t) + log k: logit-normal(m, s) training is EDM's ln sigma~ ~
    N(m + log k, s^2) (docs/FLOW.md); EDM's default is logit-normal(-1.2, 1.2) at k = 1."""
    n = 100_000
    schedule = FlowMatchingSchedule(shift=shift, density="logit_normal", logit_mean=-1.2,
                                    logit_std=1.2, t_min=1e-12)
    _, sigma = schedule.training_sigma_tilde(n, generator=torch.Generator().manual_seed(0))
    mean = -1.2 + math.log(shift)

    def normal_cdf(value: torch.Tensor) -> torch.Tensor:
        return 0.5 * (1 + torch.erf((value - mean) / (1.2 * math.sqrt(2))))

    assert ks_to_cdf(sigma.log(), normal_cdf) < KS_FACTOR / math.sqrt(n)
    assert ks_to_cdf(sigma.log() + 0.05, normal_cdf) > 2 * KS_FACTOR / math.sqrt(n)  # power


def test_shifted_training_noise_levels_match_diffusers_training_scripts_in_distribution():
    """SD3's scripts: ``s = scheduler.sigmas[int(u N)]`` from the shifted descending table, i.e.
    s_k(1 - floor(u N) / N). Ours: s_k(u). Same distribution for the symmetric densities."""
    n = 200_000
    table = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas.double()
    # + the table's 1/N steps: they move the CDF by at most (peak density of u) / N, the peak
    # being 1 (uniform), 1.6 (logit-normal(0, 1)) and 3.8 (mode 1.29)
    bound = KS_FACTOR * math.sqrt(2 / n) + 4 / N
    for density, ours, scheme, theirs in DENSITIES[:2] + DENSITIES[3:4]:
        schedule = FlowMatchingSchedule(shift=3.0, density=density, **ours)
        s = schedule.sigma(schedule.sample_t(n, generator=torch.Generator().manual_seed(0)))
        u = compute_density_for_timestep_sampling(scheme, n, **theirs,
                                                  generator=torch.Generator().manual_seed(1))
        script = table[(u * N).long()]
        assert ks_two_sample(s, script) < bound, density
    unshifted = FlowMatchingSchedule(density="uniform")
    s = unshifted.sigma(unshifted.sample_t(n, generator=torch.Generator().manual_seed(0)))
    assert ks_two_sample(s, script) > 3 * bound  # power: the shift is visible


# --------------------------------------------------------------------------- loss identities


def test_velocity_mse_is_weighted_x0_and_eps_mse():
    """docs/FLOW.md: ||v_hat - v||^2 = (1 + 1/sigma~)^2 ||x0_hat - x0||^2 = (1 + sigma~)^2
    ||eps_hat - eps||^2: w = 1/s^2 = (1 + sqrt(SNR))^2 in x0 terms, 1/(1 - s)^2 in eps terms."""
    schedule = FlowMatchingSchedule(shift=3.0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    eps = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    _, sigma = schedule.training_sigma_tilde(16, generator=generator)
    x = x0 + sigma[:, None] * eps
    denoiser = Denoiser(nn.Identity(), schedule, "velocity")
    output = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    c_in = schedule.c_in(sigma)
    velocity_mse = (output - denoiser.training_target(x0, eps, sigma)).square().mean(1)
    x0_mse = (denoiser.x0_from_output(output, x, sigma, c_in) - x0).square().mean(1)
    eps_mse = (denoiser.eps_from_output(output, x, sigma, c_in) - eps).square().mean(1)
    s = schedule.sigma(schedule.t_of_sigma(sigma))
    snr = sigma**-2
    torch.testing.assert_close(velocity_mse, (1 + 1 / sigma) ** 2 * x0_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(velocity_mse, (1 + sigma) ** 2 * eps_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close((1 + 1 / sigma) ** 2, s**-2, rtol=1e-9, atol=0)
    torch.testing.assert_close((1 + 1 / sigma) ** 2, (1 + snr.sqrt()) ** 2, rtol=1e-12, atol=0)
    torch.testing.assert_close((1 + sigma) ** 2, (1 - s) ** -2, rtol=1e-9, atol=0)


def test_sd3_loss_weightings_in_sigma_tilde():
    """diffusers' SD3 weightings of the velocity loss, as functions of sigma~ (docs/FLOW.md):
    sigma_sqrt: s^-2 = (1 + 1/sigma~)^2; cosmap: 2 / (pi (1 - 2s + 2s^2)) = 2 (1 + sigma~)^2 /
    (pi (1 + sigma~^2))."""
    schedule = FlowMatchingSchedule()
    sigma = schedule.sigma_tilde(torch.linspace(0.01, 0.99, 99, dtype=torch.float64))
    s = schedule.sigma(schedule.t_of_sigma(sigma))
    torch.testing.assert_close(compute_loss_weighting_for_sd3("sigma_sqrt", sigmas=s).double(),
                               (1 + 1 / sigma) ** 2, rtol=1e-6, atol=0)
    torch.testing.assert_close(compute_loss_weighting_for_sd3("cosmap", sigmas=s),
                               2 * (1 + sigma) ** 2 / (math.pi * (1 + sigma**2)),
                               rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- solvers on flow grids

MIXTURE = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]),
                          torch.tensor([0.25, 0.5]))
_REFERENCES: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}


def _start_and_reference(sigma_start: float) -> tuple[torch.Tensor, torch.Tensor]:
    """64 exact marginal samples at sigma~_start and their probability-flow ODE solution."""
    if sigma_start not in _REFERENCES:
        x_start = MIXTURE.sample(64, torch.Generator().manual_seed(0), sigma=sigma_start)
        reference = MIXTURE.probability_flow(x_start, sigma_start, 0.0,
                                             steps_per_unit_log_sigma=100)
        _REFERENCES[sigma_start] = x_start, reference
    return _REFERENCES[sigma_start]


def measured_order(name: str, options: dict, schedule: FlowMatchingSchedule,
                   step_counts: list[int]) -> tuple[float, list[float]]:
    """Least-squares slope of -log(error) against log(num_steps) on the uniform_t grid."""
    errors = []
    for num_steps in step_counts:
        sigmas = sigma_grid(schedule, num_steps, "uniform_t")
        x_start, reference = _start_and_reference(float(sigmas[0]))
        errors.append(rms_error(SAMPLERS[name].fn(MIXTURE, x_start.clone(), sigmas, **options),
                                reference))
    log_n = torch.tensor(step_counts, dtype=torch.float64).log()
    log_e = torch.tensor(errors, dtype=torch.float64).log()
    centred = log_n - log_n.mean()
    return -float((centred * (log_e - log_e.mean())).sum() / centred.pow(2).sum()), errors


MIDDLE, HIGH = [24, 32, 48, 64], [48, 64, 96, 128]
#: (id, sampler, options, t_max, order window). The uniform-t grid's last intervals before t_min
#: are long in log sigma~ (h = log(1 + 1 / (n t_min))), so the multistep methods of order >= 3
#: stay pre-asymptotic here: measured (shift 1 / 3) unipc(2) 2.41 / 2.46, unipc(3) 2.82 / 4.35,
#: lms 2.20 / 2.42; they converge and beat DPM-Solver++(2M) (1.97-2.26), which a test below checks.
#: Heun from the pole (default t_max, Euler first step): 1.92 / 2.10, errors 1.2e-3 at 64 steps;
#: with t_max = 1 - 1/N (no pole, EDM's Heun throughout): 2.89 / 2.39.
SOLVERS = [
    ("euler", "euler", {}, None, (0.8, 1.3)),
    ("ddim", "ddim", {}, None, (0.8, 1.3)),
    ("dpmpp_2m", "dpmpp_2m", {}, None, (1.7, 2.5)),
    ("unipc_order2", "unipc", {"order": 2}, None, (2.0, 3.5)),
    ("unipc_order3", "unipc", {"order": 3}, None, (2.4, 5.0)),
    ("lms_order4", "lms", {"order": 4}, None, (1.8, 4.5)),
    ("heun", "heun", {}, None, (1.7, 2.5)),
    ("heun_t_max_0.999", "heun", {}, 1 - 1 / N, (1.9, 3.3)),
]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("case_id,name,options,t_max,window", SOLVERS,
                         ids=[case[0] for case in SOLVERS])
def test_solvers_converge_on_flow_grids(case_id, name, options, t_max, window, shift):
    schedule = FlowMatchingSchedule(shift=shift, **({} if t_max is None else {"t_max": t_max}))
    step_counts = HIGH if name in ("unipc", "lms") else MIDDLE
    order, errors = measured_order(name, options, schedule, step_counts)
    detail = f"{case_id} shift {shift}: measured order {order:.2f}, errors {errors}"
    assert window[0] <= order <= window[1], detail
    assert all(a > b for a, b in zip(errors, errors[1:])), detail
    assert errors[-1] < 0.05, detail


def edm_heun(denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """EDM Algorithm 1 as written (Karras et al. 2022): the trapezoid in sigma~ on every step but
    the one to 0, with no exception at the pole."""
    values = sigmas.tolist()
    for sigma, sigma_next in zip(values[:-1], values[1:]):
        d = to_d(x, sigma, denoiser(x, torch.tensor(sigma, dtype=torch.float64)))
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
            continue
        d_next = to_d(x_euler, sigma_next,
                      denoiser(x_euler, torch.tensor(sigma_next, dtype=torch.float64)))
        x = x + (sigma_next - sigma) * (d + d_next) / 2
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_takes_the_euler_step_from_the_pole_and_edm_steps_after_it(shift):
    """The first point of the default grid (k 1e9) stands for sigma~ = inf: the step from it is the
    Euler step, every later step EDM's, bit for bit. EDM's trapezoid on that first step would
    extrapolate x0 by sigma~_0 / (2 sigma~_1) ~ 1e7 and miss the ODE solution by > 100."""
    sigmas = sigma_grid(FlowMatchingSchedule(shift=shift), 8, "uniform_t")
    assert sigmas[0] >= SIGMA_INFINITY > sigmas[1]
    x_start, reference = _start_and_reference(float(sigmas[0]))
    ours = SAMPLERS["heun"].fn(MIXTURE, x_start.clone(), sigmas)
    sigma, sigma_next = float(sigmas[0]), float(sigmas[1])
    x_euler = x_start + (sigma_next - sigma) * to_d(x_start, sigma, MIXTURE(x_start, sigma))
    assert torch.equal(ours, edm_heun(MIXTURE, x_euler, sigmas[1:]))
    assert rms_error(ours, reference) < 0.2
    assert rms_error(edm_heun(MIXTURE, x_start.clone(), sigmas), reference) > 100  # the fix's need
    assert [corrected for *_, corrected in heun_plan(sigmas)] == [False] + [True] * 6 + [False]


@pytest.mark.parametrize("sigma_max", [SIGMA_INFINITY * (1 - 1e-12), 80.0])
def test_heun_below_the_pole_is_edm_heun_bit_for_bit(sigma_max):
    """Grids whose first sigma~ stays below SIGMA_INFINITY (every VP/VE/EDM grid, flow with
    t_max = 1 - 1/N) run EDM's Algorithm 1 unchanged, even at a first-step ratio of 1e7."""
    sigmas = torch.cat([torch.tensor([sigma_max], dtype=torch.float64),
                        sigma_grid(FlowMatchingSchedule(t_max=1 - 1 / N), 6, "uniform_t")[1:]])
    x_start, _ = _start_and_reference(float(sigmas[0]))
    ours = SAMPLERS["heun"].fn(MIXTURE, x_start.clone(), sigmas)
    assert torch.equal(ours, edm_heun(MIXTURE, x_start.clone(), sigmas))
    assert heun_nfe_on(sigmas) == 2 * 6 - 1


@pytest.mark.usefixtures("single_thread")
def test_higher_order_solvers_beat_euler_on_flow_grid():
    schedule = FlowMatchingSchedule(shift=3.0)
    sigmas = sigma_grid(schedule, 64, "uniform_t")
    x_start, reference = _start_and_reference(float(sigmas[0]))
    errors = {case_id: rms_error(SAMPLERS[name].fn(MIXTURE, x_start.clone(), sigmas, **options),
                                 reference)
              for case_id, name, options, t_max, _ in SOLVERS if t_max is None}
    assert errors["dpmpp_2m"] < errors["euler"] / 1.5, errors
    assert errors["heun"] < errors["euler"] / 5, errors
    assert errors["unipc_order3"] < errors["dpmpp_2m"] / 5, errors
    assert errors["lms_order4"] < errors["dpmpp_2m"] / 5, errors


class MixtureVelocityNet(nn.Module):
    """The exact velocity of the Gaussian mixture as a flow net sees it: ``v(x_t, 1000 s) =
    (x_t - D(x~, sigma~)) / s`` with ``x~ = x_t / (1 - s)``, ``sigma~ = s / (1 - s)``."""

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.mixture = mixture
        self.register_buffer("marker", torch.zeros((), dtype=torch.float64))  # run in float64

    def forward(self, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        s = (timestep.double() / 1000).reshape(-1, 1)
        x_tilde, sigma = x_t / (1 - s), (s / (1 - s)).reshape(-1)
        return (x_t - self.mixture(x_tilde, sigma)) / s


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_every_sampler_runs_a_velocity_net_like_the_exact_denoiser(method):
    """Samplers only see x0_hat: through Sampler.__call__ the velocity denoiser over the mixture's
    exact velocity matches the sampler function over the mixture's exact denoiser, from the same
    prior noise (c_noise is float32, so s carries 6e-8 relative rounding)."""
    schedule = FlowMatchingSchedule(shift=3.0, t_max=1 - 1 / N)
    sampler = Sampler(method, num_steps=12, spacing="uniform_t")
    noise = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoiser = Denoiser(MixtureVelocityNet(MIXTURE), schedule, "velocity")
    ours = sampler(denoiser, schedule, (32, 2), generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64, noise=noise)
    sigmas = sampler.sigmas(schedule)
    exact = SAMPLERS[method].fn(MIXTURE, noise * schedule.prior_std(float(sigmas[0])), sigmas,
                                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t_max,nfe", [(None, 2 * 10 - 2), (1 - 1 / N, 2 * 10 - 1)])
def test_heun_nfe_counts_its_calls_on_flow_grids(t_max, nfe):
    """From the pole Heun makes one evaluation fewer; Sampler.nfe_on(schedule) says so, the
    step-count-only Sampler.nfe keeps the count below the pole."""
    schedule = FlowMatchingSchedule(shift=3.0, **({} if t_max is None else {"t_max": t_max}))
    net = LinearVelocity()  # finite at timestep 1000 (MixtureVelocityNet divides by 1 - s = 0)
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    sampler = Sampler("heun", num_steps=10, spacing="uniform_t")
    samples = sampler(Denoiser(net, schedule, "velocity"), schedule, (4, 6),
                      generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(samples).all()
    assert sampler.nfe_on(schedule) == len(calls) == nfe
    assert sampler.nfe == 2 * 10 - 1
    assert heun_nfe_on(sampler.sigmas(schedule)) == nfe
    assert Sampler("euler", 10, spacing="uniform_t").nfe_on(schedule) == 10


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_every_sampler_is_finite_and_improves_with_steps_from_the_pole(shift):
    """Few steps from sigma~_max = k 1e9 (the pole): every sampler returns finite samples, and the
    deterministic ones get closer to the ODE solution from 4 to 16 steps. (At <= 16 steps
    DPM-Solver++(2M) and UniPC trail Euler on uniform_t, with t_max = 1 - 1/N as well: the grid's
    last intervals are long in log sigma~; from 24 steps on they lead, see above.)"""
    schedule = FlowMatchingSchedule(shift=shift)
    errors: dict[str, list[float]] = {}
    for num_steps in (1, 2, 4, 16):
        sigmas = sigma_grid(schedule, num_steps, "uniform_t")
        x_start, reference = _start_and_reference(float(sigmas[0]))
        for name, method in SAMPLERS.items():
            out = method.fn(MIXTURE, x_start.clone(), sigmas,
                            generator=torch.Generator().manual_seed(0))
            assert torch.isfinite(out).all(), (name, num_steps)
            if not method.stochastic:
                errors.setdefault(name, []).append(rms_error(out, reference))
    for name, (one, _, four, sixteen) in errors.items():
        assert sixteen < four < 1.5 * one and sixteen < 0.3, (name, errors[name])


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name,expected", [
    ("flow", dict(shift=1.0, density="uniform")),
    ("flow_sd3", dict(shift=3.0, density="logit_normal", logit_mean=0.0, logit_std=1.0)),
    ("flow_flux", dict(density="uniform", use_dynamic_shifting=True, image_seq_len=1024)),
])
def test_flow_configs_build_documented_schedules(name, expected):
    path = REPO / "configs" / "scheduler" / f"{name}.yaml"
    config = OmegaConf.load(path)
    schedule = instantiate(config)
    assert isinstance(schedule, FlowMatchingSchedule)
    for key, value in expected.items():
        assert getattr(schedule, key) == value, key
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and not line.startswith("#") and not line.startswith("_target_")]
    assert lines and all("#" in line for line in lines), f"{name}: every option needs a comment"
    assert sigma_grid(schedule, 4, "uniform_t")[0] == schedule.sigma_max


def test_auto_spacing_on_a_flow_schedule_is_the_flow_match_euler_grid():
    from diffsweep.grids import resolve_spacing
    from diffsweep.samplers import Sampler

    schedule = FlowMatchingSchedule(shift=3.0)
    assert resolve_spacing(schedule, "auto") == "uniform_t"
    auto = Sampler("euler", num_steps=8).sigmas(schedule)
    assert torch.equal(auto, Sampler("euler", num_steps=8, spacing="uniform_t").sigmas(schedule))
    assert resolve_spacing(DiscreteVPSchedule("linear"), "auto") == "leading"
