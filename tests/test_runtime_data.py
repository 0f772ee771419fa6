"""Sharding: each sample once per epoch, and N ranks x batch b == 1 rank x batch N*b."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.runtime.data import ArrayDataset, DataPosition, ShardedSampler, as_dataset, epoch_permutation


def sampler(n=100, rank=0, world=1, batch=4, accum=1, seed=3, position=None):
    return ShardedSampler(n, rank=rank, world=world, batch_size=batch, grad_accum=accum, seed=seed, position=position)


def test_each_sample_is_seen_by_exactly_one_rank_per_epoch():
    n, world, batch = 103, 3, 5
    steps = n // (world * batch)
    seen = []
    for rank in range(world):
        s = sampler(n, rank, world, batch)
        for _ in range(steps):
            epoch, (indices,) = s.next_step()
            assert epoch == 0 and len(indices) == batch
            seen.extend(indices.tolist())
    assert len(seen) == len(set(seen)) == steps * world * batch  # the tail of 13 is dropped


def test_n_ranks_with_batch_b_see_what_one_rank_with_batch_nb_sees():
    n, world, batch, accum = 64, 2, 4, 2
    single = sampler(n, 0, 1, world * batch, accum)
    ranks = [sampler(n, r, world, batch, accum) for r in range(world)]
    for _ in range(20):  # crosses several epochs
        e1, micro1 = single.next_step()
        per_rank = [s.next_step() for s in ranks]
        assert all(e == e1 for e, _ in per_rank)
        for j in range(accum):  # micro-batch j of 1 rank == concatenation of the ranks' micro-batch j
            assert np.array_equal(micro1[j], np.concatenate([m[j] for _, m in per_rank]))


def test_grad_accum_micro_batches_tile_the_big_batch():
    big, small = sampler(batch=12), sampler(batch=3, accum=4)
    for _ in range(10):
        (_, (indices,)), (_, micro) = big.next_step(), small.next_step()
        assert np.array_equal(indices, np.concatenate(micro))


def test_epochs_roll_over_with_a_new_order():
    s = sampler(n=10, batch=4)
    epochs = [s.next_step()[0] for _ in range(5)]
    assert epochs == [0, 0, 1, 1, 2]
    assert not np.array_equal(epoch_permutation(10, 3, 0), epoch_permutation(10, 3, 1))
    assert np.array_equal(epoch_permutation(10, 3, 1), epoch_permutation(10, 3, 1))


def test_position_resumes_the_same_stream_even_with_another_world_size():
    full = sampler(n=50, world=1, batch=4)
    stream = [full.next_step()[1][0] for _ in range(12)]
    first = sampler(n=50, world=1, batch=4)
    for _ in range(5):
        first.next_step()
    saved = DataPosition(first.position.epoch, first.position.offset)
    resumed = [sampler(n=50, rank=r, world=2, batch=2, position=DataPosition(saved.epoch, saved.offset))
               for r in range(2)]
    for step in range(5, 12):
        parts = [s.next_step()[1][0] for s in resumed]
        assert np.array_equal(np.concatenate(parts), stream[step])


def test_a_step_larger_than_the_dataset_is_refused():
    with pytest.raises(ValueError, match="only 10"):
        sampler(n=10, world=2, batch=3, accum=2)


def test_datasets_accept_arrays_or_indexables():
    x, y = np.arange(10).reshape(5, 2), np.arange(5)
    ds = as_dataset((x, y))
    bx, by = ds[np.array([4, 0])]
    assert bx.tolist() == [[8, 9], [0, 1]] and by.tolist() == [4, 0]
    with pytest.raises(ValueError):
        ArrayDataset(x, np.arange(4))
    custom = ArrayDataset(x)
    assert as_dataset(custom) is custom
    with pytest.raises(TypeError):
        as_dataset(3)
