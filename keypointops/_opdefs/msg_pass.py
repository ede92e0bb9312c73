"""``msg_pass``: what the compiled op (``keypointops.ops``) and the Triton op
(``keypointops.triton``) share: argument checks, fake kernels and the autograd formula."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from keypointops._checks import check_choice
from keypointops._opdefs.backend import check_float_dtype, check_same_device, check_tensors, register_op_pair
from keypointops.graphs import Graph

# The aggregations of msg_pass (the raw ops' aggr argument takes the same names).
AGGREGATIONS = ("softmax", "softmax_sg", "powermean", "mean")


def check_args(x, graph, t, eps, edge_attr=None, aggr="softmax", p=1.0, clamp_min=1e-4, clamp_max=100.0) -> Graph:
    check_tensors("msg_pass", x=x)
    if x.dim() != 2:
        raise ValueError(f"msg_pass: x must be [N, C], got shape {list(x.shape)}")
    check_float_dtype("msg_pass", "x", x)
    if isinstance(graph, Tensor):
        check_same_device("msg_pass", "x", x.device, "edge_index", graph.device)
        graph = Graph.from_edge_index(graph, x.size(0))
    elif not isinstance(graph, Graph):
        raise TypeError(f"msg_pass: graph must be a keypointops.Graph or an edge_index Tensor, got "
                        f"{type(graph).__name__}")
    if graph.num_nodes != x.size(0):
        raise ValueError(f"msg_pass: graph has {graph.num_nodes} nodes but x has {x.size(0)} rows")
    check_same_device("msg_pass", "x", x.device, "graph", graph.device,
                      hint="; move the graph with graph.to(x.device)")
    check_aggr(aggr)
    if aggr == "powermean":
        _check_parameter("p", p, x, nonzero=True)
        for name, bound in (("clamp_min", clamp_min), ("clamp_max", clamp_max)):
            if bound is not None and (not isinstance(bound, (int, float)) or math.isnan(bound)):
                raise ValueError(f"msg_pass: {name} must be a float or None, got {bound!r}")
    elif aggr != "mean":   # the mean reads neither t nor p
        _check_parameter("t", t, x)
        if aggr == "softmax_sg" and isinstance(t, Tensor) and t.requires_grad:
            raise ValueError("msg_pass: t cannot require grad with aggr='softmax_sg' (its weights are "
                             "constants in backward)")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps):
        raise ValueError(f"msg_pass: eps must be a finite float, got {eps!r}")
    if edge_attr is not None:
        check_tensors("msg_pass", edge_attr=edge_attr)
        if edge_attr.shape != (graph.num_edges, x.size(1)):
            raise ValueError(f"msg_pass: edge_attr must be [E, C] = [{graph.num_edges}, {x.size(1)}], "
                             f"got {list(edge_attr.shape)}")
        if edge_attr.dtype != x.dtype:
            raise ValueError(f"msg_pass: edge_attr must be {x.dtype} like x, got {edge_attr.dtype}")
        check_same_device("msg_pass", "x", x.device, "edge_attr", edge_attr.device)
    return graph


def _check_parameter(name: str, value, x: Tensor, nonzero: bool = False) -> None:
    """The aggregation's parameter (``t`` or ``p``): a finite (non-zero) float, or a 0-dim, [1] or
    [C] floating point tensor on x's device."""
    condition = "finite and non-zero" if nonzero else "finite"
    if isinstance(value, Tensor):
        if value.dim() > 1 or (value.dim() == 1 and value.numel() not in (1, x.size(1))):
            raise ValueError(f"msg_pass: {name} must be a float, a 0-dim or [1] tensor, or a [C] = "
                             f"[{x.size(1)}] tensor, got shape {list(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"msg_pass: {name} must be a floating point tensor, got {value.dtype}")
        check_same_device("msg_pass", "x", x.device, name, value.device)
        if not torch.compiler.is_compiling():
            ok = torch.isfinite(value) & (value != 0) if nonzero else torch.isfinite(value)
            if not bool(ok.all()):
                raise ValueError(f"msg_pass: {name} must be {condition}")
    elif (not isinstance(value, (int, float)) or not math.isfinite(value)) or (nonzero and value == 0):
        raise ValueError(f"msg_pass: {name} must be a {condition} float or a tensor, got {value!r}")


def check_edge_args(x: Tensor, edge_attr: Tensor | None, perm: Tensor | None, num_edges: int,
                    perm_name: str) -> None:
    """The checks of the raw op's optional edge arguments (csrc/ops/msg_pass.cpp's
    check_msg_pass_edge_args), for the kernels called directly through ``torch.ops.keypointops``."""
    if (edge_attr is None) != (perm is None):
        raise ValueError(f"msg_pass: edge_attr and {perm_name} must be given together")
    if edge_attr is None:
        return
    if edge_attr.shape != (num_edges, x.size(1)) or edge_attr.dtype != x.dtype:
        raise ValueError(f"msg_pass: edge_attr must be [E, C] = [{num_edges}, {x.size(1)}] of {x.dtype}, "
                         f"got {edge_attr.dtype} {list(edge_attr.shape)}")
    if perm.shape != (num_edges,) or perm.dtype != torch.int64:
        raise ValueError(f"msg_pass: {perm_name} must be [E] = [{num_edges}] int64, got {perm.dtype} "
                         f"{list(perm.shape)}")
    for name, arg in (("edge_attr", edge_attr), (perm_name, perm)):
        check_same_device("msg_pass", "x", x.device, name, arg.device)


def check_aggr(aggr: str) -> None:
    """The raw ops' aggr argument (csrc/ops/msg_pass.cpp's parse_msg_pass_aggr)."""
    check_choice("msg_pass", "aggr", aggr, AGGREGATIONS)


def check_csr_args(x: Tensor, rowptr: Tensor, col: Tensor, t: Tensor, rowptr_name: str, col_name: str) -> None:
    """The checks of the raw op's CSR arguments (those of the compiled op, csrc/ops/msg_pass.cpp), for
    the kernels called directly through ``torch.ops.keypointops``."""
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
        check_same_device("msg_pass", "x", x.device, name, arg.device)


# --- torch.library registrations: fake kernels and the autograd formula --------------------------

# The defaults of the raw ops' trailing optional arguments (edge_attr, perm, perm_t, aggr,
# clamp_min, clamp_max), for calls that leave some of them out.
_OPTIONAL_DEFAULTS = (None, None, None, "softmax", 1e-4, 100.0)


def _fake_forward(x, rowptr, col, rowptr_t, col_t, t, eps, edge_attr=None, perm=None, perm_t=None,
                  aggr="softmax", clamp_min=1e-4, clamp_max=100.0):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=t.dtype), x.new_empty(x.shape, dtype=t.dtype)


def _fake_backward(grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t, eps, compute_grad_t,
                   edge_attr=None, perm_t=None, aggr="softmax", clamp_min=1e-4, clamp_max=100.0):
    grad_edge_attr = torch.empty_like(edge_attr) if edge_attr is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(t), grad_edge_attr


def _setup_context(ctx, inputs, output):
    x, _, _, rowptr_t, col_t, t, eps, *optional = inputs
    edge_attr, _, perm_t, aggr, clamp_min, clamp_max = (*optional, *_OPTIONAL_DEFAULTS[len(optional):])
    out, row_max, row_sum = output
    ctx.save_for_backward(x, t, out, row_max, row_sum, rowptr_t, col_t, edge_attr, perm_t)
    ctx.eps, ctx.aggr, ctx.clamp = eps, aggr, (clamp_min, clamp_max)


def _backward(ctx, backward_op, grad_out, _grad_row_max, _grad_row_sum):
    x, t, out, row_max, row_sum, rowptr_t, col_t, edge_attr, perm_t = ctx.saved_tensors
    need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[5]
    # One gradient per argument the caller passed (the optional edge arguments may be left out).
    num_args = len(ctx.needs_input_grad)
    need_edge = num_args > 7 and ctx.needs_input_grad[7]
    grad_x, grad_t, grad_edge_attr = backward_op(grad_out, x, out, row_max, row_sum, rowptr_t, col_t, t,
                                                 ctx.eps, need_t, edge_attr, perm_t, ctx.aggr, *ctx.clamp)
    return (grad_x if need_x else None, None, None, None, None, grad_t if need_t else None, None,
            grad_edge_attr if need_edge else None, None, None, None, None, None)[:num_args]


def register_kernels_of(forward_name: str, backward_name: str) -> None:
    """Registers the fake kernels and the autograd formula of a (forward, backward) op pair.

    Used for the compiled ops and for the Triton ops, which share their schemas.
    """
    register_op_pair(forward_name, backward_name, _fake_forward, _fake_backward, _setup_context, _backward)
