"""Samplers converge at the order their method promises, on the exact denoiser
of a Gaussian mixture.

Deterministic samplers: from a fixed batch of exact ``x~_T`` the RMS distance of the sampler's
output to the exact probability-flow ODE solution (:meth:`GaussianMixture.probability_flow`, RK4 in
float64, error ~1e-11) is fitted as ``C * num_steps^-p`` over a step range in the asymptotic
regime; the measured ``p`` must be within ``[expected - 0.3, expected + 0.5]``.

Orders expected (global, in steps): euler = ddim = 1; heun, dpmpp_2m = 2; unipc with ``order=p``
= p + 1 (the UniC corrector raises the order of the UniP predictor by one, Zhao et al. 2023,
Thm. 3.2); lms (order 4) measures 3.5-3.7 here, checked for >= 3.3: its start-up steps (Euler,
then 2- and 3-step LMS, as in k-diffusion and diffusers) have local errors O(h^2..h^4), which
bend the curve down below 4 as the steps grow (~2.5 between 512 and 1024 steps; with the first
step replaced by tiny exact-ish steps it measures ~4.1).

The sigma range [1e-4, 20] keeps the final step (every sampler returns ``D(x, sigma_min)``) from
setting an error floor: that costs ~sigma_min^2 / (2 std) ~ 1e-8 here, far below the errors fitted.

Stochastic samplers (ddpm, euler_ancestral, dpmpp_2m_sde): 4000 samples from 200 steps match the
mixture's mean and per-dim variance within 4 standard errors and are close in MMD to the exact
mixture, and the MMD shrinks by more than 10x from 10 to 200 steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffsweep.analytic import GaussianMixture, mmd_to_mixture, rms_error
from diffsweep.grids import karras_sigmas, sigma_grid
from diffsweep.samplers import SAMPLERS
from diffsweep.schedules import DiscreteVPSchedule, EDMSchedule, NoiseSchedule

pytestmark = pytest.mark.usefixtures("single_thread")




#: Two overlapping modes of different widths: a nonlinear denoiser with a smooth flow, so the
#: asymptotic regime starts at a few tens of steps.
MIXTURE = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.0, -0.5]]),
                          torch.tensor([0.25, 0.5]))
BATCH = 64
ORDER_SCHEDULE = EDMSchedule(sigma_min=1e-4, sigma_max=20.0)
DISCRETE_SCHEDULE = DiscreteVPSchedule("linear")


def _require(name: str) -> None:
    if name not in SAMPLERS:
        pytest.skip(f"sampler {name!r} is not registered in diffsweep.samplers.SAMPLERS yet")


_REFERENCES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _start_and_reference(sigma_start: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact marginal samples x~_T at ``sigma_start``
    (float64, (BATCH, 2)) and their ODE solution."""
    key = ("mixture", sigma_start)
    if key not in _REFERENCES:
        x_start = MIXTURE.sample(BATCH, torch.Generator().manual_seed(0), sigma=sigma_start)
        _REFERENCES[key] = x_start, MIXTURE.probability_flow(x_start, sigma_start, 0.0)
    return _REFERENCES[key]


def measured_order(name: str, options: dict, schedule: NoiseSchedule, spacing: str,
                   step_counts: list[int]) -> tuple[float, list[float]]:
    """Least-squares slope ``-d log(error) / d log(num_steps)`` and the errors themselves."""
    errors = []
    for num_steps in step_counts:
        sigmas = sigma_grid(schedule, num_steps, spacing)
        x_start, reference = _start_and_reference(float(sigmas[0]))
        output = SAMPLERS[name].fn(MIXTURE, x_start.clone(), sigmas, **options)
        errors.append(rms_error(output, reference))
    log_n = torch.tensor(step_counts, dtype=torch.float64).log()
    log_e = torch.tensor(errors, dtype=torch.float64).log()
    centred = log_n - log_n.mean()
    slope = float((centred * (log_e - log_e.mean())).sum() / centred.pow(2).sum())
    return -slope, errors


MIDDLE = [24, 32, 48, 64]
HIGH = [32, 48, 64, 96]
VERY_HIGH = [48, 64, 96, 128]

#: (test id, sampler, options, expected order, step counts in the asymptotic regime)
DETERMINISTIC = [
    ("euler", "euler", {}, 1.0, MIDDLE),
    ("ddim", "ddim", {}, 1.0, MIDDLE),
    ("heun", "heun", {}, 2.0, MIDDLE),
    ("dpmpp_2m", "dpmpp_2m", {}, 2.0, MIDDLE),
    ("unipc_order2", "unipc", {"order": 2}, 3.0, HIGH),
    ("unipc_order3", "unipc", {"order": 3}, 4.0, HIGH),
    ("lms_order4", "lms", {"order": 4}, None, VERY_HIGH),
]


@pytest.mark.parametrize("spacing", ["karras", "log_snr"])
@pytest.mark.parametrize("case_id,name,options,expected,step_counts", DETERMINISTIC,
                         ids=[case[0] for case in DETERMINISTIC])
def test_deterministic_sampler_order(case_id: str, name: str, options: dict,
                                     expected: float | None, step_counts: list[int],
                                     spacing: str) -> None:
    _require(name)
    order, errors = measured_order(name, options, ORDER_SCHEDULE, spacing, step_counts)
    detail = f"{case_id} on {spacing}: measured order {order:.2f}, errors {errors}"
    if expected is None:  # lms: pre-asymptotic at these step counts, heading to 4
        assert 3.3 <= order <= 4.5, detail
    else:
        assert expected - 0.3 <= order <= expected + 0.5, detail
    assert errors[-1] > 1e-9, detail  # well above the reference's own error (~1e-11)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_first_order_on_discrete_linear_schedule(name: str) -> None:
    """DDIM on diffusers' linear DDPM table with ``linspace`` spacing (t = 999 ... 0) is order 1.

    sigma~_min = 0.01 here, so the final denoising step costs ~1e-4: negligible against DDIM's
    ~1e-2 errors at these step counts.
    """
    _require(name)
    order, errors = measured_order(name, {}, DISCRETE_SCHEDULE, "linspace", [20, 30, 40, 60])
    assert 0.7 <= order <= 1.5, f"{name}: measured order {order:.2f}, errors {errors}"


@pytest.mark.parametrize("spacing", ["karras", "log_snr"])
@pytest.mark.parametrize("name", ["euler", "ddim"])
def test_first_order_error_is_exactly_proportional_to_step(name: str, spacing: str) -> None:
    """Richardson: ``2 x(2n - 1 points) - x(n points)`` is second order for a consistent method.

    Sharper than the slope fit for first-order methods: a small bias (e.g. the denoiser evaluated
    at 1.01 sigma) hides under Euler's O(1/n) error but stalls the extrapolation at the bias.
    """
    _require(name)
    x_start, reference = _start_and_reference(ORDER_SCHEDULE.sigma_max)
    point_counts = [17, 25, 33, 49]
    errors = []
    for points in point_counts:
        coarse = SAMPLERS[name].fn(MIXTURE, x_start.clone(), sigma_grid(ORDER_SCHEDULE, points,
                                                                          spacing))
        fine = SAMPLERS[name].fn(MIXTURE, x_start.clone(), sigma_grid(ORDER_SCHEDULE,
                                                                        2 * points - 1, spacing))
        errors.append(rms_error(2 * fine - coarse, reference))
    log_h = -torch.tensor(point_counts, dtype=torch.float64).sub(1).log()
    log_e = torch.tensor(errors, dtype=torch.float64).log()
    centred = log_h - log_h.mean()
    order = float((centred * (log_e - log_e.mean())).sum() / centred.pow(2).sum())
    assert 1.7 <= order <= 2.5, f"{name} {spacing}: extrapolated order {order:.2f}, {errors}"


def test_orders_are_distinguishable() -> None:
    """At equal steps the higher-order methods are far more accurate (guards the fits' meaning)."""
    errors = {}
    for case_id, name, options, _, _ in DETERMINISTIC:
        if name in SAMPLERS:
            sigmas = sigma_grid(ORDER_SCHEDULE, 64, "karras")
            x_start, reference = _start_and_reference(float(sigmas[0]))
            errors[case_id] = rms_error(SAMPLERS[name].fn(MIXTURE, x_start.clone(), sigmas,
                                                          **options), reference)
    assert errors["heun"] < errors["euler"] / 5
    if "dpmpp_2m" in errors:
        assert errors["dpmpp_2m"] < errors["euler"] / 5
    if "unipc_order3" in errors:
        assert errors["unipc_order3"] < errors["dpmpp_2m"] / 10


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_final_corrector_keeps_the_order_on_a_repeated_final_sigma(order: int) -> None:
    """A karras grid ending at sigma_end > 0 with that value repeated (diffusers'
    ``final_sigmas_type="sigma_min"``): the zero-length last step evaluates x0 there and corrects
    the step before, so the sample at sigma_end converges to the exact ODE solution there at
    order p + 1 (measured 3.07 / 4.03). Without the repeat the last step stays an uncorrected
    UniP-1 step: order 3 then measures 2.36, below 3."""
    sigma_end, sigma_start = 0.05, ORDER_SCHEDULE.sigma_max
    key = ("mixture", sigma_start, sigma_end)
    if key not in _REFERENCES:
        x_start = MIXTURE.sample(BATCH, torch.Generator().manual_seed(0), sigma=sigma_start)
        _REFERENCES[key] = x_start, MIXTURE.probability_flow(x_start, sigma_start, sigma_end)
    x_start, reference = _REFERENCES[key]
    step_counts = HIGH

    def fitted_order(repeat: bool) -> tuple[float, list[float]]:
        errors = []
        for num_steps in step_counts:
            sigmas = karras_sigmas(sigma_end, sigma_start, num_steps + 1 - repeat)
            if repeat:
                sigmas = torch.cat([sigmas, sigmas[-1:]])
            output = SAMPLERS["unipc"].fn(MIXTURE, x_start.clone(), sigmas, order=order)
            errors.append(rms_error(output, reference))
        log_n = torch.tensor(step_counts, dtype=torch.float64).log()
        log_e = torch.tensor(errors, dtype=torch.float64).log()
        centred = log_n - log_n.mean()
        return -float((centred * (log_e - log_e.mean())).sum() / centred.pow(2).sum()), errors

    measured, errors = fitted_order(repeat=True)
    assert order + 1 - 0.3 <= measured <= order + 1 + 0.5, f"order {measured:.2f}, {errors}"
    if order == 3:
        uncorrected, errors = fitted_order(repeat=False)
        assert uncorrected < 3.0, f"order {uncorrected:.2f}, {errors}"


# --------------------------------------------------------------------------- stochastic

NUM_SAMPLES = 4000
MMD_BANDWIDTH = 0.5
#: (sampler, schedule, spacing): each in the setting it is normally used with.
STOCHASTIC = [
    ("ddpm", DISCRETE_SCHEDULE, "linspace"),
    ("euler_ancestral", EDMSchedule(sigma_max=20.0), "karras"),
    ("dpmpp_2m_sde", EDMSchedule(sigma_max=20.0), "karras"),
]


def stochastic_samples(name: str, schedule: NoiseSchedule, spacing: str,
                       num_steps: int) -> torch.Tensor:
    """NUM_SAMPLES samples (float64, (n, 2)) from exact x~_T at the grid's first sigma~."""
    sigmas = sigma_grid(schedule, num_steps, spacing)
    generator = torch.Generator().manual_seed(1)
    x_start = MIXTURE.sample(NUM_SAMPLES, generator, sigma=float(sigmas[0]))
    return SAMPLERS[name].fn(MIXTURE, x_start, sigmas, generator=generator)


@pytest.mark.parametrize("name,schedule,spacing", STOCHASTIC, ids=[case[0] for case in STOCHASTIC])
def test_stochastic_sampler_matches_distribution(name: str, schedule: NoiseSchedule,
                                                 spacing: str) -> None:
    _require(name)
    fine = stochastic_samples(name, schedule, spacing, 200)
    true_mean, true_var = MIXTURE.mean(), MIXTURE.covariance().diagonal()
    # Standard errors from the exact moments (sample variance: sqrt(Var((x - m)^2) / n)).
    truth = MIXTURE.sample(200_000, torch.Generator().manual_seed(2))
    se_mean = (true_var / NUM_SAMPLES).sqrt()
    se_var = ((truth - true_mean).pow(2).var(0) / NUM_SAMPLES).sqrt()
    mean_error = (fine.mean(0) - true_mean).abs()
    var_error = (fine.var(0) - true_var).abs()
    assert (mean_error < 4 * se_mean).all(), f"{name}: mean error {mean_error} vs SE {se_mean}"
    assert (var_error < 4 * se_var).all(), f"{name}: variance error {var_error} vs SE {se_var}"
    mmd_fine = mmd_to_mixture(fine, MIXTURE, MMD_BANDWIDTH)
    assert mmd_fine < 1e-3, f"{name}: MMD^2 at 200 steps {mmd_fine:.2e}"  # exact-sample floor ~2e-4
    coarse = stochastic_samples(name, schedule, spacing, 10)
    mmd_coarse = mmd_to_mixture(coarse, MIXTURE, MMD_BANDWIDTH)
    assert mmd_coarse > 10 * max(mmd_fine, 2e-4), (
        f"{name}: MMD^2 does not shrink with steps: {mmd_coarse:.2e} at 10, {mmd_fine:.2e} at 200")


@pytest.mark.parametrize("name,schedule,spacing", STOCHASTIC, ids=[case[0] for case in STOCHASTIC])
def test_stochastic_sampler_draws_noise_from_the_generator(name: str, schedule: NoiseSchedule,
                                                           spacing: str) -> None:
    """Same x~_T and seed: bitwise the same samples; another seed: different samples.

    (A deterministic solver would pass the distribution test above; this one would not.)
    """
    _require(name)
    sigmas = sigma_grid(schedule, 20, spacing)
    x_start = MIXTURE.sample(256, torch.Generator().manual_seed(3), sigma=float(sigmas[0]))
    fn = SAMPLERS[name].fn

    def run(seed: int) -> torch.Tensor:
        return fn(MIXTURE, x_start.clone(), sigmas, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert rms_error(run(0), run(1)) > 0.1


def test_exact_samples_pass_the_stochastic_checks() -> None:
    """Calibration: the MMD threshold is well above the exact-sample floor at NUM_SAMPLES."""
    values = [mmd_to_mixture(MIXTURE.sample(NUM_SAMPLES, torch.Generator().manual_seed(seed)),
                             MIXTURE, MMD_BANDWIDTH) for seed in range(5)]
    assert max(abs(v) for v in values) < 3e-4, values
    assert math.isfinite(sum(values))
