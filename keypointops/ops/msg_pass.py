"""``msg_pass``: fused message aggregation (DeeperGCN / GENConv "softmax", "powermean", "mean")."""
from __future__ import annotations

import math

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
             edge_attr: Tensor | None = None, aggr: str = "softmax", p: float | Tensor = 1.0,
             clamp_min: float | None = 1e-4, clamp_max: float | None = 100.0,
             backend: str = "auto") -> Tensor:
    r"""Softmax-temperature, power-mean or mean aggregation of the messages ``relu(x_u + e_uv) + eps``.

    With the message of edge :math:`u \to v` :math:`m_{uv} = \mathrm{relu}(x_u + e_{uv}) + \epsilon`
    (:math:`e_{uv} = 0` without ``edge_attr``), for every node ``v`` and channel ``c``:

    - ``aggr="softmax"`` (DeeperGCN's SoftMax_Agg, PyG's ``SoftmaxAggregation``):

      .. math:: \mathrm{out}[v, c] = \sum_{u \in N(v)} \mathrm{softmax}_u(t_c\, m_{uv}[c])\, m_{uv}[c]

      and 0 where ``v`` has no incoming edge; ``aggr="softmax_sg"`` is the same output with the
      softmax weights taken as constants in backward (PyG's semi-gradient softmax, ``semi_grad``;
      ``t`` then gets no gradient and may not require one);
    - ``aggr="powermean"`` (DeeperGCN's PowerMean_Agg, PyG's ``PowerMeanAggregation`` with its
      clamping rules), with :math:`\mathrm{cl}` the clamp to ``[clamp_min, clamp_max]``:

      .. math:: \mathrm{out}[v, c] = \mathrm{cl}\Big(\frac{1}{|N(v)|} \sum_{u \in N(v)}
          \mathrm{cl}(m_{uv}[c])^{p_c}\Big)^{1/p_c}

      where the mean of an empty neighbourhood is 0, so that such a node gets
      ``clamp_min ** (1 / p)``; a ``p`` given as the plain number 1 is, as in PyG, the mean
      without any clamping;
    - ``aggr="mean"``: the mean of the messages, 0 where ``v`` has no incoming edge.

    This is PyG's ``GENConv`` message plus its aggregation in one pass (DeeperGCN, Li et al., arXiv
    2020), with no intermediate tensor of size ``E x C`` in forward or backward.  The softmax keeps
    an online softmax per (node, channel) and backward recomputes the weights from the saved
    per-(node, channel) max and sum; the power mean saves the mean before its clamp and backward
    recomputes the messages.  Backward walks the cached transposed CSR (no atomics,
    deterministic).  ``edge_attr`` is read in place, in the graph's edge order, through the graph's
    CSR permutations (no permuted copy); its gradient is the only ``E x C`` tensor backward writes.
    Gradients follow torch's rules for ``relu`` and ``clamp`` (zero outside the bounds, passed on at
    them).

    Args:
        x: ``[N, C]`` node features, float32, float64, float16 or bfloat16 (the last two summed
            in float32 by every backend).
        graph: a :class:`keypointops.Graph` (CSR over incoming edges; build it once and reuse it)
            or a PyG ``edge_index`` ``[2, E]`` (row 0 source, row 1 target), converted each call.
        t: the softmax's inverse temperature: a float, a 0-dim or ``[1]`` tensor, or a ``[C]``
            tensor (one per channel); differentiable when it is a tensor that requires grad.
        eps: the constant added to the messages.
        edge_attr: optional ``[E, C]`` edge features of ``x``'s dtype, row ``e`` for edge ``e``
            (column ``e`` of the ``edge_index``; for a :class:`keypointops.Graph`, its edge
            order, see :class:`~keypointops.Graph`); differentiable.
        aggr: ``"softmax"``, ``"softmax_sg"``, ``"powermean"`` or ``"mean"``.
        p: the power mean's power, non-zero: a float or a tensor shaped like ``t``;
            differentiable when it is a tensor that requires grad.
        clamp_min, clamp_max: the power mean's clamp bounds (``None``: unbounded), PyG's defaults.
        backend: ``"auto"`` (compiled kernel for the tensor's device), ``"cpu"``, ``"cuda"``,
            ``"triton"`` or ``"reference"``.

    Returns:
        ``[N, C]`` tensor of ``x``'s dtype.

    Autocast: under ``torch.autocast`` the op computes in the dtype of ``x`` (bfloat16 or float16
    with float32 accumulation; a tensor ``t`` or ``p`` is taken in float32; ``edge_attr`` is cast
    to that dtype) on every backend.
    """
    dtype = autocast.compute_dtype(x)
    x = autocast.cast(x, dtype)
    edge_attr = autocast.cast(edge_attr, dtype)   # under autocast, in x's compute dtype
    graph = check_args(x, graph, t, eps, edge_attr, aggr, p, clamp_min, clamp_max)
    backend = resolve_backend("msg_pass", backend, x.device)
    if aggr == "powermean" and not isinstance(p, Tensor) and p == 1:
        aggr = "mean"   # PyG's rule: a plain p of 1 is the mean, unclamped
    if backend == "reference":
        with autocast.disabled(x):
            return reference.msg_pass(x, graph, t, eps, edge_attr=edge_attr, aggr=aggr, p=p,
                                      clamp_min=clamp_min, clamp_max=clamp_max)
    parameter = _channel_parameter({"softmax": t, "softmax_sg": t, "powermean": p}.get(aggr, 1.0), x)  # mean: none
    if backend == "triton":
        from keypointops.triton import msg_pass as triton_msg_pass
        forward = triton_msg_pass.msg_pass_triton
    else:
        forward = torch.ops.keypointops.msg_pass
    perms = (graph.perm, graph.perm_t) if edge_attr is not None else (None, None)
    bounds = (-math.inf if clamp_min is None else float(clamp_min), math.inf if clamp_max is None else float(clamp_max))
    out, _, _ = forward(x, graph.rowptr, graph.col, graph.rowptr_t, graph.col_t, parameter, float(eps),
                        edge_attr, *perms, aggr, *bounds)
    return out


def _channel_parameter(value, x: Tensor) -> Tensor:
    """``t`` or ``p`` as a ``[C]`` tensor of the accumulation dtype (differentiable expand of a scalar)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(value, Tensor):
        return value.to(dtype).expand(x.size(1))   # a 0-dim, [1] or [C] tensor: one view, no copy
    return torch.full((x.size(1),), float(value), dtype=dtype, device=x.device)


if has_ops():
    register_kernels_of("keypointops::msg_pass", "keypointops::msg_pass_backward")
