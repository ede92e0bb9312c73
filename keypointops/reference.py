"""Plain-PyTorch reference of every op: the ground truth of the tests, written for clarity.

Each function computes its op's formula (stated in the op's docstring, ``keypointops.ops``) step by
step with ordinary autograd; the fused kernels must agree with it.  They allocate the large intermediates the kernels avoid.
"""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops.graphs import Graph

__all__ = ["keypoint_gather", "msg_pass", "part_pool", "rank_stats", "window_graph_conv"]


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def msg_pass(x: Tensor, graph: Graph | Tensor, t: float | Tensor = 1.0, eps: float = 1e-7, *,
             edge_attr: Tensor | None = None, aggr: str = "softmax", p: float | Tensor = 1.0,
             clamp_min: float | None = 1e-4, clamp_max: float | None = 100.0) -> Tensor:
    """With the messages ``m_uv = relu(x_u + e_uv) + eps`` (``e_uv`` row ``e`` of ``edge_attr`` for
    edge ``e``, 0 without it), per node v:

    - ``"softmax"``: ``out[v] = sum_{u in N(v)} softmax_u(t * m_uv) * m_uv``, 0 if N(v) is empty
      (``"softmax_sg"``: the same, the softmax weights taken as constants by autograd);
    - ``"powermean"``: ``out[v] = cl(mean_{u in N(v)} cl(m_uv) ** p) ** (1 / p)``, ``cl`` the
      clamp to ``[clamp_min, clamp_max]``, the mean of no message 0 (PyG's rules);
    - ``"mean"``: ``out[v] = mean_{u in N(v)} m_uv``, 0 if N(v) is empty."""
    num_nodes, channels = x.shape
    dtype = _accumulation_dtype(x.dtype)
    if isinstance(graph, Graph):  # the graph's edge order, which edge_attr follows
        src, dst = graph.edge_index[:, torch.argsort(graph.perm)]
    else:
        src, dst = graph[0].long(), graph[1].long()
    if edge_attr is None:
        messages = x.to(dtype)[src].relu() + eps                                # [E, C]
    else:
        messages = (x.to(dtype)[src] + edge_attr.to(dtype)).relu() + eps
    index = dst[:, None].expand_as(messages)
    zeros = torch.zeros(num_nodes, channels, dtype=dtype, device=x.device)
    if aggr in ("powermean", "mean"):
        power = aggr == "powermean"
        if power:
            p = p.to(dtype).reshape(-1) if isinstance(p, Tensor) else torch.tensor(p, dtype=dtype)
            messages = messages.clamp(clamp_min, clamp_max).pow(p)
        out = zeros.scatter_reduce(0, index, messages, "mean", include_self=False)   # 0 without edges
        if power:
            out = out.clamp(clamp_min, clamp_max).pow(1 / p)
        return out.to(x.dtype)
    t = t.to(dtype).reshape(-1) if isinstance(t, Tensor) else torch.tensor(t, dtype=dtype)
    logits = messages * t
    # The softmax is shift invariant: the per-node max only keeps exp() finite (no gradient).
    shift = torch.full((num_nodes, channels), float("-inf"), dtype=dtype, device=x.device)
    shift = shift.scatter_reduce(0, index, logits.detach(), "amax")
    weights = (logits - shift[dst]).exp()
    denom = zeros.index_add(0, dst, weights)
    alpha = weights / denom[dst]
    if aggr == "softmax_sg":    # PyG's semi-gradient softmax: the weights as constants
        alpha = alpha.detach()
    out = zeros.index_add(0, dst, alpha * messages)
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


def window_graph_conv(x: Tensor, adj: Tensor, window: int, dilation: int = 1, stride: int = 1) -> Tensor:
    """``out[b, t, i] = sum_j adj[.., i, j] * x[b, t * stride - pad + (j // N) * dilation, j % N]``
    (zero padded), ``pad = (window - 1) * dilation // 2``, for the ``T'`` windows of ``nn.Unfold``
    over the padded frames; ``adj`` has ``R = S * L`` rows.

    Builds the unfolded windows ``[B, T', L, C]`` explicitly (gather of the frames of every window,
    zeroed where the frame is outside ``[0, T)``), then multiplies by ``adj``.
    """
    batch, frames, nodes, channels = x.shape
    size = window * nodes
    pad = (window - 1) * dilation // 2
    reach = frames + 2 * pad - (window - 1) * dilation
    windows_out = 0 if reach <= 0 else (reach - 1) // stride + 1
    dtype = _accumulation_dtype(x.dtype)
    slots = torch.arange(window, device=x.device)
    starts = torch.arange(windows_out, device=x.device) * stride - pad
    window_frames = starts[:, None] + slots[None] * dilation                       # [T', window]
    inside = (window_frames >= 0) & (window_frames < frames)
    windows = x.to(dtype)[:, window_frames.clamp(0, max(frames - 1, 0))]           # [B, T', window, N, C]
    windows = (windows * inside[None, :, :, None, None]).reshape(batch, windows_out, size, channels)
    a = adj.to(dtype)
    if a.dim() == 2:
        out = torch.einsum("ij,btjc->btic", a, windows)
    elif a.dim() == 3:
        out = torch.einsum("bij,btjc->btic", a, windows)
    else:
        out = torch.einsum("btij,btjc->btic", a, windows)
    return out.to(x.dtype)


def keypoint_gather(features: Tensor, keypoints: Tensor, spatial_scale: float, *,
                    roi_size: float | Tensor = 1.0, sampling_ratio: int = 2, aligned: bool = True,
                    valid: Tensor | None = None, output_size: int | None = None) -> Tensor:
    """torchvision's ``roi_align(features, boxes, output_size, spatial_scale, sampling_ratio, aligned)``
    for the box of side ``roi_size`` (a number, or per keypoint ``[B, K]`` / ``[B, K, 2]`` sides
    along x and y) centred on each keypoint, as ``[B, K, C]`` (``output_size`` None) or
    ``[B, K, C, S, S]``; invalid keypoints (``valid`` False, confidence <= 0 for ``[B, K, 3]``
    keypoints, a non-finite coordinate or size, or a half side of 5e5 feature pixels or more) give 0.

    Every sample of every bin is interpolated on its own with torchvision's rules, in the order of
    torchvision's kernels; the ``[B, K, S, S, G, G, C]`` samples are materialised.
    """
    batch, channels, height, width = features.shape
    num_keypoints = keypoints.shape[1]
    bins = output_size or 1
    dtype = _accumulation_dtype(features.dtype)
    if valid is None:
        valid = keypoints[..., 2] > 0 if keypoints.size(-1) == 3 else torch.ones(
            keypoints.shape[:2], dtype=torch.bool, device=keypoints.device)
    centers = keypoints[..., :2].to(dtype)                                      # [B, K, 2] (x, y)
    if isinstance(roi_size, Tensor):
        sizes = roi_size.to(dtype)
        sizes = sizes if sizes.dim() == 3 else sizes[..., None].expand(batch, num_keypoints, 2)
    else:
        sizes = torch.full_like(centers, roi_size)
    half = sizes / 2
    sane = half.isfinite() & ((half * spatial_scale).abs() < 5e5)
    valid = valid & centers.isfinite().all(-1) & sane.all(-1)
    centers = torch.where(valid[..., None], centers, torch.zeros_like(centers))
    half = torch.where(valid[..., None], half, torch.zeros_like(half))
    # The box [x1, y1, x2, y2] in input pixels, then as torchvision: scale, shift, extent, bins.
    offset = 0.5 if aligned else 0.0
    start = (centers - half) * spatial_scale - offset
    end = (centers + half) * spatial_scale - offset
    extent = end - start
    if not aligned:
        extent = extent.clamp(min=1.0)
    bin_size = extent / bins                                                    # [B, K, 2]
    if sampling_ratio > 0:
        grid = torch.full_like(bin_size, sampling_ratio, dtype=torch.long)
    else:
        grid = bin_size.ceil().long()
    grid = torch.where(valid[..., None], grid, torch.zeros_like(grid))     # [B, K, 2]
    max_grid = max(int(grid.max()), 1) if grid.numel() else 1
    index = torch.arange(max_grid, device=features.device)
    bin_index = torch.arange(bins, device=features.device).to(dtype)
    # Sample i of bin p of an axis sits at start + p * bin_size + (i + 0.5) * bin_size / grid.
    bin_start = start[..., None] + bin_index * bin_size[..., None]              # [B, K, 2, S]
    steps = (index + 0.5).to(dtype) * bin_size[..., None] / grid[..., None].clamp(min=1)   # [B, K, 2, G]
    coords = bin_start[..., None] + steps[:, :, :, None, :]                     # [B, K, 2, S, G]
    in_grid = (index < grid[..., None])[:, :, :, None, :]                       # [B, K, 2, 1, G]

    def axis(p, size):
        """torchvision's bilinear rule along one axis: (inside, low, high, weight of high)."""
        inside = (p >= -1) & (p <= size)
        p = torch.where(inside, p.clamp(min=0), torch.zeros_like(p))
        low = p.long()
        at_end = low >= size - 1
        low = torch.where(at_end, torch.full_like(low, size - 1), low)
        high = torch.where(at_end, low, low + 1)
        frac = torch.where(at_end, torch.zeros_like(p), p - low.to(dtype))
        return inside, low, high, frac

    x_in, x_low, x_high, lx = axis(coords[:, :, 0], width)                     # [B, K, S, G]
    y_in, y_low, y_high, ly = axis(coords[:, :, 1], height)
    x_in, y_in = x_in & in_grid[:, :, 0], y_in & in_grid[:, :, 1]
    hy, hx = 1 - ly, 1 - lx
    # Samples (py, px, iy, ix): [B, K, S, S, G, G]; corners gathered from [B, H, W, C].
    pixels = features.to(dtype).permute(0, 2, 3, 1)
    b = torch.arange(batch, device=features.device)[:, None, None, None, None, None]

    def grid_of(along_y, along_x):
        return along_y[:, :, :, None, :, None], along_x[:, :, None, :, None, :]

    def corner(rows, cols):
        rows, cols = grid_of(rows, cols)
        return pixels[b, rows, cols]                                             # [B, K, S, S, G, G, C]

    def outer(wy, wx):
        wy, wx = grid_of(wy, wx)
        return (wy * wx)[..., None]

    value = (outer(hy, hx) * corner(y_low, x_low) + outer(hy, lx) * corner(y_low, x_high)
             + outer(ly, hx) * corner(y_high, x_low) + outer(ly, lx) * corner(y_high, x_high))
    y_counted, x_counted = grid_of(y_in, x_in)
    counted = (y_counted & x_counted)[..., None]
    total = torch.where(counted, value, torch.zeros_like(value)).sum((4, 5))    # [B, K, S, S, C]
    count = (grid[..., 0] * grid[..., 1]).clamp(min=1).to(dtype)
    out = total / count[:, :, None, None, None]
    out = torch.where(valid[:, :, None, None, None], out, torch.zeros_like(out)).to(features.dtype)
    return out.reshape(batch, num_keypoints, channels) if output_size is None else out.permute(0, 1, 4, 2, 3)


def rank_stats(dist: Tensor, q_pids: Tensor, q_camids: Tensor, g_pids: Tensor,
               g_camids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(first, ap, inp)`` of each query row, from a stable argsort of the row (torchreid's
    ``eval_market1501``): drop the items with the query's pid and camera and the junk (pid -1), then
    the ranks of the true matches among the kept items give ``first = rank_0``,
    ``AP = mean_k (k + 1) / (rank_k + 1)`` and ``INP = M / (rank_{M-1} + 1)`` (-1, 0, 0 without a match)."""
    if not bool(torch.isfinite(dist).all()):
        raise ValueError("rank_stats: distmat must be finite (it holds NaN or infinity)")
    order = torch.argsort(dist, dim=1, stable=True)
    pids, cams = g_pids[order], g_camids[order]
    same_pid = pids == q_pids[:, None]
    removed = (same_pid & (cams == q_camids[:, None])) | (pids == -1)
    num_queries = dist.shape[0]
    first = torch.full((num_queries,), -1, dtype=torch.int64, device=dist.device)
    ap = torch.zeros(num_queries, dtype=torch.float64, device=dist.device)
    inp = torch.zeros(num_queries, dtype=torch.float64, device=dist.device)
    for q in range(num_queries):
        kept = ~removed[q]
        ranks = same_pid[q][kept].nonzero().flatten().to(torch.float64)   # ranks of the true matches
        if ranks.numel() == 0:
            continue
        first[q] = int(ranks[0])
        ap[q] = ((torch.arange(ranks.numel(), dtype=torch.float64, device=dist.device) + 1) / (ranks + 1)).mean()
        inp[q] = ranks.numel() / (ranks[-1] + 1)
    return first, ap, inp
