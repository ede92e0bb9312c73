"""``keypoint_gather``: what the compiled op (``keypointops.ops``) and the Triton op
(``keypointops.triton``) share: argument checks, fake kernels and the autograd formula."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from keypointops._opdefs.backend import check_float_dtype, check_same_device, check_tensors, register_op_pair


# roi_size * spatial_scale limit (feature pixels) shared with the C++ checks: keeps the adaptive
# sample grid of any keypoint finite and sane.
MAX_BOX_EXTENT = 1e6


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling_args(spatial_scale, roi_size, sampling_ratio, aligned, output_size=None) -> None:
    """Raises unless the scalar arguments are valid (shared with ``keypointops.nn.KeypointGather``);
    a tensor ``roi_size`` is checked by :func:`check_args`."""
    if not _is_number(spatial_scale) or not math.isfinite(spatial_scale) or spatial_scale <= 0:
        raise ValueError(f"keypoint_gather: spatial_scale must be a finite positive number, got "
                         f"{spatial_scale!r}")
    if output_size is not None and (not isinstance(output_size, int) or isinstance(output_size, bool)
                                    or output_size < 1):
        raise ValueError(f"keypoint_gather: output_size must be None or a positive int, got {output_size!r}")
    if not isinstance(roi_size, Tensor):
        if not _is_number(roi_size) or not math.isfinite(roi_size) or roi_size < 0:
            raise ValueError(f"keypoint_gather: roi_size must be a finite number >= 0 or a [B, K] / "
                             f"[B, K, 2] tensor, got {roi_size!r}")
        if roi_size * spatial_scale >= MAX_BOX_EXTENT:
            raise ValueError(f"keypoint_gather: roi_size * spatial_scale must be below {MAX_BOX_EXTENT:g} "
                             f"feature pixels, got {roi_size * spatial_scale:g}")
    if not isinstance(sampling_ratio, int) or isinstance(sampling_ratio, bool) or not (
            sampling_ratio == -1 or sampling_ratio > 0):
        raise ValueError(f"keypoint_gather: sampling_ratio must be -1 (adaptive) or a positive int, "
                         f"got {sampling_ratio!r}")
    if not isinstance(aligned, bool):
        raise TypeError(f"keypoint_gather: aligned must be a bool, got {type(aligned).__name__}")


def roi_sizes_of(roi_size, features: Tensor, keypoints: Tensor) -> Tensor | None:
    """A tensor ``roi_size`` ([B, K]: square boxes, [B, K, 2]: (side x, side y)) as the ops'
    ``roi_sizes`` [B, K, 2] (None for a number); raises on a bad shape, dtype or device."""
    if not isinstance(roi_size, Tensor):
        return None
    expected = tuple(keypoints.shape[:2])
    if tuple(roi_size.shape) not in (expected, expected + (2,)):
        raise ValueError(f"keypoint_gather: roi_size as a tensor must be [B, K] = {list(expected)} or "
                         f"[B, K, 2], got shape {list(roi_size.shape)}")
    if not roi_size.is_floating_point():
        raise ValueError(f"keypoint_gather: roi_size must be floating point, got {roi_size.dtype}")
    check_same_device("keypoint_gather", "features", features.device, "roi_size", roi_size.device)
    return roi_size if roi_size.dim() == 3 else roi_size[..., None].expand(*expected, 2)


def check_args(features, keypoints, spatial_scale, roi_size, sampling_ratio, aligned, valid,
               output_size=None):
    """Raises on bad input; returns ``valid`` (from the confidences when not given)."""
    check_tensors("keypoint_gather", features=features, keypoints=keypoints)
    if features.dim() != 4:
        raise ValueError(f"keypoint_gather: features must be [B, C, H, W], got shape {list(features.shape)}")
    check_float_dtype("keypoint_gather", "features", features)
    if features.shape[2] == 0 or features.shape[3] == 0:
        raise ValueError(f"keypoint_gather: features must have a non-empty H x W map, got shape "
                         f"{list(features.shape)}")
    if keypoints.dim() != 3 or keypoints.shape[2] not in (2, 3):
        raise ValueError(f"keypoint_gather: keypoints must be [B, K, 2] or [B, K, 3], got shape "
                         f"{list(keypoints.shape)}")
    if keypoints.shape[0] != features.shape[0]:
        raise ValueError(f"keypoint_gather: keypoints hold {keypoints.shape[0]} images but features "
                         f"hold {features.shape[0]}")
    if not keypoints.is_floating_point():
        raise ValueError(f"keypoint_gather: keypoints must be floating point, got {keypoints.dtype}")
    check_same_device("keypoint_gather", "features", features.device, "keypoints", keypoints.device)
    check_sampling_args(spatial_scale, roi_size, sampling_ratio, aligned, output_size)
    roi_sizes_of(roi_size, features, keypoints)
    if valid is None:
        return keypoints[..., 2] > 0 if keypoints.shape[2] == 3 else None
    if not isinstance(valid, Tensor):
        raise TypeError(f"keypoint_gather: valid must be a bool Tensor or None, got {type(valid).__name__}")
    if valid.dtype != torch.bool or valid.shape != keypoints.shape[:2]:
        raise ValueError(f"keypoint_gather: valid must be a [B, K] = {list(keypoints.shape[:2])} bool "
                         f"tensor, got {valid.dtype} of shape {list(valid.shape)}")
    check_same_device("keypoint_gather", "features", features.device, "valid", valid.device)
    return valid


def uses_channels_last(features: Tensor) -> bool:
    """The layout the kernels read ``features`` in and write the gradient in (as the C++ rule)."""
    return not features.is_contiguous() and features.is_contiguous(memory_format=torch.channels_last)


# --- torch.library registrations: fake kernels and the autograd formula --------------------------

def _fake_forward(features, keypoints, valid, roi_sizes, spatial_scale, roi_size, sampling_ratio, aligned,
                  output_size):
    for name, tensor in (("keypoints", keypoints), ("valid", valid), ("roi_sizes", roi_sizes)):
        if tensor is not None:
            check_same_device("keypoint_gather", "features", features.device, name, tensor.device,
                              error=RuntimeError)
    nodes = keypoints.shape[1] * output_size * output_size
    return features.new_empty((features.shape[0], nodes, features.shape[1]))


def _fake_backward(grad_out, keypoints, valid, roi_sizes, features_size, channels_last, spatial_scale,
                   roi_size, sampling_ratio, aligned, output_size):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(features_size, dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=memory_format)


def _setup_context(ctx, inputs, output):
    features, keypoints, valid, roi_sizes, spatial_scale, roi_size, sampling_ratio, aligned, output_size = inputs
    ctx.save_for_backward(keypoints, valid, roi_sizes)
    ctx.features_size = features.shape
    ctx.channels_last = uses_channels_last(features)
    ctx.sampling = (spatial_scale, roi_size, sampling_ratio, aligned, output_size)


def _backward(ctx, backward_op, grad_out):
    keypoints, valid, roi_sizes = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad_features = backward_op(grad_out, keypoints, valid, roi_sizes, ctx.features_size,
                                    ctx.channels_last, *ctx.sampling)
    return grad_features, None, None, None, None, None, None, None, None


def register_kernels_of(forward_name: str, backward_name: str) -> None:
    """Registers the fake kernels and the autograd formula of a (forward, backward) op pair.

    Used for the compiled ops and for the Triton ops, which share their schemas.
    """
    register_op_pair(forward_name, backward_name, _fake_forward, _fake_backward, _setup_context, _backward)
