"""``keypoint_gather``: fused keypoint RoIAlign-to-node gather (torchvision RoIAlign: one bin, or an
``S x S`` patch per keypoint)."""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops import reference
from keypointops._extension import has_ops
from keypointops._opdefs import autocast
from keypointops._opdefs.backend import resolve_backend
from keypointops._opdefs.keypoint_gather import check_args, register_kernels_of, roi_sizes_of

__all__ = ["keypoint_gather"]


def keypoint_gather(features: Tensor, keypoints: Tensor, spatial_scale: float, *,
                    roi_size: float | Tensor = 1.0, sampling_ratio: int = 2, aligned: bool = True,
                    valid: Tensor | None = None, output_size: int | None = None,
                    backend: str = "auto") -> Tensor:
    r"""Samples a feature vector (or an ``S x S`` patch) at every keypoint: RoIAlign, node-major.

    For keypoint ``k`` of image ``b`` the result is torchvision's
    ``roi_align(features, box, output_size, spatial_scale, sampling_ratio, aligned)`` for the box
    ``[x - w/2, y - h/2, x + w/2, y + h/2]`` (input-image pixels; ``w = h = roi_size``, or the
    keypoint's own sizes when ``roi_size`` is a tensor).  With one bin (``output_size`` None or 1):
    the mean of ``grid_h * grid_w`` bilinear samples on the regular grid of the box scaled by
    ``spatial_scale`` (shifted by -0.5 feature pixel when ``aligned``; at least one feature pixel
    wide when not).  With ``output_size=S`` the box is split into ``S x S`` equal bins and each
    bin is such a mean over its own grid (torchvision's RoIAlign exactly: bin ``(py, px)`` starts at
    ``start + p * extent / S`` on each axis).  ``grid = sampling_ratio``, or with
    ``sampling_ratio=-1`` (adaptive) ``ceil`` of the bin size in feature pixels as computed in
    floating point, as torchvision does
    (so at an exactly integral size rounding may change it by one between devices, and an aligned
    box of size 0 has no samples and gives 0, as in torchvision).  With ``roi_size=0`` and a fixed
    ``sampling_ratio`` every sample lands on the keypoint: one bilinear sample there.  Border
    rules are torchvision's: a sample beyond ``[-1, H] x [-1, W]`` contributes 0, coordinates in
    ``[-1, 0)`` clamp to 0 and from ``H - 1`` (``W - 1``) on the last row (column) is used.

    The result is written directly as ``[B, K, C]`` (graph node features): no ``[B*K, C, 1, 1]``
    intermediate, no permute; patches as ``[B, K, S, S, C]`` (each bin a node), returned as its
    ``[B, K, C, S, S]`` view (torchvision's per-box layout; ``.contiguous()`` copies it into that
    memory layout).  The compiled kernels reduce each keypoint's sample grid to
    separable per-axis weights once and reuse them for every channel (the Triton kernels compute
    each sample's weights once per block of channels); ``features`` may be contiguous or
    channels_last, read in place (the CUDA and Triton kernels read any strides).  Backward gives the gradient of ``features`` only
    (``keypoints`` are not differentiated): it recomputes the weights and scatters ``grad_out``.
    Every backend's backward is bitwise deterministic: the CPU kernel gives each (image, channel
    block) to one thread, the CUDA and Triton kernels give each (image, channel) slice of the
    gradient to one thread that adds its keypoints in a fixed order (float32 accumulation for
    float16/bfloat16).

    Args:
        features: ``[B, C, H, W]`` feature map, float32, float64, float16 or bfloat16 (the last
            two summed in float32 by every backend).
        keypoints: ``[B, K, 2]`` ``(x, y)`` or ``[B, K, 3]`` ``(x, y, confidence)`` in input-image
            pixels, any floating dtype (converted to the accumulation dtype), any strides.
        spatial_scale: feature pixels per input pixel (``1 / stride``), finite and positive.
        roi_size: side of the box in input pixels, finite and >= 0; or per keypoint a ``[B, K]``
            tensor (square boxes, e.g. scaled by each person's height) or ``[B, K, 2]`` (sides
            along x and y), floating point, not differentiated.  A keypoint whose size is not
            finite, or whose half side is 5e5 feature pixels or more, gives zeros.
        sampling_ratio: samples per axis, or -1 for adaptive.
        aligned: torchvision's ``aligned`` (pixel-centre convention).
        output_size: None (one bin, result ``[B, K, C]``) or ``S`` (an ``S x S`` RoIAlign grid
            per keypoint, result ``[B, K, C, S, S]``).
        valid: optional ``[B, K]`` bool; invalid keypoints give zeros and no gradient.  Defaults
            to ``confidence > 0`` for ``[B, K, 3]`` keypoints and to all valid otherwise.  A
            keypoint with a non-finite coordinate also gives zeros.
        backend: ``"auto"`` (compiled kernel for the tensor's device), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, K, C]`` (or ``[B, K, C, S, S]``) tensor of ``features``' dtype.

    Autocast: under ``torch.autocast`` the op computes in the dtype of ``features`` (bfloat16 or
    float16 with float32 accumulation) on every backend; ``keypoints`` and ``valid`` are never cast.
    """
    features = autocast.cast(features, autocast.compute_dtype(features))
    valid = check_args(features, keypoints, spatial_scale, roi_size, sampling_ratio, aligned, valid, output_size)
    backend = resolve_backend("keypoint_gather", backend, features.device)
    if backend == "reference":
        with autocast.disabled(features):
            return reference.keypoint_gather(features, keypoints, spatial_scale, roi_size=roi_size,
                                             sampling_ratio=sampling_ratio, aligned=aligned, valid=valid,
                                             output_size=output_size)
    if backend == "triton":
        from keypointops.triton import keypoint_gather as triton_keypoint_gather
        forward = triton_keypoint_gather.keypoint_gather_triton
    else:
        forward = torch.ops.keypointops.keypoint_gather
    roi_sizes = roi_sizes_of(roi_size, features, keypoints)
    bins = output_size or 1
    out = forward(features, keypoints, valid, roi_sizes, float(spatial_scale),
                  0.0 if roi_sizes is not None else float(roi_size), int(sampling_ratio), bool(aligned), bins)
    if output_size is None:
        return out
    batch, num_keypoints, channels = features.shape[0], keypoints.shape[1], features.shape[1]
    return out.view(batch, num_keypoints, bins, bins, channels).permute(0, 1, 4, 2, 3)


if has_ops():
    register_kernels_of("keypointops::keypoint_gather", "keypointops::keypoint_gather_backward")
