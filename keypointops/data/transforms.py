"""Clip transforms that move the keypoints with the pixels.

A clip is a list of T PIL images (one tracklet's frames, possibly of different sizes) with
COCO-17 keypoints ``float32 [T, 17, 3]`` in each frame's own pixels.  Every step takes and returns
``(images, keypoints)`` and a numpy ``Generator`` (the clip's own, so results do not depend on the
loader's workers).  Geometric steps move the keypoints into the pixels of their output
(``x' = x * W_out / W_in``: coordinates are continuous, pixel ``i`` spans ``[i, i+1)``); a missing
joint stays ``(0, 0, 0)`` after every step.  Random decisions are taken once per clip (every frame
of a clip is flipped, or none; one erased rectangle covers the same place in every frame), as
temporal models need consistent frames.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from keypointops.data.keypoint_files import COCO17_FLIP

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "Resize", "HorizontalFlip", "Normalize", "RandomErasing",
           "Compose", "build_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images (channel in dim -3, the batch contract) back to RGB in [0, 1]
    (unclamped)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return images * std + mean


def _keep_missing(keypoints: np.ndarray, missing: np.ndarray) -> np.ndarray:
    keypoints[missing] = 0.0
    return keypoints


class Resize:
    """PIL images of any size -> ``uint8 [T, H, W, 3]`` (bilinear); keypoints scaled per frame."""

    def __init__(self, height: int, width: int):
        if height < 1 or width < 1:
            raise ValueError(f"Resize: height and width must be >= 1, got {height}x{width}")
        self.height, self.width = height, width

    def __call__(self, images: Sequence[Image.Image], keypoints: np.ndarray, rng):
        missing = keypoints[..., 2] <= 0
        out = np.empty((len(images), self.height, self.width, 3), np.uint8)
        keypoints = keypoints.copy()
        for t, image in enumerate(images):
            w, h = image.size
            if (w, h) != (self.width, self.height):
                image = image.resize((self.width, self.height), Image.BILINEAR)
            out[t] = np.asarray(image)
            keypoints[t, :, 0] *= self.width / w
            keypoints[t, :, 1] *= self.height / h
        return out, _keep_missing(keypoints, missing)


class HorizontalFlip:
    """With probability ``p``, mirrors every frame of the clip: ``x' = W - x`` and the left / right
    joints swap labels, so each joint still names the same body part."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, images: np.ndarray, keypoints: np.ndarray, rng):
        if rng.random() >= self.p:
            return images, keypoints
        width = images.shape[2]
        keypoints = keypoints[:, list(COCO17_FLIP)].copy()
        missing = keypoints[..., 2] <= 0
        keypoints[..., 0] = width - keypoints[..., 0]
        return np.ascontiguousarray(images[:, :, ::-1]), _keep_missing(keypoints, missing)


class Normalize:
    """``uint8 [T, H, W, 3]`` -> ``float32 [T, 3, H, W]``, ``(x / 255 - mean) / std`` (numpy: no
    intra-op threads in the loader)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.scale = np.array([1 / (255 * s) for s in std], np.float32).reshape(1, 3, 1, 1)
        self.shift = np.array([m / s for m, s in zip(mean, std)], np.float32).reshape(1, 3, 1, 1)

    def __call__(self, images: np.ndarray, keypoints: np.ndarray, rng):
        x = images.transpose(0, 3, 1, 2).astype(np.float32)
        x *= self.scale
        x -= self.shift
        return x, keypoints


class RandomErasing:
    """With probability ``p``, sets one random rectangle (area ``area`` of the frame, aspect ratio
    in ``[aspect, 1/aspect]``) to 0, the mean colour after normalisation, in every frame of the
    clip (torchreid's random erasing, one rectangle per clip); keypoints are unchanged."""

    def __init__(self, p: float = 0.5, area: tuple[float, float] = (0.02, 0.4), aspect: float = 0.3):
        self.p, self.area, self.aspect = p, area, aspect

    def __call__(self, images: np.ndarray, keypoints: np.ndarray, rng):
        if rng.random() >= self.p:
            return images, keypoints
        height, width = images.shape[-2:]
        for _ in range(100):
            area = rng.uniform(*self.area) * height * width
            ratio = np.exp(rng.uniform(np.log(self.aspect), -np.log(self.aspect)))
            h, w = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
            if 0 < h < height and 0 < w < width:
                y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                images[..., y:y + h, x:x + w] = 0.0
                break
        return images, keypoints


class Compose:
    """Applies the steps in order; returns torch ``(images float32 [T, 3, H, W], keypoints float32
    [T, 17, 3])``."""

    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, images, keypoints: np.ndarray, rng: np.random.Generator):
        for step in self.steps:
            images, keypoints = step(images, keypoints, rng)
        return (torch.from_numpy(np.ascontiguousarray(images)),
                torch.from_numpy(np.ascontiguousarray(keypoints, dtype=np.float32)))


def build_transform(height: int, width: int, *, train: bool, flip: bool = True,
                    random_erase: bool = True) -> Compose:
    """Resize -> (train: flip) -> normalise -> (train: random erasing)."""
    steps = [Resize(height, width)]
    if train and flip:
        steps.append(HorizontalFlip())
    steps.append(Normalize())
    if train and random_erase:
        steps.append(RandomErasing())
    return Compose(steps)
