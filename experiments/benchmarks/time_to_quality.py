"""Time to quality: classifier-FID against training wall-clock, five recipes one after the other.

On Fashion-MNIST 32x32 (28x28 zero-padded), every recipe trains for the same wall-clock budget
(``--minutes``) on the same machine, at the same batch and matched net size (parameters within
10 %), reading the same shuffled batches:

- ``default``: diffsweep's default recipe (``configs/train.yaml``: DDPM linear schedule,
  v-prediction (EDM's F-target) with uniform MSE on it, AdamW lr 1e-3 with 100 warmup steps, EMA
  max 0.999 power 2/3, clip 1, precision auto = bf16 autocast on CPUs with AVX-512 BF16), the
  ``unet_tiny`` layout at ``--base-channels``;
- ``diffusers``: diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` with
  its defaults: ``UNet2DModel`` (built to our UNet's layout, so parameters match exactly),
  ``DDPMScheduler(1000, linear)``, eps MSE, AdamW lr 1e-4 betas (0.95, 0.999) wd 1e-6, cosine LR
  with 500 warmup steps over its 100 epochs, ``EMAModel(use_ema_warmup, power 3/4, max 0.9999)``,
  clip 1, fp32, no flips; its pipeline samples with ``DDPMScheduler`` (ancestral, x0 clipped);
- ``lucidrains``: ``denoising_diffusion_pytorch.GaussianDiffusion`` defaults (``pred_v``, sigmoid
  beta schedule, 1000 steps, loss weight SNR/(SNR+1) on v, i.e. uniform eps-MSE) with its
  ``Trainer``'s defaults: Adam lr 1e-4 betas (0.9, 0.99), ``ema_pytorch.EMA(beta 0.995,
  update_every 10)``, clip 1, horizontal flips; at 50 NFE it samples with its DDIM (trailing
  grid, x0 clipped, eps re-derived). The net is our UNet (``--lucidrains-net ours``, the default:
  the recipe alone, at equal FLOPs) or its own ``Unet`` at the ``dim`` (and head size) within 10 %
  of our parameter count (``--lucidrains-net unet``: at 0.3M parameters it trains 3.5x and
  samples 8x slower than ours on a CPU: full-resolution linear attention, 7x7 stem);
- ``best``: diffsweep with ``--best-overrides`` (default: ``experiment=edm``, precision auto);
- ``rectified_flow``: ``experiment=rectified_flow`` (SD3's recipe: velocity, logit-normal(0, 1) t,
  Euler 50 on the uniform-t grid);
- not raced by default (``--recipes``): ``rf_uniform`` (rectified flow with uniform t) and
  ``ddpm`` (``experiment=ddpm``: eps-MSE in fp32, the default before this race), the controls of
  SD3's Table 1 (``experiments/paper_claims/sd3_run.py`` samples the saved EMA weights,
  ``<out>/<recipe>/ema_denoiser.pt``, at other step counts).

Scoring (evaluation time excluded from the budget): classifier-FID
(:class:`diffsweep.metrics.evaluator.FIDEvaluator` with the ``fid_classifier`` extractor; NOT
comparable to Inception FID) of the EMA weights on ``--samples`` samples every ``--eval-every``
minutes of training and at the end, with 50-step DDIM (diffsweep's sampler, the same for all) and,
at the end (``--own-sampler-at final``) or at every point (``all``), each recipe's own default
sampler at <= 50 NFE (expressed with diffsweep's samplers, which match diffusers' and lucidrains'
loops: ``ddpm`` leading + ``clip_sample`` for diffusers, ``ddim`` trailing + ``clip_sample`` +
``use_clipped_model_output`` for lucidrains, ``ddim`` 50 for the default, ``heun`` 25 = 49 NFE for
``experiment=edm``). Prints FID-vs-minutes per recipe, the headline (minutes each recipe needs to
reach the best peer's final DDIM-50 FID, interpolated linearly between evaluations) and writes
``results.json``, ``results.md`` and ``fid_vs_minutes.png`` to ``--out``.

    python experiments/benchmarks/time_to_quality.py                       # <= 75 min, idle 2 cores
    python experiments/benchmarks/time_to_quality.py --minutes 2 --eval-every 1 --samples 500
    python experiments/benchmarks/time_to_quality.py --minutes 0.05 --samples 16 --real-count 256 \\
        --classifier-samples 512 --base-channels 8 --batch 8                 # smoke test, ~1 min

Default budget: 5 x 6 min of training plus 14 evaluations of 2000 samples x ~50 NFE (bf16
sampling, 400-700 img-NFE/s: ~2.5-4 min each on an idle 2-core EPYC) plus ~2 min of set-up
(classifier, real statistics) ~ 70-75 min. Recipes run one after the other, so on a shared machine
load changes between them: ``--clock cpu`` budgets process CPU time instead of wall time (with
``--threads 1``, the default, it excludes time-slicing by other jobs); both clocks are recorded.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ("default", "diffusers", "lucidrains", "best", "rectified_flow", "rf_uniform", "ddpm")
#: the recipes raced when --recipes is not given (rf_uniform and ddpm are the SD3 Table 1 controls)
DEFAULT_RECIPES = ("default", "rectified_flow", "best", "diffusers", "lucidrains")
#: diffsweep recipes beside default/best: train.py overrides and the recipe's own sampler
EXTRA_DIFFSWEEP = {
    "rectified_flow": (["experiment=rectified_flow"], "diffsweep rectified flow (SD3: velocity, "
                       "logit-normal(0, 1) t, Euler)"),
    "rf_uniform": (["experiment=rectified_flow", "scheduler.density=uniform"],
                   "diffsweep rectified flow, uniform t (SD3's rf/uniform)"),
    "ddpm": (["experiment=ddpm"], "diffsweep DDPM eps-MSE, fp32 (the default before this race)"),
}
PEERS = ("diffusers", "lucidrains")
DATA_ROOTS = (Path("/usr/share/datasets/fashion-mnist"), ROOT.parent / "shared" / "data" /
              "fashion-mnist", ROOT / "data" / "fashion_mnist")
DEFAULT_BEST = "experiment=edm"
DDIM_PAIR = {"name": "ddim_50", "sampler": "ddim", "num_steps": 50}

log = logging.getLogger("time_to_quality")


# ----------------------------------------------------------------------------- configs and data


def compose_train_config(overrides: list[str], output_dir: Path):
    """``configs/train.yaml`` composed as Hydra would (run dir ``output_dir``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    import diffsweep.hydra_utils  # noqa: F401  (registers the diffsweep resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", return_hydra_config=True,
                      overrides=[*overrides, f"hydra.run.dir={output_dir}",
                                 f"hydra.runtime.output_dir={output_dir}",
                                 f"paths.root_dir={output_dir}"])
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def find_data_root(requested: str | None) -> Path:
    """``--data-root``, else the first folder of :data:`DATA_ROOTS` holding the idx files."""
    candidates = [Path(requested)] if requested else list(DATA_ROOTS)
    for root in candidates:
        if any(root.glob("train-images-idx3-ubyte*")) or any(
                (root / "FashionMNIST" / "raw").glob("train-images-idx3-ubyte*")):
            return root
    if requested:
        raise SystemExit(f"--data-root {requested}: no Fashion-MNIST idx files "
                         f"(train-images-idx3-ubyte[.gz]) there or in FashionMNIST/raw.")
    return candidates[-1]  # torchvision downloads here (download=true)


def data_overrides(args: argparse.Namespace) -> list[str]:
    return ["data=fashion_mnist", f"data.root={args.data_root}",
            f"data.source.download={str(args.download).lower()}",
            f"data.batch_size={args.batch}", "model=unet_tiny",
            f"model.base_channels={args.base_channels}",
            f"model.num_groups={min(8, args.base_channels)}", f"seed={args.seed}",
            f"paths.cache_dir={args.cache_dir}"]


class BatchStream:
    """The same shuffled batches (float32 in [-1, 1]) for every recipe: epoch e is a
    permutation drawn from ``seed + e``."""

    def __init__(self, images: Tensor, batch: int, seed: int) -> None:
        from diffsweep.data.base import uint8_to_unit

        self.images, self.batch, self.seed = images, batch, seed
        self.to_unit = uint8_to_unit
        self.epoch, self.position, self.order = -1, 0, torch.empty(0, dtype=torch.int64)

    def __next__(self) -> Tensor:
        if self.position + self.batch > len(self.order):
            self.epoch += 1
            self.order = torch.randperm(len(self.images),
                                        generator=torch.Generator().manual_seed(self.seed +
                                                                                self.epoch))
            self.position = 0
        index = self.order[self.position:self.position + self.batch]
        self.position += self.batch
        return self.to_unit(self.images[index])


# ----------------------------------------------------------------------------- recipes


@dataclass
class Recipe:
    """One training recipe: its step, its EMA denoiser (a diffsweep Denoiser for FID) and its
    own sampler."""

    name: str
    label: str
    net: nn.Module
    own_pair: dict[str, Any]
    notes: str = ""
    steps: int = 0

    def train_step(self, x0: Tensor) -> float:
        raise NotImplementedError

    def ema_denoiser(self):
        raise NotImplementedError

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())


def _sync_ema(average: list[Tensor], current: list[Tensor], decay: float) -> None:
    torch._foreach_lerp_(average, current, 1.0 - decay)


@dataclass
class DiffsweepRecipe(Recipe):
    """A diffsweep run config trained in a bare loop: ``module.batch_loss`` + backward +
    ``clip_grad_norm_`` + the module's own ``configure_optimizers`` + the EMA callback's update
    (``diffsweep.callbacks.ema.ema_decay``, ``torch._foreach_lerp_``); the same math as
    ``train.py`` without Lightning's hooks."""

    module: Any = None
    optimizer: Any = None
    scheduler: Any = None
    ema_net: nn.Module | None = None
    ema_options: dict[str, Any] = field(default_factory=dict)
    clip: float | None = 1.0
    autocast: bool = False
    seed: int = 0

    @classmethod
    def build(cls, name: str, label: str, overrides: list[str], args: argparse.Namespace,
              own_pair: dict[str, Any] | None = None) -> DiffsweepRecipe:
        from diffsweep.assembly import build_module

        cfg = compose_train_config([*data_overrides(args), *overrides], args.out / name)
        torch.manual_seed(args.seed)
        module = build_module(cfg)
        optimizers = module.configure_optimizers()
        ema = cfg.callbacks.ema
        options = dict(max_decay=float(ema.max_decay), inv_gamma=float(ema.inv_gamma),
                       power=float(ema.power), min_decay=float(ema.min_decay))
        from diffsweep.assembly import resolve_precision

        precision = resolve_precision(cfg.trainer)
        if precision not in ("32-true", "32", "bf16-mixed"):
            raise SystemExit(f"{name}: trainer.precision={precision} is not supported on a CPU "
                             f"here (32-true | bf16-mixed).")
        sampler = module.sampler
        pair = own_pair or {"name": f"own_{sampler.method_name}_{sampler.num_steps}",
                            "sampler": sampler.method_name, "num_steps": sampler.num_steps,
                            "spacing": sampler.spacing}
        notes = (f"{module.schedule!r}; prediction {module.prediction_type}; "
                 f"{module.loss!r}; precision {precision}")
        return cls(name=name, label=label, net=module.net, own_pair=pair, notes=notes,
                   module=module, optimizer=optimizers["optimizer"],
                   scheduler=optimizers.get("lr_scheduler", {}).get("scheduler"),
                   ema_net=copy.deepcopy(module.net).requires_grad_(False), ema_options=options,
                   clip=cfg.trainer.gradient_clip_val, autocast=precision == "bf16-mixed",
                   seed=int(cfg.seed))

    def train_step(self, x0: Tensor) -> float:
        from diffsweep.callbacks.ema import ema_decay

        module = self.module
        module.train()
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.steps) % 2**63)
        noise = module.training_noise(x0, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = module.batch_loss(x0, None, noise)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(module.net.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        with torch.no_grad():
            decay = ema_decay(self.steps, **self.ema_options)
            _sync_ema(_floating(self.ema_net), _floating(module.net), decay)
        self.steps += 1
        return float(loss.detach())

    def ema_denoiser(self):
        return self.module.denoiser.with_net(self.ema_net).eval()


def _floating(net: nn.Module) -> list[Tensor]:
    return [t for t in [*net.parameters(), *net.buffers()] if t.is_floating_point()]


def diffusers_unet(unet_kwargs: dict[str, Any]) -> nn.Module:
    """A ``UNet2DModel`` with our UNet's layout (as ``train_throughput.py`` builds it): same
    widths, blocks per level, attention sizes (one head), GroupNorm groups and dropout."""
    from diffusers import UNet2DModel

    widths = [unet_kwargs["base_channels"] * m for m in unet_kwargs["channel_mults"]]
    sizes = [unet_kwargs["resolution"] // 2**i for i in range(len(widths))]
    attention = [size in unet_kwargs["attention_resolutions"] for size in sizes]
    groups = int(unet_kwargs["num_groups"])
    if any(width % groups for width in widths):
        groups = math.gcd(*widths)
    return UNet2DModel(
        sample_size=unet_kwargs["resolution"], in_channels=unet_kwargs["in_channels"],
        out_channels=unet_kwargs["in_channels"], block_out_channels=tuple(widths),
        layers_per_block=unet_kwargs["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        attention_head_dim=widths[-1], norm_num_groups=groups,
        dropout=unet_kwargs["dropout"])


class DiffusersNet(nn.Module):
    """``net(x_t, t) -> eps`` over a ``UNet2DModel`` (a diffsweep Denoiser's net)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        return self.unet(x, c_noise).sample


@dataclass
class DiffusersRecipe(Recipe):
    unet: Any = None
    scheduler: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None
    ema: Any = None

    @classmethod
    def build(cls, unet_kwargs: dict[str, Any], args: argparse.Namespace,
              images: int) -> DiffusersRecipe:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        torch.manual_seed(args.seed)
        unet = diffusers_unet(unet_kwargs)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999),
                                      weight_decay=1e-6, eps=1e-8)
        steps_per_epoch = images // args.batch
        lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=500,
                                     num_training_steps=steps_per_epoch * 100)
        ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0,
                       power=3 / 4)
        pair = {"name": "own_ddpm_50", "sampler": "ddpm", "num_steps": 50, "spacing": "leading",
                "clip_sample": True}
        return cls(name="diffusers", label="diffusers train_unconditional", net=unet,
                   own_pair=pair, notes="UNet2DModel (our layout), DDPMScheduler linear, eps",
                   unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000,
                                                      beta_schedule="linear"),
                   optimizer=optimizer, lr_scheduler=lr_scheduler, ema=ema)

    def train_step(self, x0: Tensor) -> float:
        self.unet.train()
        noise = torch.randn(x0.shape)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],))
        noisy = self.scheduler.add_noise(x0, noise, timesteps)
        loss = F.mse_loss(self.unet(noisy, timesteps).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        self.steps += 1
        return float(loss.detach())

    def ema_denoiser(self):
        from diffsweep.denoiser import Denoiser
        from diffsweep.schedules import DiscreteVPSchedule

        unet = copy.deepcopy(self.unet)
        self.ema.copy_to(unet.parameters())
        return Denoiser(DiffusersNet(unet), DiscreteVPSchedule("linear"), "epsilon").eval()


LUCIDRAINS_DIM_MULTS = (1, 2, 4)  # three levels at 32x32, as our unet_tiny's (1, 2, 2)


def lucidrains_size(target_parameters: int) -> tuple[int, int]:
    """``(dim, attn_dim_head)`` of denoising-diffusion-pytorch's ``Unet(dim, dim_mults=(1, 2, 4),
    channels=1)`` with a parameter count within 10 % of ``target_parameters``: the closest even
    ``dim`` (odd ones break its sinusoidal embedding) at its default head size 32, else at the
    largest of 24, 16, 8 that gets within 10 % (its 4 attention heads cost the same for any dim)."""
    from denoising_diffusion_pytorch import Unet

    closest: tuple[int, int, int] | None = None
    for head in (32, 24, 16, 8):
        for dim in range(4, 129, 2):
            net = Unet(dim=dim, dim_mults=LUCIDRAINS_DIM_MULTS, channels=1, attn_dim_head=head)
            count = sum(p.numel() for p in net.parameters())
            if closest is None or abs(count - target_parameters) < abs(closest[2] -
                                                                      target_parameters):
                closest = (dim, head, count)
            if count > target_parameters:
                break
        if abs(closest[2] - target_parameters) <= 0.1 * target_parameters:
            return closest[0], closest[1]
    return closest[0], closest[1]


class LucidrainsNet(nn.Module):
    """``net(x_t, t) -> v`` over a denoising-diffusion-pytorch ``Unet`` (a diffsweep net)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        return self.unet(x, c_noise)


class OursForGaussianDiffusion(nn.Module):
    """Our UNet with the attributes ``GaussianDiffusion`` reads (``--lucidrains-net ours``: the
    peer's recipe on our net, to separate recipe from architecture)."""

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__()
        self.net, self.channels, self.out_dim, self.self_condition = net, channels, channels, False

    def forward(self, x: Tensor, time: Tensor, x_self_cond: Tensor | None = None) -> Tensor:
        return self.net(x, time.float())


def lucidrains_schedule(diffusion: nn.Module):
    """A diffsweep schedule over ``GaussianDiffusion``'s beta table (its sigmoid schedule has no
    diffusers name): :class:`diffsweep.diffusers_bridge.TrainedBetasVPSchedule`."""
    from diffsweep.diffusers_bridge import TrainedBetasVPSchedule

    return TrainedBetasVPSchedule(diffusion.betas.tolist())


@dataclass
class LucidrainsRecipe(Recipe):
    diffusion: Any = None
    optimizer: Any = None
    ema: Any = None
    dim: int = 0

    @classmethod
    def build(cls, target_parameters: int, args: argparse.Namespace,
              unet_kwargs: dict[str, Any]) -> LucidrainsRecipe:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA

        torch.manual_seed(args.seed)
        if args.lucidrains_net == "ours":
            from diffsweep.nets.unet import UNet

            dim = 0
            unet = OursForGaussianDiffusion(UNet(**unet_kwargs), unet_kwargs["in_channels"])
            described = "our UNet"
        else:
            dim, head = lucidrains_size(target_parameters)
            unet = Unet(dim=dim, dim_mults=LUCIDRAINS_DIM_MULTS, channels=1, attn_dim_head=head)
            described = f"Unet(dim={dim}, dim_mults={LUCIDRAINS_DIM_MULTS}, attn_dim_head={head})"
        diffusion = GaussianDiffusion(unet, image_size=32, timesteps=1000,
                                      auto_normalize=False)  # data already in [-1, 1]
        optimizer = torch.optim.Adam(diffusion.parameters(), lr=1e-4, betas=(0.9, 0.99))
        ema = EMA(diffusion, beta=0.995, update_every=10)
        pair = {"name": "own_ddim_50_clip", "sampler": "ddim", "num_steps": 50,
                "spacing": "trailing", "clip_sample": True, "use_clipped_model_output": True}
        return cls(name="lucidrains", label="denoising-diffusion-pytorch", net=unet,
                   own_pair=pair, notes=f"{described}, pred_v, sigmoid beta schedule",
                   diffusion=diffusion, optimizer=optimizer, ema=ema, dim=dim)

    def train_step(self, x0: Tensor) -> float:
        self.diffusion.train()
        flip = torch.rand(x0.shape[0]) < 0.5          # Trainer(augment_horizontal_flip=True)
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        loss = self.diffusion(x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()
        self.steps += 1
        return float(loss.detach())

    def ema_denoiser(self):
        from diffsweep.denoiser import Denoiser

        ema_diffusion = self.ema.ema_model
        schedule = lucidrains_schedule(ema_diffusion)
        # lucidrains' v = sqrt(abar) eps - sqrt(1 - abar) x0: our v_prediction with sigma_d = 1
        return Denoiser(LucidrainsNet(ema_diffusion.model), schedule, "v_prediction").eval()


# ----------------------------------------------------------------------------- the race


@dataclass
class Curve:
    minutes: list[float] = field(default_factory=list)       # on the budget's clock
    wall_minutes: list[float] = field(default_factory=list)
    cpu_minutes: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    fid: dict[str, list[float | None]] = field(default_factory=dict)
    loss: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0


def evaluate(recipe: Recipe, evaluator, datamodule, pairs: list[dict[str, Any]],
             precision: str) -> dict[str, float]:
    denoiser = recipe.ema_denoiser()
    results = evaluator.evaluate(denoiser, pairs, datamodule, precision=precision)
    return {key[len("fid/"):]: value for key, value in results.items() if key.startswith("fid/")}


def race(recipe: Recipe, stream: BatchStream, evaluator, datamodule,
         args: argparse.Namespace) -> Curve:
    """Train ``recipe`` for ``args.minutes`` of wall clock (evaluation excluded), scoring at every
    ``args.eval_every`` minutes and at the end."""
    curve = Curve()
    budget = args.minutes * 60.0
    every = args.eval_every * 60.0
    next_eval = min(every, budget)
    trained = 0.0      # seconds on the budget's clock (--clock)
    wall = cpu = 0.0
    torch.manual_seed(args.seed)
    recent: list[float] = []
    while True:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        recent.append(recipe.train_step(next(stream)))
        wall += time.perf_counter() - start_wall
        cpu += time.process_time() - start_cpu
        trained = cpu if args.clock == "cpu" else wall
        done = trained >= budget
        if trained >= next_eval or done:
            final = done
            pairs = [DDIM_PAIR]
            if args.own_sampler_at == "all" or final:
                if _pair_key(recipe.own_pair) != _pair_key(DDIM_PAIR):
                    pairs.append(recipe.own_pair)
            started = time.perf_counter()
            scores = evaluate(recipe, evaluator, datamodule, pairs, args.sample_precision)
            curve.eval_seconds += time.perf_counter() - started
            curve.minutes.append(trained / 60.0)
            curve.wall_minutes.append(wall / 60.0)
            curve.cpu_minutes.append(cpu / 60.0)
            curve.steps.append(recipe.steps)
            curve.loss.append(sum(recent) / len(recent))
            recent = []
            for name in {DDIM_PAIR["name"], recipe.own_pair["name"]}:
                value = scores.get(name, scores[DDIM_PAIR["name"]]
                                   if _pair_key(recipe.own_pair) == _pair_key(DDIM_PAIR) else None)
                curve.fid.setdefault(name, []).append(value)
            print(f"  {recipe.name:10s} {trained / 60:6.2f} min ({args.clock}; wall "
                  f"{wall / 60:.2f}, cpu {cpu / 60:.2f})  step {recipe.steps:6d}  "
                  f"loss {curve.loss[-1]:.4f}  " + "  ".join(
                      f"{name} {value:.2f}" for name, value in scores.items()), flush=True)
            next_eval += every
            if final:
                return curve


def save_ema_weights(recipe: Recipe, path: Path) -> None:
    """The recipe's final EMA denoiser (net state dict, schedule and prediction type as text) for
    later studies (experiments/paper_claims evaluates them at other NFE)."""
    from diffsweep.files import atomic_writer

    denoiser = recipe.ema_denoiser()
    payload = {"recipe": recipe.name, "label": recipe.label, "steps": recipe.steps,
               "state_dict": {k: v.detach().cpu() for k, v in denoiser.net.state_dict().items()},
               "prediction_type": denoiser.prediction_type, "schedule": repr(denoiser.schedule)}
    if isinstance(recipe, DiffsweepRecipe):
        payload["config"] = recipe.module.config
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, "wb") as handle:
        torch.save(payload, handle)


def _pair_key(pair: dict[str, Any]) -> tuple:
    """What a pair samples with (its name and ``spacing: auto`` aside)."""
    return tuple(sorted((k, str(v)) for k, v in pair.items()
                        if k != "name" and not (k == "spacing" and v == "auto")))


def minutes_to_reach(minutes: list[float], fids: list[float | None], target: float) -> float | None:
    """First time the curve reaches ``target``, linear between evaluations (None: never)."""
    previous = None
    for minute, fid in zip(minutes, fids):
        if fid is None:
            continue
        if fid <= target:
            if previous is None:
                return minute
            (m0, f0) = previous
            return m0 + (minute - m0) * (f0 - target) / (f0 - fid) if f0 != fid else minute
        previous = (minute, fid)
    return None


def report(recipes: list[Recipe], curves: dict[str, Curve], args: argparse.Namespace,
           machine: str, floor: float | None = None) -> tuple[str, dict[str, Any]]:
    ddim = DDIM_PAIR["name"]
    lines = [f"# Time to quality ({machine})", "",
             f"Fashion-MNIST 32x32, batch {args.batch}, {args.minutes:g} min per recipe, "
             f"classifier-FID on {args.samples} samples ({args.sample_precision} sampling), "
             f"{args.threads} thread(s), budget on the {args.clock} clock."
             + (f" FID floor (held-out real images, same count): {floor:.2f}."
                if floor is not None else ""), "",
             "| recipe | params | steps | img/s | final loss | DDIM-50 FID | own sampler "
             "| own FID |",
             "|---|---|---|---|---|---|---|---|"]
    for recipe in recipes:
        curve = curves[recipe.name]
        own = recipe.own_pair["name"]
        img_s = curve.steps[-1] * args.batch / (curve.wall_minutes[-1] * 60)
        own_fid = curve.fid.get(own, [None])[-1]
        lines.append(f"| {recipe.name} ({recipe.label}) | {recipe.parameters / 1e6:.3f}M | "
                     f"{curve.steps[-1]} | {img_s:.0f} | {curve.loss[-1]:.4f} | "
                     f"{curve.fid[ddim][-1]:.2f} | {_describe(recipe.own_pair)} | "
                     f"{'-' if own_fid is None else f'{own_fid:.2f}'} |")
    lines += ["", "FID (DDIM-50) vs minutes of training:", ""]
    for recipe in recipes:
        curve = curves[recipe.name]
        points = ", ".join(f"{m:.1f} min: {f:.2f}" for m, f in zip(curve.minutes,
                                                                   curve.fid[ddim]))
        lines.append(f"- {recipe.name}: {points}")
    peers = [r for r in recipes if r.name in PEERS]
    summary: dict[str, Any] = {}
    if peers:
        best_peer = min(peers, key=lambda r: curves[r.name].fid[ddim][-1])
        target = curves[best_peer.name].fid[ddim][-1]
        peer_minutes = curves[best_peer.name].minutes[-1]
        lines += ["", f"Headline: best peer = {best_peer.name}, final DDIM-50 FID {target:.2f} "
                      f"after {peer_minutes:.1f} min. Minutes to reach it:", ""]
        for recipe in recipes:
            curve = curves[recipe.name]
            reached = minutes_to_reach(curve.minutes, curve.fid[ddim], target)
            ratio = "" if reached is None else f" ({reached / peer_minutes:.2f}x the peer's time)"
            first = next((f for f in curve.fid[ddim] if f is not None), None)
            bound = "<= " if reached is not None and first is not None and first <= target else ""
            text = "not reached" if reached is None else f"{bound}{reached:.1f} min{ratio}"
            lines.append(f"- {recipe.name}: {text}; final {curve.fid[ddim][-1]:.2f}")
            summary[recipe.name] = reached
        summary = {"best_peer": best_peer.name, "target_fid": target, "minutes": summary}
    return "\n".join(lines) + "\n", summary


def _describe(pair: dict[str, Any]) -> str:
    extras = ", ".join(f"{k}={v}" for k, v in pair.items()
                       if k not in ("name", "sampler", "num_steps"))
    return f"{pair['sampler']} {pair['num_steps']}" + (f" ({extras})" if extras else "")


def plot(recipes: list[Recipe], curves: dict[str, Curve], target: float | None,
         path: Path, clock: str = "wall") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffsweep.files import atomic_writer

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for recipe in recipes:
        curve = curves[recipe.name]
        line, = axis.plot(curve.minutes, curve.fid[DDIM_PAIR["name"]], marker="o",
                          label=f"{recipe.name} (DDIM-50)")
        own = curve.fid.get(recipe.own_pair["name"])
        if own is not None and _pair_key(recipe.own_pair) != _pair_key(DDIM_PAIR):
            points = [(m, f) for m, f in zip(curve.minutes, own) if f is not None]
            if points:
                axis.plot(*zip(*points), marker="x", linestyle=":", color=line.get_color(),
                          label=f"{recipe.name} ({_describe(recipe.own_pair).split(' (')[0]})")
    if target is not None:
        axis.axhline(target, color="gray", linestyle="--", linewidth=0.8,
                     label="best peer's final FID")
    axis.set_xlabel(f"training minutes ({'process CPU time' if clock == 'cpu' else 'wall clock'}, "
                    "evaluation excluded)")
    axis.set_ylabel("classifier-FID")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_writer(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


def machine_string(threads: int) -> str:
    model = "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} cores, {threads} thread(s), load avg {load:.2f}"


def build_recipes(args: argparse.Namespace, images: int) -> list[Recipe]:
    recipes: list[Recipe] = []
    default = DiffsweepRecipe.build("default", "diffsweep default", [], args)
    unet_kwargs = {key: value for key, value in default.module.config["model"].items()
                   if key != "_target_"}
    for name in args.recipes:
        if name == "default":
            recipes.append(default)
        elif name == "diffusers":
            recipes.append(DiffusersRecipe.build(unet_kwargs, args, images))
        elif name == "lucidrains":
            recipes.append(LucidrainsRecipe.build(default.parameters, args, unet_kwargs))
        elif name == "best":
            overrides = [o for o in args.best_overrides.split(",") if o]
            own = None
            if any(o == "experiment=edm" for o in overrides):
                own = {"name": "own_heun_25", "sampler": "heun", "num_steps": 25}  # 49 NFE
            label = f"diffsweep --best-overrides {args.best_overrides}"
            recipes.append(DiffsweepRecipe.build("best", label, overrides, args, own))
        else:
            overrides, label = EXTRA_DIFFSWEEP[name]
            recipes.append(DiffsweepRecipe.build(name, label, overrides, args))
    reference = default.parameters
    for recipe in recipes:
        if abs(recipe.parameters - reference) > 0.1 * reference:
            raise SystemExit(f"{recipe.name}: {recipe.parameters} parameters vs {reference} "
                             f"(default): not within 10 %.")
    return recipes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0,
                        help="training wall-clock budget per recipe (evaluation excluded)")
    parser.add_argument("--eval-every", type=float, default=3.0,
                        help="minutes of training between FID evaluations (and at the end)")
    parser.add_argument("--samples", type=int, default=2000, help="generated samples per FID")
    parser.add_argument("--batch", type=int, default=64, help="training batch for every recipe")
    parser.add_argument("--base-channels", type=int, default=16,
                        help="unet_tiny width (16: 0.28M parameters); the peers are matched")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help=f"comma-separated subset of {','.join(RECIPES)}")
    parser.add_argument("--best-overrides", default=DEFAULT_BEST,
                        help="train.py overrides of the 'best' recipe, comma-separated")
    parser.add_argument("--lucidrains-net", choices=("ours", "unet"), default="ours",
                        help="lucidrains' recipe over our UNet (default: same FLOPs, the recipe "
                             "alone) or over its own Unet sized to match (3.5x slower to train, "
                             "8x to sample on a CPU at 0.3M parameters)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="budget clock: wall time, or process CPU time (steadier on a shared "
                             "machine with --threads 1)")
    parser.add_argument("--own-sampler-at", choices=("final", "all"), default="final",
                        help="score each recipe's own sampler at the end only, or at every point")
    parser.add_argument("--sample-precision", default="bf16", choices=("32", "bf16"),
                        help="net precision while sampling (the same for every recipe)")
    parser.add_argument("--real-count", type=int, default=None,
                        help="real images for the reference statistics (default: all 60000)")
    parser.add_argument("--classifier-samples", type=int, default=None,
                        help="training examples of the FID classifier (default: its config)")
    parser.add_argument("--data-root", default=None,
                        help="folder with the Fashion-MNIST idx files (default: "
                             + ", ".join(str(p) for p in DATA_ROOTS) + ")")
    parser.add_argument("--download", action="store_true",
                        help="download Fashion-MNIST with torchvision when the files are missing")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--reuse", action="store_true",
                        help="take the curve of a recipe that has <out>/<recipe>/curve.json from "
                             "there instead of racing it again (an interrupted race continues; "
                             "recipes raced in separate processes are reported together)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data order, init and noise")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "time_to_quality",
                        help="output folder (results.json, results.md, fid_vs_minutes.png)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="FID cache (real statistics, classifier); default <out>/.cache")
    args = parser.parse_args(argv)
    args.recipes = [name for name in args.recipes.split(",") if name]
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown or not args.recipes:
        parser.error(f"--recipes {','.join(unknown) or '(empty)'}: choose from {','.join(RECIPES)}")
    for key in ("minutes", "eval_every"):
        if not getattr(args, key) > 0:
            parser.error(f"--{key.replace('_', '-')} must be > 0")
    if args.samples < 2:
        parser.error("--samples must be >= 2")
    args.out = args.out.resolve()
    args.cache_dir = (args.cache_dir or args.out / ".cache").resolve()
    args.data_root = find_data_root(args.data_root)
    return args


def build_evaluation(args: argparse.Namespace) -> tuple[Any, Any]:
    """The Fashion-MNIST datamodule (set up) and the prepared classifier-FID evaluator of the race
    (``--samples``, ``--real-count``, ``--classifier-samples``, ``--cache-dir``)."""
    from hydra.utils import instantiate

    from diffsweep.assembly import build_datamodule

    cfg = compose_train_config([*data_overrides(args), "metrics=fid_classifier",
                                f"metrics.fid.evaluator.num_samples={args.samples}",
                                f"metrics.fid.evaluator.batch_size={min(args.samples, 500)}",
                                *([f"metrics.fid.evaluator.real_max_count={args.real_count}"]
                                  if args.real_count else []),
                                *([f"metrics.fid.evaluator.extractor.train_samples="
                                   f"{args.classifier_samples}"]
                                  if args.classifier_samples else [])], args.out / "fid")
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    evaluator = instantiate(cfg.metrics.fid.evaluator)
    evaluator.prepare(datamodule)
    return datamodule, evaluator


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*FID uses the.*")
    torch.set_num_threads(args.threads)
    from diffsweep.files import atomic_write_json, atomic_write_text

    datamodule, evaluator = build_evaluation(args)
    floor = evaluator.real_floor(datamodule, "val", args.samples)
    images = datamodule.dataset("train", augment=False).images
    recipes = build_recipes(args, len(images))
    machine = machine_string(args.threads)
    print(f"{machine}\ndata {args.data_root} ({len(images)} images); "
          f"{args.minutes:g} min x {len(recipes)} recipes, FID every {args.eval_every:g} min on "
          f"{args.samples} samples")
    for recipe in recipes:
        print(f"  {recipe.name:10s} {recipe.parameters:9d} params  {recipe.notes}")
    curves: dict[str, Curve] = {}
    for recipe in recipes:
        saved = args.out / recipe.name / "curve.json"
        if args.reuse and saved.is_file():
            curves[recipe.name] = Curve(**json.loads(saved.read_text())["curve"])
            print(f"{recipe.name}: reusing {saved}", flush=True)
            continue
        print(f"{recipe.name}: training", flush=True)
        curves[recipe.name] = race(recipe, BatchStream(images, args.batch, args.seed), evaluator,
                                   datamodule, args)
        atomic_write_json(saved, {"curve": dataclasses.asdict(curves[recipe.name]),
                                  "machine": machine, "notes": recipe.notes})
        save_ema_weights(recipe, args.out / recipe.name / "ema_denoiser.pt")
    text, summary = report(recipes, curves, args, machine, floor)
    print("\n" + text)
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": machine, "summary": summary, "fid_floor": floor,
               "recipes": {r.name: {"label": r.label, "parameters": r.parameters,
                                    "notes": r.notes, "own_sampler": r.own_pair,
                                    "minutes": curves[r.name].minutes,
                                    "wall_minutes": curves[r.name].wall_minutes,
                                    "cpu_minutes": curves[r.name].cpu_minutes,
                                    "steps": curves[r.name].steps,
                                    "loss": curves[r.name].loss, "fid": curves[r.name].fid,
                                    "eval_seconds": curves[r.name].eval_seconds}
                           for r in recipes}}
    atomic_write_json(args.out / "results.json", results)
    atomic_write_text(args.out / "results.md", text)
    plot(recipes, curves, summary.get("target_fid"), args.out / "fid_vs_minutes.png", args.clock)
    print(f"wrote {args.out}/results.json, results.md, fid_vs_minutes.png")
    return results


if __name__ == "__main__":
    main()
