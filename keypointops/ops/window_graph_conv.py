"""``window_graph_conv``: sliding-window block-adjacency graph conv (CTL's 3D-GCL, MS-G3D's G3D)."""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops import reference
from keypointops._extension import has_ops
from keypointops._opdefs import autocast
from keypointops._opdefs.backend import resolve_backend
from keypointops._opdefs.window_graph_conv import check_args, register_kernels_of

__all__ = ["window_graph_conv"]


def window_graph_conv(x: Tensor, adj: Tensor, window: int, *, dilation: int = 1,
                      backend: str = "auto") -> Tensor:
    r"""Graph conv over a sliding window of frames with a block adjacency (no unfolded input).

    Window ``t`` holds the frames ``t - pad + w * dilation``, ``w = 0 .. window-1``,
    ``pad = (window - 1) * dilation // 2`` (zeros for frames outside ``[0, T)``); node
    ``j = w * N + n`` of the window is node ``n`` of slot ``w``'s frame, and

    .. math:: \mathrm{out}[b, t, i, :] = \sum_{j < L} \mathrm{adj}[b, t, i, j]\,
              x[b,\ t - \mathrm{pad} + \lfloor j / N \rfloor \mathrm{dilation},\ j \bmod N,\ :]

    with ``L = window * N``.  This is the aggregation of MS-G3D's G3D and CTL's 3D graph conv
    layer (there written as an ``nn.Unfold`` of the input followed by an ``einsum``); here the
    ``[B, T, L, C]`` unfolded input is never built: every window's product reads its frames from
    ``x`` in place, in forward and in backward (which saves only ``x`` and ``adj``).

    Args:
        x: ``[B, T, N, C]`` node features of ``T`` frames, float32, float64, float16 or bfloat16
            (the last two accumulated in float32 by every backend).
        adj: the window adjacency, already normalised (see
            :func:`keypointops.graphs.normalize_adjacency` and
            :func:`keypointops.graphs.block_adjacency`): ``[L, L]`` shared by every window,
            ``[B, L, L]`` per sample or ``[B, T, L, L]`` per window; same dtype as ``x``.
            Differentiable.
        window: number of frames of a window, odd (the window is centred on its frame).
        dilation: frame step inside a window.
        backend: ``"auto"`` (compiled kernel for the tensor's device), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, T, L, C]`` tensor of ``x``'s dtype: row ``i`` of window ``t``; MS-G3D / CTL then
        collapse the ``window`` slots of each node (see :class:`keypointops.nn.WindowGraphConv3D`).

    Autocast: under ``torch.autocast`` ``adj`` is cast to the dtype of ``x`` and the op computes
    in it (bfloat16 or float16 with float32 accumulation) on every backend.
    """
    dtype = autocast.compute_dtype(x)
    x, adj = autocast.cast(x, dtype), autocast.cast(adj, dtype)
    check_args(x, adj, window, dilation)
    backend = resolve_backend("window_graph_conv", backend, x.device)
    if backend == "reference":
        return reference.window_graph_conv(x, adj, window, dilation=dilation)
    if backend == "triton":
        from keypointops.triton import window_graph_conv as triton_window_graph_conv
        forward = triton_window_graph_conv.window_graph_conv_triton
    else:
        forward = torch.ops.keypointops.window_graph_conv
    return forward(x, adj, window, dilation)


if has_ops():
    register_kernels_of("keypointops::window_graph_conv", "keypointops::window_graph_conv_backward")
