"""``window_graph_conv``: sliding-window block-adjacency graph conv (CTL's 3D-GCL, MS-G3D's G3D)."""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops import reference
from keypointops._extension import has_ops
from keypointops._opdefs import autocast
from keypointops._opdefs.backend import resolve_backend
from keypointops._opdefs.window_graph_conv import check_args, register_kernels_of, window_graph_conv_output_length

__all__ = ["window_graph_conv", "window_graph_conv_output_length"]


def window_graph_conv(x: Tensor, adj: Tensor, window: int, *, dilation: int = 1, stride: int = 1,
                      backend: str = "auto") -> Tensor:
    r"""Graph conv over sliding windows of frames with a block adjacency (no unfolded input).

    The windows are MS-G3D's (``nn.Unfold`` over the frames zero-padded by
    ``pad = (window - 1) * dilation // 2`` on both sides): window ``t`` holds the frames
    ``t * stride - pad + w * dilation``, ``w = 0 .. window-1`` (zeros for frames outside
    ``[0, T)``), and there are

    .. math:: T' = \left\lfloor \frac{T + 2\,\mathrm{pad} - (\mathrm{window} - 1)\,\mathrm{dilation}
              - 1}{\mathrm{stride}} \right\rfloor + 1

    of them (``T' = T`` for an odd window with stride 1: window ``t`` is centred on frame ``t``;
    ``T - 1`` for window 4 with stride 1).  Node ``j = w * N + n`` of a window is node ``n`` of slot
    ``w``'s frame, and

    .. math:: \mathrm{out}[b, t, i, :] = \sum_{j < L} \mathrm{adj}[b, t, i, j]\,
              x[b,\ t\,\mathrm{stride} - \mathrm{pad} + \lfloor j / N \rfloor\,\mathrm{dilation},\ j \bmod N,\ :]

    with ``L = window * N``.  ``adj`` may stack ``S`` adjacencies of the window (e.g. the ``S``
    scales of MS-G3D's multi-scale aggregation, its ``A_large``) as ``R = S * L`` rows; every
    window's input is then read once for all of them.  This is the aggregation of MS-G3D's G3D
    (Liu et al., CVPR 2020) and CTL's 3D graph conv layer (Liu et al., CVPR 2021), there written as
    an ``nn.Unfold`` of the input followed by an ``einsum``; here the ``[B, T', L, C]`` unfolded
    input is never built: every window's product reads its frames from ``x`` in place, in forward
    and in backward (which saves only ``x`` and ``adj``), and with ``stride > 1`` only the
    ``T'`` windows kept are computed.

    Args:
        x: ``[B, T, N, C]`` node features of ``T`` frames, float32, float64, float16 or bfloat16
            (the last two accumulated in float32 by every backend).
        adj: the window adjacency, already normalised (see
            :func:`keypointops.graphs.normalize_adjacency` and
            :func:`keypointops.graphs.block_adjacency`): ``[R, L]`` shared by every window,
            ``[B, R, L]`` per sample or ``[B, T', R, L]`` per window, ``R = S * L`` (``S = 1``:
            ``[L, L]``); same dtype as ``x``.  Differentiable.
        window: number of frames of a window (odd windows are centred on their frame; even ones,
            as in MS-G3D, start ``pad`` frames before ``t * stride``).
        dilation: frame step inside a window.
        stride: frame step between windows (MS-G3D's ``window_stride``).
        backend: ``"auto"`` (compiled kernel for the tensor's device), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, T', R, C]`` tensor of ``x``'s dtype: row ``i`` of window ``t``; MS-G3D / CTL then
        collapse the ``window`` slots of each node (see :class:`keypointops.nn.WindowGraphConv3D`
        and :class:`keypointops.nn.MSG3DWindow`).

    Autocast: under ``torch.autocast`` ``adj`` is cast to the dtype of ``x`` and the op computes
    in it (bfloat16 or float16 with float32 accumulation) on every backend.
    """
    dtype = autocast.compute_dtype(x)
    x, adj = autocast.cast(x, dtype), autocast.cast(adj, dtype)
    check_args(x, adj, window, dilation, stride)
    backend = resolve_backend("window_graph_conv", backend, x.device)
    if backend == "reference":
        with autocast.disabled(x):
            return reference.window_graph_conv(x, adj, window, dilation=dilation, stride=stride)
    if backend == "triton":
        from keypointops.triton import window_graph_conv as triton_window_graph_conv
        forward = triton_window_graph_conv.window_graph_conv_triton
    else:
        forward = torch.ops.keypointops.window_graph_conv
    return forward(x, adj, window, dilation, stride)


if has_ops():
    register_kernels_of("keypointops::window_graph_conv", "keypointops::window_graph_conv_backward")
