"""FIDCallback: when to score EMA samples with a :class:`~diffsweep.metrics.evaluator.FIDEvaluator`
during training, and where to log the values. The evaluator does all the work; this file is
only Lightning timing.

Timing (Lightning 2.6 WeightAveraging/EMAWeightAveraging):

- validation: WeightAveraging swaps the EMA weights in at ``on_validation_epoch_start`` and back
  in its ``on_validation_epoch_end`` (which may run before ours). So we *sample* in
  ``on_validation_batch_end`` for ``batch_idx == 0`` (EMA weights guaranteed) and only
  ``compute()`` + log at ``on_validation_epoch_end``. Every rank samples its share with a
  rank-dependent seed and every rank calls ``compute()`` (the metric all-reduces its sums).
- train end: WeightAveraging copies the EMA weights into the module in its ``on_train_end``. If that
  callback comes *after* this one in ``trainer.callbacks``, we sample from its averaged copy
  (``_average_model.module``) directly, so the final FID is always an EMA FID. Logged with
  ``trainer.loggers[*].log_metrics`` (``self.log`` is not allowed in ``on_train_end``) and kept in
  :attr:`FIDCallback.results`. When the last validation computed FID at the last step, those
  are the same weights: the final FID is that one, not sampled again.
- logged: ``fid/``, ``kid/``, ``kid_std/``, ``precision/``, ``recall/<name>`` per evaluation. The
  NFE of each pair is constant: it is logged once, as the hyperparameter ``fid_pairs`` (sampler,
  steps, NFE per pair), and put in ``trainer.callback_metrics`` (``nfe/<name>``) unlogged.
- preparation: rank 0 builds the extractor first (it may download Inception weights or train and
  cache the classifier) while the other ranks wait at a barrier, then load it; the real
  statistics are then loaded or computed by all ranks together.

The extractor and the metrics live on the evaluator, never on the LightningModule (the EMA
callback deep-copies and averages everything the module holds).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from diffsweep.metrics.evaluator import FIDEvaluator, resolve_pairs

log = logging.getLogger(__name__)


class FIDCallback(Callback):
    """FID of EMA samples for each (sampler, num_steps) pair.

    Args:
        evaluator: the :class:`~diffsweep.metrics.evaluator.FIDEvaluator` (extractor, real
            statistics, num_samples, batch_size, seed).
        pairs: list of ``{sampler, num_steps, [name], [spacing, eta, ... Sampler options]}`` or
            :class:`~diffsweep.samplers.Sampler` objects. Logged as ``fid/<name>`` and
            ``nfe/<name>``, ``name`` defaulting to ``<sampler>_<num_steps>``.
        every_n_val_epochs: compute during every n-th validation epoch (sanity check excluded);
            0 disables validation-time FID.
        at_train_end: also compute once when training ends (on the final EMA weights).

    The module must have ``denoiser``, ``image_shape``, ``sample_precision``, ``sample_compile``
    and ``compile_options``; ``trainer.datamodule`` must be a diffsweep DataModule
    (``fingerprint``, ``image_shape``, ``real_images``, ``decode``).
    """

    def __init__(self, evaluator: FIDEvaluator,
                 pairs: Sequence[Any] = ({"sampler": "ddim", "num_steps": 50},),
                 every_n_val_epochs: int = 1, at_train_end: bool = True) -> None:
        super().__init__()
        if not isinstance(evaluator, FIDEvaluator):
            raise ValueError(f"FIDCallback evaluator must be a FIDEvaluator, got "
                             f"{type(evaluator).__name__}.")
        if every_n_val_epochs < 0:
            raise ValueError(f"FIDCallback every_n_val_epochs must be >= 0, got "
                             f"{every_n_val_epochs}.")
        self.evaluator = evaluator
        self.pairs = resolve_pairs(pairs)
        self.every_n_val_epochs = int(every_n_val_epochs)
        self.at_train_end = bool(at_train_end)
        #: latest values: {"fid/<name>": float, "nfe/<name>": int, "kid/<name>": float, ...}
        self.results: dict[str, float] = {}
        self._last_step: int | None = None  # global step of the latest validation-time FID
        self._val_epochs = 0
        self._active = False
        self._sampled = False
        self._started = 0.0

    # ---------------------------------------------------------------------------- preparation
    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Extractor on rank 0 first, then the others; real statistics on all ranks together."""
        if trainer.datamodule is None:
            raise ValueError("FIDCallback needs trainer.datamodule (a diffsweep DataModule with "
                             "fingerprint/real_images/decode).")
        device = pl_module.device
        if self.evaluator.extractor is None and trainer.world_size > 1:
            error: Exception | None = None
            if trainer.is_global_zero:
                try:
                    self.evaluator.prepare_extractor(trainer.datamodule, device)
                except Exception as exception:  # noqa: BLE001 - re-raised after the broadcast
                    error = exception
            # the other ranks wait here for rank 0 (a collective), then learn whether it failed
            failed = trainer.strategy.broadcast(error is not None, src=0)
            if error is not None:
                raise error
            if failed:
                raise RuntimeError("FID: rank 0 could not build the feature extractor (its error "
                                   "is in its log).")
        self.evaluator.prepare(trainer.datamodule, device, trainer.global_rank, trainer.world_size)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_val_epochs > 0 or self.at_train_end:
            self._prepare(trainer, pl_module)
            pairs = {name: {"sampler": sampler.method_name, "num_steps": sampler.num_steps,
                            "nfe": int(sampler.nfe_on(pl_module.denoiser.schedule))}
                     for name, sampler in self.pairs}
            for logger in trainer.loggers:
                logger.log_hyperparams({"fid_pairs": pairs})

    @staticmethod
    def _publish(trainer: Trainer, results: dict[str, float]) -> dict[str, float]:
        """Put every value in ``trainer.callback_metrics``; returns those to log (not NFE)."""
        for key, value in results.items():
            trainer.callback_metrics[key] = torch.tensor(float(value))
        return {key: float(value) for key, value in results.items() if not key.startswith("nfe/")}

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_val_epochs > 0 and not trainer.sanity_checking:
            self._prepare(trainer, pl_module)

    # ---------------------------------------------------------------------------- sampling
    def _update(self, trainer: Trainer, module: LightningModule) -> None:
        """This rank's samples for every pair, with ``module``'s current weights."""
        self.evaluator.update(
            module.denoiser, self.pairs, image_shape=module.image_shape,
            decode=trainer.datamodule.decode, precision=module.sample_precision,
            compile=module.sample_compile, compile_options=module.compile_options,
            rank=trainer.global_rank, world_size=trainer.world_size)

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sampled = False
        self._active = (not trainer.sanity_checking and self.every_n_val_epochs > 0
                        and (self._val_epochs + 1) % self.every_n_val_epochs == 0)
        self._started = time.monotonic()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._active and not self._sampled and batch_idx == 0 and dataloader_idx == 0:
            self._prepare(trainer, pl_module)
            self._update(trainer, pl_module)
            self._sampled = True

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._val_epochs += 1
        if not self._active:
            return
        self._active = False
        if not self._sampled:
            log.warning("FIDCallback: no validation batch ran this epoch; FID skipped (it must "
                        "sample in on_validation_batch_end, while EMA weights are swapped in).")
            return
        self.results = self.evaluator.compute()
        for key, value in self._publish(trainer, self.results).items():
            pl_module.log(key, value, sync_dist=True, on_epoch=True, on_step=False)
        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            self.evaluator.log_results(self.results, time.monotonic() - self._started)

    # ---------------------------------------------------------------------------- train end
    @staticmethod
    def _ema_module(trainer: Trainer, pl_module: LightningModule,
                    me: Callback) -> LightningModule:
        """The module with EMA weights at on_train_end, whatever the callback order."""
        from lightning.pytorch.callbacks import WeightAveraging

        callbacks = list(trainer.callbacks)
        mine = callbacks.index(me) if me in callbacks else -1
        for index, callback in enumerate(callbacks):
            if isinstance(callback, WeightAveraging) and index > mine:
                average = getattr(callback, "_average_model", None)
                if average is not None:  # its on_train_end (copy EMA -> module) has not run yet
                    return average.module
        return pl_module

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_train_end:
            return
        if self._last_step == trainer.global_step and self.results:
            if trainer.is_global_zero:  # the last validation scored these very weights
                log.info("Final FID: the step-%d validation values (same EMA weights).",
                         trainer.global_step)
            return
        self._prepare(trainer, pl_module)
        started = time.monotonic()
        self._update(trainer, self._ema_module(trainer, pl_module, self))
        self.results = self.evaluator.compute()
        logged = self._publish(trainer, self.results)
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        if trainer.is_global_zero:
            self.evaluator.log_results(self.results, time.monotonic() - started)

    # The callback holds no state worth checkpointing except the validation-epoch counter.
    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs": self._val_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._val_epochs = int(state_dict.get("val_epochs", 0))
