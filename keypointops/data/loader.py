"""``VideoDataset`` (clips of tracklets, decoded and transformed) and ``build_loader``.

Every clip's randomness (frame sampling, flip, erasing) comes from a numpy Generator seeded with
``(seed, epoch, position, tracklet index)``, where ``position`` is the clip's place in the epoch's
global order (given by the batch sampler), so a batch is the same whatever the number of workers
and a resumed run reproduces it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from keypointops.data.corruption import check_corruption, corrupt_keypoints, donor_frames, donor_indices
from keypointops.data.keypoint_files import load_keypoints
from keypointops.data.sampling import SAMPLING_METHODS, PKBatchSampler, RandomBatchSampler, all_chunks, sample_frames
from keypointops.data.transforms import build_transform

__all__ = ["read_image", "VideoDataset", "build_loader"]


def read_image(path: str) -> Image.Image:
    """Decodes one frame as RGB; an undecodable file raises a ``ValueError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None


class VideoDataset(Dataset):
    """Clips of ``tracklets``: item ``i`` is the clip of ``items[i] = (tracklet index, chunk)``,
    ``chunk`` = None for one clip sampled with ``sampling``, or the number of a chunk of T frames
    (``sampling="all"``).  A key is an item number or ``(item, epoch, position)`` (from the batch
    samplers).  Each item is a dict: ``images float32 [T, 3, H, W]``, ``keypoints float32
    [T, 17, 3]`` (network-input pixels), ``pids``, ``camids``, ``index`` (the tracklet index).

    ``keypoints`` is a setting of :mod:`keypointops.data.corruption` (``"as-is"``: unchanged); a
    corrupted setting needs ``height``, the network input's height in pixels."""

    def __init__(self, tracklets: Sequence, *, frames: int, sampling: str, transform, seed: int = 0,
                 items: list[tuple[int, int | None]] | None = None, keypoints: str = "as-is",
                 height: int | None = None):
        if sampling not in SAMPLING_METHODS:
            raise ValueError(f"VideoDataset: unknown sampling {sampling!r}; known: {SAMPLING_METHODS}")
        self.tracklets, self.frames, self.sampling = tracklets, frames, sampling
        self.transform, self.seed = transform, seed
        self.items = items if items is not None else [(i, None) for i in range(len(tracklets))]
        self.keypoint_setting, self.height = check_corruption(keypoints), height
        if keypoints == "shifted" and height is None:
            raise ValueError("VideoDataset: keypoints='shifted' needs height (the network input's)")
        self.donors = donor_indices([t.pid for t in tracklets], seed) if keypoints == "shuffled" else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        item, epoch, position = key if isinstance(key, tuple) else (key, 0, key)
        index, chunk = self.items[item]
        tracklet = self.tracklets[index]
        rng = np.random.default_rng((self.seed, epoch, position, index))
        length = len(tracklet.frames)
        if chunk is None:
            indices = sample_frames(length, self.frames, self.sampling, rng)
        else:
            indices = all_chunks(length, self.frames)[chunk]
        decoded = {int(i): read_image(tracklet.frames[i]) for i in np.unique(indices)}
        if self.donors is not None:
            donor = self.tracklets[self.donors[index]]
            keypoints = load_keypoints(donor)[donor_frames(indices, length, len(donor.frames))]
        else:
            keypoints = load_keypoints(tracklet)[indices]
        images, keypoints = self.transform([decoded[int(i)] for i in indices], keypoints, rng)
        if self.keypoint_setting not in ("as-is", "shuffled"):
            keypoints = torch.from_numpy(corrupt_keypoints(keypoints.numpy(), self.keypoint_setting, self.height))
        return {"images": images, "keypoints": keypoints, "pids": int(tracklet.pid),
                "camids": int(tracklet.camid), "index": int(index)}


def build_loader(tracklets: Sequence, *, train: bool, frames: int, sampling: str, height: int, width: int,
                 batch_size: int, instances: int | None = None, flip: bool = True, random_erase: bool = True,
                 workers: int = 2, seed: int = 0, rank: int = 0, world_size: int = 1,
                 keypoints: str = "as-is") -> DataLoader:
    """A DataLoader of dict batches: ``images float32 [B, T, 3, H, W]`` (ImageNet-normalised),
    ``keypoints float32 [B, T, 17, 3]`` (network-input pixels, COCO-17, missing = 0), ``pids``,
    ``camids``, ``index`` (int64 ``[B]``, the tracklet's position in ``tracklets``).

    ``train=True``: P x K identity batches when ``instances`` (K) is given (``batch_size = P * K``),
    else random tracklets; incomplete batches dropped; sharded over ``(rank, world_size)``;
    ``loader.batch_sampler.set_epoch(epoch)`` before each epoch.  Flip and random erasing as asked.
    ``train=False``: every tracklet in order, no augmentation; ``sampling="all"`` gives every frame
    in clips of ``frames`` (several items per tracklet, the last padded), other methods one clip;
    ``keypoints`` a corruption control (:data:`keypointops.data.corruption.KEYPOINT_CORRUPTIONS`).
    """
    if not tracklets:
        raise ValueError("build_loader: no tracklets")
    transform = build_transform(height, width, train=train, flip=flip, random_erase=random_erase)
    common = dict(num_workers=workers, persistent_workers=workers > 0)
    if train:
        if sampling == "all":
            raise ValueError("build_loader: sampling 'all' is for testing (train=False)")
        if keypoints != "as-is":
            raise ValueError("build_loader: keypoint corruption is a test-time control (train=False)")
        dataset = VideoDataset(tracklets, frames=frames, sampling=sampling, transform=transform, seed=seed)
        if instances:
            batch_sampler = PKBatchSampler([t.pid for t in tracklets], batch_size, instances, seed=seed,
                                           rank=rank, world_size=world_size)
        else:
            batch_sampler = RandomBatchSampler(len(tracklets), batch_size, seed=seed, rank=rank,
                                               world_size=world_size)
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    items = None
    if sampling == "all":
        items = [(i, c) for i, t in enumerate(tracklets) for c in range(-(-len(t.frames) // frames))]
    dataset = VideoDataset(tracklets, frames=frames, sampling=sampling, transform=transform, seed=seed, items=items,
                           keypoints=keypoints, height=height)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **common)
