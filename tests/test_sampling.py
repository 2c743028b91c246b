import torch

from diffsweep.data.sampling import GlobalBatchSampler, ResumableDataLoader


def _batches(sampler: GlobalBatchSampler) -> list[list[int]]:
    indices = list(sampler)
    size = sampler.per_rank_batch_size
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def test_ranks_together_see_the_one_process_global_batches():
    single = _batches(GlobalBatchSampler(100, 12, seed=3))
    rank0 = _batches(GlobalBatchSampler(100, 6, world_size=2, rank=0, seed=3))
    rank1 = _batches(GlobalBatchSampler(100, 6, world_size=2, rank=1, seed=3))
    assert len(single) == len(rank0) == len(rank1) == 8  # 100 // 12, last partial dropped
    for whole, part0, part1 in zip(single, rank0, rank1):
        assert whole[0::2] == part0 and whole[1::2] == part1


def test_epochs_reshuffle_deterministically():
    sampler = GlobalBatchSampler(50, 10, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and sorted(first) == sorted(second)
    assert second == list(GlobalBatchSampler(50, 10, seed=1))  # epoch e uses seed + e


def test_resume_continues_after_the_last_finished_batch():
    reference = _batches(GlobalBatchSampler(64, 8, seed=5))
    sampler = GlobalBatchSampler(64, 8, seed=5)
    loader = ResumableDataLoader(torch.arange(64), sampler=sampler, batches_done=lambda: 3,
                                 batch_size=8)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_done": 3}
    fresh = ResumableDataLoader(torch.arange(64), sampler=GlobalBatchSampler(64, 8, seed=5),
                                batches_done=lambda: 0, batch_size=8)
    fresh.load_state_dict(state)
    assert [batch.tolist() for batch in fresh] == reference[3:]
    assert [batch.tolist() for batch in fresh] == reference  # the skip applies once


def test_without_drop_last_the_tail_is_kept_when_every_rank_gets_items():
    sampler = GlobalBatchSampler(10, 2, world_size=2, rank=1, shuffle=False, drop_last=False)
    assert list(sampler) == [1, 3, 5, 7, 9]
