"""Sigma~ grids vs diffusers' ``set_timesteps`` (diffusers: dev dependency), and bad grid input.

Tolerances: diffusers holds sigmas in float32 (computed from float32 tables); we compute in float64
from the same table, so sigma grids agree to float32 rounding (rtol 1e-6); timesteps exactly.

Deliberate differences from diffusers:

- ``linspace`` is DDIM/DDPM's (rounded indices); the Euler family's unrounded ``linspace`` is our
  ``linspace_frac``.
- DPM-Solver++/UniPC's ``leading``/``linspace`` (``num_steps + 1`` points, last dropped) are not
  reproduced; their ``trailing`` equals ours.
- ``trailing`` keeps ``num_steps`` timesteps: for 62 step counts in 1..1000 (61, 103, ..., 769,
  ..., 998) diffusers' ``arange(N, 0, -N / n)`` rounds to one extra entry, timestep -1 (``n + 1``
  steps); ours drops it and equals diffusers' first ``n`` timesteps.
- ``karras`` uses the schedule's sigma_min/sigma_max (table ends for discrete schedules), which is
  what ``EulerDiscreteScheduler(use_karras_sigmas=True)`` uses with its default ``linspace``
  spacing; with ``leading``/``trailing`` diffusers takes the ends of that spacing's grid instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsweep.grids import (
    DISCRETE_SPACINGS,
    SPACINGS,
    check_num_steps,
    discrete_timesteps,
    resolve_spacing,
    sigma_grid,
)
from diffsweep.samplers import Sampler
from diffsweep.schedules import ContinuousVPSchedule, DiscreteVPSchedule, EDMSchedule, VESchedule

diffusers = pytest.importorskip("diffusers")

SCHEDULES = {
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
}
RTOL = 1e-6


@pytest.mark.parametrize("spacing,steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0),
                                                   ("linspace", 0)])
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50, 999, 1000])
def test_discrete_timesteps_equal_ddim(spacing, num_steps, steps_offset):
    if steps_offset and num_steps == 1000:
        num_steps = 500  # leading + offset 1 with N steps would reach index N (in diffusers too)
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(num_steps)
    ours = discrete_timesteps(1000, num_steps, spacing, steps_offset)
    assert ours.tolist() == ref.timesteps.tolist()


def test_ddim_50_leading_grid():
    timesteps = discrete_timesteps(1000, 50, "leading")
    assert timesteps.tolist() == list(range(980, -1, -20))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_frac"])
@pytest.mark.parametrize("num_steps", [10, 15, 50])
def test_sigma_grid_equals_euler_discrete(name, spacing, num_steps):
    ref = diffusers.EulerDiscreteScheduler(
        **SCHEDULES[name], timestep_spacing="linspace" if spacing == "linspace_frac" else spacing)
    ref.set_timesteps(num_steps)
    ours = sigma_grid(DiscreteVPSchedule(**SCHEDULES[name]), num_steps, spacing)
    np.testing.assert_allclose(ours.numpy(), ref.sigmas.double().numpy(), rtol=RTOL, atol=0)
    assert ours[-1] == 0


def test_stable_diffusion_15_step_grid_starts_at_14_6146():
    """SD (scaled_linear) with EulerDiscreteScheduler's default ``linspace`` starts at sigma~(999).

    That is our ``linspace_frac`` (and ``linspace``/``trailing``, which also start at index 999);
    ``leading`` with SD's steps_offset=1 starts at index 925 instead.
    """
    schedule = DiscreteVPSchedule(**SCHEDULES["scaled_linear"])
    ref = diffusers.EulerDiscreteScheduler(**SCHEDULES["scaled_linear"])  # default: linspace
    ref.set_timesteps(15)
    ours = sigma_grid(schedule, 15, "linspace_frac")
    assert round(float(ours[0]), 4) == 14.6146
    np.testing.assert_allclose(ours.numpy(), ref.sigmas.double().numpy(), rtol=RTOL, atol=0)
    for spacing in ("linspace", "trailing"):
        assert round(float(sigma_grid(schedule, 15, spacing)[0]), 4) == 14.6146
    leading = sigma_grid(schedule, 15, "leading", steps_offset=1)
    assert float(leading[0]) == pytest.approx(float(schedule.sigma_tilde(torch.tensor(925.0))))
    assert float(leading[0]) < 10


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("num_steps", [5, 25])
def test_karras_equals_euler_discrete_karras(name, num_steps):
    ref = diffusers.EulerDiscreteScheduler(**SCHEDULES[name], use_karras_sigmas=True)
    ref.set_timesteps(num_steps)
    ours = sigma_grid(DiscreteVPSchedule(**SCHEDULES[name]), num_steps, "karras")
    np.testing.assert_allclose(ours.numpy(), ref.sigmas.double().numpy(), rtol=RTOL, atol=0)


def test_zero_snr_grid_equals_euler_discrete():
    kwargs = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  rescale_betas_zero_snr=True)
    ref = diffusers.EulerDiscreteScheduler(**kwargs, timestep_spacing="trailing")
    ref.set_timesteps(20)
    ours = sigma_grid(DiscreteVPSchedule(**kwargs), 20, "trailing")
    np.testing.assert_allclose(ours.numpy(), ref.sigmas.double().numpy(), rtol=RTOL, atol=0)
    assert float(ours[0]) == pytest.approx(4096.0, rel=1e-6)


@pytest.mark.parametrize("schedule", [DiscreteVPSchedule(), ContinuousVPSchedule(), VESchedule(),
                                      EDMSchedule()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("spacing", ["karras", "uniform_t", "log_snr", "auto"])
def test_grids_decrease_to_zero_within_schedule_range(schedule, spacing):
    sigmas = sigma_grid(schedule, 12, spacing)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (13,)
    assert (sigmas[:-1] > sigmas[1:]).all() and sigmas[-1] == 0
    if spacing == "auto" and schedule.discrete:  # leading: starts at index 11 * (1000 // 12)
        return
    assert float(sigmas[0]) == pytest.approx(schedule.sigma_max, rel=1e-9)
    assert float(sigmas[-2]) == pytest.approx(schedule.sigma_min, rel=1e-9)


def test_auto_spacing_is_leading_for_discrete_and_karras_for_continuous():
    assert resolve_spacing(DiscreteVPSchedule(), "auto") == "leading"
    for schedule in (ContinuousVPSchedule(), VESchedule(), EDMSchedule()):
        assert resolve_spacing(schedule, "auto") == "karras"
    assert torch.equal(Sampler("euler", 10).sigmas(EDMSchedule()),
                       sigma_grid(EDMSchedule(), 10, "karras"))
    assert torch.equal(Sampler("euler", 10).sigmas(DiscreteVPSchedule()),
                       sigma_grid(DiscreteVPSchedule(), 10, "leading"))


# ----------------------------------------------------------------------------- bad input


def test_unknown_spacing_names_choices():
    with pytest.raises(ValueError, match="leading.*karras"):
        sigma_grid(DiscreteVPSchedule(), 10, "cubic")
    with pytest.raises(ValueError, match="auto"):
        Sampler("euler", 10, "cubic")


@pytest.mark.parametrize("num_steps", [0, -3])
def test_num_steps_below_one(num_steps):
    with pytest.raises(ValueError, match=">= 1"):
        sigma_grid(DiscreteVPSchedule(), num_steps, "leading")
    with pytest.raises(ValueError, match=">= 1"):
        Sampler("euler", num_steps)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "linspace_frac"])
def test_more_steps_than_training_indices(spacing):
    with pytest.raises(ValueError, match="1000 training indices.*karras"):
        sigma_grid(DiscreteVPSchedule(), 1001, spacing)


@pytest.mark.parametrize("schedule", [ContinuousVPSchedule(), VESchedule(), EDMSchedule()],
                         ids=lambda s: type(s).__name__)
def test_discrete_spacing_on_continuous_schedule(schedule):
    with pytest.raises(ValueError, match="discrete schedule.*karras, uniform_t, log_snr"):
        Sampler("euler", 10, "trailing").sigmas(schedule)


def test_spacings_listed():
    assert set(SPACINGS) == {"auto", "leading", "trailing", "linspace", "linspace_frac",
                             "quadratic", "karras", "uniform_t", "log_snr"}


# ----------------------------------------------------------------------------- num_steps: one check


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, "10", None])
def test_num_steps_is_checked_in_one_place_with_one_message(num_steps):
    """check_num_steps is the only check: sigma_grid, discrete_timesteps and Sampler raise its
    message, naming the key, the value and what is allowed."""
    with pytest.raises(ValueError) as expected:
        check_num_steps(num_steps)
    message = str(expected.value)
    assert message == ("sampler.num_steps must be an integer >= 1 (grid intervals), "
                       f"got {num_steps!r}.")
    for call in (lambda: sigma_grid(DiscreteVPSchedule(), num_steps, "leading"),
                 lambda: sigma_grid(EDMSchedule(), num_steps, "karras"),
                 lambda: discrete_timesteps(1000, num_steps, "trailing"),
                 lambda: Sampler("euler", num_steps)):
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value) == message


def test_num_steps_accepts_integral_values():
    assert check_num_steps(1) == 1 and check_num_steps(np.int64(20)) == 20
    assert check_num_steps(10.0) == 10 and isinstance(check_num_steps(10.0), int)
    sampler = Sampler("euler", 10.0)
    assert sampler.num_steps == 10 and sampler.name == "euler_10"


def test_too_many_steps_names_the_key():
    with pytest.raises(ValueError, match=r"^sampler.num_steps=1001 exceeds the schedule's 1000"):
        Sampler("euler", 1001, "trailing").sigmas(DiscreteVPSchedule())


# ----------------------------------------------------------------------------- every grid decreases


@pytest.mark.parametrize("spacing", DISCRETE_SPACINGS)
def test_discrete_timesteps_have_num_steps_distinct_indices_for_every_count(spacing):
    """1 <= num_steps <= N: exactly num_steps indices, strictly decreasing (quadratic: DDIM's
    own repeats, non-increasing), inside [0, N - 1]."""
    for num_steps in range(1, 1001):
        timesteps = discrete_timesteps(1000, num_steps, spacing)
        assert timesteps.shape == (num_steps,), num_steps
        if spacing == "quadratic":
            assert bool((timesteps[:-1] >= timesteps[1:]).all()), num_steps
        else:
            assert bool((timesteps[:-1] > timesteps[1:]).all()), num_steps
        assert 0 <= float(timesteps.min()) and float(timesteps.max()) <= 999, num_steps


def test_trailing_equals_diffusers_first_num_steps_timesteps():
    overshoots = []
    for num_steps in range(1, 1001):
        ref = diffusers.DDIMScheduler(timestep_spacing="trailing")
        ref.set_timesteps(num_steps)
        ours = discrete_timesteps(1000, num_steps, "trailing")
        assert ours.tolist() == ref.timesteps[:num_steps].tolist(), num_steps
        if len(ref.timesteps) > num_steps:
            overshoots.append(num_steps)
            assert ref.timesteps[-1] == -1
    assert len(overshoots) == 62 and {61, 769, 998} <= set(overshoots)  # what this guards


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("num_steps", [61, 769])
def test_trailing_grids_where_diffusers_overshoots_have_num_steps_plus_one_sigmas(name, num_steps):
    sigmas = sigma_grid(DiscreteVPSchedule(**SCHEDULES[name]), num_steps, "trailing")
    assert sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0
    assert bool((sigmas[:-1] > sigmas[1:]).all())


def test_quadratic_spacing_is_the_ddim_papers_cifar10_tau():
    """DDIM's code: ``seq = [int(s) for s in np.linspace(0, np.sqrt(N * 0.8), S) ** 2]``."""
    reference = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), 10) ** 2][::-1]
    assert discrete_timesteps(1000, 10, "quadratic").tolist() == reference
    hundred = discrete_timesteps(1000, 100, "quadratic")
    assert hundred[0] == 800 and hundred[-1] == 0 and len(hundred) == 100
    assert bool((hundred[:-1] >= hundred[1:]).all())  # non-increasing ...
    assert len(set(hundred.tolist())) == 96  # ... with DDIM's 4 repeated small indices
    sampler = Sampler("ddim", num_steps=100, spacing="quadratic")
    assert sampler.nfe == 100  # counted as DDIM's S
