"""The one sampling entry: ``generate(denoiser, sampler, num_samples, image_shape)``.

Everything that draws samples (sample grids, FID during training, ``evaluate.py``, the
benchmarks) calls :func:`generate` with a :class:`~diffsweep.denoiser.Denoiser`; none of them
needs a LightningModule. It owns what is common to all of them:

- batching: ``num_samples`` drawn in chunks of ``batch_size``, concatenated;
- noise: the starting noise comes from a CPU ``generator``, so samples agree across devices up
  to arithmetic; a stochastic sampler's per-step noise comes from a device generator seeded
  from it;
- conditioning: ``class_labels`` (N,) for a class-conditional net, with classifier-free guidance
  against the null label when ``guidance_scale != 1``;
- precision: the net under autocast (``32``, ``bf16``, ``16``); the sampler's state stays float64;
- compile: sampling with a compiled copy of the net (:mod:`diffsweep.inference`), kept per net
  between calls.

Outputs are model-space samples ``(N, *image_shape)`` in float32 on the net's device; image data
passes them through ``datamodule.decode`` (a clamp, or the VAE decoder for latents).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffsweep.denoiser import ClassifierFreeGuidance, Denoiser, DenoiserFn, LabelledDenoiser
from diffsweep.inference import sampling_net, sampling_precision
from diffsweep.samplers import Sampler


def _draw(sampler: Sampler, denoiser: DenoiserFn, denoiser_schedule: Any, shape: tuple[int, ...],
          generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One chunk: starting noise from the CPU ``generator``, moved to ``device``."""
    if device.type == "cpu" or generator is None:
        return sampler(denoiser, denoiser_schedule, shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator).to(device)
    step_generator = torch.Generator(device=device)
    step_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return sampler(denoiser, denoiser_schedule, shape, generator=step_generator, device=device,
                   noise=noise)


@torch.no_grad()
def generate(denoiser: Denoiser, sampler: Sampler, num_samples: int,
             image_shape: tuple[int, ...], *, generator: torch.Generator | None = None,
             batch_size: int | None = None, class_labels: Tensor | None = None,
             guidance_scale: float = 1.0, precision: str | int = "32", compile: bool = False,
             freeze_weights: bool = False,
             compile_options: dict[str, Any] | None = None) -> Tensor:
    """Draw ``num_samples`` samples ``(N, *image_shape)`` from ``denoiser`` with ``sampler``.

    Args:
        denoiser: the denoiser over the net to sample (EMA weights, usually); put in eval mode
            for the call and restored afterwards.
        sampler: method + grid.
        num_samples: N.
        image_shape: ``(C, H, W)`` of one sample in model space.
        generator: CPU generator; the same state gives the same samples (on CPU, bitwise).
        batch_size: samples per net batch (default: all N at once).
        class_labels: (N,) labels for a class-conditional net.
        guidance_scale: classifier-free guidance scale (1: plain conditional sampling).
        precision: ``32``, ``bf16`` or ``16``: autocast dtype of the net.
        compile: sample with a compiled copy of the net (one compile per net, reused).
        freeze_weights: with ``compile``, fold the weights into the graph (for fixed weights).
        compile_options: ``torch.compile`` keyword arguments.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if class_labels is not None:
        if denoiser.num_classes is None:
            raise ValueError("class_labels given but the net is not class-conditional "
                             "(model.num_classes is null).")
        if class_labels.shape != (num_samples,):
            raise ValueError(f"class_labels must have shape ({num_samples},), got "
                             f"{tuple(class_labels.shape)}.")
    batch_size = batch_size or num_samples
    device = denoiser.device
    net: nn.Module = denoiser.net
    was_training = net.training
    net.eval()
    try:
        base = denoiser
        if compile:
            base = denoiser.with_net(sampling_net(net, compile_options, freeze_weights))
        chunks = []
        with sampling_precision(precision, device):
            for start in range(0, num_samples, batch_size):
                count = min(batch_size, num_samples - start)
                chunk_denoiser: DenoiserFn = base
                if class_labels is not None:
                    labels = class_labels[start:start + count].to(device)
                    chunk_denoiser = (
                        ClassifierFreeGuidance(base, labels, guidance_scale,
                                               null_label=denoiser.num_classes)
                        if guidance_scale != 1.0 else LabelledDenoiser(base, labels))
                chunks.append(_draw(sampler, chunk_denoiser, denoiser.schedule,
                                    (count, *image_shape), generator, device))
    finally:
        net.train(was_training)
    return torch.cat(chunks)


__all__ = ["generate"]
