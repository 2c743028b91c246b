"""Training order that does not depend on the number of processes and survives a restart.

Epoch ``e`` visits ``perm_e = randperm(n, seed + e)``; global batch ``k`` is
``perm_e[k*B:(k+1)*B]`` (``B`` = the configured global batch size) and rank ``r`` of ``W`` trains on
``global_batch[r::W]``. So a 2-process run sees exactly the global batches of a 1-process run, and
a resumed run continues with the batch after the last one it trained on: Lightning stores the
position through :class:`ResumableDataLoader`'s ``state_dict``, which names the *next* batch to
train, ``(epoch, batches_done)``. A checkpoint written after the last batch of an epoch (a step
checkpoint on the epoch's last batch, or one written at epoch end) stores ``(epoch + 1, 0)``: the
next epoch from its start, which is also where Lightning's fit loop continues.

Datasets whose items depend on the epoch (posterior samples of VAE latents) set the class
attribute ``epoch_indexed = True``; the sampler then yields :class:`EpochIndex` pairs, so the epoch
travels with every index to the dataset, in worker processes too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochIndex(NamedTuple):
    """A dataset index with the epoch it is drawn in (for ``epoch_indexed`` datasets)."""

    epoch: int
    index: int


class GlobalBatchSampler(DistributedSampler):
    """Index sampler yielding this rank's share of each global batch, in order.

    A ``DistributedSampler`` subclass so that Lightning keeps it as is (it only injects its own
    sampler into loaders that have none). Pair it with ``DataLoader(batch_size=per_rank_batch)``.

    Args:
        num_items: dataset length.
        per_rank_batch_size: items per rank per step (global batch / world_size).
        world_size, rank: process layout (1, 0 without DDP).
        shuffle: a fresh seeded permutation every epoch (else the dataset order).
        drop_last: drop the last incomplete global batch (else it is split as evenly as possible;
            a last batch with fewer items than ranks is always dropped).
        seed: base seed of the permutations.
        with_epoch: yield :class:`EpochIndex` ``(epoch, index)`` pairs instead of plain indices.
    """

    def __init__(self, num_items: int, per_rank_batch_size: int, world_size: int = 1,
                 rank: int = 0, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, with_epoch: bool = False) -> None:
        self.num_items = int(num_items)
        self.per_rank_batch_size = int(per_rank_batch_size)
        self.num_replicas, self.rank = int(world_size), int(rank)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.with_epoch = bool(with_epoch)
        self.epoch = 0
        self._skip_batches = 0
        self.global_batch_size = self.per_rank_batch_size * self.num_replicas

    def _global_batches(self, epoch: int) -> list[torch.Tensor]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(
                self.seed + epoch))
        else:
            order = torch.arange(self.num_items)
        batches = list(order.split(self.global_batch_size))
        if batches and (len(batches[-1]) < self.num_replicas or
                        (self.drop_last and len(batches[-1]) < self.global_batch_size)):
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[int] | Iterator[EpochIndex]:
        skip, self._skip_batches = self._skip_batches, 0
        epoch = self.epoch
        for batch in self._global_batches(epoch)[skip:]:
            indices = batch[self.rank::self.num_replicas].tolist()
            if self.with_epoch:
                yield from (EpochIndex(epoch, index) for index in indices)
            else:
                yield from indices

    def __len__(self) -> int:
        batches = self._global_batches(self.epoch)
        return sum(len(batch[self.rank::self.num_replicas]) for batch in batches)

    @property
    def num_global_batches(self) -> int:
        """Global batches in the current epoch (after dropping a short last one)."""
        return len(self._global_batches(self.epoch))

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch ``epoch`` next. A pending resume position (:meth:`resume`) of another
        epoch is dropped: that epoch starts at its first batch."""
        if int(epoch) != self.epoch:
            self._skip_batches = 0
        self.epoch = int(epoch)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Start the next iteration at global batch ``batches_done`` of ``epoch``; a position at or
        past the end of ``epoch`` is the start of ``epoch + 1``. Applies to one iteration."""
        epoch, batches_done = int(epoch), int(batches_done)
        if epoch < 0 or batches_done < 0:
            raise ValueError(f"A data position needs epoch >= 0 and batches_done >= 0; got "
                             f"epoch={epoch}, batches_done={batches_done}.")
        self.epoch = epoch
        if batches_done >= self.num_global_batches:
            self.epoch, batches_done = epoch + 1, 0
        self._skip_batches = batches_done


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`GlobalBatchSampler` whose position goes into checkpoints.

    ``batches_done`` reports how many batches of the current epoch the trainer has finished (the
    loader itself cannot know: prefetching reads ahead). ``epoch_length`` is how many batches
    the trainer takes from one epoch (fewer than the loader has under Lightning's
    ``limit_train_batches``; default: all of them). :meth:`state_dict` is the position of the
    next batch to train: ``{"epoch": e, "batches_done": k}``, or ``{"epoch": e + 1,
    "batches_done": 0}`` once the trainer has finished epoch ``e``.
    """

    def __init__(self, dataset: Dataset, *, sampler: GlobalBatchSampler,
                 batches_done: Callable[[], int],
                 epoch_length: Callable[[], int | float] | None = None, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_done = batches_done
        self.epoch_length = epoch_length

    def _batches_per_epoch(self) -> int | float:
        own = self.sampler.num_global_batches
        return min(own, self.epoch_length()) if self.epoch_length is not None else own

    def state_dict(self) -> dict[str, int]:
        if not isinstance(self.sampler, GlobalBatchSampler):  # e.g. Lightning's overfit_batches
            return {}
        epoch, done = self.sampler.epoch, int(self.batches_done())
        if done >= self._batches_per_epoch():
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state and isinstance(self.sampler, GlobalBatchSampler):
            self.sampler.resume(state["epoch"], state["batches_done"])
