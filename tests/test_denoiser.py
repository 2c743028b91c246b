"""Denoiser: preconditioning, prediction-type conversions, dtype handling,
classifier-free guidance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffsweep.denoiser import ClassifierFreeGuidance, Denoiser
from diffsweep.schedules import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    EDMSchedule,
    FlowMatchingSchedule,
    VESchedule,
)

SCHEDULES = [DiscreteVPSchedule(), ContinuousVPSchedule(), VESchedule(), EDMSchedule(),
             FlowMatchingSchedule(), FlowMatchingSchedule(shift=3.0, density="logit_normal")]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction", "velocity"]


class Oracle(nn.Module):
    """Outputs a fixed tensor (set per test), whatever the input;
    records what it was called with."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("marker", torch.zeros(()))  # sets the net dtype (``.double()``)
        self.output: torch.Tensor | None = None
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels=None) -> torch.Tensor:
        self.calls.append((x, c_noise))
        return self.output.to(x.dtype)


class LabelNet(nn.Module):
    """eps = x * (1 + 0.1 * label) + c_noise / 1000: a cheap conditional net."""

    def forward(self, x, c_noise, labels=None):
        scale = 1.0 if labels is None else 1 + 0.1 * labels.float().reshape(-1, 1)
        return x * scale + c_noise.reshape(-1, 1) / 1000


def _batch(schedule, n: int = 6, dim: int = 5):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, dim, generator=g, dtype=torch.float64)
    eps = torch.randn(n, dim, generator=g, dtype=torch.float64)
    _, sigma = schedule.training_sigma_tilde(n, generator=g)
    return x0, eps, sigma, x0 + sigma[:, None] * eps


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_target_then_eps_from_output_recovers_eps(schedule, prediction_type):
    net = Oracle().double()
    denoiser = Denoiser(net, schedule, prediction_type)
    x0, eps, sigma, x = _batch(schedule)
    net.output = denoiser.training_target(x0, eps, sigma)
    x_in, _, c_in = denoiser.net_inputs(x, sigma)
    torch.testing.assert_close(denoiser.eps_from_output(net.output, x, sigma, c_in), eps,
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(denoiser.x0_from_output(net.output, x, sigma, c_in), x0,
                               rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(denoiser(x, sigma), x0, rtol=1e-9, atol=1e-8)
    assert denoiser.eps(x, sigma).shape == x.shape


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_x0_and_eps_of_any_output_are_consistent(schedule, prediction_type):
    """For an arbitrary (wrong) output the two conversions still describe one point:
    ``x~ = x0_hat + sigma~ eps_hat``."""
    net = Oracle().double()
    denoiser = Denoiser(net, schedule, prediction_type)
    _, _, sigma, x = _batch(schedule)
    net.output = torch.randn(x.shape, generator=torch.Generator().manual_seed(5),
                             dtype=torch.float64)
    _, _, c_in = denoiser.net_inputs(x, sigma)
    eps = denoiser.eps_from_output(net.output, x, sigma, c_in)
    x0 = denoiser.x0_from_output(net.output, x, sigma, c_in)
    torch.testing.assert_close(x0 + sigma[:, None] * eps, x, rtol=1e-9, atol=1e-9)


def test_velocity_is_eps_minus_x0_and_converts_through_x_t():
    """Flow: target eps - x0; x0_hat = x_t - s v, eps_hat = x_t + (1 - s) v (s: the noise level)."""
    schedule = FlowMatchingSchedule(shift=3.0)
    x0, eps, sigma, x = _batch(schedule)
    net = Oracle().double()
    denoiser = Denoiser(net, schedule, "velocity")
    target = denoiser.training_target(x0, eps, sigma)
    torch.testing.assert_close(target, eps - x0, rtol=0, atol=0)
    velocity = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    net.output = velocity
    s = schedule.sigma(schedule.t_of_sigma(sigma))[:, None]
    x_t = (1 - s) * x
    _, _, c_in = denoiser.net_inputs(x, sigma)
    torch.testing.assert_close(denoiser(x, sigma), x_t - s * velocity, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(denoiser.eps_from_output(velocity, x, sigma, c_in),
                               x_t + (1 - s) * velocity, rtol=1e-12, atol=1e-12)


def test_velocity_x0_is_accurate_at_flow_sigma_max():
    """At sigma~ ~ 3e9 (t_max = 1 - 1e-9) x0_hat is computed as x_t - s v, not x~ - sigma~ eps,
    which would cancel ~9 digits of a float64 x~."""
    schedule = FlowMatchingSchedule(shift=3.0)
    sigma = torch.full((4,), schedule.sigma_max, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    eps = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    x = x0 + sigma[:, None] * eps
    net = Oracle().double()
    denoiser = Denoiser(net, schedule, "velocity")
    net.output = eps - x0
    torch.testing.assert_close(denoiser(x, sigma), x0, rtol=0, atol=1e-12)
    # the cancelling form loses ~sigma~ * 1e-16 ~ 1e-7 here: the test above can tell the difference
    _, _, c_in = denoiser.net_inputs(x, sigma)
    via_eps = x - sigma[:, None] * denoiser.eps_from_output(net.output, x, sigma, c_in)
    assert float((via_eps - x0).abs().max()) > 1e-9


def test_v_prediction_means_the_same_for_every_schedule_at_equal_sigma_tilde():
    """DDPM's v is defined in unit-variance terms of sigma~ alone, so flow (whose c_in is not the
    unit-variance scale) gives the same target and conversion as a VP/EDM schedule."""
    x0, eps, sigma, x = _batch(EDMSchedule())
    flow = Denoiser(Oracle().double(), FlowMatchingSchedule(), "v_prediction")
    edm = Denoiser(Oracle().double(), EDMSchedule(sigma_data=1.0), "v_prediction")
    target = flow.training_target(x0, eps, sigma)
    torch.testing.assert_close(target, edm.training_target(x0, eps, sigma), rtol=0, atol=0)
    unit = (1 + sigma**2).rsqrt()[:, None]
    torch.testing.assert_close(target, unit * eps - sigma[:, None] * unit * x0, rtol=1e-12,
                               atol=1e-12)


def test_v_prediction_is_alpha_eps_minus_sigma_x0_for_vp():
    schedule = DiscreteVPSchedule()
    x0, eps, sigma, _ = _batch(schedule)
    t = schedule.t_of_sigma(sigma)
    target = Denoiser(Oracle(), schedule, "v_prediction").training_target(x0, eps, sigma)
    expected = schedule.alpha(t)[:, None] * eps - schedule.sigma(t)[:, None] * x0
    torch.testing.assert_close(target, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_net_inputs_follow_the_contract(schedule):
    net = Oracle()
    denoiser = Denoiser(net, schedule)
    _, _, sigma, x = _batch(schedule)
    x_in, c_noise, c_in = denoiser.net_inputs(x, sigma)
    assert x_in.dtype == torch.float32 and c_noise.dtype == torch.float32
    assert c_noise.shape == c_in.shape == sigma.shape
    if isinstance(schedule, FlowMatchingSchedule):  # flow nets are trained on x_t itself
        torch.testing.assert_close(c_in, 1 / (1 + sigma))
    else:
        torch.testing.assert_close(c_in, 1 / (sigma**2 + schedule.sigma_data**2).sqrt())
    torch.testing.assert_close(c_noise, schedule.c_noise(schedule.t_of_sigma(sigma)).float())
    if isinstance(schedule, (DiscreteVPSchedule, FlowMatchingSchedule)):
        # the VP and the flow net see exactly x_t = alpha * x~
        t = schedule.t_of_sigma(sigma)
        torch.testing.assert_close(x_in, (schedule.alpha(t)[:, None] * x).float())
    if isinstance(schedule, FlowMatchingSchedule):  # ... and diffusers' timestep 1000 s
        s = schedule.sigma(schedule.t_of_sigma(sigma))
        torch.testing.assert_close(c_noise, (1000 * s).float())


def test_float64_state_runs_float32_net_and_returns_float64():
    schedule = DiscreteVPSchedule()
    net = Oracle()
    net.output = torch.ones(6, 5)
    denoiser = Denoiser(net, schedule)
    _, _, sigma, x = _batch(schedule)
    x0 = denoiser(x, sigma)
    assert net.calls[-1][0].dtype == torch.float32 and x0.dtype == torch.float64
    torch.testing.assert_close(x0, x - sigma[:, None])
    assert Denoiser(nn.Linear(2, 2).double(), schedule).net_dtype == torch.float64


def test_scalar_sigma_broadcasts():
    schedule = EDMSchedule()
    denoiser = Denoiser(LabelNet(), schedule)
    x = torch.randn(4, 3)
    torch.testing.assert_close(denoiser(x, torch.tensor(2.0)), denoiser(x, torch.full((4,), 2.0)))


def test_unknown_prediction_type_names_choices():
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction, velocity"):
        Denoiser(Oracle(), EDMSchedule(), "score")


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_cfg_scale_one_is_conditional_and_zero_is_unconditional(schedule):
    denoiser = Denoiser(LabelNet(), schedule)
    labels = torch.tensor([0, 1, 2, 3])
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 1.0, 2.0, 4.0])
    cond = denoiser(x, sigma, labels)
    uncond = denoiser(x, sigma, torch.full_like(labels, 9))
    assert not torch.allclose(cond, uncond)
    for scale, expected in ((1.0, cond), (0.0, uncond)):
        guided = ClassifierFreeGuidance(denoiser, labels, scale, null_label=9)
        torch.testing.assert_close(guided(x, sigma), expected, rtol=1e-6, atol=1e-6)
    guided = ClassifierFreeGuidance(denoiser, labels, 3.0, null_label=9)
    torch.testing.assert_close(guided(x, sigma), uncond + 3.0 * (cond - uncond), rtol=1e-5,
                               atol=1e-5)
    assert guided.schedule is schedule
