"""Triton kernels of ``window_graph_conv`` and the ``keypointops::window_graph_conv_triton`` ops.

Slot ``w`` of window ``t`` (``t < T'``) reads frame ``t * stride - pad + w * dilation`` (zeros
outside ``[0, T)``); window node ``j = w * N + n``; ``adj_bt`` is ``[R, L]`` (``R = S * L``: ``S``
stacked scales, the window read once for all of them).  Every kernel is a tiled small GEMM whose
gathered operand is read straight from ``x`` (or ``grad_out``) through its strides, masked where
the frame is outside the clip; nothing of size ``[B, T', L, C]`` is built.

- forward, one program per (window (b, t), tile of rows i, tile of channels):
  ``out[b, t, i, c] = sum_j adj_bt[i, j] * x[b, frame(t, j), j % N, c]``
- grad_x, one program per (frame (b, f), tile of nodes, tile of channels), over the slots ``w``
  whose window ``t = (f + pad - w * dilation) / stride`` exists:
  ``grad_x[b, f, n, c] = sum_w sum_i adj_bt[i, w * N + n] * grad_out[b, t, i, c]``
  (one writer per element: deterministic, no atomics)
- grad_adj, one program per (unit, tile of i, tile of j): the sum over the unit's windows and the
  channels of ``grad_out[b, t, i, c] * x[b, frame(t, j), j % N, c]``.  A unit is one window
  (per-window adj), one sample (per-sample adj) or one chunk of windows (shared adj), whose
  partial sums are then added by ``torch.sum`` (deterministic).

Accumulation in float32 (float64 for float64 inputs).  Memory: the outputs, plus at most
``SHARED_ADJ_CHUNKS`` ``[R, L]`` partials for a shared adj.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keypointops._opdefs.window_graph_conv import (check_args, register_kernels_of,
                                                   window_graph_conv_output_length)

__all__ = ["window_graph_conv_triton", "window_graph_conv_triton_backward"]

SHARED_ADJ_CHUNKS = 128  # partial sums of a shared adj's gradient


@triton.jit
def _forward_kernel(x_ptr, adj_ptr, out_ptr, T, T_out, N, C, L, R, pad, dilation, stride,
                    sxb, sxt, sxn, sxc, sab, sat, sai, saj,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                    ACC_DTYPE: tl.constexpr):
    window_id = tl.program_id(0).to(tl.int64)  # b * T' + t
    b = window_id // T_out
    t = window_id % T_out
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_i = offs_i < R
    mask_c = offs_c < C
    adj_bt = adj_ptr + b * sab + t * sat
    acc = tl.zeros((BLOCK_I, BLOCK_C), dtype=ACC_DTYPE)
    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        frame = t * stride - pad + (offs_j // N) * dilation
        valid_j = (offs_j < L) & (frame >= 0) & (frame < T)
        a = tl.load(adj_bt + offs_i[:, None] * sai + offs_j[None, :] * saj,
                    mask=mask_i[:, None] & (offs_j[None, :] < L), other=0.0)
        rows = x_ptr + b * sxb + frame * sxt + (offs_j % N) * sxn
        xv = tl.load(rows[:, None] + offs_c[None, :] * sxc,
                     mask=valid_j[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(a, xv, acc, input_precision="ieee")
    out = out_ptr + (window_id * R + offs_i[:, None]) * C + offs_c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_c[None, :])


@triton.jit
def _grad_x_kernel(grad_out_ptr, adj_ptr, grad_x_ptr, T, T_out, N, C, L, R, window, pad, dilation,
                   stride, sab, sat, sai, saj,
                   BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_C: tl.constexpr,
                   ACC_DTYPE: tl.constexpr):
    frame_id = tl.program_id(0).to(tl.int64)  # b * T + f
    b = frame_id // T
    f = frame_id % T
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_n = offs_n < N
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC_DTYPE)
    for w in range(0, window):
        start = f + pad - w * dilation  # t * stride of the window whose slot w reads frame f
        t = start // stride
        if (start >= 0) & (start % stride == 0) & (t < T_out):
            adj_bt = adj_ptr + b * sab + t * sat + (w * N + offs_n[:, None]) * saj
            grad_bt = grad_out_ptr + (b * T_out + t) * R * C + offs_c[None, :]
            for i0 in range(0, R, BLOCK_I):
                offs_i = i0 + tl.arange(0, BLOCK_I)
                mask_i = offs_i < R
                a_t = tl.load(adj_bt + offs_i[None, :] * sai, mask=mask_n[:, None] & mask_i[None, :],
                              other=0.0)
                g = tl.load(grad_bt + offs_i[:, None] * C, mask=mask_i[:, None] & mask_c[None, :],
                            other=0.0)
                acc = tl.dot(a_t, g, acc, input_precision="ieee")
    out = grad_x_ptr + (frame_id * N + offs_n[:, None]) * C + offs_c[None, :]
    tl.store(out, acc.to(grad_x_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _grad_adj_kernel(grad_out_ptr, x_ptr, target_ptr, T, T_out, N, C, L, R, pad, dilation, stride,
                     windows, windows_per_unit, sxb, sxt, sxn, sxc,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
                     ACC_DTYPE: tl.constexpr):
    unit = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < R
    mask_j = offs_j < L
    slot_frame = (offs_j // N) * dilation - pad  # frame of column j, relative to t * stride
    node = offs_j % N
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=ACC_DTYPE)
    first = unit * windows_per_unit
    last = tl.minimum(first + windows_per_unit, windows)
    for window_id in range(first, last):
        b = window_id // T_out
        t = window_id % T_out
        frame = t * stride + slot_frame
        valid_j = mask_j & (frame >= 0) & (frame < T)
        x_cols = x_ptr + b * sxb + frame * sxt + node * sxn
        grad_rows = grad_out_ptr + (window_id * R + offs_i) * C
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            g = tl.load(grad_rows[:, None] + offs_c[None, :], mask=mask_i[:, None] & mask_c[None, :],
                        other=0.0)
            xt = tl.load(x_cols[None, :] + offs_c[:, None] * sxc,
                         mask=mask_c[:, None] & valid_j[None, :], other=0.0)
            acc = tl.dot(g, xt, acc, input_precision="ieee")
    out = target_ptr + (unit * R + offs_i[:, None]) * L + offs_j[None, :]
    tl.store(out, acc.to(target_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_j[None, :])


def _block(size: int, cap: int) -> int:
    """Power-of-two tile edge for ``size``, at least 16 (tl.dot's minimum) and at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(max(size, 1))))


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _adj_strides(adj: Tensor) -> tuple[int, int, int, int]:
    """Strides (sample, window, row, column) of adj, 0 along the dimensions it is shared over."""
    sai, saj = adj.stride(-2), adj.stride(-1)
    sab = adj.stride(0) if adj.dim() >= 3 else 0
    sat = adj.stride(1) if adj.dim() == 4 else 0
    return sab, sat, sai, saj


@torch.library.custom_op("keypointops::window_graph_conv_triton", mutates_args=())
def window_graph_conv_triton(x: Tensor, adj: Tensor, window: int, dilation: int, stride: int) -> Tensor:
    """Forward of :func:`keypointops.window_graph_conv` in Triton (same schema as the compiled op)."""
    check_args(x, adj, window, dilation, stride)
    B, T, N, C = x.shape
    L, R, T_out = window * N, adj.size(-2), window_graph_conv_output_length(T, window, dilation, stride)
    out = torch.empty((B, T_out, R, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_i, block_j, block_c = _block(R, 64), _block(L, 32), _block(C, 64)
    grid = (B * T_out, triton.cdiv(R, block_i), triton.cdiv(C, block_c))
    _forward_kernel[grid](x, adj, out, T, T_out, N, C, L, R, (window - 1) * dilation // 2, dilation,
                          stride, *x.stride(), *_adj_strides(adj),
                          BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_C=block_c,
                          ACC_DTYPE=_acc_dtype(x.dtype))
    return out


@torch.library.custom_op("keypointops::window_graph_conv_triton_backward", mutates_args=())
def window_graph_conv_triton_backward(grad_out: Tensor, x: Tensor, adj: Tensor, window: int,
                                      dilation: int, stride: int, compute_grad_x: bool,
                                      compute_grad_adj: bool) -> tuple[Tensor, Tensor]:
    """Backward of :func:`window_graph_conv_triton`: (grad_x, grad_adj), ``[0]`` when not asked for."""
    check_args(x, adj, window, dilation, stride)
    B, T, N, C = x.shape
    L, R, T_out = window * N, adj.size(-2), window_graph_conv_output_length(T, window, dilation, stride)
    if grad_out.shape != (B, T_out, R, C):
        raise ValueError(f"window_graph_conv_backward: grad_out must be [B, T', R, C] = "
                         f"{[B, T_out, R, C]}, got {list(grad_out.shape)}")
    grad_out = grad_out.contiguous()
    pad = (window - 1) * dilation // 2
    acc_dtype = _acc_dtype(x.dtype)
    grad_x = x.new_empty(0)
    if compute_grad_x:
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if grad_x.numel() and L:
            block_n, block_i, block_c = _block(N, 32), _block(R, 32), _block(C, 64)
            grid = (B * T, triton.cdiv(N, block_n), triton.cdiv(C, block_c))
            _grad_x_kernel[grid](grad_out, adj, grad_x, T, T_out, N, C, L, R, window, pad, dilation,
                                 stride, *_adj_strides(adj), BLOCK_N=block_n, BLOCK_I=block_i,
                                 BLOCK_C=block_c, ACC_DTYPE=acc_dtype)
    grad_adj = adj.new_empty(0)
    if compute_grad_adj and B * T_out == 0:  # no window: zeros (also B of them for a [B, R, L] adj)
        grad_adj = torch.zeros_like(adj, memory_format=torch.contiguous_format)
    elif compute_grad_adj:
        windows = B * T_out
        if adj.dim() == 4:
            per_unit = 1
        elif adj.dim() == 3:
            per_unit = T_out
        else:
            per_unit = max(1, triton.cdiv(windows, SHARED_ADJ_CHUNKS))
        units = triton.cdiv(windows, per_unit)
        # Accumulated in the accumulation dtype, cast at the end (one rounding for half inputs).
        acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
        targets = torch.zeros((units, R, L), dtype=acc_torch, device=x.device)
        if units and L and C:
            block_i, block_j, block_c = _block(R, 32), _block(L, 32), _block(C, 64)
            grid = (units, triton.cdiv(R, block_i), triton.cdiv(L, block_j))
            _grad_adj_kernel[grid](grad_out, x, targets, T, T_out, N, C, L, R, pad, dilation, stride,
                                   windows, per_unit, *x.stride(), BLOCK_I=block_i, BLOCK_J=block_j,
                                   BLOCK_C=block_c, ACC_DTYPE=acc_dtype)
        if adj.dim() == 2:
            targets = targets.sum(0)
        grad_adj = targets.reshape(adj.shape).to(adj.dtype)
    return grad_x, grad_adj


register_kernels_of("keypointops::window_graph_conv_triton",
                    "keypointops::window_graph_conv_triton_backward")
