"""Triton kernels of ``keypoint_gather`` and the ``keypointops::keypoint_gather_triton`` ops.

A node is a keypoint's box (``output_size`` S = 1) or one of its ``S x S`` bins (node
``k * S * S + py * S + px``: torchvision's RoIAlign bins, each a box of its own); below
"keypoint" means node.  Box sides are read per keypoint from ``roi_sizes`` (a scalar
``roi_size`` is passed as a stride-0 view of one pair: one set of kernel specialisations for both).
Forward: one program per (keypoint, block of channels).  It walks the keypoint's RoIAlign sample
grid with torchvision's rules, computing each sample's four bilinear weights once for the whole
channel block, and writes ``out[b, k, block]`` node-major.  Any strides of ``features`` are read
in place (contiguous, channels_last or other).
Backward: one program per (image, block of channels), which owns that slice of the gradient: it
walks the image's keypoints in order and adds ``weight * grad_out[b, k, c] / count`` at the four
corners of each sample.  No other program touches the slice, so the adds (relaxed atomics, which
need not wait for a read) land in a fixed order: the result is deterministic.  float16/bfloat16
gradients are accumulated in a float32 buffer.
Memory: the output ``[B, K * S * S, C]``, the gradient ``[B, C, H, W]`` (+ its float32 buffer for
reduced precision); nothing per sample.
"""
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from keypointops._opdefs.keypoint_gather import check_args, register_kernels_of

MAX_BLOCK_C = 256


@triton.jit
def _box_axis(center, half_size, scale, sampling_ratio, size, ALIGNED: tl.constexpr,
              ADAPTIVE: tl.constexpr):
    """torchvision's box along one axis: (start, extent, grid).  grid is 0 when the box is not
    finite, its half side is MAX_HALF_BOX_EXTENT feature pixels or more, or it lies entirely
    beyond [-2, size + 1] (no sample can reach the map)."""
    if ALIGNED:
        start = (center - half_size) * scale - 0.5
        end = (center + half_size) * scale - 0.5
        extent = end - start
    else:
        start = (center - half_size) * scale
        end = (center + half_size) * scale
        extent = tl.maximum(end - start, 1.0)
    half_extent = half_size * scale
    reachable = ((start - start) == 0) & ((extent - extent) == 0) & (start <= size + 1) & (
        start + extent >= -2) & (half_extent < 5e5) & (half_extent > -5e5)
    if ADAPTIVE:
        grid = tl.ceil(tl.where(reachable, extent, 0.0)).to(tl.int32)
    else:
        grid = sampling_ratio
    return start, extent, tl.where(reachable, grid, 0)


@triton.jit
def _bin_axis(start, extent, grid, p, bins, sampling_ratio, ADAPTIVE: tl.constexpr):
    """Bin p of ``bins`` along a box axis, a box of its own (torchvision's RoIAlign bins): start
    ``start + p * (extent / bins)``, extent ``extent / bins``, ``ceil`` of it samples when adaptive;
    a box without samples keeps none."""
    bin_extent = extent / bins.to(extent.dtype)
    bin_start = start + p.to(extent.dtype) * bin_extent
    if ADAPTIVE:
        bin_grid = tl.ceil(tl.where(grid != 0, bin_extent, 0.0)).to(tl.int32)
    else:
        bin_grid = sampling_ratio
    return bin_start, bin_extent, tl.where(grid != 0, bin_grid, 0)


@triton.jit
def _sample_range(start, extent, grid, size, EPS: tl.constexpr):
    """A range [first, last) of sample indices holding every sample whose coordinate lies in
    [-1, size], widened by a margin for rounding (each sample is still tested): it keeps the loops
    short when a large adaptive grid reaches past the map."""
    spread = (grid > 0) & (extent > 0)
    start = tl.where(spread, start, 0.0)
    grid_f = grid.to(start.dtype)
    per_pixel = grid_f / tl.where(spread, extent, 1.0)
    slack = 8 * EPS * (tl.abs(start) + tl.abs(extent) + size + 2)
    lo = (-1.0 - slack - start) * per_pixel - 1.5
    hi = (size + slack - start) * per_pixel + 1.5
    first = tl.where(spread, tl.minimum(tl.maximum(lo, 0.0), grid_f), 0.0)
    last = tl.where(spread, tl.maximum(tl.minimum(hi, grid_f), 0.0), grid_f)
    return first.to(tl.int32), last.to(tl.int32)


@triton.jit
def _sample_taps(start, extent, grid, i, size, ACC: tl.constexpr):
    """Sample i of an axis under torchvision's bilinear rule: (inside, low, high, weight of high).
    Outside [-1, size] it contributes nothing; it clamps to >= 0; from size - 1 on, all on size - 1."""
    p = start + (i + 0.5) * extent / grid.to(ACC)
    inside = (p >= -1.0) & (p <= size)
    p = tl.where(inside, tl.maximum(p, 0.0), 0.0)
    low = p.to(tl.int32)
    at_end = low >= size - 1
    low = tl.where(at_end, size - 1, low)
    high = tl.where(at_end, low, low + 1)
    frac = tl.where(at_end, 0.0, p - low.to(ACC))
    return inside, low.to(tl.int64), high.to(tl.int64), frac


@triton.jit
def _keypoint_boxes(keypoints_ptr, valid_ptr, sizes_ptr, b, node, bins, stride_kb, stride_kk,
                    stride_kd, stride_vb, stride_vk, stride_sb, stride_sk, stride_sd, H, W,
                    spatial_scale, sampling_ratio, ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr,
                    HAS_VALID: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr):
    """Both box axes of node ``node`` of image b (bin (py, px) of keypoint k) and the index
    ranges of its samples that can reach the map; an invalid keypoint gets no sample rows."""
    k = node // (bins * bins)
    py = (node % (bins * bins)) // bins
    px = node % bins
    scale = tl.full((), spatial_scale, ACC)
    point = keypoints_ptr + b * stride_kb + k * stride_kk
    x = tl.load(point).to(ACC)
    y = tl.load(point + stride_kd).to(ACC)
    side = sizes_ptr + b * stride_sb + k * stride_sk
    half_x = tl.load(side).to(ACC) * 0.5
    half_y = tl.load(side + stride_sd).to(ACC) * 0.5
    x_start, x_extent, x_grid = _box_axis(x, half_x, scale, sampling_ratio, W, ALIGNED, ADAPTIVE)
    y_start, y_extent, y_grid = _box_axis(y, half_y, scale, sampling_ratio, H, ALIGNED, ADAPTIVE)
    x_start, x_extent, x_grid = _bin_axis(x_start, x_extent, x_grid, px, bins, sampling_ratio, ADAPTIVE)
    y_start, y_extent, y_grid = _bin_axis(y_start, y_extent, y_grid, py, bins, sampling_ratio, ADAPTIVE)
    if HAS_VALID:
        y_grid = tl.where(tl.load(valid_ptr + b * stride_vb + k * stride_vk) != 0, y_grid, 0)
    iy_first, iy_last = _sample_range(y_start, y_extent, y_grid, H, EPS)
    ix_first, ix_last = _sample_range(x_start, x_extent, x_grid, W, EPS)
    return (x_start, x_extent, x_grid, ix_first, ix_last), (y_start, y_extent, y_grid, iy_first, iy_last)


@triton.jit
def _sample_corners(x_axis, y_axis, ix, iy, H, W, stride_h, stride_w, c_mask, ACC: tl.constexpr):
    """Sample (iy, ix) of a keypoint: its mask over the channel block, and the offsets and
    bilinear weights (torchvision's w1..w4) of its four corners."""
    x_start, x_extent, x_grid, _, _ = x_axis
    y_start, y_extent, y_grid, _, _ = y_axis
    y_in, y_low, y_high, ly = _sample_taps(y_start, y_extent, y_grid, iy, H, ACC)
    x_in, x_low, x_high, lx = _sample_taps(x_start, x_extent, x_grid, ix, W, ACC)
    hy = 1.0 - ly
    hx = 1.0 - lx
    mask = tl.where(y_in & x_in, c_mask, False)
    offsets = (y_low * stride_h + x_low * stride_w, y_low * stride_h + x_high * stride_w,
               y_high * stride_h + x_low * stride_w, y_high * stride_h + x_high * stride_w)
    return mask, offsets, (hy * hx, hy * lx, ly * hx, ly * lx)


@triton.jit
def _forward_kernel(features_ptr, keypoints_ptr, valid_ptr, sizes_ptr, out_ptr, K, bins, C, H, W,
                    stride_b, stride_c, stride_h, stride_w, stride_kb, stride_kk, stride_kd,
                    stride_vb, stride_vk, stride_sb, stride_sk, stride_sd, spatial_scale: tl.float64,
                    sampling_ratio, ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr,
                    HAS_VALID: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    node = tl.program_id(0).to(tl.int64)  # b * K + k over the nodes (K: nodes per image)
    b = node // K
    k = node % K
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x_axis, y_axis = _keypoint_boxes(
        keypoints_ptr, valid_ptr, sizes_ptr, b, k, bins, stride_kb, stride_kk, stride_kd, stride_vb,
        stride_vk, stride_sb, stride_sk, stride_sd, H, W, spatial_scale, sampling_ratio,
        ALIGNED, ADAPTIVE, HAS_VALID, ACC, EPS)
    _, _, x_grid, ix_first, ix_last = x_axis
    _, _, y_grid, iy_first, iy_last = y_axis
    image = features_ptr + b * stride_b + c.to(tl.int64) * stride_c
    acc = tl.zeros([BLOCK_C], ACC)
    for iy in range(iy_first, iy_last):
        for ix in range(ix_first, ix_last):
            mask, offsets, weights = _sample_corners(x_axis, y_axis, ix, iy, H, W, stride_h, stride_w,
                                                     c_mask, ACC)
            for corner in tl.static_range(4):
                value = tl.load(image + offsets[corner], mask=mask, other=0.0).to(ACC)
                acc += weights[corner] * value
    count = tl.maximum(y_grid * x_grid, 1).to(ACC)
    tl.store(out_ptr + node * C + c, (acc / count).to(out_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _backward_kernel(grad_out_ptr, keypoints_ptr, valid_ptr, sizes_ptr, grad_ptr, K, bins, C, H, W,
                     stride_b, stride_c, stride_h, stride_w, stride_kb, stride_kk, stride_kd,
                     stride_vb, stride_vk, stride_sb, stride_sk, stride_sd, spatial_scale: tl.float64,
                     sampling_ratio, ALIGNED: tl.constexpr, ADAPTIVE: tl.constexpr,
                     HAS_VALID: tl.constexpr, ACC: tl.constexpr, EPS: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    image = grad_ptr + b * stride_b + c.to(tl.int64) * stride_c
    for k in range(0, K):
        x_axis, y_axis = _keypoint_boxes(
            keypoints_ptr, valid_ptr, sizes_ptr, b, k, bins, stride_kb, stride_kk, stride_kd,
            stride_vb, stride_vk, stride_sb, stride_sk, stride_sd, H, W, spatial_scale,
            sampling_ratio, ALIGNED, ADAPTIVE, HAS_VALID, ACC, EPS)
        _, _, x_grid, ix_first, ix_last = x_axis
        _, _, y_grid, iy_first, iy_last = y_axis
        count = tl.maximum(y_grid * x_grid, 1).to(ACC)
        g = tl.load(grad_out_ptr + (b * K + k) * C + c, mask=c_mask, other=0.0).to(ACC) / count
        for iy in range(iy_first, iy_last):
            for ix in range(ix_first, ix_last):
                mask, offsets, weights = _sample_corners(x_axis, y_axis, ix, iy, H, W, stride_h,
                                                         stride_w, c_mask, ACC)
                for corner in tl.static_range(4):
                    value = (weights[corner] * g).to(grad_ptr.dtype.element_ty)
                    tl.atomic_add(image + offsets[corner], value, mask=mask, sem="relaxed")


def _accumulation(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def _epsilon(acc) -> float:
    return torch.finfo(torch.float64 if acc == tl.float64 else torch.float32).eps


def _launch_args(keypoints: Tensor, valid: Optional[Tensor], roi_sizes: Optional[Tensor],
                 spatial_scale: float, roi_size: float, sampling_ratio: int, aligned: bool, acc) -> tuple:
    """(keypoints, valid, sizes pointers), the keypoint, valid, sizes and sampling arguments that
    follow the kernels' shape arguments, and their constexprs.  The sizes are ``roi_sizes`` in the
    accumulation dtype, or the scalar ``roi_size`` as a stride-0 ``[B, K, 2]`` view."""
    acc_dtype = torch.float64 if acc == tl.float64 else torch.float32
    if roi_sizes is None:
        roi_sizes = torch.full((1, 1, 2), roi_size, dtype=acc_dtype, device=keypoints.device).expand(
            *keypoints.shape[:2], 2)
    roi_sizes = roi_sizes.to(acc_dtype)
    valid_args = (valid, *valid.stride()) if valid is not None else (keypoints, 0, 0)
    pointers = (keypoints, valid_args[0], roi_sizes)
    args = (*keypoints.stride(), *valid_args[1:], *roi_sizes.stride(), spatial_scale, sampling_ratio)
    constexprs = dict(ALIGNED=aligned, ADAPTIVE=sampling_ratio <= 0, HAS_VALID=valid is not None, ACC=acc,
                      EPS=_epsilon(acc))
    return pointers, args, constexprs


def _block_c(channels: int) -> int:
    return min(triton.next_power_of_2(max(channels, 1)), MAX_BLOCK_C)


def _check_roi_sizes(roi_sizes: Optional[Tensor], keypoints: Tensor) -> None:
    if roi_sizes is not None and (tuple(roi_sizes.shape) != (*keypoints.shape[:2], 2)
                                  or not roi_sizes.is_floating_point()):
        raise ValueError(f"keypoint_gather: roi_sizes must be a floating point [B, K, 2] = "
                         f"{[*keypoints.shape[:2], 2]} tensor, got {roi_sizes.dtype} of shape "
                         f"{list(roi_sizes.shape)}")


@torch.library.custom_op("keypointops::keypoint_gather_triton", mutates_args=())
def keypoint_gather_triton(features: Tensor, keypoints: Tensor, valid: Optional[Tensor],
                           roi_sizes: Optional[Tensor], spatial_scale: float, roi_size: float,
                           sampling_ratio: int, aligned: bool, output_size: int) -> Tensor:
    check_args(features, keypoints, spatial_scale, roi_size, sampling_ratio, aligned, valid, output_size)
    _check_roi_sizes(roi_sizes, keypoints)
    B, C, H, W = features.shape
    K = keypoints.shape[1] * output_size * output_size
    out = features.new_empty((B, K, C))
    if out.numel() == 0:
        return out
    _, acc = _accumulation(features.dtype)
    pointers, rest, constexprs = _launch_args(keypoints, valid, roi_sizes, spatial_scale, roi_size,
                                              sampling_ratio, aligned, acc)
    block_c = _block_c(C)
    _forward_kernel[(B * K, triton.cdiv(C, block_c))](
        features, *pointers, out, K, output_size, C, H, W, *features.stride(), *rest,
        **constexprs, BLOCK_C=block_c, num_warps=4)
    return out


@torch.library.custom_op("keypointops::keypoint_gather_triton_backward", mutates_args=())
def keypoint_gather_triton_backward(grad_out: Tensor, keypoints: Tensor, valid: Optional[Tensor],
                                    roi_sizes: Optional[Tensor], features_size: Sequence[int],
                                    channels_last: bool, spatial_scale: float, roi_size: float,
                                    sampling_ratio: int, aligned: bool, output_size: int) -> Tensor:
    B, C, H, W = features_size
    K = keypoints.shape[1] * output_size * output_size
    if tuple(grad_out.shape) != (B, K, C):
        raise ValueError(f"keypoint_gather_backward: grad_out must be [B, K * S * S, C] = "
                         f"{[B, K, C]}, got {list(grad_out.shape)}")
    _check_roi_sizes(roi_sizes, keypoints)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    acc_dtype, acc = _accumulation(grad_out.dtype)
    grad = torch.empty(features_size, dtype=acc_dtype, device=grad_out.device,
                       memory_format=memory_format).zero_()
    if grad.numel() and K:
        pointers, rest, constexprs = _launch_args(keypoints, valid, roi_sizes, spatial_scale, roi_size,
                                                  sampling_ratio, aligned, acc)
        block_c = _block_c(C)
        _backward_kernel[(B, triton.cdiv(C, block_c))](
            grad_out.contiguous(), *pointers, grad, K, output_size, C, H, W,
            *grad.stride(), *rest, **constexprs, BLOCK_C=block_c, num_warps=4)
    return grad.to(grad_out.dtype)


register_kernels_of("keypointops::keypoint_gather_triton", "keypointops::keypoint_gather_triton_backward")
