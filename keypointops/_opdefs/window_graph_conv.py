"""``window_graph_conv``: what the compiled op (``keypointops.ops``) and the Triton op
(``keypointops.triton``) share: argument checks, fake kernels and the autograd formula."""
from __future__ import annotations

from keypointops._opdefs.backend import check_float_dtype, check_same_device, check_tensors, register_op_pair


def check_args(x, adj, window, dilation) -> None:
    check_tensors("window_graph_conv", x=x, adj=adj)
    for name, value in (("window", window), ("dilation", dilation)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window_graph_conv: {name} must be an int, got {type(value).__name__}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window_graph_conv: window must be a positive odd number (the window is "
                         f"centred on its frame), got {window}")
    if dilation < 1:
        raise ValueError(f"window_graph_conv: dilation must be >= 1, got {dilation}")
    if x.dim() != 4:
        raise ValueError(f"window_graph_conv: x must be [B, T, N, C], got shape {list(x.shape)}")
    check_float_dtype("window_graph_conv", "x", x)
    batch, frames, nodes, _ = x.shape
    size = window * nodes
    if adj.dim() not in (2, 3, 4) or tuple(adj.shape[-2:]) != (size, size):
        raise ValueError(f"window_graph_conv: adj must be [L, L], [B, L, L] or [B, T, L, L] with "
                         f"L = window * N = {window} * {nodes} = {size}, got shape {list(adj.shape)}")
    if adj.dim() >= 3 and adj.size(0) != batch:
        raise ValueError(f"window_graph_conv: adj holds {adj.size(0)} samples (shape "
                         f"{list(adj.shape)}) but x holds B = {batch}")
    if adj.dim() == 4 and adj.size(1) != frames:
        raise ValueError(f"window_graph_conv: adj holds {adj.size(1)} windows per sample (shape "
                         f"{list(adj.shape)}) but x holds T = {frames} frames")
    if adj.dtype != x.dtype:
        raise ValueError(f"window_graph_conv: adj ({adj.dtype}) must have the dtype of x "
                         f"({x.dtype}); cast it with adj.to(x.dtype)")
    check_same_device("window_graph_conv", "x", x.device, "adj", adj.device)


# --- torch.library registrations: fake kernels and the autograd formula --------------------------

def _fake_forward(x, adj, window, dilation):
    batch, frames, nodes, channels = x.shape
    return x.new_empty((batch, frames, window * nodes, channels))


def _fake_backward(grad_out, x, adj, window, dilation, compute_grad_x, compute_grad_adj):
    return (x.new_empty(x.shape) if compute_grad_x else x.new_empty(0),
            adj.new_empty(adj.shape) if compute_grad_adj else adj.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, adj, window, dilation = inputs
    ctx.save_for_backward(x, adj)
    ctx.window, ctx.dilation = window, dilation


def _backward(ctx, backward_op, grad_out):
    x, adj = ctx.saved_tensors
    need_x, need_adj = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_adj = backward_op(grad_out, x, adj, ctx.window, ctx.dilation, need_x, need_adj)
    return grad_x if need_x else None, grad_adj if need_adj else None, None, None


def register_kernels_of(forward_name: str, backward_name: str) -> None:
    """Registers the fake kernels and the autograd formula of a (forward, backward) op pair.

    Used for the compiled ops and for the Triton ops, which share their schemas.
    """
    register_op_pair(forward_name, backward_name, _fake_forward, _fake_backward, _setup_context, _backward)
