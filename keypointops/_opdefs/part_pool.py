"""``part_pool``: what the compiled op (``keypointops.ops``) and the Triton op
(``keypointops.triton``) share: argument checks, fake kernels and the autograd formula."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from keypointops._opdefs.backend import check_float_dtype, check_same_device, check_tensors, register_op_pair


def check_args(features, heatmaps, groups, temperature) -> None:
    check_tensors("part_pool", features=features, heatmaps=heatmaps)
    if features.dim() != 4:
        raise ValueError(f"part_pool: features must be [B, C, H, W], got shape {list(features.shape)}")
    if heatmaps.dim() != 4:
        raise ValueError(f"part_pool: heatmaps must be [B, J, H, W], got shape {list(heatmaps.shape)}")
    check_float_dtype("part_pool", "features", features)
    batch, _, height, width = features.shape
    if heatmaps.size(0) != batch:
        raise ValueError(f"part_pool: heatmaps has {heatmaps.size(0)} images but features has {batch}")
    if heatmaps.shape[2:] != features.shape[2:]:
        raise ValueError(f"part_pool: heatmaps spatial size {list(heatmaps.shape[2:])} differs from "
                         f"features spatial size {[height, width]}; resize the heatmaps to the "
                         "feature grid first")
    if height * width == 0:
        raise ValueError(f"part_pool: features and heatmaps must have H * W > 0, got {[height, width]}")
    _check_like_features("heatmaps", heatmaps, features)
    if groups is not None:
        if not isinstance(groups, Tensor):
            raise TypeError(f"part_pool: groups must be a Tensor or None, got {type(groups).__name__}")
        if groups.dim() != 2 or groups.size(1) != heatmaps.size(1):
            raise ValueError(f"part_pool: groups must be [P, J] = [P, {heatmaps.size(1)}] (J = heatmap "
                             f"channels), got shape {list(groups.shape)}")
        _check_like_features("groups", groups, features)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"part_pool: temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"part_pool: temperature must be a finite float > 0, got {temperature!r}")


def _check_like_features(name: str, tensor: Tensor, features: Tensor) -> None:
    if tensor.dtype != features.dtype:
        raise ValueError(f"part_pool: {name} must have the dtype of features ({features.dtype}), "
                         f"got {tensor.dtype}")
    check_same_device("part_pool", "features", features.device, name, tensor.device)


# --- torch.library registrations: fake kernels and the autograd formula --------------------------

def grad_features_format(features: Tensor) -> torch.memory_format:
    """The layout every backend gives grad_features: channels_last for channels_last features."""
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _fake_forward(features, heatmaps, groups, temperature):
    parts = heatmaps.size(1) if groups is None else groups.size(0)
    batch, channels = features.shape[:2]
    return features.new_empty(batch, parts, channels)


def _fake_backward(grad_out, features, heatmaps, groups, temperature, output_mask):
    need_features, need_heatmaps, need_groups = output_mask
    return (torch.empty_like(features, memory_format=grad_features_format(features))
            if need_features else features.new_empty(0),
            features.new_empty(heatmaps.shape if need_heatmaps else (0,)),
            features.new_empty(groups.shape if need_groups and groups is not None else (0,)))


def _setup_context(ctx, inputs, output):
    """Saves the inputs only: every backend's backward recomputes the probabilities from them."""
    features, heatmaps, groups, temperature = inputs
    ctx.save_for_backward(features, heatmaps, groups)
    ctx.temperature = temperature


def _backward(ctx, backward_op, grad_out):
    features, heatmaps, groups = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            groups is not None and ctx.needs_input_grad[2]]
    grads = backward_op(grad_out, features, heatmaps, groups, ctx.temperature, mask)
    return tuple(grad if need else None for grad, need in zip(grads, mask)) + (None,)


def register_kernels_of(forward_name: str, backward_name: str) -> None:
    """Registers the fake kernels and the autograd formula of a (forward, backward) op pair.

    Used for the compiled ops and for the Triton ops, which share their schemas.
    """
    register_op_pair(forward_name, backward_name, _fake_forward, _fake_backward, _setup_context, _backward)
