"""FIDCallback: FID of EMA samples for a list of samplers, during validation and at train end.

Timing (Lightning 2.6 WeightAveraging/EMAWeightAveraging):

- validation: WeightAveraging swaps the EMA weights in at ``on_validation_epoch_start`` and back
  in its ``on_validation_epoch_end`` (which may run before ours). So we *sample* in
  ``on_validation_batch_end`` for ``batch_idx == 0`` (EMA weights guaranteed) and only
  ``compute()`` + log at ``on_validation_epoch_end``. Every rank samples its share
  (``num_samples // world_size``, the remainder to the first ranks) with a rank-dependent seed and
  every rank calls ``compute()`` (the metric all-reduces its sums).
- train end: WeightAveraging copies the EMA weights into the module in its ``on_train_end``. If that
  callback comes *after* this one in ``trainer.callbacks``, we sample from its averaged copy
  directly, so the final FID is always an EMA FID. Logged with ``trainer.loggers[*].log_metrics``
  (``self.log`` is not allowed in ``on_train_end``) and kept in :attr:`FIDCallback.results`.

The feature extractor and the metrics live on the callback, never on the LightningModule (the EMA
callback deep-copies and averages everything the module holds).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from diffsweep.hydra_utils import to_plain
from diffsweep.metrics.features import FeatureExtractor, build_feature_extractor
from diffsweep.metrics.fid import (FrechetDistance, GaussianStats, extract_features,
                                   load_or_compute_real_stats)
from diffsweep.samplers import Sampler

log = logging.getLogger(__name__)

#: seed offset between ranks (each rank draws different noise)
RANK_SEED_STRIDE = 1_000_003


def resolve_pairs(pairs: Sequence[Any]) -> list[tuple[str, Sampler]]:
    """``[{sampler: ddim, num_steps: 20, **options}, Sampler(...), ...]`` -> ``[(name, Sampler)]``.

    A dict may carry ``name`` (log key suffix; default ``<sampler>_<num_steps>``); any other keys
    (``spacing``, ``eta``, ...) go to :class:`~diffsweep.samplers.Sampler`. Names must be unique.
    """
    out: list[tuple[str, Sampler]] = []
    for p in to_plain(list(pairs)):
        if isinstance(p, Sampler):
            out.append((p.name, p))
            continue
        if not isinstance(p, Mapping):
            raise ValueError(f"FID pair must be a Sampler or a mapping like "
                             f"{{sampler: ddim, num_steps: 20}}, got {p!r}.")
        p = dict(p)
        name = p.pop("name", None)
        if "sampler" in p:
            p["method"] = p.pop("sampler")
        p.pop("_target_", None)
        if "method" not in p:
            raise ValueError(f"FID pair {p!r} needs a 'sampler' key (e.g. ddim).")
        s = Sampler(**p)
        out.append((name or s.name, s))
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"Duplicate FID pair names {sorted(dup)}: give each pair a distinct "
                         "'name' key (e.g. name: ddim_20_karras).")
    if not out:
        raise ValueError("FIDCallback needs at least one (sampler, num_steps) pair.")
    return out


class FIDCallback(Callback):
    """FID of EMA samples for each (sampler, num_steps) pair.

    Args:
        pairs: list of ``{sampler, num_steps, [name], [spacing, eta, ... Sampler options]}`` or
            :class:`~diffsweep.samplers.Sampler` objects. Logged as ``fid/<name>`` and
            ``nfe/<name>``, ``name`` defaulting to ``<sampler>_<num_steps>``.
        num_samples: generated samples per pair (split across ranks).
        every_n_val_epochs: compute during every n-th validation epoch (sanity check excluded);
            0 disables validation-time FID.
        at_train_end: also compute once when training ends (on the final EMA weights).
        extractor: ``inception`` | ``classifier`` | ``tiny``, or a built
            :class:`~diffsweep.metrics.features.FeatureExtractor`.
        inception_weights: local Inception weights file (else ``$DIFFSWEEP_INCEPTION_WEIGHTS``,
            the torch hub cache, a download).
        download_timeout: seconds before a stalled Inception download counts as "offline".
        extractor_options: extra kwargs for the extractor (tiny: ``dim``, ``seed``; classifier:
            ``train_samples``, ``num_classes``, ``seed``, ...).
        real_split: data split for the real statistics.
        real_max_count: at most this many real images (None: the whole split).
        batch_size: batch size for sampling, decoding and feature extraction.
        seed: base seed; rank ``r`` uses ``seed + r * 1000003``. The same noise is used at every
            evaluation and for every pair (common random numbers: lower-variance comparisons).
        cache_dir: where real statistics (and the classifier) are cached.
    """

    def __init__(self, pairs: Sequence[Any] = ({"sampler": "ddim", "num_steps": 50},),
                 num_samples: int = 1000, every_n_val_epochs: int = 1, at_train_end: bool = True,
                 extractor: str | FeatureExtractor = "inception",
                 inception_weights: str | None = None, download_timeout: float = 10.0,
                 extractor_options: Mapping[str, Any] | None = None, real_split: str = "train",
                 real_max_count: int | None = None, batch_size: int = 250, seed: int = 0,
                 cache_dir: str = "~/.cache/diffsweep/fid") -> None:
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}.")
        if every_n_val_epochs < 0:
            raise ValueError(f"every_n_val_epochs must be >= 0, got {every_n_val_epochs}.")
        self.pairs = resolve_pairs(pairs)
        self.num_samples = int(num_samples)
        self.every_n_val_epochs = int(every_n_val_epochs)
        self.at_train_end = bool(at_train_end)
        self.extractor_spec = extractor
        self.inception_weights = inception_weights
        self.download_timeout = download_timeout
        self.extractor_options = dict(to_plain(extractor_options) or {})
        self.real_split = real_split
        self.real_max_count = real_max_count
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        #: latest values: {"fid/<name>": float, "nfe/<name>": int}
        self.results: dict[str, float] = {}
        self._extractor: FeatureExtractor | None = None
        self._real: GaussianStats | None = None
        self._metrics: dict[str, FrechetDistance] = {}
        self._val_epochs = 0
        self._active = False
        self._sampled = False

    # ---------------------------------------------------------------------------- preparation
    @property
    def extractor(self) -> FeatureExtractor | None:
        return self._extractor

    @property
    def real_stats(self) -> GaussianStats | None:
        return self._real

    def prepare(self, datamodule, device: torch.device | str = "cpu") -> None:
        """Build the extractor and load/compute the real statistics (idempotent)."""
        device = torch.device(device)
        if self._extractor is None:
            if isinstance(self.extractor_spec, torch.nn.Module):
                self._extractor = self.extractor_spec
            else:
                self._extractor = build_feature_extractor(
                    self.extractor_spec, datamodule=datamodule, cache_dir=self.cache_dir,
                    inception_weights=self.inception_weights,
                    download_timeout=self.download_timeout, **self.extractor_options)
            if not getattr(self._extractor, "comparable", False):
                log.warning("FID uses the %r feature extractor: values are NOT comparable to "
                            "published (Inception) FID.", getattr(self._extractor, "name", "?"))
        self._extractor.to(device)
        if self._real is None:
            if datamodule is None:
                raise ValueError("FIDCallback needs trainer.datamodule (a diffsweep DataModule "
                                 "with fingerprint/real_images/decode).")
            self._real = load_or_compute_real_stats(
                datamodule, self._extractor, self.cache_dir, self.real_split,
                self.real_max_count, self.batch_size, device)
        for name, _ in self.pairs:
            if name not in self._metrics:
                self._metrics[name] = FrechetDistance(self._real.num_features, self._real)
            self._metrics[name].to(device)

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Rank 0 first (it may train the classifier / write the cache), then the others."""
        ready = self._extractor is not None and self._real is not None
        multi = trainer.world_size > 1 and not ready
        if multi and not trainer.is_global_zero:
            trainer.strategy.barrier("fid_prepare")
        self.prepare(trainer.datamodule, pl_module.device)
        if multi and trainer.is_global_zero:
            trainer.strategy.barrier("fid_prepare")

    def _enabled(self) -> bool:
        return self.every_n_val_epochs > 0 or self.at_train_end

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled():
            self._prepare(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_val_epochs > 0 and not trainer.sanity_checking:
            self._prepare(trainer, pl_module)

    # ---------------------------------------------------------------------------- sampling
    def _local_count(self, world_size: int, rank: int) -> int:
        n, r = divmod(self.num_samples, world_size)
        return n + (1 if rank < r else 0)

    @torch.no_grad()
    def _update(self, model, datamodule, world_size: int, rank: int) -> None:
        """Sample this rank's share for every pair and update the metrics (no compute)."""
        device = getattr(model, "device", None) or next(model.parameters()).device
        self.prepare(datamodule, device)  # idempotent; moves extractor + metrics to `device`
        n_local = self._local_count(world_size, rank)
        was_training = model.training
        model.eval()
        try:
            for name, sampler in self.pairs:
                metric = self._metrics[name]
                metric.reset()
                if n_local == 0:
                    continue
                # CPU generator: DiffusionModule.sample draws noise on the CPU (same samples on any device)
                g = torch.Generator().manual_seed(self.seed + RANK_SEED_STRIDE * rank)
                x = model.sample(sampler, n_local, generator=g, batch_size=self.batch_size)
                for i in range(0, x.shape[0], self.batch_size):
                    chunk = x[i:i + self.batch_size]
                    if datamodule is not None and hasattr(datamodule, "decode"):
                        chunk = datamodule.decode(chunk)
                    feats = extract_features(self._extractor, chunk.clamp(-1, 1), self.batch_size,
                                             device)
                    metric.update(feats)
        finally:
            model.train(was_training)

    def _compute(self) -> dict[str, float]:
        """Every rank must call this (the metrics all-reduce their sums)."""
        out: dict[str, float] = {}
        for name, sampler in self.pairs:
            metric = self._metrics[name]
            value = float(metric.compute())
            metric.reset()
            out[f"fid/{name}"] = value
            out[f"nfe/{name}"] = sampler.nfe
        return out

    def evaluate(self, model, datamodule, world_size: int = 1, rank: int = 0) -> dict[str, float]:
        """Standalone FID (e.g. from an evaluate script): ``{"fid/<name>": ..., "nfe/<name>": ...}``.

        ``model`` needs ``.sample(sampler, n, generator=, batch_size=)``; use EMA weights."""
        device = getattr(model, "device", None) or next(model.parameters()).device
        self.prepare(datamodule, device)
        t0 = time.monotonic()
        self._update(model, datamodule, world_size, rank)
        self.results = self._compute()
        self._log_results(time.monotonic() - t0)
        return dict(self.results)

    def _log_results(self, seconds: float) -> None:
        name = getattr(self._extractor, "name", "?")
        for pair, _ in self.pairs:
            log.info("FID[%s] %s = %.4f (NFE %d, %d samples, %.1fs total)", name, pair,
                     self.results[f"fid/{pair}"], self.results[f"nfe/{pair}"], self.num_samples,
                     seconds)

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sampled = False
        self._active = (not trainer.sanity_checking and self.every_n_val_epochs > 0
                        and (self._val_epochs + 1) % self.every_n_val_epochs == 0)
        self._t0 = time.monotonic()

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._active and not self._sampled and batch_idx == 0 and dataloader_idx == 0:
            self._prepare(trainer, pl_module)
            self._update(pl_module, trainer.datamodule, trainer.world_size, trainer.global_rank)
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
        self.results = self._compute()
        for key, value in self.results.items():
            pl_module.log(key, float(value), sync_dist=True, on_epoch=True, on_step=False)
        if trainer.is_global_zero:
            self._log_results(time.monotonic() - self._t0)

    # ---------------------------------------------------------------------------- train end
    @staticmethod
    def _ema_model(trainer: Trainer, pl_module: LightningModule, me: Callback):
        """The module with EMA weights at on_train_end, whatever the callback order."""
        try:
            from lightning.pytorch.callbacks import WeightAveraging
        except ImportError:  # pragma: no cover
            return pl_module
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(me) if me in callbacks else -1
        for i, cb in enumerate(callbacks):
            if isinstance(cb, WeightAveraging) and i > mine:
                avg = getattr(cb, "_average_model", None)
                if avg is not None:  # its on_train_end (copy EMA -> module) has not run yet
                    return avg.module
        return pl_module

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.at_train_end:
            return
        self._prepare(trainer, pl_module)
        model = self._ema_model(trainer, pl_module, self)
        t0 = time.monotonic()
        self._update(model, trainer.datamodule, trainer.world_size, trainer.global_rank)
        self.results = self._compute()
        for logger in trainer.loggers:
            logger.log_metrics(dict(self.results), step=trainer.global_step)
        for key, value in self.results.items():
            trainer.callback_metrics[key] = torch.tensor(float(value))
        if trainer.is_global_zero:
            self._log_results(time.monotonic() - t0)

    # The callback holds no state worth checkpointing except the validation-epoch counter.
    def state_dict(self) -> dict[str, Any]:
        return {"val_epochs": self._val_epochs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._val_epochs = int(state_dict.get("val_epochs", 0))
