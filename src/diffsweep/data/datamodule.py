"""``ImageDataModule``: one LightningDataModule for every source (digits, folders, MNIST, CIFAR-10,
VAE latents of any of them)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Subset

from diffsweep.data.base import ImageSource, check_split, collate
from diffsweep.data.sampling import GlobalBatchSampler, ResumableDataLoader

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity``: a SLURM or container CPU
    limit, ``taskset``), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def capped_num_workers(num_workers: int) -> int:
    """``num_workers`` capped at :func:`available_cpus`, with one info line (rank 0 only) when
    capped: more loader processes than cores only adds contention, and torch warns about it in
    every DDP rank."""
    cpus = available_cpus()
    if num_workers <= cpus:
        return num_workers
    if rank_zero_only.rank == 0:
        log.info("data.num_workers=%d capped at %d: this process may use %d CPU core(s).",
                 num_workers, cpus, cpus)
    return cpus


class ImageDataModule(pl.LightningDataModule):
    """Dataloaders over an :class:`~diffsweep.data.base.ImageSource` (injected by Hydra).

    Batches are ``[x, label]``: x float32 ``(B, C, H, W)`` in model space (images in ``[-1, 1]``,
    or scaled VAE latents for a :class:`~diffsweep.data.latents.LatentSource`), label int64
    ``(B,)`` (-1 when unlabeled). ``channels``, ``resolution`` and ``image_shape`` (C, H, W) are the
    model-space shape, ``pixel_shape`` that of the images ``decode`` returns; all are set in
    ``__init__`` from the source (no dataset is read before ``prepare_data``/``setup``).

    Training batches for every source come from :class:`~diffsweep.data.sampling.GlobalBatchSampler`
    through a :class:`~diffsweep.data.sampling.ResumableDataLoader`: the same global batches for any
    number of processes, and a resumed run continues at the same data position. Datasets marked
    ``epoch_indexed`` (latent posterior samples) get ``(epoch, index)`` pairs from the sampler.

    Args:
        source: where images come from.
        batch_size: GLOBAL training batch size; under DDP each rank loads
            ``batch_size // world_size`` (must divide evenly). Computed in ``setup``.
        val_batch_size: global validation batch size (default: ``batch_size``).
        num_workers: DataLoader worker processes (0 = load in the main process; workers are
            persistent when > 0); capped at the CPU cores this process may use
            (:func:`capped_num_workers`).
        drop_last: drop the last incomplete training batch (validation never drops).
        shuffle: shuffle the training split (seeded by ``seed``).
        seed: seed of the training shuffle order (and of the worker RNGs, e.g. random flips).
        channels, resolution: optional consistency checks against the source (the Hydra configs
            carry them as top-level ``data.channels``/``data.resolution`` keys for the model).
        root: accepted (and stored) so the config's top-level ``data.root`` key can exist; the
            source reads it via interpolation.
    """

    def __init__(
        self,
        source: ImageSource,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        drop_last: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        channels: int | None = None,
        resolution: int | None = None,
        root: str | None = None,
    ):
        super().__init__()
        if not isinstance(source, ImageSource):
            raise TypeError(f"source must be an ImageSource, got {type(source).__name__}")
        for name, want, have in (("channels", channels, source.channels),
                                 ("resolution", resolution, source.resolution)):
            if want is not None and int(want) != int(have):
                raise ValueError(f"data.{name}={want} but the source produces {name}={have}; "
                                 f"make data.source.{name} follow data.{name}")
        if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
            raise ValueError("batch_size and val_batch_size must be >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size) if val_batch_size is not None else None
        self.num_workers = capped_num_workers(int(num_workers))
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.root = root
        self.channels: int = int(source.channels)
        self.resolution: int = int(source.resolution)
        self.image_shape: tuple[int, int, int] = (self.channels, self.resolution, self.resolution)
        pixels = source.pixel_source
        self.pixel_shape: tuple[int, int, int] = (int(pixels.channels), int(pixels.resolution),
                                                  int(pixels.resolution))
        self.world_size: int = 1
        self.rank: int = 0
        self.per_rank_batch_size: int = self.batch_size
        self.per_rank_val_batch_size: int = self.val_batch_size or self.batch_size
        self._datasets: dict[tuple[str, bool], Dataset] = {}

    # -- Lightning hooks ---------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Runs on one process per node: downloads, if the source has any."""
        self.source.prepare()

    def setup(self, stage: str | None = None) -> None:
        """Per-rank batch sizes from ``trainer.world_size``; loads the splits the stage needs."""
        trainer = getattr(self, "trainer", None)
        self.world_size = int(trainer.world_size) if trainer is not None else 1
        self.rank = int(getattr(trainer, "global_rank", 0)) if trainer is not None else 0
        self.per_rank_batch_size = self._per_rank(self.batch_size, "batch_size")
        self.per_rank_val_batch_size = self._per_rank(
            self.val_batch_size or self.batch_size, "val_batch_size")
        if stage in (None, "fit"):
            self.dataset("train")
        if stage in (None, "fit", "validate"):
            self.dataset("val")

    def _per_rank(self, global_batch: int, name: str) -> int:
        if global_batch % self.world_size:
            raise ValueError(f"data.{name}={global_batch} is the GLOBAL batch size and must be "
                             f"divisible by the number of processes ({self.world_size})")
        return global_batch // self.world_size

    def _pin_memory(self) -> bool:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return False
        try:
            return trainer.strategy.root_device.type == "cuda"
        except Exception:  # noqa: BLE001 - strategy not set up yet
            return False

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool,
                drop_last: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(),
            collate_fn=collate,
            generator=generator,
            worker_init_fn=self._worker_init(),
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches in the :mod:`~diffsweep.data.sampling` order: the same global batches
        for any number of processes, resumable mid-epoch."""
        ds = self.dataset("train")
        if self.drop_last and len(ds) < self.batch_size:
            raise ValueError(
                f"batch_size={self.batch_size} is larger than the training split "
                f"({len(ds)} images) and drop_last=true would yield zero batches: lower "
                "data.batch_size or set data.drop_last=false")
        sampler = GlobalBatchSampler(len(ds), self.per_rank_batch_size, self.world_size,
                                     self.rank, shuffle=self.shuffle, drop_last=self.drop_last,
                                     seed=self.seed,
                                     with_epoch=bool(getattr(ds, "epoch_indexed", False)))
        return ResumableDataLoader(
            ds, sampler=sampler, batches_done=self._batches_done, epoch_length=self._epoch_length,
            batch_size=self.per_rank_batch_size, drop_last=False,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=self._pin_memory(), collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed), worker_init_fn=self._worker_init())

    def _worker_init(self) -> Callable[[int], None] | None:
        """Loader workers ignore stop signals (the main process saves a checkpoint on them; a
        signal to the whole process group must not kill the workers first) and get Lightning's
        worker seeding."""
        if self.num_workers == 0:
            return None
        from diffsweep.callbacks.preemption import worker_init

        return functools.partial(worker_init, rank=self.rank)

    def _batches_done(self) -> int:
        """Training batches of the current epoch the trainer has finished (for resuming)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _epoch_length(self) -> int | float:
        """Training batches the trainer takes per epoch (``limit_train_batches`` applied; inf
        before the fit loop has counted them)."""
        trainer = getattr(self, "trainer", None)
        return float("inf") if trainer is None else trainer.num_training_batches

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.per_rank_val_batch_size, False, False)

    # -- contract API ------------------------------------------------------------------------
    def dataset(self, split: str, augment: bool | None = None) -> Dataset:
        """Dataset of model-space ``(x (C,H,W) float32, label int64)`` for ``split``
        (``train``/``val``). ``augment`` (train-time random transforms such as flips, posterior
        sampling for latents) defaults to ``split == "train"``. Cached."""
        check_split(split)
        aug = (split == "train") if augment is None else bool(augment)
        key = (split, aug)
        if key not in self._datasets:
            self._datasets[key] = self.source.load(split, augment=aug)
        return self._datasets[key]

    def pixel_dataset(self, split: str) -> Dataset:
        """Dataset of ``(image (C,H,W) float32 in [-1, 1], label int64)`` of ``split`` without
        augmentation: the images :meth:`decode` reproduces (for latents, the encoded images)."""
        return self.source.pixel_source.load(check_split(split), augment=False)

    def fingerprint(self, split: str = "train") -> str:
        """sha256 hex string naming the *pixel* images of ``split`` (source, split, resolution,
        channels, count and content; stable across runs and machines). For latents it is the
        encoded images' fingerprint, so FID statistics are shared with pixel-space runs."""
        return self.source.pixel_source.fingerprint(check_split(split))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Model space ``(B, *image_shape)`` -> images ``(B, *pixel_shape)`` in ``[-1, 1]``: a clamp
        for pixel data, the VAE decoder for latents (on ``x.device``)."""
        return self.source.decode(x)

    def real_images(
        self,
        split: str = "train",
        max_count: int | None = None,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """Yield float32 ``(B, *pixel_shape)`` image batches in ``[-1, 1]`` of ``split`` (of
        :meth:`pixel_dataset`: for latents, the encoded images) in a fixed order, at most
        ``max_count`` images in total (None: all).

        ``rank``/``world_size`` shard those images (every ``world_size``-th one starting at
        ``rank``) so DDP ranks can each feed a disjoint part to a metric that syncs across ranks.
        """
        ds = self.pixel_dataset(split)
        n = len(ds) if max_count is None else min(int(max_count), len(ds))
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        indices = list(range(rank, n, world_size))
        loader = DataLoader(
            Subset(ds, indices),
            batch_size=batch_size or self.val_batch_size or self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate,
        )
        for x, _ in loader:
            yield x

    def __repr__(self) -> str:
        return (f"ImageDataModule(source={self.source!r}, batch_size={self.batch_size}, "
                f"num_workers={self.num_workers})")
