"""DiffusionModule: the thin Lightning shell around the pure core.

Training step ``s``: sigma~ ~ ``schedule.training_sigma_tilde`` and eps ~ N(0, I) are drawn for the
whole global batch from (seed, s) and each rank takes its share; the loss
(:mod:`diffsweep.loss`) regresses the net's output on the prediction target.

Validation (on EMA weights, swapped in by the EMA callback) logs the same loss on held-out data
with a fixed noise seed; sample grids and FID live in callbacks (``diffsweep.callbacks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from diffsweep.denoiser import Denoiser
from diffsweep.inference import autocast_dtype
from diffsweep.loss import DenoisingLoss, check_formulation
from diffsweep.samplers import Sampler
from diffsweep.schedules import NoiseSchedule

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


#: Prefix of the net's parameters in checkpoints written before the denoiser was a submodule.
LEGACY_NET_PREFIX = "net."
NET_PREFIX = "denoiser.net."


@dataclass
class TrainingNoise:
    """The random draws of one training step for this rank's share of the global batch.

    ``sigma`` (B,) float64 on the CPU, ``noise`` shaped like the share's x0, ``drop`` (B,) bool
    (class labels replaced by the null label) or None.
    """

    sigma: Tensor
    noise: Tensor
    drop: Tensor | None = None


def draw_training_noise(schedule: NoiseSchedule, x0: Tensor, generator: torch.Generator | None,
                        eps_generator: torch.Generator | None = None, rank: int = 0,
                        world_size: int = 1, label_dropout: float = 0.0) -> TrainingNoise:
    """Noise levels, noise and label dropout for rank ``rank``'s share ``[rank::world_size]`` of a
    global batch of ``x0.shape[0] * world_size`` samples.

    Everything is drawn for the whole global batch and sliced, so the share of each rank and the
    union over ranks do not depend on ``world_size``. sigma~ and the dropout come from the CPU
    ``generator`` (schedule tables live there); the noise from ``eps_generator`` (on its device;
    default ``generator``), moved to x0's device.
    """
    global_batch = x0.shape[0] * world_size
    share = slice(rank, None, world_size)
    _, sigma = schedule.training_sigma_tilde(global_batch, generator=generator)
    eps_generator = eps_generator or generator
    eps_device = eps_generator.device if eps_generator is not None else x0.device
    noise = torch.randn((global_batch, *x0.shape[1:]), generator=eps_generator,
                        device=eps_device, dtype=x0.dtype)[share].to(x0.device)
    drop = None
    if label_dropout > 0:
        drop = (torch.rand(global_batch, generator=generator) < label_dropout)[share]
    return TrainingNoise(sigma[share], noise, drop)


def _rename_legacy_net_keys(state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: ``<prefix>net.*`` (checkpoints of the earlier layout, where the
    net was a direct submodule) -> ``<prefix>denoiser.net.*``."""
    legacy = prefix + LEGACY_NET_PREFIX
    for key in [key for key in state_dict if key.startswith(legacy)]:
        state_dict[prefix + NET_PREFIX + key[len(legacy):]] = state_dict.pop(key)


class DiffusionModule(L.LightningModule):
    """The Lightning shell around a :class:`~diffsweep.denoiser.Denoiser` and a training loss.

    It wires the pure core to training and nothing more: the per-step RNG and each rank's share of
    the global batch (:func:`draw_training_noise`), the loss call, optimizer and LR schedule,
    gradient clipping, and what checkpoints carry (run config, seed, RNG states). Sampling is
    :func:`diffsweep.generate.generate` over :attr:`denoiser`; the callbacks call it with the
    sampling settings held here.

    Args:
        denoiser: net + schedule + prediction type (a registered submodule: the net's weights
            are ``denoiser.net.*`` in checkpoints; the earlier ``net.*`` names load too).
        optimizer: a partial optimizer constructor (``torch.optim.AdamW`` with ``_partial_: true``).
        loss: the training loss (default :class:`~diffsweep.loss.DenoisingLoss`, uniform MSE).
        lr_schedule: a partial ``schedule(optimizer) -> LRScheduler`` stepped every optimizer step
            (:mod:`diffsweep.lr_schedules`); None: a constant learning rate.
        sampler: the sampler used for validation sample grids.
        image_shape: ``(C, H, W)`` of one sample in model space.
        label_dropout: probability of replacing a class label by the null label (CFG training);
            only used when the net is class-conditional.
        seed: seed of the training noise: step ``s`` draws the noise of the whole global batch
            from ``seed`` and ``s`` and each rank takes its share, so runs are reproducible,
            independent of the number of processes, and continue identically after a resume.
            None: a random seed (stored in checkpoints).
        compile: ``torch.compile`` the net in place (``nn.Module.compile``): parameter names keep
            no ``_orig_mod.`` prefix, so checkpoints load with or without compile, EMA included.
        compile_options: keyword arguments of ``torch.compile`` (``mode``, ``backend``, ...), for
            both ``compile`` and ``sample_compile``.
        sample_precision: precision of the net while sampling grids and FID: ``32``, ``bf16`` or
            ``16`` (autocast); the sampler's own state stays float64.
        sample_compile: sample grids and FID with a compiled copy of the net
            (:mod:`diffsweep.inference`), one compile per run, each validation's weights copied in.
        run_config: the resolved run config (:attr:`config`), stored in checkpoints so the run can
            be rebuilt without the original command line.
    """

    def __init__(self, denoiser: Denoiser, optimizer: OptimizerFactory,
                 loss: DenoisingLoss | None = None, lr_schedule: SchedulerFactory | None = None,
                 sampler: Sampler | None = None, image_shape: tuple[int, int, int] = (1, 16, 16),
                 label_dropout: float = 0.1, seed: int | None = None,
                 compile: bool = False, compile_options: dict[str, Any] | None = None,
                 sample_precision: str = "32", sample_compile: bool = False,
                 run_config: dict | None = None) -> None:
        super().__init__()
        if not isinstance(denoiser, Denoiser):
            raise TypeError(f"module.denoiser must be a diffsweep.denoiser.Denoiser, got "
                            f"{type(denoiser).__name__}.")
        if compile:
            denoiser.net.compile(**(compile_options or {}))
        self.denoiser = denoiser
        self.loss = loss or DenoisingLoss()
        self.optimizer_factory = optimizer
        self.lr_schedule = lr_schedule
        self.sampler = sampler
        self.image_shape = tuple(int(size) for size in image_shape)
        self.label_dropout = label_dropout
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**31, (1,)))
        self.config = run_config
        autocast_dtype(sample_precision)  # fail at construction on an unknown name
        self.sample_precision = str(sample_precision)
        self.sample_compile = bool(sample_compile)
        self.compile_options = dict(compile_options or {})
        self._register_load_state_dict_pre_hook(_rename_legacy_net_keys)
        check_formulation(self.loss, self.denoiser)  # prediction/schedule/weighting pairs

    @property
    def net(self) -> nn.Module:
        """The network (``denoiser.net``)."""
        return self.denoiser.net

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    @property
    def num_classes(self) -> int | None:
        return self.denoiser.num_classes

    def sampling_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~diffsweep.generate.generate` for grids and FID."""
        return {"precision": self.sample_precision, "compile": self.sample_compile,
                "compile_options": self.compile_options}

    # ------------------------------------------------------------------ loss

    def _class_labels(self, labels: Tensor | None, drop: Tensor | None) -> Tensor | None:
        if self.num_classes is None or labels is None:
            return None
        if (labels < 0).any():
            raise ValueError("The net is class-conditional (model.num_classes is set) but the "
                             "dataset has no labels; unset model.num_classes.")
        if drop is not None:
            labels = torch.where(drop.to(labels.device), torch.full_like(labels, self.num_classes),
                                 labels)
        return labels

    def training_noise(self, x0: Tensor, generator: torch.Generator | None,
                       eps_generator: torch.Generator | None = None, training: bool = True,
                       rank: int = 0, world_size: int = 1) -> TrainingNoise:
        """:func:`draw_training_noise` with this module's schedule and label dropout (none when
        not ``training`` or the net is unconditional)."""
        dropout = self.label_dropout if training and self.num_classes is not None else 0.0
        return draw_training_noise(self.schedule, x0, generator, eps_generator, rank, world_size,
                                   dropout)

    def batch_loss(self, x0: Tensor, labels: Tensor | None, noise: TrainingNoise) -> Tensor:
        """The mean loss over this rank's share ``x0`` (B, C, H, W) with its draws ``noise``."""
        class_labels = self._class_labels(labels, noise.drop)
        return self.loss(self.denoiser, x0, noise.sigma, noise.noise, class_labels).mean()

    def _step_generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """CPU and device generators seeded by (seed, global step): the same on every rank."""
        step_seed = (self.seed * 1_000_003 + self.global_step) % (2**63)
        cpu = torch.Generator().manual_seed(step_seed)
        if device.type == "cpu":
            return cpu, cpu
        return cpu, torch.Generator(device=device).manual_seed(step_seed)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        generator, eps_generator = self._step_generators(x0.device)
        world_size = self.trainer.world_size
        noise = self.training_noise(x0, generator, eps_generator, rank=self.global_rank,
                                    world_size=world_size)
        loss = self.batch_loss(x0, labels, noise)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._non_finite_message(
                loss.item(), bad_batch=not bool(torch.isfinite(x0).all())))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=x0.shape[0], sync_dist=world_size > 1)
        return loss

    def _non_finite_message(self, loss: float, bad_batch: bool = False) -> str:
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or \
            getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        where = (f"The last good checkpoint is {checkpoint}; rerun the same command to resume "
                 f"from it." if checkpoint else "No checkpoint was written before this step.")
        cause = ("The batch itself holds NaN/inf: the data is at fault, not the learning rate "
                 "(an image folder, or a latent cache written before encode-time checks: delete "
                 "it to re-encode)." if bad_batch else
                 "Check the data for NaN/inf first, then lower the learning rate "
                 "(module.optimizer.lr) or keep gradient clipping on (trainer.gradient_clip_val).")
        return (f"Training loss is {loss} at step {self.global_step}; stopped before the optimizer "
                f"step, so no weights were updated with it. {where} {cause}")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        noise = self.training_noise(x0, torch.Generator().manual_seed(1234 + batch_idx),
                                    training=False)
        loss = self.batch_loss(x0, labels, noise)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=x0.shape[0])
        return loss

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.lr_schedule is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.lr_schedule(optimizer), "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip the true (unscaled) gradients, fused optimizers included.

        Lightning refuses to clip for optimizers that unscale internally (``fused=True`` AdamW),
        under any mixed precision. Without a gradient scaler (``32-true``, ``bf16-mixed``) the
        gradients are already true, so they are clipped here directly. With one (``16-mixed`` on
        a GPU), a fused optimizer's gradients are unscaled here first with ``scaler.unscale_``;
        ``scaler.step`` then sees them unscaled and passes no scale to the fused kernel (it still
        skips the step on inf/NaN). Other optimizers keep Lightning's own path.
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            if not getattr(optimizer, "_step_supports_amp_scaling", False):
                super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                    gradient_clip_algorithm)
                return
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm in (None, "norm"):
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        elif gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            raise ValueError(f"Unknown gradient_clip_algorithm {gradient_clip_algorithm!r}; "
                             f"choose norm or value.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.config is not None:
            checkpoint["diffsweep_config"] = self.config
        checkpoint["diffsweep_seed"] = self.seed
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(),
                                    "cuda": (torch.cuda.get_rng_state_all()
                                             if torch.cuda.is_available() else [])}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.seed = checkpoint.get("diffsweep_seed", self.seed)
        rng = checkpoint.get("rng_states")
        if rng is not None:  # dropout and augmentation continue as if never interrupted
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["DiffusionModule", "NonFiniteLossError", "TrainingNoise", "count_parameters",
           "draw_training_noise"]
