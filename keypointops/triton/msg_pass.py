"""Triton kernels of ``msg_pass`` and the ops ``keypointops::msg_pass_triton`` (+ ``_backward``).

Forward: one program per (destination node v, block of BLOCK_C channels) loops over the CSR segment
``col[rowptr[v]:rowptr[v+1]]`` in tiles of BLOCK_E edges: it gathers a [BLOCK_E, BLOCK_C] tile of x,
forms m = relu(x) + eps and s = t * m, and folds the tile into an online softmax (running max M,
sum Z = sum exp(s - M), numerator A = sum exp(s - M) * m, rescaled when M grows); out = A / Z.
M and Z are saved for backward (in the accumulation dtype: float32, float64 for float64 x).
Backward: one program per (NODES_PER_PROGRAM consecutive source nodes u, channel block) walks the
transposed CSR (the targets v of the edges leaving u) with w = exp(s_u - M_v), q_v = grad_out_v / Z_v,
r_v = q_v * out_v:  grad_m_u = sum_v w (q_v (1 + s_u) - t r_v),  grad_t += m_u sum_v w (q_v m_u - r_v),
grad_x_u = grad_m_u * (x_u > 0).  Each row of grad_x has one writer; each program writes its grad_t
partial to its own row of [num_programs, C], summed afterwards row by row in a fixed order: no
atomics, bitwise deterministic.  Edge indices outside [0, N) and rowptr entries outside [0, E] are
skipped / clamped, never read through (index contents are only validated on the CPU).
Memory: forward out [N, C] + row_max, row_sum [N, C]; backward grad_x [N, C] and the grad_t
partials [ceil(N / NODES_PER_PROGRAM), C]; nothing of size E x C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keypointops.ops._backend import triton_available
from keypointops.ops.msg_pass import register_kernels_of

__all__ = ["msg_pass_triton", "msg_pass_triton_backward"]

BLOCK_E = 8               # edges per gathered tile (KMPNet graphs have in-degree 2-5)
MAX_BLOCK_C = 64          # channels per program
NODES_PER_PROGRAM = 32    # backward: consecutive source nodes per program (one grad_t partial row)
SUM_BLOCK_ROWS = 64       # rows of grad_t partials per step of the final sum


@triton.jit
def _forward_kernel(x_ptr, rowptr_ptr, col_ptr, t_ptr, out_ptr, row_max_ptr, row_sum_ptr,
                    num_nodes, num_edges, channels,
                    EPS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
    acc_dtype = t_ptr.dtype.element_ty
    v = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    t = tl.load(t_ptr + c, mask=c_mask, other=0.0)
    eps = tl.full([BLOCK_C], EPS, acc_dtype)
    e_begin = tl.maximum(tl.load(rowptr_ptr + v), 0)
    e_end = tl.minimum(tl.load(rowptr_ptr + v + 1), num_edges)
    row_max = tl.full([BLOCK_C], float("-inf"), acc_dtype)
    row_sum = tl.zeros([BLOCK_C], acc_dtype)
    weighted = tl.zeros([BLOCK_C], acc_dtype)
    valid_edges = tl.zeros([BLOCK_E], tl.int32)
    for e0 in range(e_begin, e_end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        src = tl.load(col_ptr + e, mask=e < e_end, other=-1)
        valid = (src >= 0) & (src < num_nodes)
        valid_edges += valid.to(tl.int32)
        tile_mask = valid[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + src[:, None] * channels + c[None, :], mask=tile_mask, other=0.0)
        m = tl.maximum(x.to(acc_dtype), 0.0) + eps[None, :]
        s = tl.where(tile_mask, t[None, :] * m, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # no valid edge yet: keep exp finite
        scale = tl.exp(row_max - shift)
        w = tl.exp(s - shift[None, :])
        row_sum = row_sum * scale + tl.sum(w, axis=0)
        weighted = weighted * scale + tl.sum(w * m, axis=0)
        row_max = new_max
    has_edges = tl.sum(valid_edges, axis=0) > 0  # else out 0, M 0, Z 1 (as the CPU kernel)
    out = tl.where(has_edges, weighted / tl.where(has_edges & c_mask, row_sum, 1.0), 0.0)
    offsets = v * channels + c
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=c_mask)
    tl.store(row_max_ptr + offsets, tl.where(has_edges, row_max, 0.0), mask=c_mask)
    tl.store(row_sum_ptr + offsets, tl.where(has_edges, row_sum, 1.0), mask=c_mask)


@triton.jit
def _backward_kernel(grad_out_ptr, x_ptr, out_ptr, row_max_ptr, row_sum_ptr, rowptr_t_ptr, col_t_ptr,
                     t_ptr, grad_x_ptr, grad_t_partial_ptr, num_nodes, num_edges, channels,
                     EPS: tl.constexpr, NODES_PER_PROGRAM: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_C: tl.constexpr, COMPUTE_GRAD_T: tl.constexpr):
    acc_dtype = t_ptr.dtype.element_ty
    program = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    t = tl.load(t_ptr + c, mask=c_mask, other=0.0)
    eps = tl.full([BLOCK_C], EPS, acc_dtype)
    grad_t = tl.zeros([BLOCK_C], acc_dtype)
    u_begin = program * NODES_PER_PROGRAM
    u_end = tl.minimum(u_begin + NODES_PER_PROGRAM, num_nodes)
    for u in range(u_begin, u_end):
        x_u = tl.load(x_ptr + u * channels + c, mask=c_mask, other=0.0).to(acc_dtype)
        m = tl.maximum(x_u, 0.0) + eps
        s = t * m
        grad_m = tl.zeros([BLOCK_C], acc_dtype)
        grad_t_u = tl.zeros([BLOCK_C], acc_dtype)
        e_begin = tl.maximum(tl.load(rowptr_t_ptr + u), 0)
        e_end = tl.minimum(tl.load(rowptr_t_ptr + u + 1), num_edges)
        for e0 in range(e_begin, e_end, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            dst = tl.load(col_t_ptr + e, mask=e < e_end, other=-1)
            tile_mask = ((dst >= 0) & (dst < num_nodes))[:, None] & c_mask[None, :]
            offsets = dst[:, None] * channels + c[None, :]
            # Masked entries: M = +inf gives w = 0, and q = r = 0.
            row_max_v = tl.load(row_max_ptr + offsets, mask=tile_mask, other=float("inf"))
            row_sum_v = tl.load(row_sum_ptr + offsets, mask=tile_mask, other=1.0)
            grad_v = tl.load(grad_out_ptr + offsets, mask=tile_mask, other=0.0).to(acc_dtype)
            out_v = tl.load(out_ptr + offsets, mask=tile_mask, other=0.0).to(acc_dtype)
            w = tl.exp(s[None, :] - row_max_v)
            q = grad_v / row_sum_v
            r = q * out_v
            grad_m += tl.sum(w * (q * (1.0 + s[None, :]) - t[None, :] * r), axis=0)
            if COMPUTE_GRAD_T:
                grad_t_u += tl.sum(w * (q * m[None, :] - r), axis=0)
        grad_x = tl.where(x_u > 0, grad_m, 0.0)
        tl.store(grad_x_ptr + u * channels + c, grad_x.to(grad_x_ptr.dtype.element_ty), mask=c_mask)
        if COMPUTE_GRAD_T:
            grad_t += grad_t_u * m
    if COMPUTE_GRAD_T:
        tl.store(grad_t_partial_ptr + program * channels + c, grad_t, mask=c_mask)


@triton.jit
def _sum_rows_kernel(partial_ptr, total_ptr, rows, channels, BLOCK_R: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """total[c] = sum_r partial[r, c] in a fixed order (deterministic)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    acc = tl.zeros([BLOCK_R, BLOCK_C], partial_ptr.dtype.element_ty)
    for r0 in range(0, rows, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (r < rows)[:, None] & c_mask[None, :]
        acc += tl.load(partial_ptr + r[:, None] * channels + c[None, :], mask=mask, other=0.0)
    tl.store(total_ptr + c, tl.sum(acc, axis=0), mask=c_mask)


def _block_c(channels: int) -> int:
    return min(triton.next_power_of_2(channels), MAX_BLOCK_C)


def _check_args(x: Tensor, rowptr: Tensor, col: Tensor, t: Tensor, rowptr_name: str, col_name: str):
    """The checks of the C++ ops (csrc/ops/msg_pass.cpp), for direct calls of the Triton ops."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"msg_pass: x must be a floating point [N, C] tensor, got {x.dtype} {list(x.shape)}")
    if rowptr.shape != (x.size(0) + 1,) or col.dim() != 1:
        raise ValueError(f"msg_pass: {rowptr_name} must be [N + 1] = [{x.size(0) + 1}] and {col_name} "
                         f"1-D, got {list(rowptr.shape)} and {list(col.shape)}")
    if rowptr.dtype != torch.int64 or col.dtype != torch.int64:
        raise ValueError(f"msg_pass: {rowptr_name} and {col_name} must be int64, got {rowptr.dtype} "
                         f"and {col.dtype}")
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if t.shape != (x.size(1),) or t.dtype != acc_dtype:
        raise ValueError(f"msg_pass: t must be [C] = [{x.size(1)}] of {acc_dtype} for x of {x.dtype}, "
                         f"got {t.dtype} {list(t.shape)}")
    for name, arg in ((rowptr_name, rowptr), (col_name, col), ("t", t)):
        if arg.device != x.device:
            raise ValueError(f"msg_pass: x ({x.device}) and {name} ({arg.device}) must be on the same device")
    if not triton_available(x.device):
        raise RuntimeError(f"msg_pass: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), "
                           f"got {x.device}")


@torch.library.custom_op("keypointops::msg_pass_triton", mutates_args=())
def msg_pass_triton(x: Tensor, rowptr: Tensor, col: Tensor, rowptr_t: Tensor, col_t: Tensor, t: Tensor,
                    eps: float) -> tuple[Tensor, Tensor, Tensor]:
    _check_args(x, rowptr, col, t, "rowptr", "col")
    _check_args(x, rowptr_t, col_t, t, "rowptr_t", "col_t")
    if col_t.numel() != col.numel():
        raise ValueError(f"msg_pass: col_t must have as many edges as col ({col.numel()}), got {col_t.numel()}")
    x, rowptr, col, t = x.contiguous(), rowptr.contiguous(), col.contiguous(), t.contiguous()
    num_nodes, channels = x.shape
    out = torch.empty_like(x)
    row_max = torch.empty(x.shape, dtype=t.dtype, device=x.device)
    row_sum = torch.empty(x.shape, dtype=t.dtype, device=x.device)
    if num_nodes == 0 or channels == 0:
        return out, row_max, row_sum
    block_c = _block_c(channels)
    grid = (num_nodes, triton.cdiv(channels, block_c))
    _forward_kernel[grid](x, rowptr, col, t, out, row_max, row_sum, num_nodes, col.numel(), channels,
                          EPS=float(eps), BLOCK_E=BLOCK_E, BLOCK_C=block_c, num_warps=2)
    return out, row_max, row_sum


@torch.library.custom_op("keypointops::msg_pass_triton_backward", mutates_args=())
def msg_pass_triton_backward(grad_out: Tensor, x: Tensor, out: Tensor, row_max: Tensor, row_sum: Tensor,
                             rowptr_t: Tensor, col_t: Tensor, t: Tensor, eps: float,
                             compute_grad_t: bool) -> tuple[Tensor, Tensor]:
    _check_args(x, rowptr_t, col_t, t, "rowptr_t", "col_t")
    for name, arg, dtype in (("grad_out", grad_out, x.dtype), ("out", out, x.dtype),
                             ("row_max", row_max, t.dtype), ("row_sum", row_sum, t.dtype)):
        if arg.shape != x.shape or arg.dtype != dtype or arg.device != x.device:
            raise ValueError(f"msg_pass_backward: {name} must be {list(x.shape)} {dtype} on {x.device}, "
                             f"got {list(arg.shape)} {arg.dtype} on {arg.device}")
    grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t = (
        arg.contiguous() for arg in (grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t))
    num_nodes, channels = x.shape
    grad_x = torch.empty_like(x)
    if num_nodes == 0 or channels == 0:
        return grad_x, torch.zeros_like(t)
    block_c = _block_c(channels)
    num_programs = triton.cdiv(num_nodes, NODES_PER_PROGRAM)
    grad_t_partial = torch.empty((num_programs if compute_grad_t else 1, channels), dtype=t.dtype,
                                 device=x.device)
    grid = (num_programs, triton.cdiv(channels, block_c))
    _backward_kernel[grid](grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t, grad_x,
                           grad_t_partial, num_nodes, col_t.numel(), channels, EPS=float(eps),
                           NODES_PER_PROGRAM=NODES_PER_PROGRAM, BLOCK_E=BLOCK_E, BLOCK_C=block_c,
                           COMPUTE_GRAD_T=compute_grad_t, num_warps=2)
    if not compute_grad_t:
        return grad_x, torch.zeros_like(t)
    grad_t = torch.empty_like(t)
    _sum_rows_kernel[(triton.cdiv(channels, block_c),)](grad_t_partial, grad_t, num_programs, channels,
                                                        BLOCK_R=SUM_BLOCK_ROWS, BLOCK_C=block_c)
    return grad_x, grad_t


register_kernels_of("keypointops::msg_pass_triton", "keypointops::msg_pass_triton_backward")
