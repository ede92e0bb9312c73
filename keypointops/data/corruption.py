"""Keypoint-corruption controls: evaluate a model with its test keypoints deliberately wrong.

A model that uses keypoints at inference and whose keypoint branch works must lose accuracy when
its keypoints are replaced by someone else's; a model whose branch is inert shows no change.  The
settings (``KEYPOINT_CORRUPTIONS``):

- ``as-is``: the keypoints as read (no corruption);
- ``zeroed``: every joint missing (confidence 0, coordinates 0);
- ``shuffled``: another tracklet's keypoints (of another identity where the split has one), read at
  the same relative positions in that tracklet's frames, then transformed with this clip;
- ``swapped``: left and right joint labels exchanged, coordinates unchanged;
- ``shifted``: every present joint moved down by a quarter of the crop height.

The donor of ``shuffled`` is a fixed function of the tracklet list and ``seed``
(:func:`donor_indices`), so a control is reproducible and the same for every model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from keypointops.data.keypoint_files import COCO17_FLIP

__all__ = ["KEYPOINT_CORRUPTIONS", "check_corruption", "donor_indices", "donor_frames", "corrupt_keypoints"]

KEYPOINT_CORRUPTIONS = ("as-is", "zeroed", "shuffled", "swapped", "shifted")


def check_corruption(name: str) -> str:
    """``name`` if it is one of :data:`KEYPOINT_CORRUPTIONS`, else a ``ValueError`` listing them."""
    if name not in KEYPOINT_CORRUPTIONS:
        raise ValueError(f"unknown keypoint setting {name!r}; choose from {', '.join(KEYPOINT_CORRUPTIONS)}")
    return name


def donor_indices(pids: Sequence[int], seed: int = 0) -> np.ndarray:
    """For every tracklet, the index of the tracklet whose keypoints ``shuffled`` gives it.

    A seeded random permutation, each entry then moved along the permutation to the first
    tracklet of another identity (when every tracklet has the same identity, the permutation
    itself, avoiding the tracklet itself where there is more than one).
    """
    pids = np.asarray(pids)
    n = len(pids)
    order = np.random.default_rng(seed).permutation(n)
    donors = np.empty(n, np.int64)
    for position, index in enumerate(order):
        for step in range(1, n + 1):
            candidate = order[(position + step) % n]
            if pids[candidate] != pids[index]:
                break
        else:
            candidate = order[(position + 1) % n]
        donors[index] = candidate
    return donors


def donor_frames(indices: np.ndarray, length: int, donor_length: int) -> np.ndarray:
    """The donor's frame numbers at the same relative positions as ``indices`` in a tracklet of
    ``length`` frames."""
    if length <= 1 or donor_length <= 1:
        return np.zeros_like(indices)
    return np.rint(np.asarray(indices) * (donor_length - 1) / (length - 1)).astype(np.int64)


def corrupt_keypoints(keypoints: np.ndarray, setting: str, height: int) -> np.ndarray:
    """Applies ``zeroed``, ``swapped`` or ``shifted`` to clip keypoints ``[T, 17, 3]`` in the pixels of
    a crop ``height`` pixels tall (``as-is`` and ``shuffled`` return them unchanged: a donor is
    chosen before the transforms).  Missing joints stay ``(0, 0, 0)``."""
    check_corruption(setting)
    if setting == "zeroed":
        return np.zeros_like(keypoints)
    if setting == "swapped":
        return keypoints[:, list(COCO17_FLIP)].copy()
    if setting == "shifted":
        shifted = keypoints.copy()
        present = shifted[..., 2] > 0
        shifted[..., 1] = np.where(present, shifted[..., 1] + height / 4.0, 0.0)
        return shifted
    return keypoints
