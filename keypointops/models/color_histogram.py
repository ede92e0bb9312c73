"""No-learning colour-histogram baselines: they show how hard a dataset is for appearance alone.

* :class:`ColorHistogram` (``stripes=1``): one HSV joint histogram of the whole crop.
* :class:`ColorHistogram` (``stripes=4``): one histogram per horizontal stripe (a body-agnostic
  layout prior, as PCB's stripes).
* :class:`PartColorHistogram`: one histogram per body part, from pixels sampled along the
  keypoint skeleton (head, upper / lower torso, arms, thighs, shins): the keypoint-aligned
  "oracle" that shows what knowing where the body parts are is worth.

All follow the model eval contract: ``forward(images [B, T, 3, H, W] ImageNet-normalised,
keypoints [B, T, 17, 3]) -> [B, D]``.  Per frame each histogram is L1-normalised; frames are
averaged; the descriptor is square-rooted (Hellinger) and L2-normalised, so the Euclidean distance
of two descriptors ranks like the Hellinger distance of the histograms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keypointops.data.transforms import denormalize

__all__ = ["ColorHistogram", "PartColorHistogram", "PART_SEGMENTS"]


#: Body parts as joint segments (COCO-17 indices); left and right limbs share a part.
PART_SEGMENTS: dict[str, tuple[tuple[int, int], ...]] = {
    "head": ((0, 0), (1, 2), (3, 4)),
    "arms": ((5, 7), (7, 9), (6, 8), (8, 10)),
    "thighs": ((11, 13), (12, 14)),
    "shins": ((13, 15), (14, 16)),
}
_TORSO = (5, 6, 11, 12)  # left / right shoulder, left / right hip


def _rgb(images: Tensor) -> Tensor:
    return denormalize(images).clamp(0, 1)


def _hsv_bins(rgb: Tensor, bins: tuple[int, int, int]) -> Tensor:
    """Joint HSV bin index (int64) of each colour; ``rgb`` has the channel in dim -3."""
    r, g, b = rgb.unbind(-3)
    value, _ = rgb.max(-3)
    low, _ = rgb.min(-3)
    delta = value - low
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(delta > 0, (hue / 6) % 1.0, torch.zeros_like(hue))
    sat = torch.where(value > 0, delta / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    hb, sb, vb = bins
    h = (hue * hb).long().clamp(0, hb - 1)
    s = (sat * sb).long().clamp(0, sb - 1)
    v = (value * vb).long().clamp(0, vb - 1)
    return (h * sb + s) * vb + v


def _descriptor(hist: Tensor, weight: Tensor) -> Tensor:
    """``hist [B, T, G, bins]`` counts, ``weight [B, T, G]`` -> ``[B, G * bins]``: per-group L1,
    weighted mean over frames, square root, L2."""
    hist = hist / hist.sum(-1, keepdim=True).clamp_min(1e-12)
    hist = (hist * weight.unsqueeze(-1)).sum(1) / weight.sum(1).clamp_min(1e-12).unsqueeze(-1)
    return F.normalize(hist.sqrt().flatten(1), dim=1)


class ColorHistogram(nn.Module):
    """HSV joint histogram (``bins`` = hue, saturation, value) of ``stripes`` horizontal stripes."""

    def __init__(self, stripes: int = 1, bins: tuple[int, int, int] = (8, 4, 4)):
        super().__init__()
        if stripes < 1:
            raise ValueError(f"ColorHistogram: stripes must be >= 1, got {stripes}")
        self.stripes, self.bins = stripes, tuple(bins)
        self.num_bins = bins[0] * bins[1] * bins[2]

    def forward(self, images: Tensor, keypoints: Tensor | None = None) -> Tensor:
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"ColorHistogram: images must be [B, T, 3, H, W], got {tuple(images.shape)}")
        b, t, _, h, w = images.shape
        index = _hsv_bins(_rgb(images.float()), self.bins)                     # [B, T, H, W]
        stripe = (torch.arange(h, device=images.device) * self.stripes // h).view(1, 1, h, 1)
        index = (stripe * self.num_bins + index).flatten(2)                    # [B, T, H*W]
        hist = torch.zeros(b, t, self.stripes * self.num_bins, device=images.device)
        hist.scatter_add_(2, index, torch.ones_like(index, dtype=hist.dtype))
        hist = hist.view(b, t, self.stripes, self.num_bins)
        return _descriptor(hist, hist.new_ones(b, t, self.stripes))


class PartColorHistogram(nn.Module):
    """Per-part HSV histograms of pixels sampled along the keypoint skeleton (needs keypoints in
    image pixels): points along each part's segments and a grid over the torso quadrilateral (its
    upper and lower half are two parts), each averaged over a small window.  A part whose joints
    are missing in a frame does not count for that frame."""

    def __init__(self, bins: tuple[int, int, int] = (8, 4, 4), samples: int = 5, window: float = 0.04):
        super().__init__()
        self.bins, self.samples, self.window = tuple(bins), samples, window
        self.num_bins = bins[0] * bins[1] * bins[2]
        self.num_parts = len(PART_SEGMENTS) + 2

    def _points(self, kp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sample points ``[N, S, 2]``, their part ``[S]`` and validity ``[N, S]``."""
        steps = torch.linspace(0, 1, self.samples, device=kp.device)
        points, parts, valid = [], [], []
        for p, segments in enumerate(PART_SEGMENTS.values()):
            for a, c in segments:
                xa, xc = kp[:, a, :2], kp[:, c, :2]
                points.append(xa[:, None] + steps[None, :, None] * (xc - xa)[:, None])
                ok = (kp[:, a, 2] > 0) & (kp[:, c, 2] > 0)
                valid.append(ok[:, None].expand(-1, self.samples))
                parts.extend([p] * self.samples)
        ls, rs, lh, rh = (kp[:, j, :2] for j in _TORSO)
        ok = (kp[:, list(_TORSO), 2] > 0).all(1)
        for half in (0, 1):
            for v in torch.linspace(0.1, 0.4, 3).add(0.5 * half).tolist():
                left, right = ls + v * (lh - ls), rs + v * (rh - rs)
                points.append(left[:, None] + steps[None, :, None] * (right - left)[:, None])
                valid.append(ok[:, None].expand(-1, self.samples))
                parts.extend([len(PART_SEGMENTS) + half] * self.samples)
        return torch.cat(points, 1), torch.tensor(parts, device=kp.device), torch.cat(valid, 1)

    def forward(self, images: Tensor, keypoints: Tensor) -> Tensor:
        if images.dim() != 5 or keypoints.shape[:2] != images.shape[:2] or keypoints.shape[-2:] != (17, 3):
            raise ValueError(f"PartColorHistogram: images [B, T, 3, H, W] and keypoints [B, T, 17, 3] "
                             f"expected, got {tuple(images.shape)} and {tuple(keypoints.shape)}")
        b, t, _, h, w = images.shape
        rgb = _rgb(images.float()).flatten(0, 1)
        radius = max(1, int(round(self.window * h)))
        rgb = F.avg_pool2d(rgb, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
        points, parts, valid = self._points(keypoints.flatten(0, 1).float())
        grid = torch.stack([points[..., 0] / w * 2 - 1, points[..., 1] / h * 2 - 1], -1)
        colours = F.grid_sample(rgb, grid[:, :, None], align_corners=False, padding_mode="border")[..., 0]
        index = parts * self.num_bins + _hsv_bins(colours[..., None], self.bins)[..., 0]   # [N, S]
        hist = torch.zeros(b * t, self.num_parts * self.num_bins, device=images.device)
        hist.scatter_add_(1, index, valid.to(hist.dtype))
        hist = hist.view(b, t, self.num_parts, self.num_bins)
        return _descriptor(hist, (hist.sum(-1) > 0).to(hist.dtype))
