"""Sample grids from the EMA weights at each validation and at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torchvision.utils import save_image

from diffsweep.files import atomic_write_bytes, atomic_writer
from diffsweep.generate import generate
from diffsweep.loggers import log_image
from diffsweep.samplers import Sampler

log = logging.getLogger(__name__)


def decode_to_images(trainer: L.Trainer, samples: torch.Tensor) -> torch.Tensor:
    """Model-space samples -> images in [-1, 1] via the datamodule's ``decode``
    (VAE for latents)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "decode"):
        samples = datamodule.decode(samples)
    return samples.clamp(-1, 1)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> Path:
    """Write images in [-1, 1] (N, C, H, W) as one PNG grid, atomically; returns ``path``."""
    nrow = nrow or max(1, int(round(images.shape[0] ** 0.5)))
    with atomic_writer(path) as handle:
        save_image((images.float().cpu() + 1) / 2, handle, format="png", nrow=nrow, padding=1)
    return path


class SampleGrid(Callback):
    """Draw a fixed-seed grid with the module's sampler (or ``sampler``) and log it.

    Samples are drawn in ``on_validation_batch_end`` of the first validation batch, while the EMA
    weights are swapped in, and once more at the end of training (after Lightning copied the EMA
    weights into the module). PNGs go to ``<output_dir>/samples/step_XXXXXXX.png``
    (+ ``final.png``). When the last validation ran at the last step, its grid shows the same
    weights with the same noise: ``final.png`` is a copy of it, not sampled again.

    Args:
        output_dir: run directory.
        num_samples: grid size.
        seed: noise seed; the same seed every time, so grids are comparable across steps.
        sampler: sampler for the grid (default: the module's ``sampler``).
        at_train_end: also write ``final.png`` when training ends.
    """

    def __init__(self, output_dir: str, num_samples: int = 64, seed: int = 0,
                 sampler: Sampler | None = None, at_train_end: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.num_samples, self.seed = num_samples, seed
        self.sampler = sampler
        self.at_train_end = at_train_end
        self.last_path: Path | None = None
        self.last_step: int | None = None  # global step of the latest validation grid

    def _grid(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> Path | None:
        if not trainer.is_global_zero:  # only rank 0 writes the grid; sampling has no collectives
            return None
        if self.sampler is None and pl_module.sampler is None:
            raise ValueError("callbacks.sample_grid has no sampler and the module has none "
                             "(module.sampler); set one of them.")
        generator = torch.Generator().manual_seed(self.seed)
        samples = generate(pl_module.denoiser, self.sampler or pl_module.sampler, self.num_samples,
                           pl_module.image_shape, generator=generator,
                           **pl_module.sampling_options())
        images = decode_to_images(trainer, samples)
        path = save_grid(images, self.output_dir / "samples" / f"{name}.png")
        self.last_path = path
        log_image(trainer.loggers, "samples", path, trainer.global_step)
        return path

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking:
            return
        if self._grid(trainer, pl_module, f"step_{trainer.global_step:07d}") is not None:
            self.last_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_train_end or not trainer.is_global_zero:
            return
        last = self.last_path
        if self.last_step == trainer.global_step and last is not None and last.is_file():
            final = self.output_dir / "samples" / "final.png"
            atomic_write_bytes(final, last.read_bytes())
            self.last_path = final
            log.info("Final sample grid: %s (the step-%d grid: same weights, same noise)", final,
                     trainer.global_step)
            return
        self._grid(trainer, pl_module, "final")
        log.info("Final sample grid: %s", self.last_path)
