"""``part_pool``: heatmap-softmax part pooling (AlignNet composite parts, CTL keypoint parts)."""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops import reference
from keypointops._extension import has_ops
from keypointops._opdefs import autocast
from keypointops._opdefs.backend import resolve_backend
from keypointops._opdefs.part_pool import check_args, register_kernels_of

__all__ = ["part_pool"]


def part_pool(features: Tensor, heatmaps: Tensor, groups: Tensor | None = None, *,
              temperature: float = 1.0, backend: str = "auto") -> Tensor:
    r"""Pools one feature vector per part: the feature map weighted by the part's softmax map.

    With the part logits :math:`r = \mathrm{groups} \cdot \mathrm{heatmaps}` (per pixel) and
    :math:`p_{bq} = \mathrm{softmax}_{h,w}(r_{bq} / T)`:

    .. math:: \mathrm{out}[b, q, :] = \sum_{h, w} p[b, q, h, w]\, \mathrm{features}[b, :, h, w]

    One fused op: the logits and a log-sum-exp per (image, part) are computed from the heatmaps,
    the weighted sum is a GEMM over ``H*W`` that reads the features in place (NCHW or
    channels_last), and backward recomputes the probabilities from the saved log-sum-exp.  No
    ``[B, P, C, H, W]`` tensor and no transposed copy of the features is made.  AlignNet's
    ``avgpool(features * p)`` equals ``out / (H * W)``.

    Args:
        features: ``[B, C, H, W]`` feature map, float32, float64, float16 or bfloat16 (the last
            two with float32 probabilities and sums on every backend); contiguous or channels_last.
        heatmaps: ``[B, J, H, W]`` keypoint heatmaps on the same grid, of the features' dtype.
        groups: ``[P, J]`` part-from-joint weights (e.g. the row-averaging matrices of
            :func:`keypointops.parts.part_groups`), or None for the identity (``P = J``).  It may
            require grad (its gradient is cheap: one ``[P, J]`` reduction).
        temperature: softmax temperature, a finite float > 0 (smaller is sharper).
        backend: ``"auto"`` (compiled kernel for the tensor's device), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, P, C]`` tensor of the features' dtype.  Differentiable in ``features``,
        ``heatmaps`` and ``groups``.

    Autocast: under ``torch.autocast`` ``heatmaps`` and ``groups`` are cast to the dtype of
    ``features`` and the op computes in it (bfloat16 or float16 with float32 accumulation) on every
    backend.
    """
    dtype = autocast.compute_dtype(features)
    features, heatmaps, groups = (autocast.cast(arg, dtype) for arg in (features, heatmaps, groups))
    check_args(features, heatmaps, groups, temperature)
    backend = resolve_backend("part_pool", backend, features.device)
    if backend == "reference":
        with autocast.disabled(features):
            return reference.part_pool(features, heatmaps, groups, temperature)
    if backend == "triton":
        from keypointops.triton import part_pool as triton_part_pool
        forward = triton_part_pool.part_pool_triton
    else:
        forward = torch.ops.keypointops.part_pool
    return forward(features, heatmaps, groups, float(temperature))


if has_ops():
    register_kernels_of("keypointops::part_pool", "keypointops::part_pool_backward")
