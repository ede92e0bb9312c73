"""Plain-PyTorch reference of every op: the ground truth of the tests, written for clarity.

Each function follows DESIGN.md's formula step by step with ordinary autograd; the fused kernels
must agree with it.  They allocate the large intermediates the kernels avoid.
"""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops.graphs import Graph

__all__ = ["msg_pass", "part_pool", "window_graph_conv"]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def msg_pass(x: Tensor, graph: Graph | Tensor, t: float | Tensor = 1.0, eps: float = 1e-7) -> Tensor:
    """``out[v] = sum_{u in N(v)} softmax_u(t * m_u) * m_u`` with ``m = relu(x) + eps``; 0 if N(v) is empty."""
    num_nodes, channels = x.shape
    edge_index = graph.edge_index if isinstance(graph, Graph) else graph
    src, dst = edge_index[0], edge_index[1]
    dtype = _accumulation_dtype(x.dtype)
    messages = (x.to(dtype).relu() + eps)[src]                                  # [E, C]
    t = t.to(dtype).reshape(-1) if isinstance(t, Tensor) else torch.tensor(t, dtype=dtype)
    logits = messages * t
    index = dst[:, None].expand_as(logits)
    # The softmax is shift invariant: the per-node max only keeps exp() finite (no gradient).
    shift = torch.full((num_nodes, channels), float("-inf"), dtype=dtype, device=x.device)
    shift = shift.scatter_reduce(0, index, logits.detach(), "amax")
    weights = (logits - shift[dst]).exp()
    denom = torch.zeros(num_nodes, channels, dtype=dtype, device=x.device).index_add(0, dst, weights)
    out = torch.zeros(num_nodes, channels, dtype=dtype, device=x.device)
    out = out.index_add(0, dst, weights / denom[dst] * messages)
    return out.to(x.dtype)


def part_pool(features: Tensor, heatmaps: Tensor, groups: Tensor | None = None,
              temperature: float = 1.0) -> Tensor:
    """``out[b, q] = sum_{h, w} softmax_{h, w}((groups @ heatmaps)[b, q] / temperature) * features[b, :, h, w]``."""
    dtype = _accumulation_dtype(features.dtype)
    logits = heatmaps.to(dtype).flatten(2)                                       # [B, J, H*W]
    if groups is not None:
        logits = torch.einsum("pj,bjs->bps", groups.to(dtype), logits)          # [B, P, H*W]
    probs = torch.softmax(logits / temperature, dim=-1)
    out = torch.einsum("bps,bcs->bpc", probs, features.to(dtype).flatten(2))    # [B, P, C]
    return out.to(features.dtype)


def window_graph_conv(x: Tensor, adj: Tensor, window: int, dilation: int = 1) -> Tensor:
    """``out[b, t, i] = sum_j adj[.., i, j] * x[b, t - pad + (j // N) * dilation, j % N]`` (zero padded).

    Builds the unfolded windows ``[B, T, L, C]`` explicitly (gather of the frames of every window,
    zeroed where the frame is outside ``[0, T)``), then multiplies by ``adj``.
    """
    batch, frames, nodes, channels = x.shape
    size = window * nodes
    pad = (window - 1) * dilation // 2
    dtype = _accumulation_dtype(x.dtype)
    slots = torch.arange(window, device=x.device)
    window_frames = torch.arange(frames, device=x.device)[:, None] - pad + slots[None] * dilation
    inside = (window_frames >= 0) & (window_frames < frames)                      # [T, window]
    windows = x.to(dtype)[:, window_frames.clamp(0, max(frames - 1, 0))]           # [B, T, window, N, C]
    windows = (windows * inside[None, :, :, None, None]).reshape(batch, frames, size, channels)
    a = adj.to(dtype)
    if a.dim() == 2:
        out = torch.einsum("ij,btjc->btic", a, windows)
    elif a.dim() == 3:
        out = torch.einsum("bij,btjc->btic", a, windows)
    else:
        out = torch.einsum("btij,btjc->btic", a, windows)
    return out.to(x.dtype)

