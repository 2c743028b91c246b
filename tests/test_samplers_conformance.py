"""Conformance of the sigma-space samplers with diffusers' schedulers (diffusers: dev dependency).

Each test runs the same fixed, deterministic network through a diffusers scheduler loop and through
our sampler, from the same starting point, and compares the outputs (order 1) to ``ATOL``.

How the two sides are lined up (none of this is a difference in the math):

- Starting point. diffusers multiplies its noise by ``init_noise_sigma``: 1 for DDIM/DDPM/DPM/UniPC
  (x-space), and for the Euler family ``sigma_max`` (``linspace``/``trailing``) or
  ``sqrt(sigma_max^2 + 1)`` (``leading``). We start VP sampling from the exact prior,
  ``x~_T = x_T / alpha_T`` with std ``sqrt(1 + sigma~_max^2)``. Here both sides get the same
  ``x_T``: ``x~_T = x_T * sqrt(1 + sigma~_max^2)`` for us, ``x_T`` (x-space schedulers) or
  ``x~_T`` (Euler-family schedulers, which work in x~) for diffusers.
- Net inputs. diffusers calls ``scale_model_input`` and passes the (possibly fractional) timestep;
  our denoiser feeds ``c_in * x~`` and ``c_noise(t_of_sigma(sigma~))``. For VP both are ``x_t`` and
  the same t (``t_of_sigma`` inverts the table's linear interpolation exactly).
- Grids. DPM-Solver++ and UniPC build ``leading``/``linspace`` from ``num_steps + 1`` points and
  drop the last; our ``leading``/``linspace`` are DDIM's. We compare them on ``trailing`` (identical
  in all schedulers) and via custom timesteps. DDIM steps to ``t - N // n``, which equals the next
  grid point only when n divides N: DDIM conformance uses such n.
- Grids that end above 0 (diffusers' ``final_sigmas_type="sigma_min"``, whose last sigma is
  repeated): the samplers return the sample at that sigma~, x~ for us and the Euler family, and
  diffusers' x-space schedulers ``x_t = x~ / sqrt(1 + sigma~^2)`` (:func:`_x_space`). The
  zero-length steps section at the end compares every sampler diffusers defines one for.

Deliberate differences from diffusers (not exercised by the asserts):

- the initial noise scale above (diffusers' Euler family uses ``sigma_max``, not the VP prior
  std ``sqrt(1 + sigma_max^2)``, for ``linspace``/``trailing``);
- ``t_of_sigma`` for fractional indices (karras grids) inverts the linear-in-sigma table
  interpolation; diffusers' ``_sigma_to_t`` interpolates in log sigma (< 0.05 index units apart;
  0.4 on the cosine table's first interval).
- our sampler state is float64 (diffusers: float32 x-space), so ours is the more accurate side.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from diffsweep.denoiser import Denoiser  # noqa: E402
from diffsweep.samplers import SAMPLERS, Sampler  # noqa: E402
from diffsweep.schedules import DiscreteVPSchedule  # noqa: E402

ATOL = 1e-5
SHAPE = (2, 3, 8, 8)


class FixedNet(nn.Module):
    """A fixed eps-network that behaves like a denoiser for unit-variance data.

    ``eps = s x_t + 0.3 a tanh(W x_t + cos(t / 300))`` with ``a = sqrt(abar(t))``, ``s = sqrt(1 -
    abar(t))`` read from the linear beta table at the (possibly fractional) t, and a seeded channel
    mixing W. Then ``x0_hat = a x_t - 0.3 s tanh(...)`` stays of order 1 at every noise level.
    """

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        weight = torch.randn(channels, channels, generator=torch.Generator().manual_seed(0))
        self.register_buffer("weight", weight / math.sqrt(channels))
        self.register_buffer("abar", DiscreteVPSchedule("linear").alphas_cumprod.float())

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        low = t.floor().long().clamp(0, len(self.abar) - 2)
        abar = torch.lerp(self.abar[low], self.abar[low + 1], t - low)
        mix = torch.einsum("bchw,cd->bdhw", x, self.weight)
        return (1 - abar).sqrt() * x + 0.3 * abar.sqrt() * torch.tanh(mix + torch.cos(t / 300.0))


def _x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _diffusers_loop(scheduler, net: nn.Module, sample: torch.Tensor, **step_kwargs) -> torch.Tensor:
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(net(model_input, t), t, sample, **step_kwargs).prev_sample
    return sample


def _ours(method: str, schedule, sigmas: torch.Tensor, x_T: torch.Tensor, net: nn.Module,
          prediction_type: str = "epsilon", **options) -> torch.Tensor:
    """Our sample ``x~`` at ``sigmas[-1]`` (x0 when the grid ends at 0), from x-space ``x_T``."""
    x = x_T.to(torch.float64) * math.sqrt(1 + float(sigmas[0]) ** 2)
    denoiser = Denoiser(net, schedule, prediction_type)
    return SAMPLERS[method].fn(denoiser, x, sigmas, **options).to(torch.float32)


def _x_space(x_tilde: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x_t = alpha x~`` at sigma~ = ``sigma`` (VP): what diffusers' x-space schedulers return."""
    return x_tilde / math.sqrt(1 + sigma**2)


def _sched_kwargs(beta_schedule: str) -> dict:
    if beta_schedule == "scaled_linear":
        return dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return dict(beta_schedule=beta_schedule)


def _schedule(beta_schedule: str) -> DiscreteVPSchedule:
    return DiscreteVPSchedule(**_sched_kwargs(beta_schedule))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.abs().max() > 0.1, "outputs should be of order 1"
    return float((a - b).abs().max())


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("spacing,steps_offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
def test_ddim_matches_diffusers(beta_schedule, spacing, steps_offset):
    net, x_T = FixedNet(), _x_T()
    ref = diffusers.DDIMScheduler(**_sched_kwargs(beta_schedule), clip_sample=False,
                                  timestep_spacing=spacing, steps_offset=steps_offset)
    ref.set_timesteps(50)
    expected = _diffusers_loop(ref, net, x_T)
    sampler = Sampler("ddim", 50, spacing, steps_offset=steps_offset)
    schedule = _schedule(beta_schedule)
    got = _ours("ddim", schedule, sampler.sigmas(schedule), x_T, net)
    assert _max_diff(got, expected) < ATOL


def test_ddpm_matches_diffusers_same_generator():
    net, x_T = FixedNet(), _x_T()
    ref = diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small")
    ref.set_timesteps(25)
    expected = _diffusers_loop(ref, net, x_T, generator=torch.Generator().manual_seed(7))
    schedule = _schedule("linear")
    sigmas = Sampler("ddpm", 25, "leading").sigmas(schedule)
    got = _ours("ddpm", schedule, sigmas, x_T, net, generator=torch.Generator().manual_seed(7))
    assert _max_diff(got, expected) < ATOL


EULER_FAMILY = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
}


@pytest.mark.parametrize("method", sorted(EULER_FAMILY))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace_frac"])
def test_euler_family_matches_diffusers(method, spacing):
    net, x_T = FixedNet(), _x_T(1)
    cls, kwargs = EULER_FAMILY[method]
    diffusers_spacing = "linspace" if spacing == "linspace_frac" else spacing
    ref = cls(**_sched_kwargs("scaled_linear"), timestep_spacing=diffusers_spacing, **kwargs)
    ref.set_timesteps(15)
    schedule = _schedule("scaled_linear")
    sigmas = Sampler(method, 15, spacing).sigmas(schedule)
    start = x_T * math.sqrt(1 + float(sigmas[0]) ** 2)  # x~_T; the Euler family works in x~
    expected = _diffusers_loop(ref, net, start)
    got = _ours(method, schedule, sigmas, x_T, net)
    assert _max_diff(got, expected) < ATOL


def test_euler_ancestral_matches_diffusers_same_generator():
    net, x_T = FixedNet(), _x_T(2)
    ref = diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="trailing")
    ref.set_timesteps(20)
    schedule = _schedule("linear")
    sigmas = Sampler("euler_ancestral", 20, "trailing").sigmas(schedule)
    start = x_T * math.sqrt(1 + float(sigmas[0]) ** 2)
    expected = _diffusers_loop(ref, net, start, generator=torch.Generator().manual_seed(3))
    got = _ours("euler_ancestral", schedule, sigmas, x_T, net,
                generator=torch.Generator().manual_seed(3))
    assert _max_diff(got, expected) < ATOL


@pytest.mark.parametrize("num_steps", [10, 20])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_dpmpp_2m_matches_diffusers(beta_schedule, num_steps):
    net, x_T = FixedNet(), _x_T(3)
    ref = diffusers.DPMSolverMultistepScheduler(**_sched_kwargs(beta_schedule),
                                                timestep_spacing="trailing")
    ref.set_timesteps(num_steps)
    expected = _diffusers_loop(ref, net, x_T)
    schedule = _schedule(beta_schedule)
    got = _ours("dpmpp_2m", schedule, Sampler("dpmpp_2m", num_steps, "trailing").sigmas(schedule),
                x_T, net)
    assert _max_diff(got, expected) < ATOL


def test_dpmpp_2m_matches_diffusers_custom_leading_timesteps():
    """Our (DDIM) ``leading`` grid fed to diffusers as custom timesteps; lower_order_final=False
    still takes a first-order last step because ``final_sigmas_type='zero'``."""
    net, x_T = FixedNet(), _x_T(4)
    schedule = _schedule("linear")
    sampler = Sampler("dpmpp_2m", 25, "leading")
    sigmas = sampler.sigmas(schedule)
    timesteps = schedule.t_of_sigma(sigmas[:-1]).round().long().tolist()
    ref = diffusers.DPMSolverMultistepScheduler(lower_order_final=False)
    ref.set_timesteps(timesteps=timesteps)
    expected = _diffusers_loop(ref, net, x_T)
    got = _ours("dpmpp_2m", schedule, sigmas, x_T, net)
    assert _max_diff(got, expected) < ATOL


def test_dpmpp_2m_sde_matches_diffusers_same_generator():
    net, x_T = FixedNet(), _x_T(5)
    ref = diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
                                                timestep_spacing="trailing")
    ref.set_timesteps(20)
    expected = _diffusers_loop(ref, net, x_T, generator=torch.Generator().manual_seed(11))
    schedule = _schedule("linear")
    sigmas = Sampler("dpmpp_2m_sde", 20, "trailing").sigmas(schedule)
    got = _ours("dpmpp_2m_sde", schedule, sigmas, x_T, net,
                generator=torch.Generator().manual_seed(11))
    assert _max_diff(got, expected) < ATOL


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("num_steps", [6, 20])
def test_unipc_matches_diffusers(order, num_steps):
    net, x_T = FixedNet(), _x_T(6)
    ref = diffusers.UniPCMultistepScheduler(solver_order=order, timestep_spacing="trailing")
    ref.set_timesteps(num_steps)
    expected = _diffusers_loop(ref, net, x_T)
    schedule = _schedule("linear")
    sigmas = Sampler("unipc", num_steps, "trailing", order=order).sigmas(schedule)
    got = _ours("unipc", schedule, sigmas, x_T, net, order=order)
    assert _max_diff(got, expected) < ATOL


@pytest.mark.parametrize("method", sorted(SAMPLERS))
def test_sampler_call_is_deterministic_and_in_model_dtype(method):
    schedule = _schedule("linear")
    denoiser = Denoiser(FixedNet(), schedule)
    sampler = Sampler(method, 8, "trailing")

    def run() -> torch.Tensor:
        return sampler(denoiser, schedule, SHAPE, generator=torch.Generator().manual_seed(0))

    first, second = run(), run()
    assert first.dtype == torch.float32 and first.shape == SHAPE
    assert torch.equal(first, second)
    assert torch.isfinite(first).all()


@pytest.mark.parametrize("method,nfe", [("ddim", 10), ("ddpm", 10), ("euler", 10),
                                        ("euler_ancestral", 10), ("heun", 19), ("dpmpp_2m", 10),
                                        ("dpmpp_2m_sde", 10), ("unipc", 10), ("lms", 10)])
def test_nfe_counts_network_calls(method, nfe):
    schedule = _schedule("linear")
    net = FixedNet()
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    sampler = Sampler(method, 10, "trailing")
    sampler(Denoiser(net, schedule), schedule, SHAPE, generator=torch.Generator().manual_seed(0))
    assert sampler.nfe == nfe == len(calls)


# ----------------------------------------------------------------------------- bad input


def test_unknown_sampler_names_choices():
    with pytest.raises(ValueError, match="ddim.*dpmpp_2m.*unipc"):
        Sampler("plms", 10)


@pytest.mark.parametrize("method", ["ddim", "ddpm", "euler_ancestral", "dpmpp_2m_sde"])
def test_negative_eta(method):
    with pytest.raises(ValueError, match="eta must be >= 0"):
        Sampler(method, 10, eta=-0.1)


@pytest.mark.parametrize("order", [1, 4])
def test_unipc_order(order):
    with pytest.raises(ValueError, match="order must be one of 2, 3"):
        Sampler("unipc", 10, order=order)


def test_lms_order():
    with pytest.raises(ValueError, match="integer >= 1"):
        Sampler("lms", 10, order=0)


def test_zero_snr_euler_trailing_matches_diffusers():
    """Zero terminal SNR: sigma~_max = 4096 (diffusers' 2**-24 stand-in), told t = 999.

    Tolerance 5e-5 (measured 2e-5): at sigma~ = 4096, one float32 ulp of the net's input or output
    moves ``x0_hat = x~ - sigma~ eps`` by ~4096 * 6e-8 = 2.4e-4 on the first step, on either side
    (with diffusers' state in float64 the difference is 8e-6).
    """
    kwargs = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  rescale_betas_zero_snr=True)
    net, x_T = FixedNet(), _x_T(8)
    ref = diffusers.EulerDiscreteScheduler(**kwargs, timestep_spacing="trailing")
    ref.set_timesteps(10)
    schedule = DiscreteVPSchedule(**kwargs)
    sigmas = Sampler("euler", 10, "trailing").sigmas(schedule)
    expected = _diffusers_loop(ref, net, x_T * math.sqrt(1 + float(sigmas[0]) ** 2))
    assert _max_diff(_ours("euler", schedule, sigmas, x_T, net), expected) < 5e-5


# ----------------------------------------------------------------------------- x0 clipping
#
# ``clip_sample`` / dynamic ``thresholding`` (ddim, ddpm) against diffusers' DDIMScheduler and
# DDPMScheduler with the same options. Two kinds of check:
#
# - diffusers' own full-loop tests (tests/schedulers/test_scheduler_{ddim,ddpm}.py,
#   ``test_full_loop_no_noise``, both with ``clip_sample=True``) run ``SchedulerCommonTest``'s
#   ``dummy_model`` (``eps = x t / (t + 1)``) from ``dummy_sample_deter`` and assert
#   ``result_sum``/``result_mean``: DDIM (10 leading steps, eta 0) 172.0067 / 0.223967, DDPM (all
#   1000 steps, noise from ``torch.manual_seed(0)``) 258.9606 / 0.3372. We reproduce both numbers
#   and match the diffusers loop elementwise.
# - FixedNet (order-1 outputs) with a tighter clip range, dynamic thresholding in its dynamic
#   regime (s between 1 and sample_max_value), eta > 0 and ``use_clipped_model_output``.


class DummyModel(nn.Module):
    """diffusers' ``SchedulerCommonTest.dummy_model``: ``eps = x t / (t + 1)``."""

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *(1,) * (x.ndim - 1))
        return x * t / (t + 1)


def _dummy_sample_deter(shape: tuple[int, ...] = (4, 3, 8, 8)) -> torch.Tensor:
    """diffusers' ``SchedulerCommonTest.dummy_sample_deter``: ramps in [0, 1), batch first.

    (4, 3, 8, 8) is the common one; (4, 3, 8) is ``UniPCMultistepScheduler1DTest``'s.
    """
    num_elems = math.prod(shape)
    ramps = torch.arange(num_elems).reshape(*shape[1:], shape[0]) / num_elems
    return ramps.permute(len(shape) - 1, *range(len(shape) - 1))


def _diffusers_ddim_loop(scheduler, net: nn.Module, sample: torch.Tensor, **step_kwargs):
    for t in scheduler.timesteps:
        sample = scheduler.step(net(sample, t), t, sample, **step_kwargs).prev_sample
    return sample


def test_ddim_clip_sample_full_loop_reproduces_diffusers_reference():
    ref = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=True)
    ref.set_timesteps(10)
    expected = _diffusers_ddim_loop(ref, DummyModel(), _dummy_sample_deter(), eta=0.0)
    schedule = _schedule("linear")
    sampler = Sampler("ddim", 10, "leading", clip_sample=True)
    got = _ours("ddim", schedule, sampler.sigmas(schedule), _dummy_sample_deter(), DummyModel(),
                **sampler.options)
    assert abs(got.abs().sum().item() - 172.0067) < 1e-2
    assert abs(got.abs().mean().item() - 0.223967) < 1e-3
    assert _max_diff(got, expected) < ATOL
    # Here |x0_hat| stays below 1, so the clip never binds: diffusers' number pins the DDIM path
    # and the loop's set-up; test_x0_clipping_matches_diffusers has clips that bind.


def test_ddpm_clip_sample_full_loop_reproduces_diffusers_reference():
    """Tolerance 5e-5 (measured 2.8e-5; 1.2e-5 without clipping): 1000 steps of diffusers' float32
    coefficients, and at t ~ 999 the net's float32 rounding enters x0_hat = (x_t - s eps) / a
    amplified by 1 / a ~ 160 on either side."""
    ref = diffusers.DDPMScheduler(beta_schedule="linear", clip_sample=True,
                                  variance_type="fixed_small")
    sample, generator = _dummy_sample_deter(), torch.Generator().manual_seed(0)
    for t in reversed(range(1000)):
        sample = ref.step(DummyModel()(sample, t), t, sample, generator=generator).prev_sample
    schedule = _schedule("linear")
    sampler = Sampler("ddpm", 1000, "leading", clip_sample=True)
    got = _ours("ddpm", schedule, sampler.sigmas(schedule), _dummy_sample_deter(), DummyModel(),
                generator=torch.Generator().manual_seed(0), **sampler.options)
    assert abs(got.abs().sum().item() - 258.9606) < 1e-2
    assert abs(got.abs().mean().item() - 0.3372) < 1e-3
    assert _max_diff(got, sample) < 5e-5
    unclipped = _ours("ddpm", schedule, sampler.sigmas(schedule), _dummy_sample_deter(),
                      DummyModel(), generator=torch.Generator().manual_seed(0))
    assert _max_diff(unclipped, got) > 0.1  # the clip binds in this loop


THRESHOLD = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0)


@pytest.mark.parametrize("method,options", [
    ("ddim", dict(clip_sample=True, clip_sample_range=0.5)),
    ("ddim", dict(clip_sample=True, clip_sample_range=0.5, use_clipped_model_output=True)),
    ("ddim", dict(clip_sample=True, clip_sample_range=0.5, eta=0.5)),
    ("ddim", dict(THRESHOLD)),
    ("ddim", dict(THRESHOLD, eta=1.0)),
    ("ddpm", dict(clip_sample=True, clip_sample_range=0.5)),
    ("ddpm", dict(THRESHOLD)),
], ids=lambda value: value if isinstance(value, str)
    else "-".join(f"{k}={v}" for k, v in value.items()))
def test_x0_clipping_matches_diffusers(method, options):
    """Same options, same net, same x_T and (for eta > 0 and ddpm) the same generator stream:
    diffusers DDIM draws its noise on every step, ours skips the step to sigma~ = 0, where
    diffusers' std is 0, so the streams line up step by step."""
    net, x_T = FixedNet(), 1.5 * _x_T(9)  # wide enough that |x0_hat| exceeds 1 early on
    num_steps, seed = (25, 7) if method == "ddpm" else (20, 7)
    scheduler_options = {k: v for k, v in options.items()
                         if k not in ("eta", "use_clipped_model_output")}
    scheduler_options.setdefault("clip_sample", False)
    schedule = _schedule("linear")
    sampler = Sampler(method, num_steps, "leading", **options)
    sigmas = sampler.sigmas(schedule)
    if method == "ddim":
        ref = diffusers.DDIMScheduler(beta_schedule="linear", **scheduler_options)
        ref.set_timesteps(num_steps)
        expected = _diffusers_ddim_loop(
            ref, net, x_T, eta=options.get("eta", 0.0),
            generator=torch.Generator().manual_seed(seed),
            use_clipped_model_output=options.get("use_clipped_model_output", False))
    else:
        ref = diffusers.DDPMScheduler(beta_schedule="linear", variance_type="fixed_small",
                                      **scheduler_options)
        ref.set_timesteps(num_steps)
        expected = _diffusers_loop(ref, net, x_T, generator=torch.Generator().manual_seed(seed))

    def ours(**overrides) -> torch.Tensor:
        return _ours(method, schedule, sigmas, x_T, net,
                     generator=torch.Generator().manual_seed(seed), **{**options, **overrides})

    got = ours()
    assert _max_diff(got, expected) < ATOL
    # every option in play changes the result (a test that ignored it could not fail otherwise)
    assert _max_diff(ours(clip_sample=False, thresholding=False), got) > 1e-2
    if options.get("use_clipped_model_output"):
        assert _max_diff(ours(use_clipped_model_output=False), got) > 1e-3
    if options.get("thresholding"):  # s > 1 somewhere: not plain clipping to [-1, 1]
        assert _max_diff(ours(thresholding=False, clip_sample=True), got) > 1e-3


# ----------------------------------------------------------------------------- zero-length steps
#
# A grid whose last sigma is repeated, so its final step has zero length. diffusers builds one with
# ``use_karras_sigmas=True, final_sigmas_type="sigma_min"`` (Euler, DPM-Solver++, UniPC) and from
# repeated custom timesteps (Heun, whose step to 0 then follows); Euler ancestral's and LMS's API
# never builds one, so their grid is set by hand (``scheduler.sigmas``). Every sampler but UniPC
# skips the step (diffusers evaluates the net there and moves by zero: the same sample); UniPC
# evaluates the net at the repeated sigma and applies its corrector, as diffusers does.
#
# diffusers rounds karras timesteps (DPM-Solver++, UniPC) or interpolates them in log sigma
# (Euler); ours come from ``t_of_sigma``. The net sees ``round(t)`` on both sides
# (:class:`RoundedTimeNet`) and each test checks that both asked for the same t's.


class RoundedTimeNet(nn.Module):
    """``net(x, round(t))``, recording each call's rounded t."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.timesteps: list[float] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).round()
        self.timesteps.append(float(t.reshape(-1)[0]))
        return self.net(x, t)


#: diffusers' tests/schedulers/test_scheduler_unipc.py, ``test_full_loop_with_karras`` and
#: ``test_full_loop_with_karras_and_v_prediction`` (linear betas, bh2, order 2, 10 steps,
#: ``final_sigmas_type="sigma_min"``, ``dummy_model`` from ``dummy_sample_deter``, no noise):
#: ``mean(|sample|)`` for UniPCMultistepSchedulerTest (4, 3, 8, 8) and its 1-D variant (4, 3, 8),
#: asserted to 1e-3.
UNIPC_KARRAS_REFERENCE = {
    ((4, 3, 8, 8), "epsilon"): 0.2925,
    ((4, 3, 8, 8), "v_prediction"): 0.1966,
    ((4, 3, 8), "epsilon"): 0.2898,
    ((4, 3, 8), "v_prediction"): 0.1944,
}


@pytest.mark.parametrize("shape,prediction_type", list(UNIPC_KARRAS_REFERENCE),
                         ids=[f"{len(shape) - 2}d-{prediction}"
                              for shape, prediction in UNIPC_KARRAS_REFERENCE])
def test_unipc_karras_sigma_min_full_loop_reproduces_diffusers_reference(shape, prediction_type):
    """Our UniPC on diffusers' grid (its last sigma repeated) gives diffusers' asserted numbers:
    the net is evaluated at the repeated sigma and corrects the last step (10 calls)."""
    ref = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_order=2,
                                            solver_type="bh2", final_sigmas_type="sigma_min",
                                            use_karras_sigmas=True,
                                            prediction_type=prediction_type)
    ref.set_timesteps(10)
    expected = _diffusers_loop(ref, DummyModel(), _dummy_sample_deter(shape))
    sigmas = ref.sigmas.to(torch.float64)
    assert sigmas[-1] == sigmas[-2] > 0  # the final step has zero length
    schedule, net = _schedule("linear"), RoundedTimeNet(DummyModel())

    def ours(grid: torch.Tensor, model: nn.Module) -> torch.Tensor:
        return _x_space(_ours("unipc", schedule, grid, _dummy_sample_deter(shape), model,
                              prediction_type), float(grid[-1]))

    got = ours(sigmas, net)
    reference = UNIPC_KARRAS_REFERENCE[shape, prediction_type]
    assert abs(got.abs().mean().item() - reference) < 1e-3
    assert _max_diff(got, expected) < ATOL
    assert net.timesteps == ref.timesteps.tolist()
    assert SAMPLERS["unipc"].nfe_on(sigmas) == len(net.timesteps) == 10
    # Skipping the zero-length step (no final corrector) misses diffusers' number by ~2e-2.
    skipped = ours(sigmas[:-1], RoundedTimeNet(DummyModel()))
    assert abs(skipped.abs().mean().item() - reference) > 1e-2


def _karras_sigma_min(scheduler_class, num_steps: int, **kwargs):
    scheduler = scheduler_class(**_sched_kwargs("scaled_linear"), use_karras_sigmas=True,
                                final_sigmas_type="sigma_min", **kwargs)
    scheduler.set_timesteps(num_steps)
    return scheduler, scheduler.sigmas.to(torch.float64)


def _heun_repeated_timestep():
    """Custom timesteps ending 100, 100: diffusers' Heun grid s999 .. s100, s100, 0 (its
    ``sigmas`` hold each inner value twice, one per stage; our grid once)."""
    scheduler = diffusers.HeunDiscreteScheduler(**_sched_kwargs("scaled_linear"))
    scheduler.set_timesteps(timesteps=[999, 700, 400, 100, 100])
    stages = scheduler.sigmas
    return scheduler, torch.cat([stages[:1], stages[1:-1:2], stages[-1:]]).to(torch.float64)


def _last_sigma_repeated_by_hand(scheduler_class):
    """The 10-step trailing grid with its final 0 replaced by a repeat of the last sigma."""
    scheduler = scheduler_class(**_sched_kwargs("scaled_linear"), timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    scheduler.sigmas = torch.cat([scheduler.sigmas[:-1], scheduler.sigmas[-2:-1]])
    return scheduler, scheduler.sigmas.to(torch.float64)


#: (id, method, options, diffusers scheduler and its grid, x-space scheduler, generator seed,
#: evaluations diffusers spends on the zero-length step beyond ours).
REPEATED_FINAL_SIGMA = [
    ("euler", "euler", {},
     lambda: _karras_sigma_min(diffusers.EulerDiscreteScheduler, 10), False, None, 1),
    ("heun", "heun", {}, _heun_repeated_timestep, False, None, 2),
    ("lms", "lms", {},
     lambda: _last_sigma_repeated_by_hand(diffusers.LMSDiscreteScheduler), False, None, 1),
    ("euler_ancestral", "euler_ancestral", {},
     lambda: _last_sigma_repeated_by_hand(diffusers.EulerAncestralDiscreteScheduler), False, 3, 1),
    ("dpmpp_2m-10", "dpmpp_2m", {},  # < 15 steps: the zero-length step is first order
     lambda: _karras_sigma_min(diffusers.DPMSolverMultistepScheduler, 10), True, None, 1),
    ("dpmpp_2m-16", "dpmpp_2m", {},  # >= 15 steps: second order over h = 0
     lambda: _karras_sigma_min(diffusers.DPMSolverMultistepScheduler, 16), True, None, 1),
    ("dpmpp_2m_sde", "dpmpp_2m_sde", {},
     lambda: _karras_sigma_min(diffusers.DPMSolverMultistepScheduler, 10,
                               algorithm_type="sde-dpmsolver++"), True, 11, 1),
    ("unipc-order2", "unipc", {"order": 2},
     lambda: _karras_sigma_min(diffusers.UniPCMultistepScheduler, 10), True, None, 0),
    ("unipc-order3", "unipc", {"order": 3},
     lambda: _karras_sigma_min(diffusers.UniPCMultistepScheduler, 10, solver_order=3),
     True, None, 0),
]


@pytest.mark.parametrize("method,options,build,x_space,seed,wasted",
                         [case[1:] for case in REPEATED_FINAL_SIGMA],
                         ids=[case[0] for case in REPEATED_FINAL_SIGMA])
def test_repeated_final_sigma_matches_diffusers(method, options, build, x_space, seed, wasted):
    """Same sample as diffusers' loop on its grid with a zero-length step; our calls are diffusers'
    less the ``wasted`` ones it makes on that step (none for UniPC), and ``nfe_on`` counts them."""
    ref, sigmas = build()
    assert len(torch.unique(sigmas)) < len(sigmas), "the grid repeats a value"
    net, x_T = RoundedTimeNet(FixedNet()), _x_T(10)
    start = x_T if x_space else x_T * math.sqrt(1 + float(sigmas[0]) ** 2)

    def generator() -> dict:
        return {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}

    expected = _diffusers_loop(ref, net, start, **generator())
    ours_net = RoundedTimeNet(FixedNet())
    got = _ours(method, _schedule("scaled_linear"), sigmas, x_T, ours_net, **options, **generator())
    if x_space:
        got = _x_space(got, float(sigmas[-1]))
    assert torch.isfinite(expected).all()
    assert _max_diff(got, expected) < ATOL
    assert len(net.timesteps) - len(ours_net.timesteps) == wasted
    assert ours_net.timesteps == net.timesteps[:len(ours_net.timesteps)]
    assert SAMPLERS[method].nfe_on(sigmas, options) == len(ours_net.timesteps)


def test_diffusers_ddpm_refuses_a_zero_length_step():
    """DDPM (and DDIM, which steps t -> t - N // n) have no zero-length step in diffusers; ours
    skip one as every sampler does (tests/test_sampler_repeated_sigmas.py)."""
    with pytest.raises(ValueError, match="descending"):
        diffusers.DDPMScheduler().set_timesteps(timesteps=[500, 100, 100])
