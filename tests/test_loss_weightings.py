"""Loss weightings (configs/loss/): formulas at known SNRs, the x0-currency identities through
``DenoisingLoss`` on a fixed denoiser, EDM's preconditioning, the validated pairs and the
``experiment=edm`` / ``experiment=rectified_flow`` recipes."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from diffsweep.assembly import build_module
from diffsweep.denoiser import PREDICTION_TYPES, Denoiser
from diffsweep.grids import resolve_spacing
from diffsweep.loss import (
    EPSILON_MAX_SIGMA,
    DenoisingLoss,
    EDMWeighting,
    LossWeighting,
    MinSNRWeighting,
    SigmoidWeighting,
    SoftMinSNRWeighting,
    TargetMSEWeighting,
    check_formulation,
    target_x0_weight,
)
from diffsweep.module import DiffusionModule
from diffsweep.schedules import DiscreteVPSchedule, EDMSchedule, FlowMatchingSchedule, VESchedule

#: sigma~ = 0.1, 0.5, 1, 2, 10  <->  SNR = 100, 4, 1, 0.25, 0.01
SIGMA = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=torch.float64)
SNR = torch.tensor([100.0, 4.0, 1.0, 0.25, 0.01], dtype=torch.float64)
VP = DiscreteVPSchedule("linear")          # sigma_data = 1
EDM = EDMSchedule()                        # sigma_data = 0.5
FLOW = FlowMatchingSchedule()
WEIGHTINGS = [MinSNRWeighting(), MinSNRWeighting(gamma=1.5), SoftMinSNRWeighting(),
              SoftMinSNRWeighting(gamma=3.0), EDMWeighting(), SigmoidWeighting(),
              SigmoidWeighting(bias=-2.0), TargetMSEWeighting("epsilon"),
              TargetMSEWeighting("v_prediction")]


def close(actual, expected, rtol=1e-12):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- formulas


def test_target_x0_weights_at_known_snrs():
    close(target_x0_weight("epsilon", SIGMA), SNR)
    close(target_x0_weight("sample", SIGMA), torch.ones(5))
    close(target_x0_weight("v_prediction", SIGMA), SNR + 1)               # VP: sigma_d = 1
    close(target_x0_weight("v_prediction", SIGMA, 0.5), SNR + 4)
    close(target_x0_weight("velocity", SIGMA), (1 + SNR.sqrt()) ** 2)
    close(target_x0_weight("velocity", torch.tensor([1.0], dtype=torch.float64)), [4.0])
    with pytest.raises(ValueError, match="prediction_type 'edm'.*target_x0_weight"):
        target_x0_weight("edm", SIGMA)


def test_min_snr_matches_hang_et_al_for_every_target():
    weighting = MinSNRWeighting(gamma=5.0)
    clamped = torch.tensor([5.0, 4.0, 1.0, 0.25, 0.01], dtype=torch.float64)
    close(weighting.x0_weight(SIGMA, VP), clamped)
    close(weighting(SIGMA, VP, "sample"), clamped)
    close(weighting(SIGMA, VP, "epsilon"), [0.05, 1.0, 1.0, 1.0, 1.0])
    close(weighting(SIGMA, VP, "v_prediction"), [5 / 101, 4 / 5, 1 / 2, 0.25 / 1.25, 0.01 / 1.01])
    close(weighting(SIGMA, VP, "velocity"), clamped / (1 + 1 / SIGMA) ** 2)
    close(weighting(SIGMA, EDM, "v_prediction"), clamped / (SNR + 4))     # sigma_d = 0.5


def test_min_snr_equals_diffusers_snr_gamma_and_lucidrains_loss_weight():
    """diffusers' train_text_to_image ``--snr_gamma`` (eps: min(snr, g) / snr, v: / (snr + 1))
    over ``compute_snr`` and denoising-diffusion-pytorch's ``loss_weight`` buffers."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr

    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    timesteps = torch.tensor([0, 10, 200, 500, 999])
    snr = compute_snr(scheduler, timesteps).double()
    sigma = VP.sigma_tilde(timesteps.double())
    clamped = torch.minimum(snr, torch.full_like(snr, 5.0))
    weighting = MinSNRWeighting(5.0)
    close(weighting(sigma, VP, "epsilon"), clamped / snr, rtol=1e-5)
    close(weighting(sigma, VP, "v_prediction"), clamped / (snr + 1), rtol=1e-5)

    ddpm = pytest.importorskip("denoising_diffusion_pytorch")
    from denoising_diffusion_pytorch.denoising_diffusion_pytorch import linear_beta_schedule

    net = ddpm.Unet(dim=8, dim_mults=(1, 2), channels=1)
    alphas_cumprod = torch.cumprod(1 - linear_beta_schedule(1000), 0)[timesteps]  # float64 there
    sigma = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    for objective, prediction_type in [("pred_noise", "epsilon"), ("pred_x0", "sample"),
                                       ("pred_v", "v_prediction")]:
        diffusion = ddpm.GaussianDiffusion(net, image_size=8, timesteps=1000, objective=objective,
                                           beta_schedule="linear", min_snr_loss_weight=True,
                                           min_snr_gamma=5)
        close(weighting(sigma, VP, prediction_type), diffusion.loss_weight[timesteps], rtol=1e-6)


def test_soft_min_snr_is_k_diffusions_weight_on_the_f_target():
    weighting = SoftMinSNRWeighting()
    for schedule in (EDM, VP):
        data = schedule.sigma_data
        close(weighting.x0_weight(SIGMA, schedule), 1 / (SIGMA**2 + data**2))
        k_diffusion = (SIGMA * data) ** 2 / (SIGMA**2 + data**2) ** 2   # on F = -v
        close(weighting(SIGMA, schedule, "v_prediction"), k_diffusion)
    close(SoftMinSNRWeighting(gamma=2.0).x0_weight(SIGMA, EDM), 1 / (1 / SNR + 1 / 2.0))


def test_edm_weighting_is_lambda_and_unit_weight_on_v():
    for schedule in (EDM, VP, FLOW):
        data = schedule.sigma_data
        lam = (SIGMA**2 + data**2) / (SIGMA * data) ** 2
        close(EDMWeighting().x0_weight(SIGMA, schedule), lam)
        close(EDMWeighting()(SIGMA, schedule, "v_prediction"), torch.ones(5))
        close(EDMWeighting()(SIGMA, schedule, "sample"), lam)
    close(EDMWeighting(sigma_data=2.0).x0_weight(SIGMA, VP), SNR + 0.25)


@pytest.mark.parametrize("bias", [-2.0, 0.0, 3.0])
def test_sigmoid_is_kingma_gao_and_soft_min_snr_with_gamma_e_to_the_b(bias):
    weighting = SigmoidWeighting(bias)
    close(weighting(SIGMA, VP, "epsilon"), torch.sigmoid(bias - SNR.log()))
    close(weighting.x0_weight(SIGMA, VP), SNR * torch.sigmoid(bias - SNR.log()))
    close(weighting.x0_weight(SIGMA, EDM),
          SoftMinSNRWeighting(gamma=math.exp(bias)).x0_weight(SIGMA, EDM))
    # k-diffusion's soft-min-snr is the sigmoid with b = -2 log sigma_d
    close(SigmoidWeighting(-2 * math.log(0.5)).x0_weight(SIGMA, EDM),
          SoftMinSNRWeighting().x0_weight(SIGMA, EDM))


def test_weightings_refuse_bad_parameters_by_name():
    with pytest.raises(ValueError, match=r"loss.weighting.gamma=0 must be a finite number > 0"):
        MinSNRWeighting(0)
    with pytest.raises(ValueError, match=r"loss.weighting.gamma=-1.0 .*or null"):
        SoftMinSNRWeighting(-1.0)
    with pytest.raises(ValueError, match=r"loss.weighting.sigma_data=nan"):
        EDMWeighting(float("nan"))
    with pytest.raises(ValueError, match=r"loss.weighting.bias=inf"):
        SigmoidWeighting(float("inf"))
    with pytest.raises(ValueError, match=r"loss.weighting.target='x0'.*epsilon, sample"):
        TargetMSEWeighting("x0")
    with pytest.raises(ValueError, match=r"loss.weighting must be a LossWeighting"):
        DenoisingLoss(weighting=3.0)


# ----------------------------------------------------------------------------- identities


class SameDenoiserNet(nn.Module):
    """The net of prediction type ``prediction_type`` whose denoiser is one fixed
    ``x0_hat(x~, sigma~) = 0.6 x~ / (1 + 0.3 sigma~) + 0.1``: its output is that type's target at
    (x0_hat, eps_hat = (x~ - x0_hat) / sigma~). sigma~ is told by the test (``self.sigma``)."""

    def __init__(self, schedule, prediction_type: str) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.6, dtype=torch.float64))
        self.reference = Denoiser(nn.Identity(), schedule, prediction_type)
        self.schedule = schedule
        self.sigma: torch.Tensor | None = None

    def x0_hat(self, x_tilde, sigma):
        return self.scale * x_tilde / (1 + 0.3 * sigma.view(-1, 1, 1, 1)) + 0.1

    def forward(self, x_in, c_noise):
        sigma = self.sigma.view(-1, 1, 1, 1)
        x_tilde = x_in / self.schedule.c_in(self.sigma).view(-1, 1, 1, 1)
        x0_hat = self.x0_hat(x_tilde, self.sigma)
        eps_hat = (x_tilde - x0_hat) / sigma
        return self.reference.training_target(x0_hat, eps_hat, self.sigma)


def _fixed_batch(schedule, prediction_type, sigma):
    net = SameDenoiserNet(schedule, prediction_type)
    net.sigma = sigma
    denoiser = Denoiser(net, schedule, prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(sigma), 1, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(len(sigma), 1, 4, 4, generator=generator, dtype=torch.float64)
    x_tilde = x0 + sigma.view(-1, 1, 1, 1) * noise
    # every type represents the same denoiser
    torch.testing.assert_close(denoiser(x_tilde, sigma), net.x0_hat(x_tilde, sigma))
    x0_error = (net.x0_hat(x_tilde, sigma) - x0).square().flatten(1).mean(1)
    return denoiser, x0, noise, x0_error


SCHEDULES = [VP, EDM, VESchedule(), FlowMatchingSchedule(t_max=0.999)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_every_weighting_is_one_objective_in_x0_terms_for_every_prediction_type(schedule,
                                                                                 prediction_type):
    """DenoisingLoss(w) on the net of any type = w(sigma~) * ||x0_hat - x0||^2 for one denoiser."""
    denoiser, x0, noise, x0_error = _fixed_batch(schedule, prediction_type, SIGMA)
    uniform = DenoisingLoss()(denoiser, x0, SIGMA, noise).double()
    close(uniform, target_x0_weight(prediction_type, SIGMA, schedule.sigma_data) * x0_error,
          rtol=1e-5)
    for weighting in WEIGHTINGS:
        loss = DenoisingLoss(weighting)
        close(loss(denoiser, x0, SIGMA, noise).double(),
              weighting.x0_weight(SIGMA, schedule) * x0_error, rtol=1e-5)
        close(loss.x0_weight(SIGMA, denoiser), weighting.x0_weight(SIGMA, schedule), rtol=1e-12)


def _raw(factor):
    return lambda sigma, schedule: factor(sigma.double())


def test_uniform_v_loss_is_eps_loss_times_snr_plus_one_over_snr_not_its_inverse():
    """Our unit-variance v: uniform v-MSE == eps-MSE x (SNR + 1) / SNR (= 1 / alpha^2) on VP;
    v-MSE x SNR / (SNR + 1) (denoising-diffusion-pytorch's pred_v) == uniform eps-MSE."""
    v_denoiser, x0, noise, _ = _fixed_batch(VP, "v_prediction", SIGMA)
    eps_denoiser, *_ = _fixed_batch(VP, "epsilon", SIGMA)
    uniform_v = DenoisingLoss()(v_denoiser, x0, SIGMA, noise)
    uniform_eps = DenoisingLoss()(eps_denoiser, x0, SIGMA, noise)
    eps_over_alpha2 = DenoisingLoss(_raw(lambda s: 1 + s**2))(eps_denoiser, x0, SIGMA, noise)
    torch.testing.assert_close(uniform_v, eps_over_alpha2, rtol=1e-5, atol=0)
    eps_times_alpha2 = DenoisingLoss(_raw(lambda s: 1 / (1 + s**2)))(eps_denoiser, x0, SIGMA,
                                                                      noise)
    assert not torch.allclose(uniform_v, eps_times_alpha2, rtol=1e-2)
    lucidrains_v = DenoisingLoss(TargetMSEWeighting("epsilon"))(v_denoiser, x0, SIGMA, noise)
    torch.testing.assert_close(lucidrains_v, uniform_eps, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        lucidrains_v, DenoisingLoss(_raw(lambda s: 1 / (1 + s**2)))(v_denoiser, x0, SIGMA, noise))


def test_uniform_flow_velocity_loss_in_eps_and_x0_terms():
    schedule = FlowMatchingSchedule(t_max=0.999)
    velocity, x0, noise, x0_error = _fixed_batch(schedule, "velocity", SIGMA)
    eps_denoiser, *_ = _fixed_batch(schedule, "epsilon", SIGMA)
    uniform = DenoisingLoss()(velocity, x0, SIGMA, noise)
    torch.testing.assert_close(
        uniform, DenoisingLoss(_raw(lambda s: (1 + s) ** 2))(eps_denoiser, x0, SIGMA, noise),
        rtol=1e-5, atol=0)
    close(uniform.double(), (1 + 1 / SIGMA) ** 2 * x0_error, rtol=1e-5)


class FixedF(nn.Module):
    """EDM's raw network F(c_in x, c_noise): a fixed nonlinear function."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tensor(0.2, dtype=torch.float64))

    def forward(self, x_in, c_noise):
        return torch.tanh(x_in) * (1 + c_noise.view(-1, 1, 1, 1).to(x_in.dtype)) + self.bias


class Negated(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x_in, c_noise):
        return -self.net(x_in, c_noise)


def test_v_prediction_on_the_edm_schedule_is_edms_preconditioning_and_loss_exactly():
    """D = c_skip x + c_out F(c_in x, ln(sigma)/4) and EDM's loss lambda ||D - x0||^2 (Karras et
    al. 2022, Table 1) equal our v_prediction denoiser over -F and its uniform (or edm) loss."""
    sigma = torch.tensor([0.002, 0.05, 0.5, 3.0, 80.0], dtype=torch.float64)
    data = EDM.sigma_data
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(5, 1, 4, 4, generator=generator, dtype=torch.float64)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    s = sigma.view(-1, 1, 1, 1)
    c_skip = data**2 / (s**2 + data**2)
    c_out = s * data / (s**2 + data**2).sqrt()
    c_in = 1 / (s**2 + data**2).sqrt()
    f_net = FixedF()
    edm_d = c_skip * x + c_out * f_net(c_in * x, sigma.log() / 4)
    denoiser = Denoiser(Negated(f_net), EDM, "v_prediction")
    # c_noise reaches the net in float32, the rest is float64
    torch.testing.assert_close(denoiser(x, sigma), edm_d, rtol=1e-7, atol=1e-9)

    lam = (sigma**2 + data**2) / (sigma * data) ** 2
    edm_loss = lam * (edm_d - x0).square().flatten(1).mean(1)
    edm_target = (x0 - c_skip * x) / c_out
    torch.testing.assert_close(-denoiser.training_target(x0, noise, sigma), edm_target)
    for weighting in (None, EDMWeighting()):
        close(DenoisingLoss(weighting)(denoiser, x0, sigma, noise).double(), edm_loss, rtol=1e-5)
    # the same objective on an x0-predicting net is loss=edm (without EDM's c_skip/c_out)
    sample_net = SameDenoiserNet(EDM, "sample")
    sample_net.sigma = sigma
    sample = Denoiser(sample_net, EDM, "sample")
    expected = lam * (sample_net.x0_hat(x, sigma) - x0).square().flatten(1).mean(1)
    close(DenoisingLoss(EDMWeighting())(sample, x0, sigma, noise).double(), expected, rtol=1e-5)


# ----------------------------------------------------------------------------- validation


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))

    def forward(self, x_in, c_noise):
        return self.weight * x_in


def _module(schedule, prediction_type, loss=None):
    return DiffusionModule(Denoiser(TinyNet(), schedule, prediction_type), torch.optim.AdamW,
                           loss=loss, image_shape=(1, 4, 4), seed=0)


def test_epsilon_prediction_on_a_flow_schedule_from_t_near_one_is_refused():
    for schedule in (FlowMatchingSchedule(), FlowMatchingSchedule(shift=3.0)):
        assert schedule.sigma_max > EPSILON_MAX_SIGMA
        with pytest.raises(ValueError, match=r"prediction_type=epsilon cannot be sampled from "
                                             r"FlowMatchingSchedule.*velocity.*t_max=0.999"):
            _module(schedule, "epsilon")
    _module(FlowMatchingSchedule(t_max=0.999), "epsilon")  # sigma~_max = 999


@pytest.mark.parametrize("schedule", [VP, DiscreteVPSchedule("squaredcos_cap_v2"), EDM,
                                      VESchedule(), FlowMatchingSchedule()],
                         ids=lambda s: repr(s)[:30])
@pytest.mark.parametrize("prediction_type", ["velocity", "v_prediction", "sample"])
def test_bounded_prediction_types_are_allowed_on_every_schedule_with_every_weighting(
        schedule, prediction_type):
    for weighting in [None, *WEIGHTINGS]:
        module = _module(schedule, prediction_type, DenoisingLoss(weighting))
        assert module.prediction_type == prediction_type


class NegativeAtHighNoise(LossWeighting):
    name = "negative"

    def x0_weight(self, sigma, schedule):
        return torch.where(sigma > 1.0, -1.0, 1.0).double()


def test_a_weighting_that_is_negative_or_unknown_for_the_type_is_refused_before_training():
    with pytest.raises(ValueError, match=r"loss=negative .* gives weight -1\.57\d* on the epsilon "
                                         r"target at sigma~=1\.\d+ of DiscreteVPSchedule"):
        _module(VP, "epsilon", DenoisingLoss(NegativeAtHighNoise()))
    denoiser = Denoiser(TinyNet(), VP, "epsilon")
    denoiser.prediction_type = "edm"  # a type the weightings do not know yet
    with pytest.raises(ValueError, match=r"loss=min_snr with module.denoiser.prediction_type=edm"):
        check_formulation(DenoisingLoss(MinSNRWeighting()), denoiser)
    check_formulation(DenoisingLoss(), denoiser)               # uniform: nothing to convert
    check_formulation(DenoisingLoss(lambda s, sch: s), denoiser)  # raw weights: the user's


# ----------------------------------------------------------------------------- configs


LOSS_CONFIGS = ["mse", "min_snr", "soft_min_snr", "edm", "sigmoid", "target_mse"]


def test_every_loss_config_builds_by_target(train_config):
    expected = {"mse": type(None), "min_snr": MinSNRWeighting, "soft_min_snr": SoftMinSNRWeighting,
                "edm": EDMWeighting, "sigmoid": SigmoidWeighting, "target_mse": TargetMSEWeighting}
    for name in LOSS_CONFIGS:
        loss = instantiate(train_config(f"loss={name}").loss)
        assert isinstance(loss, DenoisingLoss) and isinstance(loss.weighting, expected[name])
    assert train_config().loss.weighting is None                    # default: DDPM L_simple
    assert instantiate(train_config("loss=min_snr").loss).weighting.gamma == 5.0
    cfg = train_config("loss=min_snr", "loss.weighting.gamma=2", "scheduler=cosine",
                       "module.denoiser.prediction_type=v_prediction")
    module = build_module(cfg)
    assert module.loss.weighting.gamma == 2.0 and module.prediction_type == "v_prediction"


def test_experiment_edm_is_edms_recipe(train_config):
    module = build_module(train_config("experiment=edm", fast=False))
    assert isinstance(module.schedule, EDMSchedule) and module.schedule.sigma_data == 0.5
    assert module.prediction_type == "v_prediction"
    assert isinstance(module.loss.weighting, EDMWeighting)
    sigma = module.schedule.training_sigma_tilde(64, torch.Generator().manual_seed(0))[1]
    close(module.loss.sample_weight(sigma, module.denoiser), torch.ones(64))   # unit F weight
    assert module.sampler.method_name == "heun" and module.sampler.num_steps == 18
    assert module.sampler.nfe == 35 and module.sampler.spacing == "karras"
    x0 = torch.randn(4, *module.image_shape)
    noise = module.training_noise(x0, torch.Generator().manual_seed(0))
    assert torch.isfinite(module.batch_loss(x0, None, noise))


def test_experiment_rectified_flow_is_sd3s_recipe_at_small_scale(train_config):
    module = build_module(train_config("experiment=rectified_flow", fast=False))
    schedule = module.schedule
    assert isinstance(schedule, FlowMatchingSchedule) and schedule.shift == 1.0
    assert schedule.density == "logit_normal"
    assert module.prediction_type == "velocity" and module.loss.weighting is None
    assert module.sampler.method_name == "euler"
    assert resolve_spacing(schedule, module.sampler.spacing) == "uniform_t"
    with pytest.raises(ValueError, match="prediction_type=epsilon cannot be sampled"):
        build_module(train_config("experiment=rectified_flow",
                                  "module.denoiser.prediction_type=epsilon", fast=False))
