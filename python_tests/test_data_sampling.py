"""Frame sampling per tracklet and the P x K / random batch samplers (DDP sharding, epochs)."""
from collections import Counter

import numpy as np
import pytest

from keypointops.data.sampling import PKBatchSampler, RandomBatchSampler, all_chunks, sample_frames


@pytest.mark.parametrize("method", ["evenly", "restricted_random", "random_consecutive", "all"])
@pytest.mark.parametrize("length", [1, 5, 8, 9, 37])
def test_every_method_gives_t_valid_ordered_indices(method, length):
    rng = np.random.default_rng(0)
    idx = sample_frames(length, 8, method, rng)
    assert idx.shape == (8,) and idx.dtype == np.int64
    assert idx.min() >= 0 and idx.max() < length
    assert (np.diff(idx) >= 0).all()
    if length < 8:  # all frames, then the last one repeated
        np.testing.assert_array_equal(idx, list(range(length)) + [length - 1] * (8 - length))
    else:
        assert len(set(idx.tolist())) == 8


def test_evenly_is_kmpnets_rule():
    np.testing.assert_array_equal(sample_frames(37, 8, "evenly"), np.arange(0, 32, 4))
    np.testing.assert_array_equal(sample_frames(16, 8, "evenly"), np.arange(0, 16, 2))
    np.testing.assert_array_equal(sample_frames(9, 8, "evenly"), np.arange(8))


def test_restricted_random_takes_one_frame_per_chunk():
    seen = set()
    for seed in range(20):
        idx = sample_frames(40, 4, "restricted_random", np.random.default_rng(seed))
        assert [i // 10 for i in idx] == [0, 1, 2, 3]
        seen.add(tuple(idx))
    assert len(seen) > 10


def test_random_consecutive_is_consecutive_and_random():
    starts = set()
    for seed in range(20):
        idx = sample_frames(30, 6, "random_consecutive", np.random.default_rng(seed))
        np.testing.assert_array_equal(np.diff(idx), 1)
        starts.add(int(idx[0]))
    assert len(starts) > 5


def test_all_chunks_cover_every_frame():
    chunks = all_chunks(10, 4)
    assert chunks.shape == (3, 4)
    np.testing.assert_array_equal(chunks.reshape(-1), list(range(10)) + [9, 9])
    assert all_chunks(3, 4).tolist() == [[0, 1, 2, 2]]


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="unknown method"):
        sample_frames(5, 2, "sideways")
    with pytest.raises(ValueError, match="at least one frame"):
        sample_frames(0, 2, "evenly")
    with pytest.raises(ValueError, match="rng"):
        sample_frames(10, 2, "restricted_random")


def make_pids():
    # 10 identities with 1..7 tracklets each.
    return [pid for pid in range(10) for _ in range(1 + pid % 7)]


def test_pk_batches_hold_p_identities_times_k_tracklets():
    pids = make_pids()
    sampler = PKBatchSampler(pids, batch_size=12, instances=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 12
        counts = Counter(pids[index] for index, _, _ in batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
    positions = [pos for batch in batches for _, _, pos in batch]
    assert positions == list(range(len(positions)))


def test_two_ranks_get_disjoint_tracklets_and_the_same_length():
    pids = make_pids()
    for cls, kwargs in ((PKBatchSampler, dict(pids=pids, batch_size=4, instances=2)),
                        (RandomBatchSampler, dict(num_items=len(pids), batch_size=4))):
        ranks = [cls(**kwargs, seed=1, rank=r, world_size=2) for r in range(2)]
        for epoch in (0, 1):
            for s in ranks:
                s.set_epoch(epoch)
            seen = [{index for batch in s for index, _, _ in batch} for s in ranks]
            assert len(ranks[0]) == len(ranks[1]) > 0
            assert not seen[0] & seen[1]
            keys = [(pos) for s in ranks for batch in s for _, _, pos in batch]
            assert len(keys) == len(set(keys))  # positions are global: distinct across ranks


def test_epochs_are_reproducible_and_differ():
    pids = make_pids()
    a, b = PKBatchSampler(pids, 4, 2, seed=7), PKBatchSampler(pids, 4, 2, seed=7)
    a.set_epoch(5)
    b.set_epoch(5)
    assert list(a) == list(b)  # a resumed run reproduces the epoch
    b.set_epoch(6)
    assert [i for batch in a for i, _, _ in batch] != [i for batch in b for i, _, _ in batch]
    assert all(epoch == 6 for batch in b for _, epoch, _ in batch)


def test_random_batch_sampler_covers_each_tracklet_once():
    sampler = RandomBatchSampler(23, 5, seed=0)
    indices = [i for batch in sampler for i, _, _ in batch]
    assert len(indices) == 20 and len(set(indices)) == 20


def test_sampler_argument_errors():
    with pytest.raises(ValueError, match="multiple of"):
        PKBatchSampler([0, 1], 5, 2)
    with pytest.raises(ValueError, match="only 2"):
        PKBatchSampler([0, 1], 6, 2)
    with pytest.raises(ValueError, match="rank"):
        RandomBatchSampler(10, 2, rank=2, world_size=2)
