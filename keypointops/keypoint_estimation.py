"""Keypoints for a dataset that ships none: the OpenPose COCO body network on every frame, one
person decoded per crop, written as the per-frame ``.pose`` files the dataset readers look for
(``keypointops keypoints``).

Decoding (:func:`decode_pose`) follows OpenPose (Cao et al., "Realtime Multi-Person 2D Pose
Estimation using Part Affinity Fields", CVPR 2017) for a crop that shows one person:

* the candidates of a joint are the local maxima (3 x 3) of its heatmap above ``threshold``;
  each is refined to sub-cell precision by a parabola through the logarithms of the peak and its
  two neighbours along x and along y (exact for a Gaussian peak, the shape OpenPose is trained
  to output); its confidence is the heatmap value at the peak;
* a joint with one candidate takes it; where a joint has several (another person's limb, a
  reflection), the part-affinity fields choose: each candidate is scored by the line integral of
  the field of every limb that joins it to an already chosen joint (the mean over 10 points of
  the field's projection on the segment's direction), the best-connected candidate wins (ties:
  the higher peak), repeated until no choice changes;
* a joint without a candidate is missing.

The COCO-18 result is converted to COCO-17 (the neck is dropped) and scaled from the network's
input to the frame's pixels.  Frames are resized to the network input (``height x width``, a
multiple of 8 each), which keeps the batches rectangular.

Resume: a tracklet whose frames all have their file is skipped, and each file is written
atomically, so an interrupted run continues where it stopped.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from keypointops.data.keypoint_files import to_coco17, write_pose
from keypointops.models.pose_maps import OPENPOSE_LIMBS, POSE_STRIDE

__all__ = ["decode_pose", "keypoint_file", "estimate_dataset"]

_NUM_JOINTS18 = 18
_PAF_SAMPLES = 10


def _peaks(heat: np.ndarray, threshold: float) -> list[tuple[float, float, float]]:
    """Local maxima of one heatmap ``[h, w]`` above ``threshold``: ``(x, y, value)`` in grid cells,
    sub-cell refined (log-parabola per axis)."""
    h, w = heat.shape
    padded = np.pad(heat, 1, constant_values=-np.inf)
    neighbours = np.stack([padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    is_peak = (heat > threshold) & (heat >= neighbours.max(0))
    out = []
    for y, x in zip(*np.nonzero(is_peak)):
        out.append((x + _refine(heat[y, x - 1] if x > 0 else None, heat[y, x],
                                heat[y, x + 1] if x + 1 < w else None),
                    y + _refine(heat[y - 1, x] if y > 0 else None, heat[y, x],
                                heat[y + 1, x] if y + 1 < h else None),
                    float(heat[y, x])))
    return out


def _refine(before: float | None, peak: float, after: float | None) -> float:
    """Offset in [-0.5, 0.5] of the vertex of the parabola through the logs of three samples
    (0 at a border or on a flat top)."""
    if before is None or after is None:
        return 0.0
    tiny = 1e-12
    lb, lp, la = (np.log(max(float(v), tiny)) for v in (before, peak, after))
    curvature = lb - 2 * lp + la
    if not curvature < 0:
        return 0.0
    return float(np.clip(0.5 * (lb - la) / curvature, -0.5, 0.5))


def _paf_score(paf: np.ndarray, limb: int, start: tuple, end: tuple) -> float:
    """Mean projection of limb ``limb``'s field on the unit vector from ``start`` to ``end``
    (grid cells), sampled at :data:`_PAF_SAMPLES` points of the segment (nearest cell)."""
    channel = OPENPOSE_LIMBS[limb][2]
    vector = np.array(end[:2]) - np.array(start[:2])
    length = float(np.hypot(*vector))
    if length < 1e-6:
        return 0.0
    unit = vector / length
    h, w = paf.shape[-2:]
    t = np.linspace(0.0, 1.0, _PAF_SAMPLES)
    xs = np.clip(np.rint(start[0] + t * vector[0]).astype(int), 0, w - 1)
    ys = np.clip(np.rint(start[1] + t * vector[1]).astype(int), 0, h - 1)
    return float(np.mean(paf[channel, ys, xs] * unit[0] + paf[channel + 1, ys, xs] * unit[1]))


def decode_pose(maps: np.ndarray | torch.Tensor, *, threshold: float = 0.1) -> np.ndarray:
    """One person's COCO-17 keypoints ``float32 [17, 3]`` from OpenPose's 57 maps ``[57, h, w]``.

    ``maps`` in the layout of :mod:`keypointops.models.pose_maps` (19 heatmaps, 38 part-affinity
    fields).  Coordinates are in pixels of the network input (a cell's centre at ``8 * cell +
    3.5``, the convention of :func:`~keypointops.models.pose_maps.render_pose_maps`); confidence is
    the heatmap's peak value; a joint under ``threshold`` is missing ``(0, 0, 0)``.
    """
    maps = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
    if maps.ndim != 3 or maps.shape[0] != 57:
        raise ValueError(f"decode_pose: maps must be [57, h, w] (19 heatmaps, 38 fields), got {list(maps.shape)}")
    paf = maps[19:]
    candidates = [_peaks(maps[j], threshold) for j in range(_NUM_JOINTS18)]
    chosen = [max(c, key=lambda p: p[2]) if c else None for c in candidates]
    for _ in range(_NUM_JOINTS18):  # each sweep fixes choices next to settled ones; stops when stable
        changed = False
        for j in (j for j in range(_NUM_JOINTS18) if len(candidates[j]) > 1):
            def connection(candidate, j=j):
                score = 0.0
                for limb, (a, b, _) in enumerate(OPENPOSE_LIMBS):
                    if a == j and chosen[b] is not None:
                        score += _paf_score(paf, limb, candidate, chosen[b])
                    elif b == j and chosen[a] is not None:
                        score += _paf_score(paf, limb, chosen[a], candidate)
                return score, candidate[2]
            best = max(candidates[j], key=connection)
            changed |= best is not chosen[j]
            chosen[j] = best
        if not changed:
            break
    offset = POSE_STRIDE / 2 - 0.5
    kp18 = np.zeros((_NUM_JOINTS18, 3), np.float32)
    for j, peak in enumerate(chosen):
        if peak is not None:
            kp18[j] = (peak[0] * POSE_STRIDE + offset, peak[1] * POSE_STRIDE + offset, peak[2])
    return to_coco17(kp18, "openpose18")


def keypoint_file(dataset, frame: str) -> Path:
    """Where the reader of ``dataset`` looks for the keypoints of ``frame``: MARS's
    ``bbox_<split>_keypoints/<pid>/<stem>.pose`` (PoseTrackReID's ``<split>_keypoints/...`` alike),
    else the ``<stem>.pose`` beside the image."""
    from keypointops.data import MARS, PoseTrackReID

    image = Path(frame)
    if isinstance(dataset, (MARS, PoseTrackReID)):
        split_folder = image.parent.parent
        return split_folder.with_name(split_folder.name + "_keypoints") / image.parent.name / (image.stem + ".pose")
    return image.with_suffix(".pose")


def _write_atomic(path: Path, keypoints: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pose")
    os.close(fd)
    try:
        write_pose(tmp, keypoints)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _frames_to_batch(frames: list[str], height: int, width: int) -> tuple[torch.Tensor, np.ndarray]:
    """``(OpenPose input [N, 3, height, width], the frames' (width, height) [N, 2])``."""
    from keypointops.data.loader import read_image
    from keypointops.data.transforms import Normalize
    from keypointops.models.pose_maps import openpose_input

    images, sizes = [], []
    for frame in frames:
        image = read_image(frame)
        sizes.append(image.size)
        images.append(np.asarray(image.resize((width, height), resample=2)))  # bilinear
    normalised, _ = Normalize()(np.stack(images), None, None)
    return openpose_input(torch.from_numpy(normalised)), np.array(sizes, np.float32)


def _to_frame(keypoints: np.ndarray, frame_size: np.ndarray, height: int, width: int) -> np.ndarray:
    """Keypoints from network-input pixels to the pixels of a frame of ``(width, height)``
    ``frame_size`` (pixel centres map to pixel centres); missing joints stay ``(0, 0, 0)``."""
    out = keypoints.copy()
    scale = frame_size / np.array([width, height], np.float32)
    present = out[:, 2] > 0
    out[present, :2] = (out[present, :2] + 0.5) * scale - 0.5
    return out


@torch.no_grad()
def estimate_dataset(dataset, net: torch.nn.Module, *, device: torch.device, batch_size: int = 16,
                     height: int = 256, width: int = 128, threshold: float = 0.1, progress: bool = True) -> dict:
    """Estimates and writes the keypoints of every frame of ``dataset`` (train, query and gallery).

    ``net`` maps OpenPose input ``[N, 3, height, width]`` to the 57 maps (an
    :class:`~keypointops.models.pose_maps.OpenPoseBody` with loaded weights).  Tracklets whose
    frames all have a keypoint file are skipped.  Returns ``{"tracklets", "skipped", "frames"}``
    (frames estimated).
    """
    from tqdm import tqdm

    if height % POSE_STRIDE or width % POSE_STRIDE or height <= 0 or width <= 0:
        raise ValueError(f"keypoints: the network input {height} x {width} must be positive multiples of {POSE_STRIDE}")
    net = net.eval().to(device)
    seen, tracklets = set(), []
    for tracklet in (*dataset.train, *dataset.query, *dataset.gallery):
        if tracklet.frames not in seen:
            seen.add(tracklet.frames)
            tracklets.append(tracklet)
    stats = {"tracklets": len(tracklets), "skipped": 0, "frames": 0}
    for tracklet in tqdm(tracklets, desc="keypoints", unit="tracklet", disable=not progress, mininterval=2):
        targets = [keypoint_file(dataset, frame) for frame in tracklet.frames]
        if all(path.is_file() for path in targets):
            stats["skipped"] += 1
            continue
        for first in range(0, len(targets), batch_size):
            frames = tracklet.frames[first:first + batch_size]
            images, sizes = _frames_to_batch(list(frames), height, width)
            maps = net(images.to(device)).float().cpu()
            for i, path in enumerate(targets[first:first + batch_size]):
                _write_atomic(path, _to_frame(decode_pose(maps[i], threshold=threshold), sizes[i], height, width))
            stats["frames"] += len(frames)
    return stats
