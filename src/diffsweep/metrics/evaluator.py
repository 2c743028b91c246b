"""``FIDEvaluator``: FID (and KID, precision/recall) of a denoiser's samples for one or more
samplers, without Lightning.

The evaluator holds the extractor (or its factory), the real-statistics settings and the sampling
budget. It works in three steps, which the training callback spreads over Lightning hooks and
:meth:`FIDEvaluator.evaluate` runs back to back:

1. :meth:`~FIDEvaluator.prepare` (idempotent): build the extractor (``factory(datamodule=,
   cache_dir=)``) and load or compute the cached real statistics of the datamodule;
2. :meth:`~FIDEvaluator.update`: for every (name, Sampler) pair, draw this rank's share of
   ``num_samples`` with :func:`diffsweep.generate.generate`, decode, extract features and
   accumulate them in a :class:`~diffsweep.metrics.metric.FrechetDistance` (no communication);
3. :meth:`~FIDEvaluator.compute`: every rank calls it; the metrics all-reduce their sums and
   return ``{"fid/<name>": float, "nfe/<name>": int}``, plus ``kid/<name>``, ``kid_std/<name>``
   (``kid=True``) and ``precision/<name>``, ``recall/<name>`` (``precision_recall=True``),
   computed from the same features against a random sample of ``real_features`` real vectors
   kept with the cached statistics (:mod:`diffsweep.metrics.fidelity`).

Noise: common random numbers. Each pair's samples start from a fresh CPU generator seeded with
``seed + RANK_SEED_STRIDE * rank``, so every pair and every evaluation sees the same noise
(lower-variance comparisons between samplers and over training), and ranks draw different noise.
Rank ``r`` of ``W`` draws ``num_samples // W`` samples, one more for ``r < num_samples % W``.

Class-conditional nets: with ``guidance_scale`` set, sample ``i`` (counted over all ranks) gets
label ``i % num_classes`` (balanced classes) and classifier-free guidance at that scale; without
it the net samples unconditionally (its null label).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from diffsweep.generate import generate
from diffsweep.metrics.extractors.base import ExtractorFactory, FeatureExtractor, extract_features
from diffsweep.metrics.fidelity import kernel_inception_distance, precision_recall
from diffsweep.metrics.frechet import GaussianStats
from diffsweep.metrics.metric import FeatureBank, FrechetDistance
from diffsweep.metrics.real_stats import load_or_compute_real_stats
from diffsweep.samplers import Sampler

log = logging.getLogger(__name__)

#: seed offset between ranks (each rank draws different noise)
RANK_SEED_STRIDE = 1_000_003

Pair = tuple[str, Sampler]


def _plain(obj: Any) -> Any:
    """OmegaConf containers -> plain python (without importing OmegaConf when absent)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return obj
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def resolve_pairs(pairs: Sequence[Any]) -> list[Pair]:
    """``[{sampler: ddim, num_steps: 20, **options}, Sampler(...), (name, Sampler), ...]`` ->
    ``[(name, Sampler)]``.

    A mapping may carry ``name`` (the log-key suffix; default ``Sampler.name``, i.e.
    ``<sampler>_<num_steps>``); its other keys (``spacing``, ``eta``, ...) go to
    :class:`~diffsweep.samplers.Sampler`. Names must be unique; at least one pair.
    """
    out: list[Pair] = []
    for pair in list(_plain(pairs) if pairs is not None else []):
        pair = _plain(pair)
        if isinstance(pair, Sampler):
            out.append((pair.name, pair))
            continue
        if (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], Sampler)):
            out.append((pair[0], pair[1]))
            continue
        if not isinstance(pair, Mapping):
            raise ValueError(f"FID pair must be a Sampler, a (name, Sampler) tuple or a mapping "
                             f"like {{sampler: ddim, num_steps: 20}}, got {pair!r}.")
        options = dict(pair)
        name = options.pop("name", None)
        if "sampler" in options:
            options["method"] = options.pop("sampler")
        options.pop("_target_", None)
        if "method" not in options:
            raise ValueError(f"FID pair {pair!r} needs a 'sampler' key (e.g. ddim).")
        sampler = Sampler(**options)
        out.append((str(name) if name else sampler.name, sampler))
    names = [name for name, _ in out]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise ValueError(f"Duplicate FID pair names {sorted(duplicates)}: give each pair a "
                         "distinct 'name' key (e.g. name: ddim_20_karras).")
    if not out:
        raise ValueError("FID needs at least one (sampler, num_steps) pair.")
    return out


def local_count(num_samples: int, world_size: int, rank: int) -> int:
    """Rank ``rank``'s share of ``num_samples``: the remainder goes to the first ranks."""
    base, remainder = divmod(int(num_samples), int(world_size))
    return base + (1 if rank < remainder else 0)


def balanced_labels(count: int, num_classes: int, start: int = 0) -> Tensor:
    """Labels ``(count,)`` of samples ``start .. start + count - 1``: sample ``i`` gets class
    ``i % num_classes`` (every class equally often)."""
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    return torch.arange(int(start), int(start) + int(count)) % int(num_classes)


class FIDEvaluator:
    """FID of samples against cached real statistics (see the module docstring).

    Args:
        extractor: a :class:`~diffsweep.metrics.extractors.base.FeatureExtractor`, or a factory
            called as ``extractor(datamodule=..., cache_dir=...)`` in :meth:`prepare` (a Hydra
            config ``_target_: <Extractor>.build`` with ``_partial_: true``).
        num_samples: generated samples per pair, split across ranks (>= 2).
        batch_size: batch size for sampling, decoding and feature extraction.
        seed: base noise seed; rank ``r`` uses ``seed + r * RANK_SEED_STRIDE``.
        real_split: data split whose statistics are the reference.
        real_max_count: at most this many real images (None: the whole split).
        cache_dir: where real statistics (and the classifier extractor) are cached.
        kid: also report KID (``kid/<name>``, ``kid_std/<name>``).
        precision_recall: also report improved precision and recall.
        real_features: real feature vectors kept (a random sample, cached with the statistics)
            for KID and precision/recall; 0 keeps none (then both must be off).
        kid_subsets: KID's random subsets.
        kid_subset_size: KID's subset size (capped at the sample counts).
        prc_neighborhood: k of the k-NN radii of precision/recall.
    """

    def __init__(self, extractor: FeatureExtractor | ExtractorFactory, num_samples: int = 1000,
                 batch_size: int = 250, seed: int = 0, real_split: str = "train",
                 real_max_count: int | None = None,
                 cache_dir: str | os.PathLike = "~/.cache/diffsweep/fid", kid: bool = True,
                 precision_recall: bool = True, real_features: int = 10000,
                 kid_subsets: int = 100, kid_subset_size: int = 1000,
                 prc_neighborhood: int = 3) -> None:
        if not (isinstance(extractor, nn.Module) or callable(extractor)):
            raise ValueError(f"FIDEvaluator extractor must be a FeatureExtractor or a factory "
                             f"called with datamodule= and cache_dir=, got {extractor!r}.")
        if int(num_samples) < 2:
            raise ValueError(f"FIDEvaluator num_samples must be >= 2, got {num_samples}.")
        if int(batch_size) < 1:
            raise ValueError(f"FIDEvaluator batch_size must be >= 1, got {batch_size}.")
        if real_max_count is not None and int(real_max_count) < 2:
            raise ValueError(f"FIDEvaluator real_max_count must be >= 2 or null, got "
                             f"{real_max_count}.")
        if int(real_features) < 0 or ((kid or precision_recall) and int(real_features) < 2):
            raise ValueError(f"FIDEvaluator real_features must be >= 2 with kid or "
                             f"precision_recall on (0 with both off), got {real_features}.")
        if int(kid_subsets) < 1 or int(kid_subset_size) < 2:
            raise ValueError(f"FIDEvaluator kid_subsets must be >= 1 and kid_subset_size >= 2, "
                             f"got {kid_subsets} and {kid_subset_size}.")
        if int(prc_neighborhood) < 1:
            raise ValueError(f"FIDEvaluator prc_neighborhood must be >= 1, got "
                             f"{prc_neighborhood}.")
        self.kid = bool(kid)
        self.precision_recall = bool(precision_recall)
        self.real_features = int(real_features)
        self.kid_subsets = int(kid_subsets)
        self.kid_subset_size = int(kid_subset_size)
        self.prc_neighborhood = int(prc_neighborhood)
        self._extractor_spec = extractor
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.real_split = str(real_split)
        self.real_max_count = None if real_max_count is None else int(real_max_count)
        self.cache_dir = str(cache_dir)
        self._extractor: FeatureExtractor | None = (
            extractor if isinstance(extractor, nn.Module) else None)
        self._real: GaussianStats | None = None
        self._metrics: dict[str, FrechetDistance] = {}
        self._banks: dict[str, FeatureBank] = {}
        # pair name -> net evaluations per sample, of the last update
        self._pending: dict[str, int] = {}

    # ------------------------------------------------------------------ preparation
    @property
    def extractor(self) -> FeatureExtractor | None:
        """The built extractor (None before :meth:`prepare_extractor` for a factory)."""
        return self._extractor

    @property
    def real_stats(self) -> GaussianStats | None:
        """The reference statistics (None before :meth:`prepare_reference`)."""
        return self._real

    @property
    def prepared(self) -> bool:
        return self._extractor is not None and self._real is not None

    def prepare_extractor(self, datamodule: Any = None,
                          device: torch.device | str = "cpu") -> FeatureExtractor:
        """Build the extractor once (a factory is called with ``datamodule`` and ``cache_dir``)
        and move it to ``device``. The classifier factory trains and writes its cache here: under
        DDP let rank 0 run this first."""
        if self._extractor is None:
            extractor = self._extractor_spec(datamodule=datamodule,
                                             cache_dir=Path(self.cache_dir).expanduser())
            if not isinstance(extractor, nn.Module):
                raise TypeError(f"The FID extractor factory returned {type(extractor).__name__}, "
                                "not a FeatureExtractor.")
            self._extractor = extractor
            if not getattr(extractor, "comparable", False):
                log.warning("FID uses the %r feature extractor: values are NOT comparable to "
                            "published (Inception) FID.", getattr(extractor, "name", "?"))
        self._extractor.to(device)
        return self._extractor

    def prepare_reference(self, datamodule: Any, device: torch.device | str = "cpu",
                          rank: int = 0, world_size: int = 1) -> GaussianStats:
        """Load or compute the real statistics once (every rank calls this under DDP: a missing
        cache is computed with each rank extracting its shard)."""
        if self._extractor is None:
            raise RuntimeError("FIDEvaluator.prepare_reference needs the extractor: call "
                               "prepare_extractor first.")
        if self._real is None:
            if datamodule is None:
                raise ValueError("FID needs a datamodule with fingerprint(split), image_shape "
                                 "and real_images(split, max_count, ...) for the real statistics.")
            self._real = load_or_compute_real_stats(
                datamodule, self._extractor, self.cache_dir, self.real_split, self.real_max_count,
                self.batch_size, device, rank=rank, world_size=world_size,
                features=self.real_features)
        return self._real

    def prepare(self, datamodule: Any, device: torch.device | str = "cpu", rank: int = 0,
                world_size: int = 1) -> None:
        """:meth:`prepare_extractor` then :meth:`prepare_reference` (idempotent; the first
        datamodule's real statistics are kept)."""
        self.prepare_extractor(datamodule, device)
        self.prepare_reference(datamodule, device, rank, world_size)

    # ------------------------------------------------------------------ scoring
    @property
    def needs_features(self) -> bool:
        """Whether generated feature vectors are kept (KID or precision/recall on)."""
        return self.kid or self.precision_recall

    def _metric(self, name: str, device: torch.device) -> FrechetDistance:
        assert self._real is not None
        if name not in self._metrics:
            self._metrics[name] = FrechetDistance(self._real.num_features, self._real)
        return self._metrics[name].to(device)

    def _bank(self, name: str, device: torch.device) -> FeatureBank | None:
        if not self.needs_features:
            return None
        assert self._real is not None
        if name not in self._banks:
            self._banks[name] = FeatureBank(self._real.num_features)
        return self._banks[name].to(device)

    @torch.no_grad()
    def update(self, denoiser: Any, pairs: Sequence[Any], *, image_shape: Sequence[int],
               decode: Callable[[Tensor], Tensor] | None = None, precision: str | int = "32",
               compile: bool = False, freeze_weights: bool = False,
               compile_options: dict[str, Any] | None = None, rank: int = 0,
               world_size: int = 1, guidance_scale: float | None = None) -> None:
        """Sample this rank's share for every pair and accumulate its features (no
        communication; call :meth:`compute` next, on every rank).

        Args:
            denoiser: a :class:`~diffsweep.denoiser.Denoiser` (EMA weights, usually).
            pairs: see :func:`resolve_pairs`.
            image_shape: ``(C, H, W)`` of one sample in model space.
            decode: model space -> images in ``[-1, 1]`` (``datamodule.decode``; None: identity);
                its output is clamped to ``[-1, 1]``.
            precision, compile, freeze_weights, compile_options: passed to
                :func:`diffsweep.generate.generate`.
            rank, world_size: this process's rank and the number of ranks.
            guidance_scale: for a class-conditional net: balanced labels and classifier-free
                guidance at this scale (1: plain conditional); None: unconditional samples.
        """
        if not self.prepared:
            raise RuntimeError("FIDEvaluator.update before prepare(datamodule): no extractor or "
                               "real statistics yet.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
        resolved = resolve_pairs(pairs)
        device = denoiser.device
        self._extractor.to(device)
        count = local_count(self.num_samples, world_size, rank)
        conditioning: dict[str, Any] = {}
        if guidance_scale is not None:
            if denoiser.num_classes is None:
                raise ValueError(f"guidance_scale={guidance_scale} needs a class-conditional net "
                                 f"(model.num_classes set); this one is unconditional.")
            first = sum(local_count(self.num_samples, world_size, r) for r in range(rank))
            conditioning = {"class_labels": balanced_labels(count, denoiser.num_classes, first),
                            "guidance_scale": float(guidance_scale)}
        for name, sampler in resolved:
            metric, bank = self._metric(name, device), self._bank(name, device)
            metric.reset()  # fresh states, created in the caller's (inference) mode
            if bank is not None:
                bank.reset()
            if count == 0:
                continue
            generator = torch.Generator().manual_seed(self.seed + RANK_SEED_STRIDE * rank)
            samples = generate(denoiser, sampler, count, tuple(image_shape), generator=generator,
                               batch_size=self.batch_size, precision=precision, compile=compile,
                               freeze_weights=freeze_weights, compile_options=compile_options,
                               **conditioning)
            for start in range(0, samples.shape[0], self.batch_size):
                chunk = samples[start:start + self.batch_size]
                images = (decode(chunk) if decode is not None else chunk).clamp(-1, 1)
                features = extract_features(self._extractor, images, self.batch_size, device)
                metric.update(features)
                if bank is not None:
                    bank.update(features)
        self._pending = {name: int(sampler.nfe_on(denoiser.schedule)) for name, sampler in resolved}

    def real_floor(self, datamodule: Any, split: str = "val", num_samples: int | None = None,
                   device: torch.device | str = "cpu") -> float:
        """FID of ``num_samples`` (default :attr:`num_samples`) real images of ``split`` against
        the reference statistics: what a perfect generator scores at this sample count (FID's
        finite-sample floor; held-out images, so it also holds the split's own difference)."""
        self.prepare(datamodule, device)
        count = int(num_samples or self.num_samples)
        metric = FrechetDistance(self._real.num_features, self._real).to(device)
        seen = 0
        for images in datamodule.real_images(split, max_count=count, batch_size=self.batch_size):
            metric.update(extract_features(self._extractor, images, self.batch_size, device))
            seen += images.shape[0]
        if seen < 2:
            raise ValueError(f"real_floor: split {split!r} has {seen} images; need >= 2.")
        return float(metric.compute())

    def compute(self) -> dict[str, float | int]:
        """``{"fid/<name>": float, "nfe/<name>": int}`` (and the KID, precision/recall keys, see
        the module docstring) for the pairs of the last :meth:`update`. Under DDP every rank must
        call this (the metrics all-reduce their sums and gather the feature vectors)."""
        if not self._pending:
            raise RuntimeError("FIDEvaluator.compute before update: nothing was sampled.")
        results: dict[str, float | int] = {}
        for name, nfe in self._pending.items():
            metric = self._metrics[name]
            results[f"fid/{name}"] = float(metric.compute())
            results[f"nfe/{name}"] = nfe
            metric.reset()
            if self.needs_features:
                bank = self._banks[name]
                results.update(self._fidelity(name, bank.compute()))
                bank.reset()
        self._pending = {}
        return results

    def _fidelity(self, name: str, fake: Tensor) -> dict[str, float]:
        """KID and precision/recall of ``fake`` ``(N, D)`` against the real feature sample."""
        real = self._real.features if self._real is not None else None
        if real is None or real.shape[0] == 0:
            raise RuntimeError("FIDEvaluator: the real statistics carry no feature sample "
                               "(real_features=0?); KID and precision/recall need one.")
        results: dict[str, float] = {}
        if self.kid:
            mean, std = kernel_inception_distance(fake, real, self.kid_subsets,
                                                  self.kid_subset_size, seed=self.seed)
            results[f"kid/{name}"], results[f"kid_std/{name}"] = mean, std
        if self.precision_recall:
            if min(fake.shape[0], real.shape[0]) > self.prc_neighborhood:
                precision, recall = precision_recall(fake, real, self.prc_neighborhood)
                results[f"precision/{name}"], results[f"recall/{name}"] = precision, recall
            else:
                log.warning("Precision/recall skipped for %s: %d generated and %d real vectors "
                            "are not more than prc_neighborhood=%d.", name, fake.shape[0],
                            real.shape[0], self.prc_neighborhood)
        return results

    def evaluate(self, denoiser: Any, pairs: Sequence[Any], datamodule: Any, *,
                 image_shape: Sequence[int] | None = None, precision: str | int = "32",
                 compile: bool = False, freeze_weights: bool = False,
                 compile_options: dict[str, Any] | None = None, rank: int = 0,
                 world_size: int = 1,
                 guidance_scale: float | None = None) -> dict[str, float | int]:
        """:meth:`prepare`, :meth:`update` (decoding with ``datamodule.decode``; ``image_shape``
        defaults to ``datamodule.image_shape``) and :meth:`compute` in one call; logs each FID."""
        started = time.monotonic()
        self.prepare(datamodule, denoiser.device, rank, world_size)
        shape = tuple(image_shape if image_shape is not None else datamodule.image_shape)
        self.update(denoiser, pairs, image_shape=shape, decode=getattr(datamodule, "decode", None),
                    precision=precision, compile=compile, freeze_weights=freeze_weights,
                    compile_options=compile_options, rank=rank, world_size=world_size,
                    guidance_scale=guidance_scale)
        results = self.compute()
        if rank == 0:
            self.log_results(results, time.monotonic() - started)
        return results

    def log_results(self, results: Mapping[str, float], seconds: float) -> None:
        """One log line per pair."""
        kind = getattr(self._extractor, "name", "?")
        for key in results:
            if key.startswith("fid/"):
                name = key[len("fid/"):]
                extras = "".join(f", {label} {results[f'{metric}/{name}']:.4g}"
                                 for metric, label in (("kid", "KID"), ("precision", "precision"),
                                                       ("recall", "recall"))
                                 if f"{metric}/{name}" in results)
                log.info("FID[%s] %s = %.4f (NFE %d%s; %d samples, %.1fs total)", kind, name,
                         results[key], results[f"nfe/{name}"], extras, self.num_samples, seconds)


__all__ = ["FIDEvaluator", "RANK_SEED_STRIDE", "balanced_labels", "local_count", "resolve_pairs"]
