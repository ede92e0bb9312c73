"""``msg_pass``: fused softmax-temperature message aggregation (DeeperGCN / GENConv "softmax")."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from keypointops import reference
from keypointops._extension import has_ops
from keypointops.graphs import Graph
from keypointops.ops._backend import register_op_pair, resolve_backend

__all__ = ["msg_pass"]


def msg_pass(x: Tensor, graph: Graph | Tensor, t: float | Tensor = 1.0, eps: float = 1e-7, *,
             backend: str = "auto") -> Tensor:
    r"""Softmax-temperature aggregation of the messages ``relu(x_u) + eps`` into every node.

    With :math:`m_u = \mathrm{relu}(x_u) + \epsilon`, for every node ``v`` and channel ``c``

    .. math:: \mathrm{out}[v, c] = \sum_{u \in N(v)} \mathrm{softmax}_u(t_c\, m[u, c])\, m[u, c]

    and 0 where ``v`` has no incoming edge.  This is PyG's ``GENConv`` message plus
    ``SoftmaxAggregation`` in one pass: an online softmax per (node, channel), no tensor of size
    ``E x C`` in forward or backward; backward recomputes the weights from the saved per-(node,
    channel) max and sum and walks the cached transposed CSR (no atomics, deterministic).

    Args:
        x: ``[N, C]`` node features, float32 or float64 (float16/bfloat16 on CUDA).
        graph: a :class:`keypointops.Graph` (CSR over incoming edges; build it once and reuse it)
            or a PyG ``edge_index`` ``[2, E]`` (row 0 source, row 1 target), converted each call.
        t: inverse temperature: a float, a 0-dim or ``[1]`` tensor, or a ``[C]`` tensor (one per
            channel); differentiable when it is a tensor that requires grad.
        eps: the constant added to the messages.
        backend: ``"auto"`` (compiled kernel for the tensor's device), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"reference"``.

    Returns:
        ``[N, C]`` tensor of ``x``'s dtype.
    """
    graph = _check_args(x, graph, t, eps)
    backend = resolve_backend("msg_pass", backend, x.device)
    if backend == "reference":
        return reference.msg_pass(x, graph, t, eps)
    t_channels = _channel_t(t, x)
    if backend == "triton":
        from keypointops.triton import msg_pass as triton_msg_pass
        forward = triton_msg_pass.msg_pass_triton
    else:
        forward = torch.ops.keypointops.msg_pass
    out, _, _ = forward(x, graph.rowptr, graph.col, graph.rowptr_t, graph.col_t, t_channels, float(eps))
    return out


def _check_args(x, graph, t, eps) -> Graph:
    if not isinstance(x, Tensor):
        raise TypeError(f"msg_pass: x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"msg_pass: x must be [N, C], got shape {list(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"msg_pass: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if isinstance(graph, Tensor):
        if graph.device != x.device:
            raise ValueError(f"msg_pass: x ({x.device}) and edge_index ({graph.device}) must be on the "
                             "same device")
        graph = Graph.from_edge_index(graph, x.size(0))
    elif not isinstance(graph, Graph):
        raise TypeError(f"msg_pass: graph must be a keypointops.Graph or an edge_index Tensor, got "
                        f"{type(graph).__name__}")
    if graph.num_nodes != x.size(0):
        raise ValueError(f"msg_pass: graph has {graph.num_nodes} nodes but x has {x.size(0)} rows")
    if graph.device != x.device:
        raise ValueError(f"msg_pass: x ({x.device}) and graph ({graph.device}) must be on the same "
                         "device; move the graph with graph.to(x.device)")
    if isinstance(t, Tensor):
        if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, x.size(1))):
            raise ValueError(f"msg_pass: t must be a float, a 0-dim or [1] tensor, or a [C] = "
                             f"[{x.size(1)}] tensor, got shape {list(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"msg_pass: t must be a floating point tensor, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"msg_pass: x ({x.device}) and t ({t.device}) must be on the same device")
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(t).all()):
            raise ValueError("msg_pass: t must be finite")
    elif not isinstance(t, (int, float)) or not math.isfinite(t):
        raise ValueError(f"msg_pass: t must be a finite float or a tensor, got {t!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"msg_pass: eps must be a finite float, got {eps!r}")
    return graph


def _channel_t(t, x: Tensor) -> Tensor:
    """``t`` as a ``[C]`` tensor of the accumulation dtype (differentiable expand of a scalar)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(t, Tensor):
        return t.to(dtype).reshape(-1).expand(x.size(1))
    return torch.full((x.size(1),), float(t), dtype=dtype, device=x.device)


# --- torch.library registrations: fake kernels and the autograd formula --------------------------

def _fake_forward(x, rowptr, col, rowptr_t, col_t, t, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=t.dtype), x.new_empty(x.shape, dtype=t.dtype)


def _fake_backward(grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t, eps, compute_grad_t):
    return torch.empty_like(x), torch.empty_like(t)


def _setup_context(ctx, inputs, output):
    x, _, _, rowptr_t, col_t, t, eps = inputs
    out, row_max, row_sum = output
    ctx.save_for_backward(x, t, out, row_max, row_sum, rowptr_t, col_t)
    ctx.eps = eps


def _backward(ctx, backward_op, grad_out, _grad_row_max, _grad_row_sum):
    x, t, out, row_max, row_sum, rowptr_t, col_t = ctx.saved_tensors
    need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    grad_x, grad_t = backward_op(grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t,
                                 ctx.eps, need_t)
    return grad_x if need_x else None, None, None, None, None, grad_t if need_t else None, None


def register_kernels_of(forward_name: str, backward_name: str) -> None:
    """Registers the fake kernels and the autograd formula of a (forward, backward) op pair.

    Used for the compiled ops and for the Triton ops, which share their schemas.
    """
    register_op_pair(forward_name, backward_name, _fake_forward, _fake_backward, _setup_context, _backward)


if has_ops():
    register_kernels_of("keypointops::msg_pass", "keypointops::msg_pass_backward")
