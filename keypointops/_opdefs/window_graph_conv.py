"""``window_graph_conv``: what the compiled op (``keypointops.ops``) and the Triton op
(``keypointops.triton``) share: argument checks, fake kernels and the autograd formula."""
from __future__ import annotations

from keypointops._opdefs.backend import check_float_dtype, check_same_device, check_tensors, register_op_pair


def window_graph_conv_output_length(frames: int, window: int, dilation: int = 1, stride: int = 1) -> int:
    """``T'``, the number of windows :func:`keypointops.window_graph_conv` returns for ``frames``
    frames: the windows of ``nn.Unfold`` (MS-G3D's temporal windows) over the frames zero-padded
    by ``(window - 1) * dilation // 2`` on both sides, with the given stride; 0 when the padded clip
    is shorter than one window.  Use it to size a time-varying ``adj`` ``[B, T', R, L]``."""
    reach = frames + 2 * ((window - 1) * dilation // 2) - (window - 1) * dilation
    return 0 if reach <= 0 else (reach - 1) // stride + 1


def check_args(x, adj, window, dilation, stride) -> None:
    check_tensors("window_graph_conv", x=x, adj=adj)
    for name, value in (("window", window), ("dilation", dilation), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window_graph_conv: {name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"window_graph_conv: {name} must be >= 1, got {value}")
    if x.dim() != 4:
        raise ValueError(f"window_graph_conv: x must be [B, T, N, C], got shape {list(x.shape)}")
    check_float_dtype("window_graph_conv", "x", x)
    batch, frames, nodes, _ = x.shape
    size = window * nodes
    rows = adj.size(-2) if adj.dim() >= 2 else -1
    stacked = rows == 0 if size == 0 else rows > 0 and rows % size == 0
    if adj.dim() not in (2, 3, 4) or adj.size(-1) != size or not stacked:
        raise ValueError(f"window_graph_conv: adj must be [R, L], [B, R, L] or [B, T', R, L] with "
                         f"L = window * N = {window} * {nodes} = {size} and R = S * L (S stacked "
                         f"scales), got shape {list(adj.shape)}")
    if adj.dim() >= 3 and adj.size(0) != batch:
        raise ValueError(f"window_graph_conv: adj holds {adj.size(0)} samples (shape "
                         f"{list(adj.shape)}) but x holds B = {batch}")
    windows = window_graph_conv_output_length(frames, window, dilation, stride)
    if adj.dim() == 4 and adj.size(1) != windows:
        raise ValueError(f"window_graph_conv: adj holds {adj.size(1)} windows per sample (shape "
                         f"{list(adj.shape)}) but x's T = {frames} frames make T' = {windows} "
                         f"windows (window {window}, dilation {dilation}, stride {stride})")
    if adj.dtype != x.dtype:
        raise ValueError(f"window_graph_conv: adj ({adj.dtype}) must have the dtype of x "
                         f"({x.dtype}); cast it with adj.to(x.dtype)")
    check_same_device("window_graph_conv", "x", x.device, "adj", adj.device)


# --- torch.library registrations: fake kernels and the autograd formula --------------------------

def _fake_forward(x, adj, window, dilation, stride):
    batch, frames, _, channels = x.shape
    return x.new_empty((batch, window_graph_conv_output_length(frames, window, dilation, stride), adj.size(-2), channels))


def _fake_backward(grad_out, x, adj, window, dilation, stride, compute_grad_x, compute_grad_adj):
    return (x.new_empty(x.shape) if compute_grad_x else x.new_empty(0),
            adj.new_empty(adj.shape) if compute_grad_adj else adj.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, adj, window, dilation, stride = inputs
    ctx.save_for_backward(x, adj)
    ctx.window, ctx.dilation, ctx.stride = window, dilation, stride


def _backward(ctx, backward_op, grad_out):
    x, adj = ctx.saved_tensors
    need_x, need_adj = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_adj = backward_op(grad_out, x, adj, ctx.window, ctx.dilation, ctx.stride, need_x,
                                   need_adj)
    return grad_x if need_x else None, grad_adj if need_adj else None, None, None, None


def register_kernels_of(forward_name: str, backward_name: str) -> None:
    """Registers the fake kernels and the autograd formula of a (forward, backward) op pair.

    Used for the compiled ops and for the Triton ops, which share their schemas.
    """
    register_op_pair(forward_name, backward_name, _fake_forward, _fake_backward, _setup_context, _backward)
