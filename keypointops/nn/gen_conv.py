"""``GENConv``: PyTorch Geometric's DeeperGCN convolution with the fused ``msg_pass`` aggregation.

A drop-in replacement for ``torch_geometric.nn.GENConv(aggr="softmax")``: same constructor
arguments, parameter names and forward call, so a PyG state dict loads with ``strict=True`` and
gives the same output.  The message ``relu(x_j) + eps`` and the softmax aggregation run as one
:func:`keypointops.msg_pass` call instead of PyG's gather / scatter-softmax / scatter-sum over
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

__all__ = ["GENConv", "MessageNorm", "MsgPassAggregation"]

_NORMS = {"batch": lambda c: BatchNorm1d(c, affine=True),
          "layer": lambda c: LayerNorm(c, elementwise_affine=True),
          "instance": lambda c: InstanceNorm1d(c, affine=False)}
_AGGR_KWARGS = ("t", "learn", "semi_grad", "channels")


class MsgPassAggregation(torch.nn.Module):
    r"""Message ``relu(x_j) + eps`` and softmax-temperature aggregation, fused (:func:`keypointops.msg_pass`).

    Holds the inverse temperature ``t`` like PyG's ``SoftmaxAggregation(t, learn, channels=channels)``:
    a ``Parameter`` of shape ``[channels]`` when ``learn`` (state dict key ``t``), a float otherwise.
    Unlike PyG's aggregation it takes node features and a graph, not gathered messages: it computes
    ``out[v] = sum_{u in N(v)} softmax_u(t * m_u) * m_u`` with ``m_u = relu(x_u) + eps``.
    """

    def __init__(self, t: float = 1.0, learn: bool = False, channels: int = 1):
        super().__init__()
        if not learn and channels != 1:
            raise ValueError(f"MsgPassAggregation: channels must be 1 when t is not learned, got {channels}")
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"MsgPassAggregation: channels must be a positive int, got {channels!r}")
        if not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"MsgPassAggregation: t must be a finite float, got {t!r}")
        self._init_t = float(t)
        self.learn = learn
        self.channels = channels
        self.t = Parameter(torch.empty(channels)) if learn else float(t)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if isinstance(self.t, Tensor):
            self.t.data.fill_(self._init_t)

    def forward(self, x: Tensor, graph: Graph | Tensor, eps: float = 1e-7, backend: str = "auto") -> Tensor:
        return msg_pass(x, graph, self.t, eps, backend=backend)

    def extra_repr(self) -> str:
        return f"learn={self.learn}, channels={self.channels}"


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
    r"""DeeperGCN's GENeralized Graph Convolution with softmax aggregation, on :func:`keypointops.msg_pass`.

    .. math::
        \mathbf{x}_i' = \mathrm{MLP}\Big(\mathbf{x}_i + \sum_{j \in N(i)}
        \mathrm{softmax}_j(t\,\mathbf{m}_j)\,\mathbf{m}_j\Big), \qquad
        \mathbf{m}_j = \mathrm{relu}(\mathbf{x}_j) + \epsilon

    **Matches** ``torch_geometric.nn.GENConv`` (2.8) for ``aggr="softmax"``: the constructor
    arguments (same names, order and defaults, including ``bias=False`` and ``norm="batch"``),
    ``t`` / ``learn_t``, ``num_layers`` / ``expansion`` / ``norm`` (``"batch"``, ``"layer"``,
    ``"instance"`` or ``None``), ``eps``, ``bias``, ``msg_norm`` / ``learn_msg_scale``,
    ``in_channels != out_channels`` (``lin_src`` / ``lin_dst``) and ``aggr_kwargs=dict(t=..., learn=True,
    channels=out_channels)`` for a per-channel ``t``; the parameter and buffer names (``aggr_module.t``,
    ``mlp.*``, ``msg_norm.scale``, ``lin_src.*``, ``lin_dst.*``), so ``load_state_dict(pyg_conv.state_dict(),
    strict=True)`` works both ways; the forward call ``conv(x, edge_index)``; the output and the
    gradients (to float32 rounding: the fused op sums in another order).  ``norm="instance"`` is,
    as in PyG, ``InstanceNorm1d`` on the ``[N, C]`` hidden features (it normalises each node over
    its channels and warns that ``num_features`` is unused).

    **Differs**: ``edge_index`` may also be a :class:`keypointops.Graph` (build it once per batch and
    reuse it across layers: an ``edge_index`` tensor is converted to CSR on every call); the
    aggregation is one fused kernel chosen by ``backend`` (``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"triton"``, ``"reference"``; see :func:`keypointops.msg_pass`).  ``p`` and ``learn_p`` are
    accepted and, as in PyG with ``aggr="softmax"``, have no effect.

    **Not supported** (raise ``NotImplementedError`` at construction or call): other aggregations
    (``"powermean"``, ``"add"``, ``"mean"``, ``"max"``, ``Aggregation`` objects, lists), the
    semi-gradient ``"softmax_sg"`` / ``semi_grad=True``, edge features (``edge_dim``, ``edge_attr``),
    bipartite input (a tuple ``in_channels`` with different sizes, a tuple ``x``, ``size``), lazy
    ``in_channels=-1``, sparse adjacency tensors, and the other ``MessagePassing`` keyword
    arguments (``flow``, ``node_dim``, ``decomposed_layers``, ...).
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
        if not isinstance(aggr, str) or aggr not in ("softmax", "softmax_sg"):
            raise NotImplementedError(f"GENConv: only aggr='softmax' is supported (the fused msg_pass "
                                      f"aggregation), got aggr={aggr!r}")
        if aggr == "softmax_sg":
            raise NotImplementedError("GENConv: aggr='softmax_sg' (semi-gradient softmax) is not "
                                      "supported; msg_pass always computes the full gradient")
        if edge_dim is not None:
            raise NotImplementedError(f"GENConv: edge features are not supported (edge_dim={edge_dim}); "
                                      "msg_pass aggregates node features only")
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
        self.aggr = "softmax"
        self.eps = float(eps)
        self.backend = backend
        self.aggr_module = _aggregation(aggr_kwargs, t, learn_t, out_channels)
        if in_channels_src != out_channels:
            self.lin_src = Linear(in_channels_src, out_channels, bias=bias)
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
        for name in ("msg_norm", "lin_src", "lin_dst"):
            if hasattr(self, name):
                getattr(self, name).reset_parameters()

    def forward(self, x: Tensor, edge_index: Graph | Tensor, edge_attr: Tensor | None = None,
                size: tuple[int, int] | None = None) -> Tensor:
        """``x`` ``[N, in_channels]``; ``edge_index`` a ``[2, E]`` PyG edge index (row 0 source,
        row 1 target) or a :class:`keypointops.Graph`.  Returns ``[N, out_channels]``."""
        if not isinstance(x, Tensor):
            raise NotImplementedError(f"GENConv: x must be a Tensor [N, C] (bipartite (x_src, x_dst) "
                                      f"input is not supported), got {type(x).__name__}")
        if edge_attr is not None:
            raise NotImplementedError("GENConv: edge_attr is not supported; msg_pass aggregates node "
                                      "features only")
        if size is not None:
            raise NotImplementedError(f"GENConv: size is not supported (bipartite graphs), got {size}")
        if isinstance(edge_index, Tensor) and edge_index.layout != torch.strided:
            raise NotImplementedError(f"GENConv: sparse adjacency ({edge_index.layout}) is not supported; "
                                      "pass an edge_index [2, E] or a keypointops.Graph")
        x_src = self.lin_src(x) if hasattr(self, "lin_src") else x
        out = self.aggr_module(x_src, edge_index, self.eps, self.backend)
        if hasattr(self, "msg_norm"):
            out = self.msg_norm(x, out)
        x_dst = self.lin_dst(x) if hasattr(self, "lin_dst") else x
        return self.mlp(out + x_dst)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, aggr={self.aggr}, "
                f"backend={self.backend})")


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
    if pair[0] != pair[1]:
        raise NotImplementedError(f"GENConv: bipartite in_channels {pair} (different source and "
                                  "destination sizes) are not supported")
    return pair


def _aggregation(aggr_kwargs: dict | None, t: float, learn_t: bool, out_channels: int) -> MsgPassAggregation:
    """The ``aggr_module`` from ``t`` / ``learn_t``, or from ``aggr_kwargs`` which, as in PyG, override them."""
    if aggr_kwargs is None:
        return MsgPassAggregation(t, learn_t)
    if not isinstance(aggr_kwargs, dict) or set(aggr_kwargs) - set(_AGGR_KWARGS):
        raise NotImplementedError(f"GENConv: aggr_kwargs may only hold {_AGGR_KWARGS}, got {aggr_kwargs!r}")
    learn = aggr_kwargs.get("learn", False)
    channels = aggr_kwargs.get("channels", 1)
    if aggr_kwargs.get("semi_grad", False):
        if learn:
            raise ValueError("GENConv: aggr_kwargs semi_grad=True cannot be used with a learnable t")
        raise NotImplementedError("GENConv: semi_grad=True (semi-gradient softmax) is not supported; "
                                  "msg_pass always computes the full gradient")
    if channels not in (1, out_channels):
        raise ValueError(f"GENConv: aggr_kwargs channels must be 1 or out_channels ({out_channels}), "
                         f"got {channels!r}")
    return MsgPassAggregation(aggr_kwargs.get("t", 1.0), learn, channels)
