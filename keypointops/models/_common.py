"""What the re-ID models share: the check of a batch against the model contract, the per-frame loss and the
running means behind a model's ``diagnostics()``."""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops.losses import cross_entropy_label_smooth

__all__ = ["check_clip", "frame_loss", "RunningMeans"]


def check_clip(images: Tensor, keypoints: Tensor | None, fn: str, need_keypoints: bool = False) -> None:
    """Checks a batch against the contract: ``images [B, T, 3, H, W]``, ``keypoints [B, T, 17, 3]``."""
    if not isinstance(images, Tensor) or images.dim() != 5 or images.size(2) != 3:
        raise ValueError(f"{fn}: images must be [B, T, 3, H, W], got {list(getattr(images, 'shape', []))}")
    if keypoints is None:
        if need_keypoints:
            raise ValueError(f"{fn}: keypoints [B, T, 17, 3] are required here, got None")
        return
    if not isinstance(keypoints, Tensor) or keypoints.dim() != 4 or keypoints.shape[2:] != (17, 3) \
            or keypoints.shape[:2] != images.shape[:2]:
        raise ValueError(f"{fn}: keypoints must be [B, T, 17, 3] with the images' B and T "
                         f"{list(images.shape[:2])}, got {list(getattr(keypoints, 'shape', []))}")


def frame_loss(logits: dict[str, Tensor], pids: Tensor, frames: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean of the label-smoothed CE (ε = 0.1) of every classifier, each frame labelled with its clip's pid.

    ``logits`` maps a name to ``[B * T, num_classes]``; returns ``(total, {"ce_<name>": term})``.
    """
    if not isinstance(pids, Tensor) or pids.dim() != 1:
        raise ValueError(f"loss: pids must be an int64 tensor [B], got {list(getattr(pids, 'shape', []))}")
    targets = pids.to(next(iter(logits.values())).device).repeat_interleave(frames)
    parts = {f"ce_{name}": cross_entropy_label_smooth(x, targets, 0.1) for name, x in logits.items()}
    return torch.stack(list(parts.values())).mean(), parts


class RunningMeans:
    """Means of named scalar statistics over the training steps since the last :meth:`read`.

    A model adds its statistics in ``loss`` (:meth:`add`, detached tensors: no host sync per step)
    and returns :meth:`read` from ``diagnostics()``, which the engine calls once per epoch.
    """

    def __init__(self):
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, **values: Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self._sums[name] = self._sums[name] + value if name in self._sums else value
            self._counts[name] = self._counts.get(name, 0) + 1

    def read(self) -> dict[str, float]:
        """``{name: mean since the last read}`` (empty when nothing was added), then starts over."""
        means = {name: float(total) / self._counts[name] for name, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        return means
