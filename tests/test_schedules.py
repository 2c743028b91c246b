"""Noise schedules: diffusers' tables bit for bit, DESIGN.md's formulas, round trips, training t,
readable reprs. (Flow matching's own formulas and diffusers conformance: tests/test_flow.py.)"""

from __future__ import annotations

import math

import pytest
import torch

import diffsweep.schedules
from diffsweep.schedules import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    EDMSchedule,
    FlowMatchingSchedule,
    VESchedule,
    discrete_betas,
)

diffusers = pytest.importorskip("diffusers")

DISCRETE = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
ALL_SCHEDULES = [DiscreteVPSchedule(**kw) for kw in DISCRETE.values()] + [
    DiscreteVPSchedule(rescale_betas_zero_snr=True), ContinuousVPSchedule(), VESchedule(),
    EDMSchedule(), FlowMatchingSchedule(),
    FlowMatchingSchedule(shift=3.0, density="logit_normal", logit_mean=0.5, logit_std=0.8),
    FlowMatchingSchedule(density="mode", mode_scale=1.29),
    FlowMatchingSchedule(use_dynamic_shifting=True, image_seq_len=1024, density="cosmap")]


@pytest.mark.parametrize("name", sorted(DISCRETE))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_equal_diffusers_exactly(name, zero_snr):
    ref = diffusers.DDPMScheduler(**DISCRETE[name], rescale_betas_zero_snr=zero_snr)
    ours = DiscreteVPSchedule(**DISCRETE[name], rescale_betas_zero_snr=zero_snr)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod.double())
    assert torch.equal(ours.betas, ref.betas.double())


def test_unknown_beta_schedule_names_choices():
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        discrete_betas("sigmoid")


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_sigma_tilde_round_trip(schedule):
    t = torch.linspace(schedule.t_min, schedule.t_max, 997, dtype=torch.float64)
    if schedule.discrete:
        t = torch.cat([t, torch.arange(schedule.num_train_timesteps, dtype=torch.float64)])
        if schedule.rescale_betas_zero_snr:  # sigma~ is not monotone on (N-2, N-1): see t_of_sigma
            t = t[(t <= schedule.num_train_timesteps - 2) | (t == schedule.t_max)]
    sigma = schedule.sigma_tilde(t)
    assert sigma.dtype == torch.float64
    torch.testing.assert_close(schedule.t_of_sigma(sigma), t, rtol=1e-9, atol=1e-9)
    back = schedule.sigma_tilde(schedule.t_of_sigma(sigma))
    if isinstance(schedule, FlowMatchingSchedule):
        # sigma~ = k t / (1 - t) up to t_max = 1 - 1e-9: t holds 1 - t to 1.1e-16 absolute, so the
        # round trip is exact to 1e-9 relative plus that conditioning, 2.2e-16 sigma~ / k.
        bound = 1e-9 * sigma + 2.2e-16 * sigma**2 / schedule.shift
        assert ((back - sigma).abs() <= bound).all()
        small = sigma < 1e6
        torch.testing.assert_close(back[small], sigma[small], rtol=1e-9, atol=0)
    else:
        torch.testing.assert_close(back, sigma, rtol=1e-9, atol=0)


def test_discrete_table_entries_map_to_integer_indices_exactly():
    schedule = DiscreteVPSchedule()
    n = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(schedule.t_of_sigma(schedule.sigmas), n)
    assert torch.equal(schedule.sigma_tilde(n), schedule.sigmas)


@pytest.mark.parametrize("schedule", [s for s in ALL_SCHEDULES if not isinstance(
    s, (VESchedule, EDMSchedule, FlowMatchingSchedule))], ids=lambda s: type(s).__name__)
def test_vp_alpha_squared_plus_sigma_squared_is_one(schedule):
    t = torch.linspace(schedule.t_min, schedule.t_max, 101, dtype=torch.float64)
    torch.testing.assert_close(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2,
                               torch.ones_like(t), rtol=0, atol=1e-12)
    assert schedule.prior_std(2.0) == pytest.approx(math.sqrt(5.0))


def test_discrete_formulas_match_design():
    schedule = DiscreteVPSchedule()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    n = torch.arange(1000, dtype=torch.float64)
    # diffusers' (and our) table is built in float32: ~1e-7 relative in abar, 1e-4 in 1 - abar at
    # n=0
    torch.testing.assert_close(schedule.alpha(n), abar.sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(schedule.sigma(n), (1 - abar).sqrt(), rtol=1e-4, atol=0)
    assert torch.equal(schedule.c_noise(n), n)
    cosine = DiscreteVPSchedule("squaredcos_cap_v2")
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(cosine.alphas_cumprod[499]) == pytest.approx(f(500 / 1000) / f(0), rel=1e-5)


def test_vp_continuous_formulas_match_design():
    schedule = ContinuousVPSchedule()
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    alpha = torch.exp(-t**2 * (20 - 0.1) / 4 - t * 0.1 / 2)
    torch.testing.assert_close(schedule.alpha(t), alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.sigma(t), (1 - alpha**2).sqrt(), rtol=1e-10, atol=0)
    torch.testing.assert_close(schedule.c_noise(t), 999 * t, rtol=1e-12, atol=0)
    assert (schedule.t_min, schedule.t_max) == (1e-3, 1.0)


def test_ve_formulas_match_design():
    schedule = VESchedule()
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    sigma = 0.01 * (50 / 0.01) ** t
    assert torch.equal(schedule.alpha(t), torch.ones_like(t))
    torch.testing.assert_close(schedule.sigma(t), sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(schedule.c_noise(t), sigma.log() / 4, rtol=1e-12, atol=1e-15)
    assert schedule.sigma_max == pytest.approx(50.0)
    assert schedule.prior_std(50.0) == 50.0


def test_edm_formulas_match_design():
    schedule = EDMSchedule()
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    assert torch.equal(schedule.sigma(sigma), sigma)
    assert torch.equal(schedule.t_of_sigma(sigma), sigma)
    torch.testing.assert_close(schedule.c_noise(sigma), sigma.log() / 4)
    torch.testing.assert_close(schedule.c_in(sigma), 1 / (sigma**2 + 0.25).sqrt())
    # ln sigma ~ N(-1.2, 1.2^2)
    log_sigma = schedule.sample_t(200_000, generator=torch.Generator().manual_seed(0)).log()
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=0.01)
    assert float(log_sigma.std()) == pytest.approx(1.2, abs=0.01)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_sample_t_in_range_and_deterministic(schedule):
    def draw() -> torch.Tensor:
        return schedule.sample_t(4096, generator=torch.Generator().manual_seed(123))

    t = draw()
    assert t.shape == (4096,) and t.dtype == torch.float64
    assert torch.equal(t, draw())
    if isinstance(schedule, EDMSchedule):
        assert (t > 0).all()
    else:
        assert (t >= schedule.t_min).all() and (t <= schedule.t_max).all()
    if schedule.discrete:
        assert torch.equal(t, t.round())
    _, sigma = schedule.training_sigma_tilde(8, generator=torch.Generator().manual_seed(1))
    assert sigma.shape == (8,) and (sigma > 0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_train_timesteps=1), "num_train_timesteps"),
])
def test_bad_discrete_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiscreteVPSchedule(**kwargs)


def test_bad_continuous_arguments():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDMSchedule(sigma_min=0.0)
    with pytest.raises(ValueError, match="eps_t"):
        ContinuousVPSchedule(eps_t=0.0)


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_repr_is_readable_and_rebuilds_the_schedule(schedule):
    text = repr(schedule)
    assert text.startswith(type(schedule).__name__ + "(") and " object at 0x" not in text
    rebuilt = eval(text, vars(diffsweep.schedules))  # noqa: S307 - our own repr
    assert type(rebuilt) is type(schedule) and repr(rebuilt) == text
    t = torch.linspace(schedule.t_min, schedule.t_max, 11, dtype=torch.float64)
    assert torch.equal(rebuilt.sigma_tilde(t), schedule.sigma_tilde(t))
    assert torch.equal(rebuilt.c_noise(t), schedule.c_noise(t))
    assert rebuilt.sigma_data == schedule.sigma_data
    assert torch.equal(rebuilt.sample_t(64, generator=torch.Generator().manual_seed(0)),
                       schedule.sample_t(64, generator=torch.Generator().manual_seed(0)))


def test_reprs_name_the_arguments_that_differ():
    assert repr(VESchedule(sigma_max=80.0)) == (
        "VESchedule(sigma_min=0.01, sigma_max=80.0, eps_t=1e-05, sigma_data=0.5)")
    assert "beta_start=0.00085" in repr(DiscreteVPSchedule("scaled_linear", beta_start=0.00085,
                                                           beta_end=0.012))
    assert "shift=3.0" in repr(FlowMatchingSchedule(shift=3.0))
    assert "image_seq_len=4096" in repr(FlowMatchingSchedule(use_dynamic_shifting=True,
                                                             image_seq_len=4096))


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_log_snr_is_minus_two_log_sigma_tilde(schedule):
    t = torch.linspace(schedule.t_min, schedule.t_max, 7, dtype=torch.float64)
    expected = (schedule.alpha(t) ** 2 / schedule.sigma(t) ** 2).log()
    torch.testing.assert_close(schedule.log_snr(t), expected, rtol=1e-9, atol=1e-9)
