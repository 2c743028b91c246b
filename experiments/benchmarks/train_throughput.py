"""Training throughput (img/s): diffsweep's Lightning step vs a bare PyTorch loop vs diffusers.

Three loops over the same batch size and synthetic data (a shuffled in-memory TensorDataset in a
DataLoader, as ``configs/data/*.yaml`` use with ``num_workers: 0``), all in one process:

- ``lightning``: a real ``lightning.Trainer.fit`` of ``DiffusionModule`` with the default training
  options (``configs/train.yaml``: AdamW lr 1e-3 with 100 warmup steps, ``gradient_clip_val: 1.0``,
  ``log_every_n_steps: 25``), the EMA callback (``configs/callbacks/default.yaml``), a
  ``LearningRateMonitor`` and a ``CSVLogger``. Timed between ``on_train_batch_start`` of step
  ``warmup`` and of step ``warmup + steps`` (start-up, the first steps and teardown excluded).
  No progress bar, checkpoint or sample-grid callbacks (they do not act in these steps).
- ``bare``: the same math without Lightning: ``module.batch_loss`` on the same UNet,
  backward, ``clip_grad_norm_``, the module's own ``configure_optimizers`` (AdamW + warmup),
  one ``torch._foreach_lerp_`` EMA update.
- ``diffusers``: ``UNet2DModel`` (built to match our UNet's conv/attention layout, so its FLOPs
  match; both parameter counts and FLOPs are printed) + ``DDPMScheduler.add_noise`` + AdamW +
  ``clip_grad_norm_`` + ``EMAModel(use_ema_warmup=True, foreach=True)``, as in diffusers'
  ``train_unconditional.py`` example.

The three loops run interleaved in ``--rounds`` rounds (so load changes on a shared machine hit all
of them); the table shows per-loop medians over rounds and the median of the per-round ratios.

    python experiments/benchmarks/train_throughput.py                   # tiny16,tiny32; fp32+bf16
    python experiments/benchmarks/train_throughput.py --configs small32 --steps 4 --rounds 2
    python experiments/benchmarks/train_throughput.py --threads 2 --precision bf16

Both wall-clock and process-CPU-time throughput are printed: on a shared machine the CPU time of a
one-thread run is the steadier measure of the work done (it excludes time-slicing by other jobs).

``--threads`` sets ``torch.set_num_threads`` (default 1: on a 2-core machine shared with other
jobs, 2 intra-op threads are several times slower for these small convolutions; see README.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[2]

#: name -> (model config file, image channels, resolution)
CONFIGS = {
    "tiny16": ("unet_tiny", 1, 16),
    "tiny32": ("unet_tiny", 3, 32),
    "small32": ("unet_small", 3, 32),
}
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
EMA_OPTIONS = dict(max_decay=0.999, inv_gamma=1.0, power=2 / 3)  # configs/callbacks/default.yaml
LR, WARMUP_STEPS, CLIP = 1e-3, 100, 1.0  # configs/train.yaml, configs/trainer/default.yaml


# ------------------------------------------------------------------------ models


def model_kwargs(name: str) -> dict[str, Any]:
    """Our UNet's constructor arguments for a CONFIGS entry (from configs/model/*.yaml)."""
    model, channels, resolution = CONFIGS[name]
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / f"configs/model/{model}.yaml"))
    cfg.pop("_target_")
    cfg.update(in_channels=channels, resolution=resolution)
    return cfg


def our_unet(name: str) -> nn.Module:
    from diffsweep.nets.unet import UNet

    return UNet(**model_kwargs(name))


def diffusers_unet(name: str) -> nn.Module:
    """A ``UNet2DModel`` with our UNet's layout: same widths, blocks per level, attention sizes
    (single head), GroupNorm groups, dropout and time-embedding width."""
    from diffusers import UNet2DModel

    kw = model_kwargs(name)
    widths = [kw["base_channels"] * m for m in kw["channel_mults"]]
    sizes = [kw["resolution"] // 2**i for i in range(len(widths))]
    attn = [size in kw["attention_resolutions"] for size in sizes]
    return UNet2DModel(
        sample_size=kw["resolution"], in_channels=kw["in_channels"],
        out_channels=kw["in_channels"], block_out_channels=tuple(widths),
        layers_per_block=kw["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        attention_head_dim=widths[-1], norm_num_groups=min(kw["num_groups"], widths[0] // 4),
        dropout=kw["dropout"])


class DiffusersAdapter(nn.Module):
    """``net(x, c_noise) -> eps`` over a ``UNet2DModel`` (for our samplers / FLOP counting)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        return self.unet(x, c_noise).sample


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def forward_flops(net: nn.Module, shape: tuple[int, ...], train: bool = False) -> int:
    """FLOPs (``torch.utils.flop_counter``: matmul, conv, attention) of one forward, or of
    forward + backward when ``train``."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(shape)
    t = torch.randint(0, 1000, (shape[0],)).float()
    counter = FlopCounterMode(display=False)
    with counter:
        out = net(x, t)
        out = out.sample if hasattr(out, "sample") else out
        if train:
            out.square().mean().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ------------------------------------------------------------------------ data / module


def make_loader(name: str, batch: int, num_batches: int = 16) -> torch.utils.data.DataLoader:
    _, channels, res = CONFIGS[name]
    gen = torch.Generator().manual_seed(0)
    data = torch.rand(batch * num_batches, channels, res, res, generator=gen) * 2 - 1
    labels = torch.full((len(data),), -1, dtype=torch.long)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, labels),
                                       batch_size=batch, shuffle=True, drop_last=True)


#: Overrides of configs/train.yaml's module.optimizer (set by --fused).
OPTIMIZER_OVERRIDES: dict[str, Any] = {}


def optimizer_factory() -> Callable[..., torch.optim.Optimizer]:
    """``module.optimizer`` of configs/train.yaml (AdamW partial), with OPTIMIZER_OVERRIDES."""
    from hydra.utils import instantiate

    cfg = OmegaConf.load(ROOT / "configs/module/default.yaml").optimizer
    cfg = OmegaConf.merge(cfg, OPTIMIZER_OVERRIDES)
    return instantiate(cfg)


def make_module(name: str, **module_kwargs: Any):
    import functools

    from diffsweep.denoiser import Denoiser
    from diffsweep.lr_schedules import constant
    from diffsweep.module import DiffusionModule
    from diffsweep.schedules import DiscreteVPSchedule

    _, channels, res = CONFIGS[name]
    return DiffusionModule(Denoiser(our_unet(name), DiscreteVPSchedule("linear")),
                           optimizer_factory(), image_shape=(channels, res, res),
                           lr_schedule=functools.partial(constant, warmup_steps=WARMUP_STEPS),
                           **module_kwargs)


def _cycle(loader):
    while True:
        yield from loader


def clocks() -> tuple[float, float]:
    """(wall clock, this process's CPU time) in seconds."""
    return time.perf_counter(), time.process_time()


def per_step(start: tuple[float, float], end: tuple[float, float],
             steps: int) -> tuple[float, float]:
    return (end[0] - start[0]) / steps, (end[1] - start[1]) / steps


def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


# ------------------------------------------------------------------------ the three loops


def time_lightning(name: str, batch: int, steps: int, warmup: int, precision: str,
                   module_factory: Callable | None = None) -> tuple[float, float]:
    """(wall, CPU) seconds per step of ``Trainer.fit`` (see the module docstring)."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from diffsweep.callbacks.ema import EMA

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: dict[int, tuple[float, float]] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.times[trainer.global_step] = clocks()

    timer = StepTimer()
    module = (module_factory or make_module)(name)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            accelerator="cpu", devices=1, precision=PRECISIONS[precision],
            max_steps=warmup + steps + 1, max_epochs=-1, gradient_clip_val=CLIP,
            log_every_n_steps=25, logger=CSVLogger(tmp, name="csv", version=""),
            callbacks=[EMA(**EMA_OPTIONS), LearningRateMonitor(logging_interval="step"), timer],
            enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            default_root_dir=tmp)
        trainer.fit(module, train_dataloaders=make_loader(name, batch))
    return per_step(timer.times[warmup], timer.times[warmup + steps], steps)


def time_bare(name: str, batch: int, steps: int, warmup: int,
              precision: str) -> tuple[float, float]:
    """(wall, CPU) seconds per step of the same math in a plain loop."""
    from diffsweep.callbacks.ema import ema_decay

    module = make_module(name)
    params = [p for p in module.net.parameters()]
    ema = [p.detach().clone() for p in params]
    optimization = module.configure_optimizers()  # the module's own AdamW + warmup
    optimizer, sched = optimization["optimizer"], optimization["lr_scheduler"]["scheduler"]
    data = _cycle(make_loader(name, batch))
    start = (0.0, 0.0)
    for step in range(warmup + steps):
        if step == warmup:
            start = clocks()
        x0, labels = next(data)
        with _autocast(precision):
            loss = module.batch_loss(x0, labels, module.training_noise(x0, None))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - ema_decay(step, **EMA_OPTIONS))
    return per_step(start, clocks(), steps)


def time_diffusers(name: str, batch: int, steps: int, warmup: int,
                   precision: str) -> tuple[float, float]:
    """(wall, CPU) seconds per step of diffusers' train_unconditional-style loop."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    net = diffusers_unet(name)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / WARMUP_STEPS))
    ema = EMAModel(net.parameters(), decay=EMA_OPTIONS["max_decay"], use_ema_warmup=True,
                   inv_gamma=1.0, power=2 / 3, foreach=True)
    data = _cycle(make_loader(name, batch))
    start = (0.0, 0.0)
    for step in range(warmup + steps):
        if step == warmup:
            start = clocks()
        x0, _ = next(data)
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (x0.shape[0],))
        noisy = scheduler.add_noise(x0, noise, timesteps)
        with _autocast(precision):
            pred = net(noisy, timesteps).sample
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(net.parameters())
    return per_step(start, clocks(), steps)


LOOPS = {"lightning": time_lightning, "bare": time_bare, "diffusers": time_diffusers}


# ------------------------------------------------------------------------ report


def load_string() -> str:
    try:
        return "load avg (1/5/15 min) " + " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load avg n/a"


def machine_string() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except OSError:
        isa = []
    return (f"{model}, {os.cpu_count()} logical CPUs ({', '.join(isa) or 'no AVX-512'}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny16,tiny32",
                        help=f"comma list of {', '.join(CONFIGS)}")
    parser.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per loop and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--loops", default="lightning,bare,diffusers")
    parser.add_argument("--fused", choices=("config", "true", "false"), default="config",
                        help="AdamW fused= for our loops (config: as configs/train.yaml); the "
                             "diffusers loop always uses torch's default AdamW, as its example")
    args = parser.parse_args()
    if args.fused != "config":
        OPTIMIZER_OVERRIDES["fused"] = args.fused == "true"
    torch.set_num_threads(args.threads)
    loops = args.loops.split(",")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    adamw = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/module/default.yaml").optimizer)
    adamw = {k: v for k, v in {**adamw, **OPTIMIZER_OVERRIDES}.items() if not k.startswith("_")}
    print(f"Machine: {machine_string()}; batch {args.batch}; {args.steps} timed steps x "
          f"{args.rounds} rounds; our AdamW {adamw}; {load_string()} at start\n")
    print("| config | params ours / diffusers | train GFLOP/img ours / diffusers |")
    print("|---|---|---|")
    for name in args.configs.split(","):
        _, c, r = CONFIGS[name]
        ours, theirs = our_unet(name), diffusers_unet(name)
        f_ours = forward_flops(ours, (1, c, r, r), train=True) / 1e9
        f_theirs = forward_flops(DiffusersAdapter(theirs), (1, c, r, r), train=True) / 1e9
        print(f"| {name} ({model_kwargs(name)['base_channels']}ch, {c}x{r}x{r}) | "
              f"{count_params(ours) / 1e6:.3f}M / {count_params(theirs) / 1e6:.3f}M | "
              f"{f_ours:.3f} / {f_theirs:.3f} |")
    print()

    rows = []
    for name in args.configs.split(","):
        for precision in args.precision.split(","):
            # results[loop] = [(wall img/s, cpu img/s) per round]
            results: dict[str, list[tuple[float, float]]] = {loop: [] for loop in loops}
            for _ in range(args.rounds):
                for loop in loops:
                    wall, cpu = LOOPS[loop](name, args.batch, args.steps, args.warmup, precision)
                    results[loop].append((args.batch / wall, args.batch / cpu))
            rows.append((name, precision, results))
            print(f"  done {name} {precision}: " + ", ".join(
                f"{k} {_median(v, 0):.1f}" for k, v in results.items())
                + f" img/s (wall); {load_string()}", flush=True)

    print(f"\n{load_string()} at end\n")
    clocks_shown = [(0, "wall clock")]
    if args.threads == 1:  # with more threads CPU time adds them up (and their spin-waits)
        clocks_shown.append((1, "process CPU time"))
    for clock, label in clocks_shown:
        print(f"img/s by {label} (medians over rounds; ratios: median of per-round ratios)\n")
        print("| config | precision | " + " | ".join(loops)
              + " | lightning / bare | lightning / diffusers | bare / diffusers |")
        print("|---|---|" + "---|" * (len(loops) + 3))
        for name, precision, results in rows:
            cells = " | ".join(f"{_median(results[loop], clock):.1f}" for loop in loops)
            print(f"| {name} | {precision} | {cells} | "
                  f"{_ratio(results, 'lightning', 'bare', clock)} | "
                  f"{_ratio(results, 'lightning', 'diffusers', clock)} | "
                  f"{_ratio(results, 'bare', 'diffusers', clock)} |")
        print()


def _median(values: list[tuple[float, float]], clock: int) -> float:
    return statistics.median(v[clock] for v in values)


def _ratio(results: dict, a: str, b: str, clock: int) -> str:
    if a not in results or b not in results:
        return "n/a"
    return f"{statistics.median(x[clock] / y[clock] for x, y in zip(results[a], results[b])):.3f}"


if __name__ == "__main__":
    main()
