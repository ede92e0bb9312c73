"""Triton kernels of ``msg_pass`` and the ops ``keypointops::msg_pass_triton`` (+ ``_backward``).

Forward: one program per (block of BLOCK_N destination nodes v, block of BLOCK_C channels) steps
through the nodes' CSR segments ``col[rowptr[v]:rowptr[v+1]]`` together, BLOCK_E neighbours per node
per step, up to the block's largest in-degree: it gathers a [BLOCK_N, BLOCK_E, BLOCK_C] tile of x,
forms m = relu(x) + eps, and folds the tile into an online softmax per (node, channel) over the
shift message M, the m of the largest logit t * m so far (sum Z = sum exp(t (m - M)), numerator
A = sum exp(t (m - M)) * (m - M), re-centred and rescaled when M changes); out = M + A / Z (equal
messages give out = M exactly, a sharp softmax M + a small term, so that backward's m_u - out_v is
accurate).  The exponent is t times an
exact-sign difference, never t * m - t * M: that form carries the rounding error ulp(t * m) into
the exponent, and fused into one multiply-add its exponent is the product's rounding error, which
overflows exp and gives NaN.  M and Z are saved for backward (as row_max and row_sum) in the
accumulation dtype (float32; float64 for float64 x).
Backward: one program per (block of BLOCK_N source nodes u, channel block) steps the same way
through the transposed CSR (the targets v of the edges leaving u) with
w = exp(t (m_u - M_v)) grad_out_v / Z_v and the centred message d = m_u - out_v (no cancellation of
two large terms at a sharp softmax):
grad_m_u = sum_v (w + w t d),  grad_t += m_u sum_v w d,  grad_x_u = grad_m_u * (x_u > 0)
(SEMI_GRAD, aggr "softmax_sg", PyG's semi-gradient softmax: the weights are constants, grad_m_u =
sum_v w, no grad_t).  Each row of grad_x has one writer; each program writes its grad_t
partial to its own row of [num_programs, C], summed afterwards row by row in a fixed order: no
atomics, bitwise deterministic.  Edge indices outside [0, N) are skipped and rowptr entries are
clamped to [0, E], never read through (index contents are only validated on the CPU).
Edge features (HAS_EDGE): the message of CSR position k is relu(x[col[k]] + edge_attr[perm[k]]) + eps,
the edge rows gathered in place through the permutation (edge ids outside [0, E) skip the edge);
backward takes message and mask per edge, g = (w + w t d) [x_u + e > 0], grad_x_u = sum g,
grad_edge_attr[perm_t[k]] = g (one writer per edge row), grad_t += sum w d m.
Power mean and mean (aggr "powermean" with p = t, "mean"; POWER selects): forward steps the same
tiles and sums c^p, c = clamp(m, LO, HI) (m itself for the mean), per (node, channel); it stores
out = clamp(y, LO, HI)^(1/p) (y for the mean) with y = sum / deg (0 without edges), and saves y and
deg as row_max and row_sum.  Backward gathers per edge the target's factor
q_v = grad_out_v Y^(1/p) / (p Y) [LO <= y_v <= HI] / deg_v (Y = clamp(y_v); grad_out_v / deg_v for
the mean) and writes g = q_v p c^p / c [LO <= m <= HI] [x_u + e > 0] (g = q_v [x_u + e > 0]), with
grad_p += q_v c^p ln c per edge and grad_out_u out_u ln(Y_u) (-1/p^2) per node u as a target.
Powers are exp(p ln c) (Triton has no pow).
Memory: forward out [N, C] + row_max, row_sum [N, C]; backward grad_x [N, C], the grad_t
partials [ceil(N / BLOCK_N), C] and with edge features grad_edge_attr [E, C] (the gradient of that
input); no other tensor of size E x C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keypointops._opdefs.backend import triton_available
from keypointops._opdefs.msg_pass import check_aggr, check_csr_args, check_edge_args, register_kernels_of

__all__ = ["msg_pass_triton", "msg_pass_triton_backward"]

# Tile sizes: (nodes, edges per node, channels) per step.  On the GPU the tile stays small enough
# for registers; the interpreter runs every program and every op in Python, so it gets fewer,
# larger tiles (the same code; only the tile shapes differ).
GPU_TILE = dict(BLOCK_N=4, BLOCK_E=8, MAX_BLOCK_C=64, num_warps=4)
# With edge features two more gathered tiles are live per step (the edge rows, and in backward the
# per-edge messages): half the edges per step keeps the backward within the register file (at
# BLOCK_E=8 it takes 255 registers and spills on sm_90; at 4 at most 142, no spill:
# tools/triton_aot.py).
GPU_EDGE_TILE = dict(GPU_TILE, BLOCK_E=4)
INTERPRETER_TILE = dict(BLOCK_N=64, BLOCK_E=16, MAX_BLOCK_C=64, num_warps=4)
SUM_BLOCK_ROWS = 64       # rows of grad_t partials per step of the final sum


@triton.jit
def _tile_setup(t_ptr, rowptr_ptr, num_nodes, num_edges, channels, EPS: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's nodes (axis 0 block of BLOCK_N) and channels (axis 1 block of BLOCK_C):
    node ids, their CSR segments [e_begin, e_begin + degree) clamped to [0, E], the channels and
    their mask, t[c] and eps in t's dtype."""
    nodes = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    node_mask = nodes < num_nodes
    e_begin = tl.minimum(tl.maximum(tl.load(rowptr_ptr + nodes, mask=node_mask, other=0), 0), num_edges)
    e_end = tl.minimum(tl.load(rowptr_ptr + nodes + 1, mask=node_mask, other=0), num_edges)
    degree = tl.maximum(e_end - e_begin, 0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < channels
    t = tl.load(t_ptr + c, mask=c_mask, other=0.0)
    eps = tl.full([BLOCK_C], EPS, t_ptr.dtype.element_ty)
    return nodes, node_mask, e_begin, degree, c, c_mask, t, eps


@triton.jit
def _gather_step(col_ptr, perm_ptr, e_begin, degree, k0, num_nodes, num_edges, c_mask,
                 BLOCK_E: tl.constexpr, HAS_EDGE: tl.constexpr):
    """Neighbours k0 .. k0 + BLOCK_E - 1 of every node of the tile: their ids [BLOCK_N, BLOCK_E]
    (-1 past the segment, out of [0, N), or with HAS_EDGE an edge id out of [0, E)), their edge
    ids (perm; 0 without HAS_EDGE) and the [BLOCK_N, BLOCK_E, BLOCK_C] gather mask."""
    k = k0 + tl.arange(0, BLOCK_E)
    in_segment = k[None, :] < degree[:, None]
    position = e_begin[:, None] + k[None, :]
    nbr = tl.load(col_ptr + position, mask=in_segment, other=-1)
    nbr = tl.where((nbr >= 0) & (nbr < num_nodes), nbr, -1)
    edge = tl.zeros_like(nbr)
    if HAS_EDGE:
        edge = tl.load(perm_ptr + position, mask=nbr >= 0, other=-1)
        nbr = tl.where((edge >= 0) & (edge < num_edges), nbr, -1)
    return nbr, edge, (nbr >= 0)[:, :, None] & c_mask[None, None, :]


@triton.jit
def _message_tile(x_ptr, col_ptr, edge_attr_ptr, perm_ptr, e_begin, degree, k0, num_nodes, num_edges, channels,
                  c, c_mask, eps, BLOCK_E: tl.constexpr, HAS_EDGE: tl.constexpr):
    """The messages relu(x_src [+ e]) + eps of neighbours k0 .. k0 + BLOCK_E - 1 of the tile's nodes,
    [BLOCK_N, BLOCK_E, BLOCK_C] in eps's dtype, with the sources (-1: skipped) and the tile mask."""
    src, edge, tile_mask = _gather_step(col_ptr, perm_ptr, e_begin, degree, k0, num_nodes, num_edges,
                                        c_mask, BLOCK_E, HAS_EDGE)
    x = tl.load(x_ptr + src[:, :, None] * channels + c[None, None, :], mask=tile_mask, other=0.0)
    x = x.to(eps.dtype)
    if HAS_EDGE:
        x += tl.load(edge_attr_ptr + edge[:, :, None] * channels + c[None, None, :], mask=tile_mask,
                     other=0.0).to(eps.dtype)
    return src, tile_mask, tl.maximum(x, 0.0) + eps[None, None, :]


@triton.jit
def _forward_kernel(x_ptr, rowptr_ptr, col_ptr, edge_attr_ptr, perm_ptr, t_ptr, out_ptr, row_max_ptr,
                    row_sum_ptr, num_nodes, num_edges, channels, EPS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
                    HAS_EDGE: tl.constexpr):
    acc_dtype = t_ptr.dtype.element_ty
    nodes, node_mask, e_begin, degree, c, c_mask, t, eps = _tile_setup(
        t_ptr, rowptr_ptr, num_nodes, num_edges, channels, EPS, BLOCK_N, BLOCK_C)
    row_max = tl.zeros([BLOCK_N, BLOCK_C], acc_dtype)   # the shift message M; Z = 0: none yet
    row_sum = tl.zeros([BLOCK_N, BLOCK_C], acc_dtype)
    weighted = tl.zeros([BLOCK_N, BLOCK_C], acc_dtype)
    valid_edges = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, tl.max(degree, axis=0), BLOCK_E):
        src, tile_mask, m = _message_tile(x_ptr, col_ptr, edge_attr_ptr, perm_ptr, e_begin, degree, k0, num_nodes,
                                          num_edges, channels, c, c_mask, eps, BLOCK_E, HAS_EDGE)
        valid_edges += tl.sum((src >= 0).to(tl.int32), axis=1)
        # The tile's candidate shift: its largest m for t >= 0, its smallest for t < 0 (the current
        # shift where the tile holds no edge of the node).
        largest = tl.max(tl.where(tile_mask, m, float("-inf")), axis=1)
        smallest = tl.min(tl.where(tile_mask, m, float("inf")), axis=1)
        any_edge = tl.max(tile_mask.to(tl.int32), axis=1) > 0
        candidate = tl.where(any_edge, tl.where(t[None, :] >= 0, largest, smallest), row_max)
        better = any_edge & ((row_sum == 0) | (t[None, :] * (candidate - row_max) > 0))
        shift = tl.where(better, candidate, row_max)
        # Both exponents are <= 0 wherever they are used; the clamp keeps the others finite.
        scale = tl.where(row_sum > 0, tl.exp(tl.minimum(t[None, :] * (row_max - shift), 0.0)), 1.0)
        w = tl.where(tile_mask, tl.exp(tl.minimum(t[None, None, :] * (m - shift[:, None, :]), 0.0)), 0.0)
        weighted = ((weighted + (row_max - shift) * row_sum) * scale  # re-centred on the new shift
                    + tl.sum(w * (m - shift[:, None, :]), axis=1))
        row_sum = row_sum * scale + tl.sum(w, axis=1)
        row_max = shift
    has_edges = (valid_edges > 0)[:, None] & c_mask[None, :]  # else out 0, M 0, Z 1 (as the CPU kernel)
    out = tl.where(has_edges, row_max + weighted / tl.where(has_edges, row_sum, 1.0), 0.0)
    offsets = nodes[:, None] * channels + c[None, :]
    mask = node_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(row_max_ptr + offsets, tl.where(has_edges, row_max, 0.0), mask=mask)
    tl.store(row_sum_ptr + offsets, tl.where(has_edges, row_sum, 1.0), mask=mask)


@triton.jit
def _backward_kernel(grad_out_ptr, x_ptr, out_ptr, row_max_ptr, row_sum_ptr, rowptr_t_ptr, col_t_ptr,
                     edge_attr_ptr, perm_t_ptr, t_ptr, grad_x_ptr, grad_t_partial_ptr,
                     grad_edge_attr_ptr, num_nodes, num_edges, channels, EPS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
                     COMPUTE_GRAD_T: tl.constexpr, HAS_EDGE: tl.constexpr, SEMI_GRAD: tl.constexpr):
    acc_dtype = t_ptr.dtype.element_ty
    nodes, node_mask, e_begin, degree, c, c_mask, t, eps = _tile_setup(
        t_ptr, rowptr_t_ptr, num_nodes, num_edges, channels, EPS, BLOCK_N, BLOCK_C)
    mask = node_mask[:, None] & c_mask[None, :]
    offsets = nodes[:, None] * channels + c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
    m = tl.maximum(x, 0.0) + eps[None, :]
    grad_m = tl.zeros([BLOCK_N, BLOCK_C], acc_dtype)
    grad_t = tl.zeros([BLOCK_N, BLOCK_C], acc_dtype)
    for k0 in range(0, tl.max(degree, axis=0), BLOCK_E):
        dst, edge, tile_mask = _gather_step(col_t_ptr, perm_t_ptr, e_begin, degree, k0, num_nodes,
                                            num_edges, c_mask, BLOCK_E, HAS_EDGE)
        gathered = dst[:, :, None] * channels + c[None, None, :]
        row_max_v = tl.load(row_max_ptr + gathered, mask=tile_mask, other=0.0)
        row_sum_v = tl.load(row_sum_ptr + gathered, mask=tile_mask, other=1.0)
        grad_v = tl.load(grad_out_ptr + gathered, mask=tile_mask, other=0.0).to(acc_dtype)
        out_v = tl.load(out_ptr + gathered, mask=tile_mask, other=0.0).to(acc_dtype)
        if HAS_EDGE:  # the message, its mask and grad_t's factor m per edge
            edge_rows = edge[:, :, None] * channels + c[None, None, :]
            x_e = x[:, None, :] + tl.load(edge_attr_ptr + edge_rows, mask=tile_mask, other=0.0).to(acc_dtype)
            m_e = tl.maximum(x_e, 0.0) + eps[None, None, :]
        else:
            m_e = m[:, None, :]
        exponent = tl.where(tile_mask, t[None, None, :] * (m_e - row_max_v), float("-inf"))
        w = tl.exp(exponent) * grad_v / row_sum_v                    # masked entries: 0
        d = m_e - out_v
        if SEMI_GRAD:   # the weights as constants
            g = w
        else:
            g = w + w * t[None, None, :] * d
        if HAS_EDGE:
            g = tl.where(x_e > 0, g, 0.0)
            tl.store(grad_edge_attr_ptr + edge_rows, g.to(grad_edge_attr_ptr.dtype.element_ty), mask=tile_mask)
            if COMPUTE_GRAD_T:
                grad_t += tl.sum(w * d * m_e, axis=1)
        elif COMPUTE_GRAD_T:
            grad_t += tl.sum(w * d, axis=1)
        grad_m += tl.sum(g, axis=1)
    if HAS_EDGE:
        grad_x = grad_m
    else:
        grad_x = tl.where(x > 0, grad_m, 0.0)
        grad_t = grad_t * m
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_GRAD_T:
        grad_t_partial = tl.sum(grad_t, axis=0)  # rows past N hold 0
        tl.store(grad_t_partial_ptr + tl.program_id(0).to(tl.int64) * channels + c, grad_t_partial,
                 mask=c_mask)


@triton.jit
def _clamp(v, lo, hi):
    return tl.minimum(tl.maximum(v, lo), hi)


@triton.jit
def _power(base, exponent):
    """base ** exponent for base >= 0 (0 ** positive = 0)."""
    powered = tl.exp(exponent * tl.log(tl.maximum(base, 1e-38)))
    return tl.where(base > 0, powered, tl.where(exponent > 0, 0.0, float("inf")))


@triton.jit
def _power_setup(p, c_mask, LO: tl.constexpr, HI: tl.constexpr, BLOCK_C: tl.constexpr):
    """The exponents p with 1 on channels past C (a harmless power: their results are masked) and
    the clamp bounds LO, HI as [BLOCK_C] vectors in p's dtype."""
    p = tl.where(c_mask, p, 1.0)
    return p, tl.full([BLOCK_C], LO, p.dtype), tl.full([BLOCK_C], HI, p.dtype)


@triton.jit
def _power_mean_forward_kernel(x_ptr, rowptr_ptr, col_ptr, edge_attr_ptr, perm_ptr, p_ptr, out_ptr, mean_ptr,
                               degree_ptr, num_nodes, num_edges, channels, EPS: tl.constexpr,
                               LO: tl.constexpr, HI: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, HAS_EDGE: tl.constexpr,
                               POWER: tl.constexpr):
    acc_dtype = p_ptr.dtype.element_ty
    nodes, node_mask, e_begin, degree, c, c_mask, p, eps = _tile_setup(
        p_ptr, rowptr_ptr, num_nodes, num_edges, channels, EPS, BLOCK_N, BLOCK_C)
    p, lo, hi = _power_setup(p, c_mask, LO, HI, BLOCK_C)
    total = tl.zeros([BLOCK_N, BLOCK_C], acc_dtype)
    valid_edges = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, tl.max(degree, axis=0), BLOCK_E):
        src, tile_mask, m = _message_tile(x_ptr, col_ptr, edge_attr_ptr, perm_ptr, e_begin, degree, k0, num_nodes,
                                          num_edges, channels, c, c_mask, eps, BLOCK_E, HAS_EDGE)
        valid_edges += tl.sum((src >= 0).to(tl.int32), axis=1)
        if POWER:
            m = _power(_clamp(m, lo[None, None, :], hi[None, None, :]), p[None, None, :])
        total += tl.sum(tl.where(tile_mask, m, 0.0), axis=1)
    deg = valid_edges.to(acc_dtype)[:, None]
    mean = total / tl.maximum(deg, 1.0)                    # 0 without edges
    out = mean
    if POWER:
        out = _power(_clamp(mean, lo[None, :], hi[None, :]), 1.0 / p[None, :])
    offsets = nodes[:, None] * channels + c[None, :]
    mask = node_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + offsets, mean, mask=mask)
    tl.store(degree_ptr + offsets, tl.broadcast_to(deg, [BLOCK_N, BLOCK_C]), mask=mask)


@triton.jit
def _power_mean_backward_kernel(grad_out_ptr, x_ptr, mean_ptr, degree_ptr, rowptr_t_ptr, col_t_ptr,
                                edge_attr_ptr, perm_t_ptr, p_ptr, grad_x_ptr, grad_p_partial_ptr,
                                grad_edge_attr_ptr, num_nodes, num_edges, channels, EPS: tl.constexpr,
                                LO: tl.constexpr, HI: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr, COMPUTE_GRAD_T: tl.constexpr,
                                HAS_EDGE: tl.constexpr, POWER: tl.constexpr):
    acc_dtype = p_ptr.dtype.element_ty
    nodes, node_mask, e_begin, degree, c, c_mask, p, eps = _tile_setup(
        p_ptr, rowptr_t_ptr, num_nodes, num_edges, channels, EPS, BLOCK_N, BLOCK_C)
    p, lo_c, hi_c = _power_setup(p, c_mask, LO, HI, BLOCK_C)
    lo, hi = lo_c[None, None, :], hi_c[None, None, :]
    mask = node_mask[:, None] & c_mask[None, :]
    offsets = nodes[:, None] * channels + c[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
    grad_x = tl.zeros([BLOCK_N, BLOCK_C], acc_dtype)
    grad_p = tl.zeros([BLOCK_N, BLOCK_C], acc_dtype)
    for k0 in range(0, tl.max(degree, axis=0), BLOCK_E):
        dst, edge, tile_mask = _gather_step(col_t_ptr, perm_t_ptr, e_begin, degree, k0, num_nodes,
                                            num_edges, c_mask, BLOCK_E, HAS_EDGE)
        gathered = dst[:, :, None] * channels + c[None, None, :]
        # The target's factor q_v (see the module docstring), 0 on masked entries.
        q = tl.load(grad_out_ptr + gathered, mask=tile_mask, other=0.0).to(acc_dtype)
        q = q / tl.maximum(tl.load(degree_ptr + gathered, mask=tile_mask, other=1.0), 1.0)
        x_e = x[:, None, :]
        if HAS_EDGE:
            edge_rows = edge[:, :, None] * channels + c[None, None, :]
            x_e = x_e + tl.load(edge_attr_ptr + edge_rows, mask=tile_mask, other=0.0).to(acc_dtype)
        g = tl.where(x_e > 0, q, 0.0)
        if POWER:
            y = tl.load(mean_ptr + gathered, mask=tile_mask, other=1.0)
            y_clamped = _clamp(y, lo, hi)
            q = tl.where((y >= lo) & (y <= hi), q * _power(y_clamped, 1.0 / p[None, None, :]) /
                         (p[None, None, :] * y_clamped), 0.0)
            m = tl.maximum(x_e, 0.0) + eps[None, None, :]
            c_m = _clamp(m, lo, hi)
            c_p = _power(c_m, p[None, None, :])
            g = tl.where((x_e > 0) & (m >= lo) & (m <= hi), q * p[None, None, :] * c_p / c_m, 0.0)
            if COMPUTE_GRAD_T:
                grad_p += tl.sum(tl.where(c_m > 0, q * c_p * tl.log(tl.maximum(c_m, 1e-38)), 0.0), axis=1)
        if HAS_EDGE:
            tl.store(grad_edge_attr_ptr + edge_rows, g.to(grad_edge_attr_ptr.dtype.element_ty), mask=tile_mask)
        grad_x += tl.sum(g, axis=1)
    tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if COMPUTE_GRAD_T:
        # Each node as a target: d out / d p = out ln(Y) (-1 / p^2), out = Y^(1/p), Y = clamp(mean).
        y_clamped = _clamp(tl.load(mean_ptr + offsets, mask=mask, other=1.0), lo_c[None, :], hi_c[None, :])
        grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(acc_dtype)
        log_y = tl.where(y_clamped > 0, tl.log(tl.maximum(y_clamped, 1e-38)), 0.0)
        grad_p -= grad_out * _power(y_clamped, 1.0 / p[None, :]) * log_y / (p[None, :] * p[None, :])
        grad_p_partial = tl.sum(tl.where(mask, grad_p, 0.0), axis=0)
        tl.store(grad_p_partial_ptr + tl.program_id(0).to(tl.int64) * channels + c, grad_p_partial,
                 mask=c_mask)


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


def _tile(x: Tensor, has_edge: bool) -> dict:
    """Tile sizes for x's device and the edge features (see GPU_TILE / GPU_EDGE_TILE /
    INTERPRETER_TILE)."""
    gpu_tile = GPU_EDGE_TILE if has_edge else GPU_TILE
    tile = dict(gpu_tile if x.device.type == "cuda" else INTERPRETER_TILE)
    tile["BLOCK_C"] = min(triton.next_power_of_2(x.size(1)), tile.pop("MAX_BLOCK_C"))
    return tile


def _check_args(x: Tensor, rowptr: Tensor, col: Tensor, t: Tensor, rowptr_name: str, col_name: str):
    check_csr_args(x, rowptr, col, t, rowptr_name, col_name)
    if not triton_available(x.device):
        raise RuntimeError(f"msg_pass: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), "
                           f"got {x.device}")


@torch.library.custom_op("keypointops::msg_pass_triton", mutates_args=())
def msg_pass_triton(x: Tensor, rowptr: Tensor, col: Tensor, rowptr_t: Tensor, col_t: Tensor, t: Tensor,
                    eps: float, edge_attr: Tensor | None = None, perm: Tensor | None = None,
                    perm_t: Tensor | None = None, aggr: str = "softmax", clamp_min: float = 1e-4,
                    clamp_max: float = 100.0) -> tuple[Tensor, Tensor, Tensor]:
    check_aggr(aggr)
    _check_args(x, rowptr, col, t, "rowptr", "col")
    _check_args(x, rowptr_t, col_t, t, "rowptr_t", "col_t")
    if col_t.numel() != col.numel():
        raise ValueError(f"msg_pass: col_t must have as many edges as col ({col.numel()}), got {col_t.numel()}")
    check_edge_args(x, edge_attr, perm, col.numel(), "perm")
    check_edge_args(x, edge_attr, perm_t, col.numel(), "perm_t")
    x, rowptr, col, t = x.contiguous(), rowptr.contiguous(), col.contiguous(), t.contiguous()
    has_edge = edge_attr is not None
    # Without edge features the edge pointers are never read: x and col stand in for them.
    edge_attr = edge_attr.contiguous() if has_edge else x
    perm = perm.contiguous() if has_edge else col
    num_nodes, channels = x.shape
    out = torch.empty_like(x)
    row_max = torch.empty(x.shape, dtype=t.dtype, device=x.device)
    row_sum = torch.empty(x.shape, dtype=t.dtype, device=x.device)
    if num_nodes == 0 or channels == 0:
        return out, row_max, row_sum
    tile = _tile(x, has_edge)
    grid = (triton.cdiv(num_nodes, tile["BLOCK_N"]), triton.cdiv(channels, tile["BLOCK_C"]))
    if aggr in ("powermean", "mean"):
        _power_mean_forward_kernel[grid](x, rowptr, col, edge_attr, perm, t, out, row_max, row_sum, num_nodes,
                                         col.numel(), channels, EPS=float(eps), LO=float(clamp_min),
                                         HI=float(clamp_max), HAS_EDGE=has_edge, POWER=aggr == "powermean",
                                         **tile)
        return out, row_max, row_sum
    _forward_kernel[grid](x, rowptr, col, edge_attr, perm, t, out, row_max, row_sum, num_nodes, col.numel(),
                          channels, EPS=float(eps), HAS_EDGE=has_edge, **tile)
    return out, row_max, row_sum


@torch.library.custom_op("keypointops::msg_pass_triton_backward", mutates_args=())
def msg_pass_triton_backward(grad_out: Tensor, x: Tensor, out: Tensor, row_max: Tensor, row_sum: Tensor,
                             rowptr_t: Tensor, col_t: Tensor, t: Tensor, eps: float,
                             compute_grad_t: bool, edge_attr: Tensor | None = None,
                             perm_t: Tensor | None = None, aggr: str = "softmax", clamp_min: float = 1e-4,
                             clamp_max: float = 100.0) -> tuple[Tensor, Tensor, Tensor]:
    check_aggr(aggr)
    _check_args(x, rowptr_t, col_t, t, "rowptr_t", "col_t")
    check_edge_args(x, edge_attr, perm_t, col_t.numel(), "perm_t")
    for name, arg, dtype in (("grad_out", grad_out, x.dtype), ("out", out, x.dtype),
                             ("row_max", row_max, t.dtype), ("row_sum", row_sum, t.dtype)):
        if arg.shape != x.shape or arg.dtype != dtype or arg.device != x.device:
            raise ValueError(f"msg_pass_backward: {name} must be {list(x.shape)} {dtype} on {x.device}, "
                             f"got {list(arg.shape)} {arg.dtype} on {arg.device}")
    grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t = (
        arg.contiguous() for arg in (grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t))
    num_nodes, channels = x.shape
    has_edge = edge_attr is not None
    grad_x = torch.empty_like(x)
    # Zeros: the rows of edges skipped for a bad index are never written.
    grad_edge_attr = torch.zeros_like(edge_attr) if has_edge else x.new_empty(0)
    edge_attr = edge_attr.contiguous() if has_edge else x          # stand-ins, never read
    perm_t = perm_t.contiguous() if has_edge else col_t
    if num_nodes == 0 or channels == 0:
        return grad_x, torch.zeros_like(t), grad_edge_attr
    tile = _tile(x, has_edge)
    num_programs = triton.cdiv(num_nodes, tile["BLOCK_N"])
    # The mean has no parameter; the semi-gradient softmax's weights are constants (no grad for t).
    compute_grad_t = compute_grad_t and aggr not in ("mean", "softmax_sg")
    grad_t_partial = torch.empty((num_programs if compute_grad_t else 1, channels), dtype=t.dtype,
                                 device=x.device)
    grid = (num_programs, triton.cdiv(channels, tile["BLOCK_C"]))
    if aggr in ("powermean", "mean"):
        _power_mean_backward_kernel[grid](
            grad_out, x, row_max, row_sum, rowptr_t, col_t, edge_attr, perm_t, t, grad_x, grad_t_partial,
            grad_edge_attr if has_edge else grad_x, num_nodes, col_t.numel(), channels, EPS=float(eps),
            LO=float(clamp_min), HI=float(clamp_max), COMPUTE_GRAD_T=compute_grad_t, HAS_EDGE=has_edge,
            POWER=aggr == "powermean", **tile)
    else:
        _backward_kernel[grid](grad_out, x, out, row_max, row_sum, rowptr_t, col_t, edge_attr, perm_t, t,
                               grad_x, grad_t_partial, grad_edge_attr if has_edge else grad_x, num_nodes,
                               col_t.numel(), channels, EPS=float(eps), COMPUTE_GRAD_T=compute_grad_t,
                               HAS_EDGE=has_edge, SEMI_GRAD=aggr == "softmax_sg", **tile)
    if not compute_grad_t:
        return grad_x, torch.zeros_like(t), grad_edge_attr
    grad_t = torch.empty_like(t)
    _sum_rows_kernel[(triton.cdiv(channels, tile["BLOCK_C"]),)](
        grad_t_partial, grad_t, num_programs, channels, BLOCK_R=SUM_BLOCK_ROWS, BLOCK_C=tile["BLOCK_C"])
    return grad_x, grad_t, grad_edge_attr


register_kernels_of("keypointops::msg_pass_triton", "keypointops::msg_pass_triton_backward")
