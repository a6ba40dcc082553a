"""Training randomness a resumed run reproduces (diffseg/data/resumable.py): the epoch order, the per-item
transform seeds, the global RNG states in the checkpoint."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai import transforms as mt

from diffseg.data.resumable import EpochSampler, RNGStateInCheckpoint, SeededTransformDataset


def _epoch(sampler: EpochSampler, epoch: int) -> list[tuple[int, int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("length,world,drop_last", [(64, 1, True), (64, 4, True), (10, 3, False), (10, 3, True)])
def test_resume_epoch_order_ranks_partition_each_epoch(length, world, drop_last):
    samplers = [EpochSampler(length, seed=7, rank=r, world=world, drop_last=drop_last) for r in range(world)]
    for epoch in (0, 1, 5):
        parts = [_epoch(s, epoch) for s in samplers]
        assert all(len(p) == len(samplers[0]) for p in parts)  # every rank the same number of batches
        indices = [i for p in parts for _, i in p]
        if drop_last:
            assert len(set(indices)) == len(indices) == (length // world) * world  # disjoint, nothing repeated
        else:
            assert set(indices) == set(range(length))  # every item, padded by the permutation's start
        assert all(e == epoch for p in parts for e, _ in p)
    assert _epoch(samplers[0], 0) != _epoch(samplers[0], 1)  # a new order every epoch
    assert _epoch(EpochSampler(length, 7, 0, world), 2) == _epoch(EpochSampler(length, 7, 0, world), 2)
    assert _epoch(EpochSampler(length, 7, 0, world), 2) != _epoch(EpochSampler(length, 8, 0, world), 2)


def test_resume_from_skips_the_items_already_trained_on_then_continues():
    full = EpochSampler(40, seed=3)
    epochs = {e: _epoch(full, e) for e in (2, 3)}
    resumed = EpochSampler(40, seed=3)
    resumed.resume_from(2, consumed=12)
    assert list(resumed) == epochs[2][12:]  # the rest of the interrupted epoch, without loading the first 12
    assert len(resumed) == 40  # Lightning counts the epoch's batches on the full length
    assert _epoch(resumed, 3) == epochs[3]  # the next epoch is whole


def test_resume_item_transforms_depend_only_on_seed_epoch_and_index():
    data = [{"image": torch.arange(16.0).reshape(1, 4, 4) + 100 * i} for i in range(5)]
    transform = mt.Compose([mt.RandFlipd("image", prob=0.5, spatial_axis=0),
                            mt.RandGaussianNoised("image", prob=1.0, std=1.0)])
    ds = SeededTransformDataset(data, transform, seed=11)
    first = [ds[(1, i)]["image"].clone() for i in range(5)]
    again = [ds[(1, i)]["image"].clone() for i in reversed(range(5))][::-1]  # another order: same samples
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(ds[(2, 0)]["image"], first[0])  # another epoch: other noise
    other = SeededTransformDataset(data, transform, seed=12)
    assert not torch.allclose(other[(1, 0)]["image"], first[0])  # another run seed: other noise
    # through a DataLoader with 2 workers the items are the same as loaded here, in order
    sampler = EpochSampler(5, seed=0)
    sampler.set_epoch(1)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=sampler, num_workers=2)
    for (_, index), batch in zip(list(sampler), loader):
        torch.testing.assert_close(batch["image"][0], first[index])


def test_resume_rng_states_travel_in_the_checkpoint_callback():
    callback = RNGStateInCheckpoint()
    torch.manual_seed(5)
    np.random.seed(5)
    state = callback.state_dict()
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(99)
    np.random.seed(99)
    callback.load_state_dict(state)
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])


def test_resume_rng_states_load_with_weights_only(tmp_path):
    """Checkpoints stay loadable with torch.load(weights_only=True) (Lightning's test/evaluate path)."""
    import random

    path = tmp_path / "state.pt"
    random.seed(3)
    torch.save({"rng": RNGStateInCheckpoint().state_dict()}, path)
    state = torch.load(path, weights_only=True)["rng"]
    expected = random.random()
    random.seed(4)
    RNGStateInCheckpoint().load_state_dict(state)
    assert random.random() == expected
