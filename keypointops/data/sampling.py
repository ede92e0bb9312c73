"""Frame sampling per tracklet, and the batch samplers of training (DDP-aware).

Frame sampling (``sample_frames``): ``evenly`` (KMPNet: T frames at equal stride), ``restricted_random``
(CTL: T equal chunks, one random frame of each, in order), ``random_consecutive`` (RGCN / AlignNet:
T consecutive frames from a random start) and, for testing, ``all`` (every frame, in chunks of T:
``all_chunks``).  A tracklet shorter than T is padded by repeating its last frame.

Batch samplers (``PKBatchSampler``, ``RandomBatchSampler``) yield lists of ``(index, epoch,
position)`` keys: ``VideoDataset`` seeds each clip's randomness from ``(seed, epoch, position,
index)``, so batches do not depend on the number of loader workers.  Each epoch's global order is a
pure function of ``(seed, epoch)``: every rank computes it and keeps its own disjoint share, every
rank has the same number of batches, and a resumed run that calls ``set_epoch(epoch)`` reproduces
the epoch exactly.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import numpy as np

__all__ = ["SAMPLING_METHODS", "sample_frames", "all_chunks", "PKBatchSampler", "RandomBatchSampler"]

SAMPLING_METHODS = ("evenly", "restricted_random", "random_consecutive", "all")


def _pad(indices: np.ndarray, frames: int) -> np.ndarray:
    """``indices`` followed by its last element repeated up to ``frames`` entries."""
    if len(indices) >= frames:
        return indices
    return np.concatenate([indices, np.full(frames - len(indices), indices[-1], dtype=indices.dtype)])


def _check(length: int, frames: int) -> None:
    if length < 1:
        raise ValueError(f"sample_frames: a tracklet must have at least one frame, got length {length}")
    if frames < 1:
        raise ValueError(f"sample_frames: frames (T) must be >= 1, got {frames}")


def sample_frames(length: int, frames: int, method: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The indices (int64 ``[frames]``) of the frames of one clip of a tracklet of ``length`` frames.

    ``evenly``: ``L' = L - L % T``, indices ``0, L'/T, 2L'/T, ...`` (KMPNet's rule); deterministic.
    ``restricted_random``: the tracklet cut into T equal chunks, one uniformly random frame of each.
    ``random_consecutive``: T consecutive frames from a uniformly random start.
    ``all``: the first chunk of :func:`all_chunks` (use that function for every chunk).
    A tracklet shorter than T gives all its frames, then its last frame repeated.
    """
    _check(length, frames)
    if method not in SAMPLING_METHODS:
        raise ValueError(f"sample_frames: unknown method {method!r}; known: {SAMPLING_METHODS}")
    if method == "all":
        return all_chunks(length, frames)[0]
    if length < frames:
        return _pad(np.arange(length, dtype=np.int64), frames)
    if method == "evenly":
        usable = length - length % frames
        return np.arange(0, usable, usable // frames, dtype=np.int64)
    if rng is None:
        raise ValueError(f"sample_frames: method {method!r} needs a numpy Generator (rng)")
    if method == "restricted_random":
        bounds = np.linspace(0, length, frames + 1).astype(np.int64)
        return bounds[:-1] + (rng.random(frames) * (bounds[1:] - bounds[:-1])).astype(np.int64)
    start = int(rng.integers(0, length - frames + 1))
    return np.arange(start, start + frames, dtype=np.int64)


def all_chunks(length: int, frames: int) -> np.ndarray:
    """Every frame of a tracklet in chunks of T: int64 ``[ceil(L / T), T]``, the last chunk padded
    by repeating the last frame."""
    _check(length, frames)
    chunks = -(-length // frames)
    return _pad(np.arange(length, dtype=np.int64), chunks * frames).reshape(chunks, frames)


class _EpochBatchSampler:
    """Common part: (seed, epoch) -> the global list of batches, the share of one rank."""

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank={rank}, "
                             f"world_size={world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose batches the next iteration yields (call before every epoch)."""
        self.epoch = int(epoch)

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def _rank_batches(self) -> list[list[int]]:
        batches = self._global_batches(np.random.default_rng((self.seed, self.epoch)))
        per_rank = len(batches) // self.world_size
        return batches[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        batches = self._rank_batches()
        position = self.rank * len(batches) * self.batch_size
        for batch in batches:
            yield [(int(index), self.epoch, position + i) for i, index in enumerate(batch)]
            position += len(batch)

    def __len__(self) -> int:
        return len(self._rank_batches())


class PKBatchSampler(_EpochBatchSampler):
    """P identities x K tracklets per batch (``batch_size = P * K``), torchreid's
    ``RandomIdentitySampler`` made DDP-aware.

    Per epoch: each identity's tracklets are shuffled (sampled with replacement up to K when it has
    fewer) and cut into groups of K (an incomplete last group is dropped); batches take one group from
    each of P identities drawn at random among those with groups left, until fewer than P remain.
    The batches are dealt to ranks in contiguous blocks of equal size, so ranks see disjoint
    tracklets and the same number of batches.
    """

    def __init__(self, pids: Sequence[int], batch_size: int, instances: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        if instances < 1 or batch_size % instances:
            raise ValueError(f"PKBatchSampler: batch_size ({batch_size}) must be a multiple of "
                             f"instances K ({instances}) >= 1")
        self.instances = instances
        self.identities = batch_size // instances
        self.by_pid: dict[int, list[int]] = defaultdict(list)
        for index, pid in enumerate(pids):
            self.by_pid[int(pid)].append(index)
        if len(self.by_pid) < self.identities:
            raise ValueError(f"PKBatchSampler: P = batch_size / instances = {self.identities} identities "
                             f"per batch, but the data has only {len(self.by_pid)}")

    def _global_batches(self, rng):
        groups: dict[int, list[list[int]]] = {}
        for pid in sorted(self.by_pid):
            indices = np.asarray(self.by_pid[pid])
            if len(indices) < self.instances:
                indices = rng.choice(indices, self.instances, replace=True)
            indices = rng.permutation(indices)
            usable = len(indices) - len(indices) % self.instances
            groups[pid] = [indices[i:i + self.instances].tolist() for i in range(0, usable, self.instances)]
        batches = []
        available = [pid for pid in groups if groups[pid]]
        while len(available) >= self.identities:
            chosen = rng.choice(len(available), self.identities, replace=False)
            batch = []
            for pid in (available[c] for c in chosen):
                batch.extend(groups[pid].pop())
            batches.append(batch)
            available = [pid for pid in available if groups[pid]]
        return batches


class RandomBatchSampler(_EpochBatchSampler):
    """Batches of ``batch_size`` tracklets in a random order (each tracklet once per epoch, the
    incomplete last batch dropped), for models trained without P x K batches; DDP-aware like
    :class:`PKBatchSampler`."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(batch_size, seed, rank, world_size)
        if num_items < batch_size * world_size:
            raise ValueError(f"RandomBatchSampler: {num_items} tracklets are fewer than one batch of "
                             f"{batch_size} per rank for {world_size} rank(s)")
        self.num_items = num_items

    def _global_batches(self, rng):
        order = rng.permutation(self.num_items)
        usable = len(order) - len(order) % self.batch_size
        return [order[i:i + self.batch_size].tolist() for i in range(0, usable, self.batch_size)]
