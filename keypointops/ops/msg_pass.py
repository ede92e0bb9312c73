"""``msg_pass``: fused softmax-temperature message aggregation (DeeperGCN / GENConv "softmax")."""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops import reference
from keypointops._extension import has_ops
from keypointops._opdefs import autocast
from keypointops._opdefs.backend import resolve_backend
from keypointops._opdefs.msg_pass import check_args, register_kernels_of
from keypointops.graphs import Graph

__all__ = ["msg_pass"]


def msg_pass(x: Tensor, graph: Graph | Tensor, t: float | Tensor = 1.0, eps: float = 1e-7, *,
             edge_attr: Tensor | None = None, backend: str = "auto") -> Tensor:
    r"""Softmax-temperature aggregation of the messages ``relu(x_u + e_uv) + eps`` into every node.

    With the message of edge :math:`u \to v` :math:`m_{uv} = \mathrm{relu}(x_u + e_{uv}) + \epsilon`
    (:math:`e_{uv} = 0` without ``edge_attr``), for every node ``v`` and channel ``c``

    .. math:: \mathrm{out}[v, c] = \sum_{u \in N(v)} \mathrm{softmax}_u(t_c\, m_{uv}[c])\, m_{uv}[c]

    and 0 where ``v`` has no incoming edge.  This is PyG's ``GENConv`` message plus
    ``SoftmaxAggregation`` in one pass (DeeperGCN, Li et al., arXiv 2020): an online softmax per
    (node, channel), no intermediate tensor of size ``E x C`` in forward or backward; backward
    recomputes the weights from the saved per-(node, channel) max and sum and walks the cached
    transposed CSR (no atomics, deterministic).  ``edge_attr`` is read in place, in the graph's
    edge order, through the graph's CSR permutations (no permuted copy); its gradient is the only
    ``E x C`` tensor backward writes.

    Args:
        x: ``[N, C]`` node features, float32, float64, float16 or bfloat16 (the last two summed
            in float32 by every backend).
        graph: a :class:`keypointops.Graph` (CSR over incoming edges; build it once and reuse it)
            or a PyG ``edge_index`` ``[2, E]`` (row 0 source, row 1 target), converted each call.
        t: inverse temperature: a float, a 0-dim or ``[1]`` tensor, or a ``[C]`` tensor (one per
            channel); differentiable when it is a tensor that requires grad.
        eps: the constant added to the messages.
        edge_attr: optional ``[E, C]`` edge features of ``x``'s dtype, row ``e`` for edge ``e``
            (column ``e`` of the ``edge_index``; for a :class:`keypointops.Graph`, its edge
            order, see :class:`~keypointops.Graph`); differentiable.
        backend: ``"auto"`` (compiled kernel for the tensor's device), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"reference"``.

    Returns:
        ``[N, C]`` tensor of ``x``'s dtype.

    Autocast: under ``torch.autocast`` the op computes in the dtype of ``x`` (bfloat16 or float16
    with float32 accumulation; a tensor ``t`` is taken in float32; ``edge_attr`` is cast to that
    dtype) on every backend.
    """
    dtype = autocast.compute_dtype(x)
    x = autocast.cast(x, dtype)
    edge_attr = autocast.cast(edge_attr, dtype)   # under autocast, in x's compute dtype
    graph = check_args(x, graph, t, eps, edge_attr)
    backend = resolve_backend("msg_pass", backend, x.device)
    if backend == "reference":
        return reference.msg_pass(x, graph, t, eps, edge_attr=edge_attr)
    t_channels = _channel_t(t, x)
    if backend == "triton":
        from keypointops.triton import msg_pass as triton_msg_pass
        forward = triton_msg_pass.msg_pass_triton
    else:
        forward = torch.ops.keypointops.msg_pass
    perms = (graph.perm, graph.perm_t) if edge_attr is not None else (None, None)
    out, _, _ = forward(x, graph.rowptr, graph.col, graph.rowptr_t, graph.col_t, t_channels, float(eps),
                        edge_attr, *perms)
    return out


def _channel_t(t, x: Tensor) -> Tensor:
    """``t`` as a ``[C]`` tensor of the accumulation dtype (differentiable expand of a scalar)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(t, Tensor):
        return t.to(dtype).expand(x.size(1))   # a 0-dim, [1] or [C] t: one view, no copy
    return torch.full((x.size(1),), float(t), dtype=dtype, device=x.device)


if has_ops():
    register_kernels_of("keypointops::msg_pass", "keypointops::msg_pass_backward")
