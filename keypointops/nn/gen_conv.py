"""``GENConv``: PyTorch Geometric's DeeperGCN convolution with the fused ``msg_pass`` aggregation.

A drop-in replacement for ``torch_geometric.nn.GENConv``: same constructor arguments, parameter
names and forward call, so a PyG state dict loads with ``strict=True`` and gives the same output.
With the softmax, power-mean and mean aggregations the message ``relu(x_j + e_ji) + eps`` and the
aggregation run as one :func:`keypointops.msg_pass` call instead of PyG's gather / scatter over
``E x C`` tensors.  PyTorch Geometric is not needed at run time.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import BatchNorm1d, Dropout, InstanceNorm1d, LayerNorm, Linear, Parameter, ReLU, Sequential

from keypointops.graphs import Graph
from keypointops.ops import msg_pass
from keypointops._opdefs.backend import check_backend

__all__ = ["GENConv", "MessageNorm", "MsgPassAggregation", "PowerMeanAggregation", "ScatterAggregation"]

_NORMS = {"batch": lambda c: BatchNorm1d(c, affine=True),
          "layer": lambda c: LayerNorm(c, elementwise_affine=True),
          "instance": lambda c: InstanceNorm1d(c, affine=False)}
_AGGR_KWARGS = {"softmax": ("t", "learn", "semi_grad", "channels"),
                "powermean": ("p", "learn", "channels", "clamp_min", "clamp_max")}
# PyG's names of the plain reductions -> torch's scatter_reduce names.
_SCATTER_REDUCE = {"add": "sum", "sum": "sum", "mean": "mean", "max": "amax", "min": "amin"}
SUPPORTED_AGGR = ("softmax", "softmax_sg", "powermean", "power", "add", "sum", "mean", "max", "min")


class _LearnableAggregation(torch.nn.Module):
    """An aggregation with one scalar hyper-parameter (``PARAM``: ``t`` or ``p``) that PyG holds as
    a float, or as a ``Parameter`` of shape ``[channels]`` when ``learn`` (state dict key ``PARAM``)."""

    PARAM = ""

    def __init__(self, value: float, learn: bool, channels: int, nonzero: bool = False):
        super().__init__()
        name = f"{type(self).__name__}: "
        if not learn and channels != 1:
            raise ValueError(f"{name}channels must be 1 when {self.PARAM} is not learned, got {channels}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{name}channels must be a positive int, got {channels!r}")
        if not isinstance(value, (int, float)) or not math.isfinite(value) or (nonzero and value == 0):
            raise ValueError(f"{name}{self.PARAM} must be a finite{' non-zero' if nonzero else ''} float, "
                             f"got {value!r}")
        self._init_value = float(value)
        self.learn = learn
        self.channels = channels
        setattr(self, self.PARAM, Parameter(torch.empty(channels)) if learn else float(value))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        value = getattr(self, self.PARAM)
        if isinstance(value, Tensor):
            value.data.fill_(self._init_value)

    def extra_repr(self) -> str:
        return f"learn={self.learn}, channels={self.channels}"


class MsgPassAggregation(_LearnableAggregation):
    r"""Message ``relu(x_j) + eps`` and softmax-temperature aggregation, fused (:func:`keypointops.msg_pass`).

    Holds the inverse temperature ``t`` like PyG's ``SoftmaxAggregation(t, learn, semi_grad,
    channels)``: a ``Parameter`` of shape ``[channels]`` when ``learn`` (state dict key ``t``), a
    float otherwise; ``semi_grad`` takes the softmax weights as constants in backward (PyG's
    semi-gradient softmax, ``aggr="softmax_sg"``; not with a learnable ``t``).  Unlike PyG's
    aggregation it takes node features and a graph, not gathered messages: it computes
    ``out[v] = sum_{u in N(v)} softmax_u(t * m_u) * m_u`` with ``m_u = relu(x_u) + eps``.
    """

    PARAM = "t"

    def __init__(self, t: float = 1.0, learn: bool = False, channels: int = 1, semi_grad: bool = False):
        if learn and semi_grad:
            raise ValueError(f"{type(self).__name__}: semi_grad=True cannot be used with a learnable t")
        super().__init__(t, learn, channels)
        self.semi_grad = semi_grad

    def forward(self, x: Tensor, graph: Graph | Tensor, eps: float = 1e-7, backend: str = "auto",
                edge_attr: Tensor | None = None) -> Tensor:
        return msg_pass(x, graph, self.t, eps, edge_attr=edge_attr, aggr="softmax_sg" if self.semi_grad else "softmax",
                        backend=backend)


def _messages(x: Tensor, graph: Graph | Tensor, eps: float, edge_attr: Tensor | None) -> tuple[Tensor, Tensor]:
    """GENConv's messages ``relu(x_src + e) + eps`` ``[E, C]`` and their targets ``[E]``, in the
    edge order of ``graph`` (plain PyTorch: the messages are materialised)."""
    if isinstance(graph, Graph):
        src, dst = graph.edge_index
        edge_attr = edge_attr[graph.perm] if edge_attr is not None else None   # into CSR order
    else:
        src, dst = graph[0].long(), graph[1].long()
    h = x[src] if edge_attr is None else x[src] + edge_attr
    return h.relu() + eps, dst


class PowerMeanAggregation(_LearnableAggregation):
    r"""GENConv's message and power-mean aggregation, fused (:func:`keypointops.msg_pass` with
    ``aggr="powermean"``).

    .. math:: \mathrm{out}_v = \mathrm{cl}\Big(\frac{1}{|N(v)|} \sum_{u \in N(v)}
        \mathrm{cl}(m_{uv})^p\Big)^{1/p}

    with the messages :math:`m_{uv} = \mathrm{relu}(x_u + e_{uv}) + \epsilon` and :math:`\mathrm{cl}`
    the clamp to ``[clamp_min, clamp_max]`` (DeeperGCN, Li et al., arXiv 2020).  The same
    computation, clamping rules and parameter as PyG's ``PowerMeanAggregation(p, learn, channels,
    clamp_min, clamp_max)``: messages and the mean are clamped (``None``: no bound) unless ``p`` is
    the plain number 1, which is the unclamped mean; ``p`` is a ``Parameter`` of shape
    ``[channels]`` when ``learn`` (state dict key ``p``).  A node without incoming edges gets
    ``clamp_min ** (1 / p)``, as in PyG.  Unlike PyG's aggregation it takes node features and a
    graph, not gathered messages, and materialises no ``[E, C]`` tensor.
    """

    PARAM = "p"

    def __init__(self, p: float = 1.0, learn: bool = False, channels: int = 1,
                 clamp_min: float | None = 1e-4, clamp_max: float | None = 100.0):
        super().__init__(p, learn, channels, nonzero=True)
        self.min_value, self.max_value = clamp_min, clamp_max

    def forward(self, x: Tensor, graph: Graph | Tensor, eps: float = 1e-7, backend: str = "auto",
                edge_attr: Tensor | None = None) -> Tensor:
        return msg_pass(x, graph, eps=eps, edge_attr=edge_attr, aggr="powermean", p=self.p,
                        clamp_min=self.min_value, clamp_max=self.max_value, backend=backend)


class ScatterAggregation(torch.nn.Module):
    """GENConv's message and a plain reduction (``"add"``/``"sum"``, ``"mean"``, ``"max"``,
    ``"min"``; 0 where a node has no incoming edge): the mean fused (:func:`keypointops.msg_pass`
    with ``aggr="mean"``), the others in plain PyTorch as PyG computes them."""

    def __init__(self, reduce: str):
        super().__init__()
        self.reduce = reduce

    def forward(self, x: Tensor, graph: Graph | Tensor, eps: float = 1e-7, backend: str = "auto",
                edge_attr: Tensor | None = None) -> Tensor:
        if self.reduce == "mean":
            return msg_pass(x, graph, eps=eps, edge_attr=edge_attr, aggr="mean", backend=backend)
        messages, dst = _messages(x, graph, eps, edge_attr)
        return _scatter(messages, dst, x.size(0), _SCATTER_REDUCE[self.reduce])

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}"


def _scatter(messages: Tensor, dst: Tensor, num_nodes: int, reduce: str) -> Tensor:
    """``reduce`` of the rows of ``messages`` per target in ``dst``; 0 for a node without any."""
    out = messages.new_zeros(num_nodes, messages.size(1))
    return out.scatter_reduce(0, dst[:, None].expand_as(messages), messages, reduce, include_self=False)


class MessageNorm(torch.nn.Module):
    r"""Message normalisation ``s * ||x_i||_2 * m_i / ||m_i||_2`` (DeeperGCN).

    The same computation and parameter (``scale``, shape ``[1]``, trainable iff ``learn_scale``)
    as ``torch_geometric.nn.norm.MessageNorm``.
    """

    def __init__(self, learn_scale: bool = False, device: torch.device | None = None):
        super().__init__()
        self.scale = Parameter(torch.empty(1, device=device), requires_grad=learn_scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.scale.data.fill_(1.0)

    def forward(self, x: Tensor, msg: Tensor, p: float = 2.0) -> Tensor:
        msg = F.normalize(msg, p=p, dim=-1)
        x_norm = x.norm(p=p, dim=-1, keepdim=True)
        return msg * x_norm * self.scale

    def extra_repr(self) -> str:
        return f"learn_scale={self.scale.requires_grad}"


def _mlp(channels: list[int], norm: str | None, bias: bool) -> Sequential:
    """PyG GENConv's MLP, module for module (Linear, norm, ReLU, Dropout(0), ..., Linear) so that
    the state dict keys (``mlp.0.weight``, ``mlp.1.running_mean``, ...) are the same."""
    layers = []
    for i in range(1, len(channels)):
        layers.append(Linear(channels[i - 1], channels[i], bias=bias))
        if i < len(channels) - 1:
            if norm:
                layers.append(_NORMS[norm](channels[i]))
            layers += [ReLU(), Dropout(0.0)]
    return Sequential(*layers)


class GENConv(torch.nn.Module):
    r"""DeeperGCN's GENeralized Graph Convolution (Li et al., arXiv 2020), its aggregations fused.

    .. math::
        \mathbf{x}_i' = \mathrm{MLP}\Big(\mathbf{x}_i + \mathrm{AGG}_{j \in N(i)}\,
        \mathbf{m}_{ji}\Big), \qquad
        \mathbf{m}_{ji} = \mathrm{relu}(\mathbf{x}_j + \mathbf{e}_{ji}) + \epsilon

    **Matches** ``torch_geometric.nn.GENConv`` (2.8): the constructor arguments (same names, order
    and defaults, including ``bias=False`` and ``norm="batch"``), ``t`` / ``learn_t``, ``p`` /
    ``learn_p``, ``num_layers`` / ``expansion`` / ``norm`` (``"batch"``, ``"layer"``,
    ``"instance"`` or ``None``), ``eps``, ``bias``, ``msg_norm`` / ``learn_msg_scale``,
    ``edge_dim`` (an edge encoder ``lin_edge`` when ``edge_dim != out_channels``; without
    ``edge_dim`` the edge features must have ``out_channels`` columns), ``in_channels`` as an int
    or a ``(source, destination)`` pair (``lin_src`` / ``lin_dst`` where they differ from
    ``out_channels``) and ``aggr_kwargs`` (e.g. ``dict(t=..., learn=True, channels=out_channels)``
    for a per-channel ``t``); the parameter and buffer names (``aggr_module.t`` /
    ``aggr_module.p``, ``mlp.*``, ``msg_norm.scale``, ``lin_src.*``, ``lin_dst.*``,
    ``lin_edge.*``), so ``load_state_dict(pyg_conv.state_dict(), strict=True)`` works both ways;
    the forward call ``conv(x, edge_index, edge_attr=None, size=None)`` with ``x`` a tensor or a
    bipartite pair ``(x_src, x_dst)`` (``x_dst`` may be ``None``), ``edge_index`` an int64 or int32
    ``[2, E]`` tensor, a PyG ``EdgeIndex`` or a transposed torch sparse adjacency ``adj_t``
    ``[N_dst, N_src]`` (COO, CSR or CSC; its values, when ``[E, D]``, are the edge features), as
    PyG takes them; ``repr``; the output and the gradients (to float32 rounding: the fused op sums
    in another order).  ``norm="instance"`` is, as in PyG, ``InstanceNorm1d`` on the ``[N, C]``
    hidden features.

    **Aggregations**: ``"softmax"`` (and PyG's semi-gradient softmax ``"softmax_sg"`` /
    ``aggr_kwargs=dict(semi_grad=True)``, whose weights are constants in backward),
    ``"powermean"`` (alias ``"power"``; learnable ``p`` and PyG's clamping, see
    :class:`PowerMeanAggregation`) and ``"mean"`` are fused (:func:`keypointops.msg_pass`, edge
    features read in place; no ``E x C`` intermediate).
    ``"add"``/``"sum"``, ``"max"`` and ``"min"`` (:class:`ScatterAggregation`) run in plain
    PyTorch, equal to PyG's and as costly (they materialise the ``[E, C]`` messages).

    **Differs**: ``edge_index`` may also be a :class:`keypointops.Graph` (build it once per batch
    and reuse it across layers: a tensor or sparse adjacency is converted to CSR on every call;
    edge features then follow the graph's edge order); the fused aggregation runs on the kernel
    chosen by ``backend`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``).  A
    bipartite call whose destinations outnumber its sources pads ``x_src`` with zero rows to a
    square graph (one ``[N_dst, C]`` copy; the padded rows send no message).

    **Not supported** (raise ``NotImplementedError`` at construction or call, naming what is):
    lists of aggregations and
    ``Aggregation`` objects, lazy ``in_channels=-1`` / ``edge_dim=-1``, and the other
    ``MessagePassing`` keyword arguments (``flow``, ``node_dim``, ``decomposed_layers``, ...).
    """

    def __init__(
        self,
        in_channels: int | tuple[int, int],
        out_channels: int,
        aggr: str = "softmax",
        t: float = 1.0,
        learn_t: bool = False,
        p: float = 1.0,
        learn_p: bool = False,
        msg_norm: bool = False,
        learn_msg_scale: bool = False,
        norm: str | None = "batch",
        num_layers: int = 2,
        expansion: int = 2,
        eps: float = 1e-7,
        bias: bool = False,
        edge_dim: int | None = None,
        *,
        backend: str = "auto",
        **kwargs,
    ):
        super().__init__()
        aggr_kwargs = kwargs.pop("aggr_kwargs", None)
        if kwargs:
            raise NotImplementedError(f"GENConv: the MessagePassing arguments {sorted(kwargs)} are not "
                                      "supported (the fused aggregation has fixed source-to-target flow)")
        in_channels_src, in_channels_dst = _check_channels(in_channels, out_channels)
        if not isinstance(aggr, str) or aggr not in SUPPORTED_AGGR:
            raise NotImplementedError(f"GENConv: aggr must be one of {SUPPORTED_AGGR} (softmax, powermean and mean "
                                      f"fused, the others in plain PyTorch), got aggr={aggr!r}")
        if edge_dim is not None and (not isinstance(edge_dim, int) or edge_dim < 1):
            if edge_dim == -1:
                raise NotImplementedError("GENConv: lazy edge_dim=-1 is not supported; give the size")
            raise ValueError(f"GENConv: edge_dim must be a positive int or None, got {edge_dim!r}")
        if norm and norm not in _NORMS:
            raise ValueError(f"GENConv: norm must be 'batch', 'layer', 'instance' or None, got {norm!r}")
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"GENConv: num_layers must be an int >= 1, got {num_layers!r}")
        if not isinstance(expansion, int) or expansion < 1:
            raise ValueError(f"GENConv: expansion must be an int >= 1, got {expansion!r}")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps):
            raise ValueError(f"GENConv: eps must be a finite float, got {eps!r}")
        check_backend("GENConv", backend)

        self.in_channels = in_channels
        self.out_channels = out_channels
        # PyG's aliases: "softmax_sg" is the softmax with semi_grad=True, "power" the power mean.
        self.aggr = {"power": "powermean", "softmax_sg": "softmax"}.get(aggr, aggr)
        self.eps = float(eps)
        self.backend = backend
        self.aggr_module = _aggregation(self.aggr, aggr_kwargs, t, learn_t, p, learn_p, out_channels,
                                        semi_grad=aggr == "softmax_sg")
        if in_channels_src != out_channels:
            self.lin_src = Linear(in_channels_src, out_channels, bias=bias)
        if edge_dim is not None and edge_dim != out_channels:
            self.lin_edge = Linear(edge_dim, out_channels, bias=bias)
        if in_channels_dst != out_channels:
            self.lin_dst = Linear(in_channels_dst, out_channels, bias=bias)
        self.mlp = _mlp([out_channels] + [out_channels * expansion] * (num_layers - 1) + [out_channels],
                        norm, bias)
        if msg_norm:
            self.msg_norm = MessageNorm(learn_msg_scale)

    def reset_parameters(self) -> None:
        """Re-initialises every parameter as PyG's ``GENConv.reset_parameters``."""
        self.aggr_module.reset_parameters()
        for module in self.mlp:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        for name in ("msg_norm", "lin_src", "lin_edge", "lin_dst"):
            if hasattr(self, name):
                getattr(self, name).reset_parameters()

    def forward(self, x: Tensor | tuple[Tensor, Tensor | None], edge_index: Graph | Tensor,
                edge_attr: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        """``x`` ``[N, in_channels]`` or a pair ``(x_src [N_src, a], x_dst [N_dst, b] or None)``;
        ``edge_index`` a ``[2, E]`` PyG edge index (row 0 source, row 1 target; int64 or int32), a
        PyG ``EdgeIndex``, a torch sparse ``adj_t [N_dst, N_src]`` or a :class:`keypointops.Graph`;
        ``edge_attr`` ``[E, edge_dim]`` in the edge order of ``edge_index``; ``size`` ``(N_src,
        N_dst)``.  Returns ``[N_dst, out_channels]``."""
        x_src, x_dst = _node_features(x)
        x_skip = x_dst
        if hasattr(self, "lin_src"):
            x_src = self.lin_src(x_src)
        graph, edge_attr, num_dst = _graph_input(edge_index, edge_attr, size, x_src, x_dst)
        if edge_attr is not None:
            if hasattr(self, "lin_edge"):
                edge_attr = _EdgeEncoder.apply(edge_attr, self.lin_edge.weight, self.lin_edge.bias)
            if edge_attr.dim() != 2 or edge_attr.size(1) != self.out_channels:
                raise ValueError(f"GENConv: edge_attr must have out_channels = {self.out_channels} columns "
                                 f"(or edge_dim set for an edge encoder), got shape {list(edge_attr.shape)}")
        out = self._aggregate(x_src, graph, num_dst, edge_attr)
        if hasattr(self, "msg_norm"):
            out = self.msg_norm(x_skip if x_skip is not None else x_src, out)
        if x_skip is not None:
            out = out + (self.lin_dst(x_skip) if hasattr(self, "lin_dst") else x_skip)
        return self.mlp(out)

    def _aggregate(self, x_src: Tensor, graph: Graph | Tensor, num_dst: int, edge_attr: Tensor | None) -> Tensor:
        """The aggregated messages ``[num_dst, out_channels]``: on a square graph of
        ``max(N_src, num_dst)`` nodes, ``x_src`` padded with zero rows to it when it is shorter."""
        num_nodes = graph.num_nodes if isinstance(graph, Graph) else max(x_src.size(0), num_dst)
        if x_src.size(0) < num_nodes:
            x_src = torch.cat([x_src, x_src.new_zeros(num_nodes - x_src.size(0), x_src.size(1))])
        if isinstance(graph, Tensor):
            graph = Graph.from_edge_index(graph, num_nodes)
        out = self.aggr_module(x_src, graph, self.eps, self.backend, edge_attr=edge_attr)
        return out[:num_dst]

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, aggr={self.aggr})"


class _EdgeEncoder(torch.autograd.Function):
    """``F.linear(edge_attr, weight, bias)`` for the ``[E, D]`` edge features, whose weight
    gradient is computed as ``(edge_attr^T @ grad)^T``: the GEMM over the E rows then reads both
    ``[E, *]`` operands row-major.  Autograd's ``grad^T @ edge_attr`` is the same product, but
    the CPU BLAS runs that orientation many times slower on tall operands (docs/benchmarks.md)."""

    @staticmethod
    def forward(edge_attr: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(edge_attr, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        edge_attr, weight, bias = inputs
        ctx.save_for_backward(edge_attr, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor):
        edge_attr, weight = ctx.saved_tensors
        need_attr, need_weight, need_bias = ctx.needs_input_grad
        grad_attr = grad @ weight if need_attr else None
        grad_weight = (edge_attr.t() @ grad).t() if need_weight else None
        grad_bias = grad.sum(0) if ctx.has_bias and need_bias else None
        return grad_attr, grad_weight, grad_bias


def _node_features(x) -> tuple[Tensor, Tensor | None]:
    """``(x_src, x_dst)`` of a tensor (both the same) or a bipartite pair (``x_dst`` may be None)."""
    if isinstance(x, Tensor):
        return x, x
    if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], Tensor) and (
            x[1] is None or isinstance(x[1], Tensor)):
        return x[0], x[1]
    raise TypeError(f"GENConv: x must be a Tensor or a pair (x_src, x_dst or None), got {type(x).__name__}")


def _graph_input(edge_index, edge_attr, size, x_src: Tensor, x_dst: Tensor | None):
    """``(graph, edge_attr, num_dst)`` from the forms PyG's GENConv takes: ``graph`` a
    :class:`keypointops.Graph` or a plain int64 ``[2, E]`` tensor; a sparse ``adj_t``'s ``[E, D]``
    values become ``edge_attr`` (unless given)."""
    sizes = [None, None] if size is None else list(size)
    if len(sizes) != 2:
        raise ValueError(f"GENConv: size must be (num_src, num_dst), got {size!r}")
    if isinstance(edge_index, Graph):
        sizes = [edge_index.num_nodes, edge_index.num_nodes]
        graph = edge_index
    elif isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
        graph, values = _sparse_to_edge_index(edge_index)
        sizes = [edge_index.size(1), edge_index.size(0)]
        if edge_attr is None and values.dim() == 2:
            edge_attr = values
    elif isinstance(edge_index, Tensor):
        if type(edge_index) is not Tensor and hasattr(edge_index, "sparse_size"):  # PyG's EdgeIndex
            num_rows, num_cols = edge_index.sparse_size()
            sizes = [num_rows if num_rows is not None else sizes[0], num_cols if num_cols is not None else sizes[1]]
            edge_index = edge_index.as_subclass(Tensor)
        if edge_index.dtype not in (torch.int32, torch.int64) or edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise ValueError(f"GENConv: edge_index must be an int64 or int32 [2, E] tensor, got {edge_index.dtype} "
                             f"{list(edge_index.shape)}")
        graph = edge_index.long()
    else:
        raise TypeError(f"GENConv: edge_index must be a [2, E] tensor, an EdgeIndex, a torch sparse adjacency "
                        f"or a keypointops.Graph, got {type(edge_index).__name__}")
    for dim, (name, tensor) in enumerate((("x_src", x_src), ("x_dst", x_dst))):
        if tensor is not None:
            if sizes[dim] is not None and sizes[dim] != tensor.size(0):
                raise ValueError(f"GENConv: {name} has {tensor.size(0)} rows but the graph's size is {sizes[dim]}")
            sizes[dim] = tensor.size(0)
    num_dst = sizes[1] if sizes[1] is not None else sizes[0]
    return graph, edge_attr, num_dst


def _sparse_to_edge_index(adj_t: Tensor) -> tuple[Tensor, Tensor]:
    """``(edge_index [2, E], values)`` of a torch sparse ``adj_t [N_dst, N_src]`` (COO, CSR or
    CSC), in PyG's ``to_edge_index`` order: coalesced COO, row-major CSR, column-major CSC."""
    if adj_t.layout == torch.sparse_coo:
        adj_t = adj_t.coalesce()
        dst, src = adj_t.indices()
        values = adj_t.values()
    elif adj_t.layout == torch.sparse_csr:
        crow, src, values = adj_t.crow_indices(), adj_t.col_indices(), adj_t.values()
        dst = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow.diff())
    elif adj_t.layout == torch.sparse_csc:
        ccol, dst, values = adj_t.ccol_indices(), adj_t.row_indices(), adj_t.values()
        src = torch.repeat_interleave(torch.arange(ccol.numel() - 1, device=ccol.device), ccol.diff())
    else:
        raise NotImplementedError(f"GENConv: sparse adjacency of layout {adj_t.layout} is not supported; "
                                  "use COO, CSR or CSC")
    return torch.stack([src.long(), dst.long()]), values


def _check_channels(in_channels, out_channels) -> tuple[int, int]:
    """(source, destination) input sizes; raises for what GENConv does not support."""
    if not isinstance(out_channels, int) or out_channels < 1:
        raise ValueError(f"GENConv: out_channels must be a positive int, got {out_channels!r}")
    pair = tuple(in_channels) if isinstance(in_channels, (tuple, list)) else (in_channels, in_channels)
    if len(pair) != 2 or not all(isinstance(c, int) for c in pair):
        raise ValueError(f"GENConv: in_channels must be an int or a pair of ints, got {in_channels!r}")
    if any(c == -1 for c in pair):
        raise NotImplementedError("GENConv: lazy in_channels=-1 is not supported; give the size")
    if any(c < 1 for c in pair):
        raise ValueError(f"GENConv: in_channels must be positive, got {in_channels!r}")
    return pair


def _aggregation(aggr: str, aggr_kwargs: dict | None, t: float, learn_t: bool, p: float, learn_p: bool,
                 out_channels: int, semi_grad: bool) -> torch.nn.Module:
    """The ``aggr_module`` from ``t`` / ``learn_t`` or ``p`` / ``learn_p``, or from ``aggr_kwargs``
    which, as in PyG, override them."""
    if aggr in _SCATTER_REDUCE:
        if aggr_kwargs:
            raise NotImplementedError(f"GENConv: aggr_kwargs are not supported with aggr={aggr!r}, got {aggr_kwargs!r}")
        return ScatterAggregation(aggr)
    if aggr_kwargs is None:
        aggr_kwargs = dict(t=t, learn=learn_t, semi_grad=semi_grad) if aggr == "softmax" else dict(p=p, learn=learn_p)
    allowed = _AGGR_KWARGS[aggr]
    if not isinstance(aggr_kwargs, dict) or set(aggr_kwargs) - set(allowed):
        raise NotImplementedError(f"GENConv: aggr_kwargs may only hold {allowed} with aggr={aggr!r}, "
                                  f"got {aggr_kwargs!r}")
    channels = aggr_kwargs.get("channels", 1)
    if channels not in (1, out_channels):
        raise ValueError(f"GENConv: aggr_kwargs channels must be 1 or out_channels ({out_channels}), "
                         f"got {channels!r}")
    if aggr == "softmax":
        return MsgPassAggregation(aggr_kwargs.get("t", 1.0), aggr_kwargs.get("learn", False), channels,
                                  aggr_kwargs.get("semi_grad", False))
    return PowerMeanAggregation(**aggr_kwargs)
