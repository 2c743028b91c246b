"""Sampler overhead per step vs one UNet forward (batch 64), for every registered sampler.

The sampler's own work (float64 state updates, coefficients, the denoiser's preconditioning) is
timed with a near-free net (``eps = 0.1 x``) wrapped in the real ``Denoiser``, divided by the NFE
and compared with one forward of ``configs/model/unet_tiny.yaml``'s UNet at the same batch. The
contract: overhead per step < 2% of the forward.

    python experiments/benchmarks/sampler_overhead.py [--batch 64] [--steps 50] [--channels 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from diffsweep.denoiser import Denoiser
from diffsweep.samplers import SAMPLERS, Sampler
from diffsweep.schedules import DiscreteVPSchedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import best_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


class NearFreeNet(nn.Module):
    """``eps = 0.1 * x``: one elementwise op, so timing it measures everything but the net."""

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return 0.1 * x


def unet(channels: int, resolution: int) -> nn.Module:
    """The UNet of configs/model/unet_tiny.yaml with the data keys filled in."""
    from diffsweep.nets.unet import UNet

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/model/unet_tiny.yaml"))
    cfg.pop("_target_")
    cfg.update(in_channels=channels, resolution=resolution)
    return UNet(**cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    shape = (args.batch, args.channels, args.resolution, args.resolution)
    schedule = DiscreteVPSchedule()
    net = unet(args.channels, args.resolution)
    x = torch.randn(shape)
    c_noise = torch.full((args.batch,), 500.0)
    with torch.no_grad():
        forward = best_of(lambda: net(x, c_noise), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {shape}")
    print(f"UNet (unet_tiny) forward: {forward * 1e3:.2f} ms")
    denoiser = Denoiser(NearFreeNet(), schedule)
    print(f"{'sampler':16s} {'NFE':>4s} {'run ms':>8s} {'per NFE ms':>10s} {'% of forward':>12s}")
    for method in SAMPLERS:
        sampler = Sampler(method, args.steps, "trailing")
        run = best_of(lambda: sampler(denoiser, schedule, shape,  # noqa: B023 - best_of calls it now
                                      generator=torch.Generator().manual_seed(0)), args.repeats)
        per_nfe = run / sampler.nfe
        print(f"{method:16s} {sampler.nfe:4d} {run * 1e3:8.2f} {per_nfe * 1e3:10.3f} "
              f"{100 * per_nfe / forward:11.2f}%")


if __name__ == "__main__":
    main()
