"""DiffusionModule: the LightningModule around a net, a noise schedule and the training loss.

Training: ``x~ = x0 + sigma~ * eps`` with ``t ~ schedule.sample_t``; the net sees
``c_in(sigma~) * x~`` (for VP exactly ``x_t``) and ``c_noise(t)``; the loss is the MSE between the
net's output and ``denoiser.training_target`` (eps for eps-prediction).

Validation (on EMA weights, swapped in by the EMA callback) logs the same loss on held-out data
with a fixed noise seed; sample grids and FID live in callbacks (``diffsweep.callbacks``).
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffsweep.denoiser import ClassifierFreeGuidance, Denoiser, append_dims
from diffsweep.inference import autocast_dtype, compiled_sampling_net, sampling_precision
from diffsweep.samplers import Sampler
from diffsweep.schedules import NoiseSchedule

OptimizerFactory = Callable[..., torch.optim.Optimizer]


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class DiffusionModule(L.LightningModule):
    """Epsilon-prediction (or v / x0) diffusion training for any :class:`NoiseSchedule`.

    Args:
        net: ``net(x_in, c_noise, class_labels=None) -> output`` (see ``nets/unet.py``).
        schedule: the noise schedule.
        optimizer: a partial optimizer constructor (``torch.optim.AdamW`` with ``_partial_: true``).
        sampler: the sampler used for validation sample grids (others can be passed to ``sample``).
        image_shape: ``(C, H, W)`` of one sample in model space.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
        lr_warmup_steps: linear learning-rate warmup from 0 over this many steps (0: none).
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
        sample_precision: precision of the net while sampling (grids, FID, ``evaluate.py``):
            ``32``, ``bf16`` or ``16`` (autocast); the sampler's own state stays float64.
        sample_compile: sample with a compiled copy of the net
            (:class:`diffsweep.inference.CompiledSamplingNet`), kept between calls and brought up
            to date with the net's weights in place; :attr:`sample_freeze_weights` (set by
            ``evaluate.py``, where the weights never change) folds them into the compiled graph.
        config: the composed run config, stored in checkpoints so ``evaluate.py`` can rebuild
            the model without the original command line.
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, optimizer: OptimizerFactory,
                 sampler: Sampler | None = None, image_shape: tuple[int, int, int] = (1, 16, 16),
                 prediction_type: str = "epsilon", lr_warmup_steps: int = 0,
                 label_dropout: float = 0.1, seed: int | None = None,
                 compile: bool = False, compile_options: dict[str, Any] | None = None,
                 sample_precision: str = "32", sample_compile: bool = False,
                 config: dict | None = None) -> None:
        super().__init__()
        if compile:
            net.compile(**(compile_options or {}))
        self.net = net
        self.schedule = schedule
        # Not a registered submodule: its net is self.net (one copy of the weights in checkpoints).
        object.__setattr__(self, "_denoiser", Denoiser(net, schedule, prediction_type))
        self.optimizer_factory = optimizer
        self.sampler = sampler
        self.image_shape = tuple(image_shape)
        self.prediction_type = prediction_type
        self.lr_warmup_steps = lr_warmup_steps
        self.label_dropout = label_dropout
        self.seed = int(seed) if seed is not None else int(torch.randint(0, 2**31, (1,)))
        self.config = config
        autocast_dtype(sample_precision)  # fail at construction on an unknown name
        self.sample_precision = str(sample_precision)
        self.sample_compile = sample_compile
        self.compile_options = dict(compile_options or {})
        self.sample_freeze_weights = False
        # Not a submodule either: a cache, never saved in checkpoints nor moved with the module.
        object.__setattr__(self, "_compiled_net", None)  # CompiledSamplingNet | None
        self.num_classes: int | None = getattr(net, "num_classes", None)

    @property
    def denoiser(self) -> Denoiser:
        """``denoiser(x~, sigma~) -> x0_hat`` over this module's net and schedule."""
        return self._denoiser

    # ------------------------------------------------------------------ loss

    def _class_labels(self, labels: Tensor, drop: Tensor | None) -> Tensor | None:
        if self.num_classes is None:
            return None
        if (labels < 0).any():
            raise ValueError("The net is class-conditional (model.num_classes is set) but the "
                             "dataset has no labels; unset model.num_classes.")
        if drop is not None:
            labels = torch.where(drop.to(labels.device), torch.full_like(labels, self.num_classes),
                                 labels)
        return labels

    def diffusion_loss(self, x0: Tensor, labels: Tensor | None = None,
                       generator: torch.Generator | None = None,
                       eps_generator: torch.Generator | None = None, training: bool = True,
                       rank: int = 0, world_size: int = 1) -> Tensor:
        """Mean squared error of the net's output against its target, averaged over the batch.

        ``x0`` (B, C, H, W) is this rank's share ``[rank::world_size]`` of a global batch; times
        (from the CPU ``generator``) and noise (from ``eps_generator``, on x0's device; default
        ``generator``) are drawn for the whole global batch and sliced the same way.
        """
        global_batch = x0.shape[0] * world_size
        share = slice(rank, None, world_size)
        # sigma~ is drawn on the CPU in float64 (schedule tables live there).
        _, sigma = self.schedule.training_sigma_tilde(global_batch, generator=generator)
        sigma = sigma[share]
        eps_generator = eps_generator or generator
        eps_device = eps_generator.device if eps_generator is not None else x0.device
        eps = torch.randn((global_batch, *x0.shape[1:]), generator=eps_generator,
                          device=eps_device, dtype=x0.dtype)[share].to(x0.device)
        drop = None
        if training and self.num_classes is not None and self.label_dropout > 0:
            drop = (torch.rand(global_batch, generator=generator) < self.label_dropout)[share]
        sigma_device = sigma.to(x0.device)
        x_tilde = x0 + append_dims(sigma_device, x0.ndim).to(x0.dtype) * eps
        x_in, c_noise, _ = self.denoiser.net_inputs(x_tilde, sigma)
        class_labels = self._class_labels(labels, drop) if labels is not None else None
        if class_labels is None:
            output = self.net(x_in, c_noise.to(x0.device))
        else:
            output = self.net(x_in, c_noise.to(x0.device), class_labels)
        target = self.denoiser.training_target(x0, eps, sigma)
        return F.mse_loss(output.float(), target.float())

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
        loss = self.diffusion_loss(x0, labels, generator, eps_generator,
                                   rank=self.global_rank, world_size=self.trainer.world_size)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(self._non_finite_message(loss.item()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=x0.shape[0], sync_dist=self.trainer.world_size > 1)
        return loss

    def _non_finite_message(self, loss: float) -> str:
        checkpoint = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or \
            getattr(self.trainer.checkpoint_callback, "best_model_path", "")
        where = (f"The last good checkpoint is {checkpoint}; rerun the same command to resume "
                 f"from it." if checkpoint else "No checkpoint was written before this step.")
        return (f"Training loss is {loss} at step {self.global_step}; stopped before the optimizer "
                f"step, so no weights were updated with it. {where} Lower the learning rate "
                f"(module.optimizer.lr), keep gradient clipping on (trainer.gradient_clip_val) or "
                f"check the data.")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        generator = torch.Generator().manual_seed(1234 + batch_idx)
        loss = self.diffusion_loss(x0, labels, generator=generator, training=False)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True,
                 batch_size=x0.shape[0])
        return loss

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, sampler: Sampler | None = None, num_samples: int = 64,
               generator: torch.Generator | None = None, batch_size: int | None = None,
               class_labels: Tensor | None = None, guidance_scale: float = 1.0,
               precision: str | None = None, compile: bool | None = None) -> Tensor:
        """Draw ``num_samples`` model-space samples ``(N, C, H, W)`` with ``sampler``.

        ``precision`` / ``compile`` override :attr:`sample_precision` / :attr:`sample_compile`
        for this call.

        ``class_labels`` (N,) conditions a class-conditional net; ``guidance_scale`` != 1 applies
        classifier-free guidance against the null label (1: plain conditional sampling).

        Deterministic given ``generator`` (a CPU generator: noise is drawn on the CPU and moved, so
        samples agree across devices up to arithmetic). Uses the weights currently in the module
        (EMA weights during validation and after training).
        """
        sampler = sampler or self.sampler
        if sampler is None:
            raise ValueError("No sampler given and the module has none configured.")
        if class_labels is not None and self.num_classes is None:
            raise ValueError("class_labels given but the net is not class-conditional "
                             "(model.num_classes is null).")
        batch_size = batch_size or num_samples
        precision = self.sample_precision if precision is None else str(precision)
        was_training = self.training
        self.eval()
        base = self._sampling_denoiser(self.sample_compile if compile is None else compile)
        chunks = []
        with sampling_precision(precision, self.device):
            for start in range(0, num_samples, batch_size):
                count = min(batch_size, num_samples - start)
                shape = (count, *self.image_shape)
                denoiser: Any = base
                if class_labels is not None:
                    labels = class_labels[start:start + count].to(self.device)
                    denoiser = (ClassifierFreeGuidance(base, labels, guidance_scale,
                                                       null_label=self.num_classes)
                                if guidance_scale != 1.0 else _LabelledDenoiser(base, labels))
                chunks.append(_sample_on_device(sampler, denoiser, self.schedule, shape,
                                                generator, self.device))
        self.train(was_training)
        return torch.cat(chunks)

    def _sampling_denoiser(self, compile: bool) -> Denoiser:
        """The denoiser to sample with: over the live net, or over a compiled copy of it that
        computes the same (see :func:`diffsweep.inference.compiled_sampling_net`)."""
        if not compile:
            return self.denoiser
        compiled = compiled_sampling_net(self.net, self._compiled_net, self.compile_options,
                                         self.sample_freeze_weights)
        object.__setattr__(self, "_compiled_net", compiled)
        return Denoiser(compiled, self.schedule, self.prediction_type)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.net.parameters())
        if self.lr_warmup_steps <= 0:
            return {"optimizer": optimizer}
        warmup = self.lr_warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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


class _LabelledDenoiser:
    """A denoiser with class labels bound, for class-conditional sampling."""

    def __init__(self, denoiser: Denoiser, class_labels: Tensor) -> None:
        self.denoiser, self.class_labels = denoiser, class_labels

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.denoiser(x, sigma, self.class_labels)


def _sample_on_device(sampler: Sampler, denoiser: Any, schedule: NoiseSchedule,
                      shape: tuple[int, ...], generator: torch.Generator | None,
                      device: torch.device) -> Tensor:
    """Run ``sampler`` with the starting noise drawn from a CPU ``generator``.

    The starting noise is the same on every device; a stochastic sampler's per-step noise comes
    from a device generator seeded from the CPU one.
    """
    if device.type == "cpu" or generator is None:
        return sampler(denoiser, schedule, shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator).to(device)
    step_generator = torch.Generator(device=device)
    step_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return sampler(denoiser, schedule, shape, generator=step_generator, device=device,
                   noise=noise)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["DiffusionModule", "NonFiniteLossError", "count_parameters"]
