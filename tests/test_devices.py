"""Schedule tables live on the CPU; training and sampling must work with the net and data on
another device. The ``meta`` device stands in for a GPU here: a CPU-table lookup indexed by a
tensor on another device fails the same way as with CUDA."""

import pytest
import torch

from diffsweep.denoiser import Denoiser
from diffsweep.module import DiffusionModule
from diffsweep.nets.unet import UNet
from diffsweep.samplers import Sampler
from diffsweep.schedules import DiscreteVPSchedule, EDMSchedule, VESchedule

SCHEDULES = [DiscreteVPSchedule("linear"), VESchedule(), EDMSchedule()]


def _module(schedule, prediction_type="epsilon") -> DiffusionModule:
    net = UNet(in_channels=1, resolution=8, base_channels=8, channel_mults=(1, 2),
               num_res_blocks=1, attention_resolutions=())
    return DiffusionModule(Denoiser(net.to("meta"), schedule, prediction_type),
                           optimizer=torch.optim.AdamW, image_shape=(1, 8, 8), seed=0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_training_loss_with_net_on_another_device(schedule, prediction_type):
    module = _module(schedule, prediction_type)
    x0 = torch.empty(4, 1, 8, 8, device="meta")
    loss = module.batch_loss(x0, None, module.training_noise(x0, torch.Generator().manual_seed(0)))
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("method", ["ddim", "ddpm", "heun", "dpmpp_2m", "unipc", "lms"])
def test_sampling_with_net_on_another_device(schedule, method):
    module = _module(schedule)
    spacing = "trailing" if schedule.discrete else "karras"
    sampler = Sampler(method, num_steps=3, spacing=spacing)
    samples = sampler(module.denoiser, schedule, (2, 1, 8, 8), device="meta")
    assert samples.device.type == "meta" and samples.shape == (2, 1, 8, 8)
