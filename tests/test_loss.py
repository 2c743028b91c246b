"""The pure training core: the loss object, the per-step draws, LR schedules,
the composed module."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from diffsweep.assembly import build_module
from diffsweep.denoiser import Denoiser
from diffsweep.loss import DenoisingLoss
from diffsweep.lr_schedules import constant, cosine, inverse_sqrt
from diffsweep.module import draw_training_noise
from diffsweep.nets.unet import UNet
from diffsweep.schedules import DiscreteVPSchedule, EDMSchedule


class CountingNet(nn.Module):
    """``net(x_in, c_noise) = w * x_in``, counting its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))
        self.calls = 0

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, *labels) -> torch.Tensor:
        self.calls += 1
        return self.weight * x_in


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_loss_is_the_per_sample_mse_on_the_prediction_target_with_one_net_call(prediction_type):
    net = CountingNet()
    denoiser = Denoiser(net, EDMSchedule(), prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=generator)
    noise = torch.randn(3, 1, 4, 4, generator=generator)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    loss = DenoisingLoss()(denoiser, x0, sigma, noise)
    assert net.calls == 1 and loss.shape == (3,)
    x_tilde = x0 + sigma.float().view(-1, 1, 1, 1) * noise
    c_in = (1 / (sigma ** 2 + 0.5 ** 2).sqrt()).float().view(-1, 1, 1, 1)
    target = denoiser.training_target(x0, noise, sigma)
    expected = ((0.5 * c_in * x_tilde - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)


def test_weighting_multiplies_each_sample_loss():
    denoiser = Denoiser(CountingNet(), DiscreteVPSchedule("linear"))
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    plain = DenoisingLoss()(denoiser, x0, sigma, noise)
    weighted = DenoisingLoss(weighting=lambda s, schedule: 1 / s)(denoiser, x0, sigma, noise)
    torch.testing.assert_close(weighted, plain / sigma.float())


def test_training_draws_are_the_same_global_batch_for_any_number_of_ranks():
    schedule = DiscreteVPSchedule("linear")
    x0 = torch.zeros(8, 1, 2, 2)
    whole = draw_training_noise(schedule, x0, torch.Generator().manual_seed(3), label_dropout=0.5)
    for world_size in (2, 4):
        shares = [draw_training_noise(schedule, x0[: 8 // world_size],
                                      torch.Generator().manual_seed(3), rank=rank,
                                      world_size=world_size, label_dropout=0.5)
                  for rank in range(world_size)]
        for rank, share in enumerate(shares):
            assert torch.equal(share.sigma, whole.sigma[rank::world_size])
            assert torch.equal(share.noise, whole.noise[rank::world_size])
            assert torch.equal(share.drop, whole.drop[rank::world_size])
    assert draw_training_noise(schedule, x0, torch.Generator()).drop is None


def _factors(schedule, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=1.0)
    scheduler = schedule(optimizer)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_lr_schedules_follow_their_formulas():
    assert _factors(lambda o: constant(o, warmup_steps=4), 6) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert _factors(lambda o: constant(o), 2) == [1.0, 1.0]
    cos = _factors(lambda o: cosine(o, total_steps=10, warmup_steps=2, min_factor=0.1), 12)
    assert cos[:2] == [0.5, 1.0] and cos[2] == pytest.approx(1.0)
    assert cos[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cos[10] == pytest.approx(0.1) and cos[11] == pytest.approx(0.1)
    inv = _factors(lambda o: inverse_sqrt(o, ref_steps=4), 17)
    assert inv[:5] == [1.0] * 5 and inv[16] == pytest.approx(0.5)


@pytest.mark.parametrize("bad, message", [
    (lambda o: constant(o, warmup_steps=-1), r"lr_schedule.warmup_steps=-1.*integer >= 0"),
    (lambda o: cosine(o, total_steps=0), r"lr_schedule.total_steps=0.*integer >= 1"),
    (lambda o: cosine(o, total_steps=5, min_factor=2), r"lr_schedule.min_factor=2.*\[0, 1\]"),
])
def test_bad_lr_schedule_options_are_refused_by_name(bad, message):
    with pytest.raises(ValueError, match=message):
        bad(torch.optim.SGD([nn.Parameter(torch.zeros(()))], lr=1.0))


def test_one_instantiate_builds_the_module_from_the_composed_groups(train_config):
    cfg = train_config("scheduler=edm", "sampler=heun", "lr_schedule=cosine",
                       "module.denoiser.prediction_type=v_prediction")
    module = instantiate(cfg.module, _partial_=True)()
    assert isinstance(module.net, UNet) and isinstance(module.schedule, EDMSchedule)
    assert module.prediction_type == "v_prediction" and module.sampler.method_name == "heun"
    assert module.image_shape == (1, 16, 16)
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert scheduler.lr_lambdas[0](cfg.trainer.max_steps) == pytest.approx(0.0)  # cosine's end
    stored = build_module(cfg).config  # what checkpoints carry: the resolved run config
    assert stored["module"]["denoiser"]["net"] == stored["model"]
    assert stored["module"]["denoiser"]["schedule"]["_target_"].endswith("EDMSchedule")
