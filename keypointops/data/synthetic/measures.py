"""What a dataset gives alignment to fix: how far a body part moves within an identity.

A method with fixed horizontal stripes (PCB and its followers) assumes that a body part lands at
the same height of every crop of a person.  :func:`hip_spread` measures how wrong that is on a
dataset with keypoints, from the keypoints alone.
"""
from __future__ import annotations

import numpy as np

from keypointops.data.keypoint_files import load_keypoints

__all__ = ["hip_spread"]

_HIPS = (11, 12)  # COCO-17 left / right hip


def hip_spread(tracklets, frame_height: int, reference_height: int = 128) -> float:
    """Within-identity standard deviation of the hip's height in the crop, in pixels of a crop
    ``reference_height`` tall (the frames are ``frame_height`` tall).

    Each tracklet's hip height is the mean, over its frames where both hips were detected, of the
    hips' midpoint; the spread is the pooled within-identity standard deviation of these means
    (the root of the mean over identities with two or more such tracklets of the unbiased
    variance), so it measures how far the hip moves across a person's tracklets and cameras, not
    the per-frame jitter.  Tracklets of pid <= 0 (distractors, junk) do not count.
    """
    by_pid: dict[int, list[float]] = {}
    for tracklet in tracklets:
        if tracklet.pid <= 0:
            continue
        kp = load_keypoints(tracklet)
        both = (kp[:, _HIPS, 2] > 0).all(1)
        if both.any():
            by_pid.setdefault(tracklet.pid, []).append(float(kp[both][:, _HIPS, 1].mean()))
    variances = [np.var(heights, ddof=1) for heights in by_pid.values() if len(heights) >= 2]
    if not variances:
        raise ValueError("hip_spread: no identity has two tracklets with both hips detected")
    return float(np.sqrt(np.mean(variances)) * reference_height / frame_height)
