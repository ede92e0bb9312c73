"""Triton kernels of ``part_pool`` and the ``keypointops::part_pool_triton`` ops.

Forward: one program per (image, block of channels) runs a flash-attention-style online softmax
over blocks of pixels: the logits tile ``groups @ heatmaps`` is computed in registers (the softmax
prologue), the running max and sum rescale the accumulator, and ``p @ features^T`` is accumulated
tile by tile; nothing but the inputs is saved for backward.
Backward: a first kernel, one program per image, computes the max M and sum Z of every part's
logits (p = exp(r - M) / Z as the softmax of autograd, not exp(r - lse) from a log-sum-exp: a
float32 lse is rounded to ulp(lse), an error that exp(r - lse) carries into every probability of the
row, relative 1e-5 at logits of a few hundred, a sharp softmax).  Then two kernels, one program per (image, block of
pixels) each.  The first walks the channels once: it writes its tile of
``grad_features = p^T @ dout`` and of ``grad_p = dout @ features`` and its share of
``delta = rowsum(p * grad_p)``.  The second forms ``grad_r = p * (grad_p - delta) / T`` (the softmax
backward of autograd: at a saturated softmax the two terms at the dominant pixel are the same
rounded number and cancel exactly, where ``rowsum(dout * out)``, equal in exact arithmetic, is a
differently rounded dot product and would leave noise of ulp(|dout| |f|) / T) and gives the heatmap
(``groups^T @ grad_r``) and groups (``grad_r @ heatmaps^T``, per-program partials summed in a fixed
order) gradients.
Memory: besides the outputs, M and Z [B, P], ``grad_p`` [B, P, S], the ``[B, S/BLOCK_S, P]``
delta shares and the ``[B, S/BLOCK_S, P, J]`` groups partials; the probabilities are never stored.
float64 has no tensor-core dot in Triton: its products are broadcast-multiply-sums.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from keypointops._opdefs.part_pool import grad_features_format, register_kernels_of

__all__ = ["part_pool_triton", "part_pool_triton_backward"]


@triton.jit
def _mm(a, b, FP64: tl.constexpr):
    """a [M, K] @ b [K, N], accumulated in float32 (float64 for FP64)."""
    if FP64:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _groups_tile(g_ptr, offs_p, offs_j, P, J):
    """The [BLOCK_P, BLOCK_J] groups matrix, zero-padded."""
    return tl.load(g_ptr + offs_p[:, None] * J + offs_j[None, :],
                   mask=(offs_p[:, None] < P) & (offs_j[None, :] < J), other=0.0)


@triton.jit
def _logits(hm_ptr, g, offs_p, offs_j, offs_s, P, J, S, temperature,
            IDENTITY: tl.constexpr, FP64: tl.constexpr):
    """The [BLOCK_P, BLOCK_S] tile of (groups @ heatmaps) / temperature of one image (0 off range)."""
    mask_s = offs_s[None, :] < S
    if IDENTITY:
        r = tl.load(hm_ptr + offs_p[:, None] * S + offs_s[None, :],
                    mask=(offs_p[:, None] < P) & mask_s, other=0.0).to(temperature.dtype)
    else:
        hm = tl.load(hm_ptr + offs_j[:, None] * S + offs_s[None, :],
                     mask=(offs_j[:, None] < J) & mask_s, other=0.0)
        r = _mm(g, hm, FP64).to(temperature.dtype)
    return r / temperature


@triton.jit
def _part_pool_fwd_kernel(f_ptr, hm_ptr, g_ptr, t_ptr, out_ptr,
                          P, J, C, S, stride_fb, stride_fc, stride_fs,
                          IDENTITY: tl.constexpr, FP64: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    temperature = tl.load(t_ptr)
    offs_p = tl.arange(0, BLOCK_P)
    offs_j = tl.arange(0, BLOCK_J)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < P
    mask_c = offs_c < C
    g = _groups_tile(g_ptr, offs_p, offs_j, P, J) if not IDENTITY else None
    hm_img = hm_ptr + b * J * S
    f_img = f_ptr + b * stride_fb
    row_max = tl.full([BLOCK_P], float("-inf"), temperature.dtype)
    row_sum = tl.zeros([BLOCK_P], temperature.dtype)
    acc = tl.zeros([BLOCK_P, BLOCK_C], temperature.dtype)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        r = _logits(hm_img, g, offs_p, offs_j, offs_s, P, J, S, temperature, IDENTITY, FP64)
        r = tl.where(offs_s[None, :] < S, r, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(r, axis=1))
        rescale = tl.exp(row_max - new_max)
        probs = tl.exp(r - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        f = tl.load(f_img + offs_s[:, None] * stride_fs + offs_c[None, :] * stride_fc,
                    mask=(offs_s[:, None] < S) & mask_c[None, :], other=0.0)
        acc = acc * rescale[:, None] + _mm(probs.to(f.dtype), f, FP64)
        row_max = new_max
    out = acc / row_sum[:, None]
    tl.store(out_ptr + b * P * C + offs_p[:, None] * C + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _part_pool_row_stats_kernel(hm_ptr, g_ptr, t_ptr, row_max_ptr, row_sum_ptr, P, J, S,
                                IDENTITY: tl.constexpr, FP64: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per image: the max M and sum Z = sum exp(r - M) of every part's logits, two passes over the
    pixel blocks (backward's p = exp(r - M) / Z, as the softmax of autograd)."""
    b = tl.program_id(0).to(tl.int64)
    temperature = tl.load(t_ptr)
    offs_p = tl.arange(0, BLOCK_P)
    offs_j = tl.arange(0, BLOCK_J)
    mask_p = offs_p < P
    g = _groups_tile(g_ptr, offs_p, offs_j, P, J) if not IDENTITY else None
    hm_img = hm_ptr + b * J * S
    row_max = tl.full([BLOCK_P], float("-inf"), temperature.dtype)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        r = _logits(hm_img, g, offs_p, offs_j, offs_s, P, J, S, temperature, IDENTITY, FP64)
        row_max = tl.maximum(row_max, tl.max(tl.where(offs_s[None, :] < S, r, float("-inf")), axis=1))
    row_sum = tl.zeros([BLOCK_P], temperature.dtype)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        r = _logits(hm_img, g, offs_p, offs_j, offs_s, P, J, S, temperature, IDENTITY, FP64)
        row_sum += tl.sum(tl.where(offs_s[None, :] < S, tl.exp(r - row_max[:, None]), 0.0), axis=1)
    tl.store(row_max_ptr + b * P + offs_p, row_max, mask=mask_p)
    tl.store(row_sum_ptr + b * P + offs_p, row_sum, mask=mask_p)


@triton.jit
def _probabilities(hm_ptr, g, row_max_ptr, row_sum_ptr, b, offs_p, offs_j, offs_s, P, J, S, temperature,
                   IDENTITY: tl.constexpr, FP64: tl.constexpr):
    """The [BLOCK_P, BLOCK_S] tile of p = exp(r - M) / Z of image b (0 off range)."""
    mask_p = offs_p < P
    r = _logits(hm_ptr + b * J * S, g, offs_p, offs_j, offs_s, P, J, S, temperature, IDENTITY, FP64)
    row_max = tl.load(row_max_ptr + b * P + offs_p, mask=mask_p, other=0.0)
    row_sum = tl.load(row_sum_ptr + b * P + offs_p, mask=mask_p, other=1.0)
    return tl.where(mask_p[:, None] & (offs_s[None, :] < S), tl.exp(r - row_max[:, None]) / row_sum[:, None], 0.0)


@triton.jit
def _pixel_block(g_ptr, t_ptr, P, J, S, IDENTITY: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr):
    """A backward program's image b and pixel block (axis 1): (b, pixel block, temperature, part,
    joint and pixel offsets, part and pixel masks, the groups tile (zeros, unread, for the identity))."""
    b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    offs_p = tl.arange(0, BLOCK_P)
    offs_j = tl.arange(0, BLOCK_J)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    if IDENTITY:  # no groups tile is read; a compiled kernel cannot return None
        g = tl.zeros([BLOCK_P, BLOCK_J], tl.float32)
    else:
        g = _groups_tile(g_ptr, offs_p, offs_j, P, J)
    return b, pid_s, tl.load(t_ptr), offs_p, offs_j, offs_s, offs_p < P, offs_s < S, g


@triton.jit
def _part_pool_bwd_kernel(f_ptr, hm_ptr, g_ptr, t_ptr, dout_ptr, row_max_ptr, row_sum_ptr, grad_f_ptr, grad_p_ptr,
                          delta_ptr, P, J, C, S, stride_fb, stride_fc, stride_fs,
                          stride_gfb, stride_gfc, stride_gfs,
                          IDENTITY: tl.constexpr, FP64: tl.constexpr, NEED_FEATURES: tl.constexpr,
                          NEED_LOGITS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (image, block of pixels): grad_features = p^T @ dout and, with NEED_LOGITS,
    grad_p = dout @ features ([B, P, S]) and this block's share of delta = rowsum(p * grad_p)."""
    b, pid_s, temperature, offs_p, offs_j, offs_s, mask_p, mask_s, g = _pixel_block(
        g_ptr, t_ptr, P, J, S, IDENTITY, BLOCK_P, BLOCK_J, BLOCK_S)
    probs = _probabilities(hm_ptr, g, row_max_ptr, row_sum_ptr, b, offs_p, offs_j, offs_s, P, J, S,
                           temperature, IDENTITY, FP64)
    grad_p = tl.zeros([BLOCK_P, BLOCK_S], temperature.dtype)
    f_img = f_ptr + b * stride_fb
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        dout = tl.load(dout_ptr + b * P * C + offs_p[:, None] * C + offs_c[None, :],
                       mask=mask_p[:, None] & mask_c[None, :], other=0.0)
        if NEED_FEATURES:
            grad_f = _mm(tl.trans(probs).to(dout.dtype), dout, FP64)           # [BLOCK_S, BLOCK_C]
            tl.store(grad_f_ptr + b * stride_gfb + offs_s[:, None] * stride_gfs
                     + offs_c[None, :] * stride_gfc, grad_f.to(grad_f_ptr.dtype.element_ty),
                     mask=mask_s[:, None] & mask_c[None, :])
        if NEED_LOGITS:
            f = tl.load(f_img + offs_c[:, None] * stride_fc + offs_s[None, :] * stride_fs,
                        mask=mask_c[:, None] & mask_s[None, :], other=0.0)     # [BLOCK_C, BLOCK_S]
            grad_p += _mm(dout, f, FP64).to(temperature.dtype)
    if NEED_LOGITS:
        tl.store(grad_p_ptr + b * P * S + offs_p[:, None] * S + offs_s[None, :], grad_p,
                 mask=mask_p[:, None] & mask_s[None, :])
        tl.store(delta_ptr + (b * tl.num_programs(1) + pid_s) * P + offs_p,
                 tl.sum(probs * grad_p, axis=1), mask=mask_p)


@triton.jit
def _part_pool_logits_bwd_kernel(hm_ptr, g_ptr, t_ptr, row_max_ptr, row_sum_ptr, grad_p_ptr, delta_ptr,
                                 grad_hm_ptr, grad_g_ptr, P, J, S, pixel_blocks,
                                 IDENTITY: tl.constexpr, FP64: tl.constexpr,
                                 NEED_HEATMAPS: tl.constexpr, NEED_GROUPS: tl.constexpr,
                                 BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per (image, block of pixels): grad_r = p * (grad_p - delta) / T with delta = rowsum(p * grad_p)
    (the block shares summed in block order), then grad_heatmaps = groups^T @ grad_r and this
    block's grad_r @ heatmaps^T share of grad_groups."""
    b, pid_s, temperature, offs_p, offs_j, offs_s, mask_p, mask_s, g = _pixel_block(
        g_ptr, t_ptr, P, J, S, IDENTITY, BLOCK_P, BLOCK_J, BLOCK_S)
    hm_img = hm_ptr + b * J * S
    probs = _probabilities(hm_ptr, g, row_max_ptr, row_sum_ptr, b, offs_p, offs_j, offs_s, P, J, S,
                           temperature, IDENTITY, FP64)
    delta = tl.zeros([BLOCK_P], temperature.dtype)
    for block in range(0, pixel_blocks):
        delta += tl.load(delta_ptr + (b * pixel_blocks + block) * P + offs_p, mask=mask_p, other=0.0)
    grad_p = tl.load(grad_p_ptr + b * P * S + offs_p[:, None] * S + offs_s[None, :],
                     mask=mask_p[:, None] & mask_s[None, :], other=0.0)
    grad_r = probs * (grad_p - delta[:, None]) / temperature                  # 0 off range
    if NEED_HEATMAPS:
        if IDENTITY:
            tl.store(grad_hm_ptr + b * J * S + offs_p[:, None] * S + offs_s[None, :],
                     grad_r.to(grad_hm_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_s[None, :])
        else:
            grad_hm = _mm(tl.trans(g).to(temperature.dtype), grad_r, FP64)  # [BLOCK_J, BLOCK_S]
            tl.store(grad_hm_ptr + b * J * S + offs_j[:, None] * S + offs_s[None, :],
                     grad_hm.to(grad_hm_ptr.dtype.element_ty), mask=(offs_j[:, None] < J) & mask_s[None, :])
    if NEED_GROUPS:
        hm = tl.load(hm_img + offs_j[:, None] * S + offs_s[None, :],
                     mask=(offs_j[:, None] < J) & mask_s[None, :], other=0.0)
        grad_g = _mm(grad_r, tl.trans(hm).to(temperature.dtype), FP64)       # [BLOCK_P, BLOCK_J]
        partial = (b * pixel_blocks + pid_s) * P * J
        tl.store(grad_g_ptr + partial + offs_p[:, None] * J + offs_j[None, :], grad_g,
                 mask=mask_p[:, None] & (offs_j[None, :] < J))


def _blocks(parts: int, joints: int, dtype: torch.dtype) -> dict:
    """Tile sizes: parts and joints padded to a power of two >= 16 (the smallest dot); float64
    (broadcast products held in registers) gets smaller pixel and channel tiles."""
    small = dtype == torch.float64
    return dict(BLOCK_P=max(16, triton.next_power_of_2(parts)),
                BLOCK_J=max(16, triton.next_power_of_2(joints)),
                BLOCK_S=16 if small else 32, BLOCK_C=16 if small else 64)


def _pointer(tensor: Tensor) -> Tensor:
    """``tensor``, or for an empty one a one-element stand-in (an empty tensor may have no storage,
    and Triton rejects a null pointer); a stand-in is never read or written, every access of it
    being masked."""
    return tensor if tensor.numel() else tensor.new_zeros(1)


def _prepare(features: Tensor, heatmaps: Tensor, groups: Tensor | None, temperature: float):
    """[B, C, S] view of the features (any strides), contiguous heatmaps [B, J, S] and groups, and
    the temperature as a one-element tensor of the accumulation dtype."""
    batch, channels, height, width = features.shape
    acc_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.reshape(batch, channels, height * width)
    hm = heatmaps.reshape(batch, heatmaps.size(1), height * width).contiguous()
    g = groups.contiguous() if groups is not None else hm  # hm: a placeholder pointer, never read
    t = torch.tensor([temperature], dtype=acc_dtype, device=features.device)
    return f, hm, g, t, acc_dtype


@torch.library.custom_op("keypointops::part_pool_triton", mutates_args=())
def part_pool_triton(features: Tensor, heatmaps: Tensor, groups: Tensor | None,
                     temperature: float) -> Tensor:
    """Triton forward: out [B, P, C]; the schema of ``keypointops::part_pool``."""
    f, hm, g, t, _ = _prepare(features, heatmaps, groups, temperature)
    batch, channels, pixels = f.shape
    joints = hm.size(1)
    parts = joints if groups is None else groups.size(0)
    out = features.new_empty(batch, parts, channels)
    if out.numel() == 0:
        return out
    blocks = _blocks(parts, joints, features.dtype)
    grid = (batch, triton.cdiv(channels, blocks["BLOCK_C"]))
    _part_pool_fwd_kernel[grid](_pointer(f), _pointer(hm), _pointer(g), t, out, parts, joints, channels, pixels,
                                f.stride(0), f.stride(1), f.stride(2), IDENTITY=groups is None,
                                FP64=features.dtype == torch.float64, **blocks)
    return out


@torch.library.custom_op("keypointops::part_pool_triton_backward", mutates_args=())
def part_pool_triton_backward(grad_out: Tensor, features: Tensor, heatmaps: Tensor,
                              groups: Tensor | None, temperature: float,
                              output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward: (grad_features, grad_heatmaps, grad_groups), empty [0] where not asked for."""
    need_features, need_heatmaps, need_groups = output_mask
    need_groups = need_groups and groups is not None
    f, hm, g, t, acc_dtype = _prepare(features, heatmaps, groups, temperature)
    batch, channels, pixels = f.shape
    joints = hm.size(1)
    parts = joints if groups is None else groups.size(0)
    grad_f = (torch.empty_like(features, memory_format=grad_features_format(features))
              if need_features else features.new_empty(0))
    grad_hm = features.new_empty(heatmaps.shape if need_heatmaps else (0,))
    blocks = _blocks(parts, joints, features.dtype)
    pixel_blocks = triton.cdiv(pixels, blocks["BLOCK_S"])
    need_logits = need_heatmaps or need_groups
    grad_p = features.new_empty(batch, parts, pixels, dtype=acc_dtype) if need_logits else t
    delta = features.new_empty(batch, pixel_blocks, parts, dtype=acc_dtype) if need_logits else t
    grad_g_partial = (features.new_empty(batch, pixel_blocks, parts, joints, dtype=acc_dtype)
                      if need_groups else t)  # t: a placeholder pointer, never written
    if batch and (need_features or need_logits):
        gf = grad_f.view(batch, channels, pixels) if need_features else f
        common = dict(IDENTITY=groups is None, FP64=features.dtype == torch.float64,
                      BLOCK_P=blocks["BLOCK_P"], BLOCK_J=blocks["BLOCK_J"], BLOCK_S=blocks["BLOCK_S"])
        row_max = features.new_empty(batch, parts, dtype=acc_dtype)
        row_sum = torch.empty_like(row_max)
        _part_pool_row_stats_kernel[(batch,)](_pointer(hm), _pointer(g), t, _pointer(row_max), _pointer(row_sum),
                                              parts, joints, pixels, **common)
        _part_pool_bwd_kernel[(batch, pixel_blocks)](
            _pointer(f), _pointer(hm), _pointer(g), t, _pointer(grad_out.contiguous()), _pointer(row_max),
            _pointer(row_sum),
            _pointer(gf), grad_p, delta, parts, joints, channels, pixels, f.stride(0), f.stride(1),
            f.stride(2), gf.stride(0), gf.stride(1), gf.stride(2), NEED_FEATURES=need_features,
            NEED_LOGITS=need_logits, BLOCK_C=blocks["BLOCK_C"], **common)
        if need_logits:
            _part_pool_logits_bwd_kernel[(batch, pixel_blocks)](
                _pointer(hm), _pointer(g), t, _pointer(row_max), _pointer(row_sum), grad_p, delta,
                _pointer(grad_hm),
                grad_g_partial, parts, joints, pixels, pixel_blocks, NEED_HEATMAPS=need_heatmaps,
                NEED_GROUPS=need_groups, **common)
    grad_g = grad_g_partial.sum((0, 1)).to(features.dtype) if need_groups else features.new_empty(0)
    return grad_f, grad_hm, grad_g


register_kernels_of("keypointops::part_pool_triton", "keypointops::part_pool_triton_backward")
