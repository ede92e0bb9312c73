"""``MSG3DWindow``: MS-G3D's G3D pathway (temporal windows, multi-scale aggregation, 1x1 projection)
on :func:`keypointops.window_graph_conv`, state-dict compatible with MS-G3D's ``SpatialTemporal_MS_GCN``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keypointops._checks import check_choice
from keypointops.graphs import Skeleton, block_adjacency, multiscale_adjacency, skeleton
from keypointops.ops.window_graph_conv import window_graph_conv

__all__ = ["MSG3DWindow"]

_ACTIVATIONS = {"relu": nn.ReLU, "leakyrelu": lambda: nn.LeakyReLU(0.2), "tanh": nn.Tanh,
                "linear": nn.Identity, None: nn.Identity}


class _Projection(nn.Module):
    """MS-G3D's ``MLP(in, [out], activation='linear')``: (dropout,) 1x1 conv, BatchNorm, with its
    parameter names (``layers.<i>.*``); run by :class:`MSG3DWindow` as a matrix product."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        layers = [nn.Dropout(p=dropout)] if dropout > 0.001 else []
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=1), nn.BatchNorm2d(out_channels),
                   nn.Identity()]
        self.layers = nn.ModuleList(layers)

    @property
    def dropout(self) -> nn.Dropout | None:
        return self.layers[0] if isinstance(self.layers[0], nn.Dropout) else None

    @property
    def conv(self) -> nn.Conv2d:
        return self.layers[-3]

    @property
    def norm(self) -> nn.BatchNorm2d:
        return self.layers[-2]

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class MSG3DWindow(nn.Module):
    r"""MS-G3D's G3D pathway (Liu et al., "Disentangling and Unifying Graph Convolutions for
    Skeleton-Based Action Recognition", CVPR 2020): temporal windows -> multi-scale window graph
    aggregation -> 1x1 projection, BatchNorm, (residual,) activation.

    The same computation, parameters and parameter names as MS-G3D's
    ``nn.Sequential(UnfoldTemporalWindows(window, stride, dilation), SpatialTemporal_MS_GCN(...))``
    (the ``gcn3d`` of its ``MS_G3D`` block): for ``x`` ``[B, C_in, T, V]``, with ``L = window * V``
    and ``S = num_scales``,

    1. ``A = A_scales + A_res``: ``A_scales`` the ``[S * L, L]`` stacked multi-scale adjacency of
       the window graph (:func:`keypointops.graphs.multiscale_adjacency` of
       :func:`keypointops.graphs.block_adjacency`; a buffer, not in the state dict, as in
       MS-G3D), ``A_res`` the learnable residual adjacency (``use_Ares``);
    2. ``agg[b, s * C_in + c, t, v] = sum_u A[s * L + v, u] x_unfolded[b, c, t, u]`` for the
       ``T'`` windows of MS-G3D's ``UnfoldTemporalWindows`` (stride, dilation, even windows as
       there): one :func:`keypointops.window_graph_conv` call with the stacked adjacency, which reads
       every window of ``x`` once for all ``S`` scales and never builds the unfolded input;
    3. ``out = act(BN(W agg + bias) + residual)`` with ``W`` the ``mlp`` 1x1 conv
       ``S * C_in -> C_out``.

    The adjacency rows are handed to the op scale-minor (row ``v * S + s``), so that its output
    ``[B, T', L, S * C_in]`` is, per window node, the ``S * C_in`` vector the 1x1 conv reads: the
    projection is one matrix product, with no copy of the aggregate; the result is returned as a
    ``[B, C_out, T', L]`` tensor in channels-last memory layout.

    State dict: ``A_res``, ``mlp.layers.<i>.*`` (``Conv2d`` and ``BatchNorm2d``, after a ``Dropout``
    when ``dropout > 0``) and, with ``residual=True`` and ``in_channels != out_channels``,
    ``residual.layers.<i>.*``: loads MS-G3D's ``SpatialTemporal_MS_GCN`` weights and back
    (``strict=True``).

    Args:
        in_channels, out_channels: ``C_in`` and ``C_out``.
        adjacency: the skeleton graph ``A_binary``: a skeleton name of :mod:`keypointops.graphs`, a
            :class:`~keypointops.graphs.Skeleton` or a ``[V, V]`` 0/1 tensor without self loops.
        num_scales: ``S``.
        window: frames per window (MS-G3D's ``window_size``; odd or even).
        stride: frame step between windows (``window_stride``).
        dilation: frame step inside a window (``window_dilation``).
        disentangled_agg, use_Ares, residual, dropout, activation: as in MS-G3D's
            ``SpatialTemporal_MS_GCN``.  The residual adds the unfolded input (``C_in == C_out``)
            or its 1x1 projection; it builds the unfolded ``[B, T', L, C_in]`` input (MS-G3D's
            ``MS_G3D`` block does not use it).
        backend: backend of :func:`keypointops.window_graph_conv`.
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: str | Skeleton | Tensor,
                 num_scales: int, window: int, stride: int = 1, dilation: int = 1, *,
                 disentangled_agg: bool = True, use_Ares: bool = True, residual: bool = False,
                 dropout: float = 0.0, activation: str | None = "relu", backend: str = "auto"):
        super().__init__()
        joints = adjacency if isinstance(adjacency, Tensor) else skeleton(adjacency).adjacency()
        if joints.dim() != 2 or joints.size(0) != joints.size(1):
            raise ValueError(f"MSG3DWindow: adjacency must be [V, V], got shape {list(joints.shape)}")
        for name, value in (("num_scales", num_scales), ("window", window), ("stride", stride),
                            ("dilation", dilation)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MSG3DWindow: {name} must be an int >= 1, got {value!r}")
        check_choice("MSG3DWindow", "activation", activation, _ACTIVATIONS)
        self.num_joints, self.num_scales = joints.size(0), num_scales
        self.window, self.stride, self.dilation, self.backend = window, stride, dilation, backend
        size = window * self.num_joints
        window_graph = block_adjacency(joints.double(), window)   # tile(A + I): self loops included
        scales = multiscale_adjacency(window_graph, num_scales, disentangled=disentangled_agg)
        self.register_buffer("A_scales", scales.float(), persistent=False)
        self.A_res = nn.Parameter(torch.empty(num_scales * size, size).uniform_(-1e-6, 1e-6)) if use_Ares else None
        self.mlp = _Projection(in_channels * num_scales, out_channels, dropout)
        if residual and in_channels != out_channels:
            self.residual = _Projection(in_channels, out_channels)
        self.residual_mode = "projection" if residual and in_channels != out_channels else (
            "identity" if residual else None)
        self.act = _ACTIVATIONS[activation]()

    def adjacency(self) -> Tensor:
        """``A_scales + A_res``: ``[S * L, L]``, scale ``s`` in rows ``s * L ..`` (MS-G3D's order)."""
        return self.A_scales if self.A_res is None else self.A_scales + self.A_res

    def _unfolded(self, x_nodes: Tensor) -> Tensor:
        """The unfolded input ``[B, C, T', L]`` (MS-G3D's ``UnfoldTemporalWindows``), for the residual."""
        size = self.window * self.num_joints
        eye = torch.eye(size, dtype=x_nodes.dtype, device=x_nodes.device)
        windows = window_graph_conv(x_nodes, eye, self.window, dilation=self.dilation, stride=self.stride,
                                    backend=self.backend)
        return windows.permute(0, 3, 1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, C_in, T, V]`` -> ``[B, C_out, T', window * V]`` (MS-G3D's layouts)."""
        if x.dim() != 4 or x.size(3) != self.num_joints or x.size(1) * self.num_scales != self.mlp.conv.in_channels:
            raise ValueError(f"MSG3DWindow: x must be [B, C_in, T, V] with C_in = "
                             f"{self.mlp.conv.in_channels // self.num_scales} and V = {self.num_joints}, "
                             f"got shape {list(x.shape)}")
        batch, channels = x.shape[:2]
        size, scales = self.window * self.num_joints, self.num_scales
        x_nodes = x.permute(0, 2, 3, 1)                                        # [B, T, V, C_in]
        # Rows scale-minor (v * S + s): the op's [B, T', S * L, C] output is [B, T', L, S * C].
        adj = self.adjacency().to(x.dtype).view(scales, size, size).transpose(0, 1).reshape(size * scales, size)
        agg = window_graph_conv(x_nodes, adj, self.window, dilation=self.dilation, stride=self.stride,
                                backend=self.backend)
        agg = agg.reshape(batch, agg.size(1), size, scales * channels)       # [B, T', L, S * C_in]
        if self.mlp.dropout is not None:
            agg = self.mlp.dropout(agg)
        conv = self.mlp.conv
        out = F.linear(agg, conv.weight.view(conv.out_channels, -1), conv.bias)   # [B, T', L, C_out]
        out = self.mlp.norm(out.permute(0, 3, 1, 2))                           # [B, C_out, T', L]
        if self.residual_mode == "projection":
            out = out + self.residual(self._unfolded(x_nodes))
        elif self.residual_mode == "identity":
            out = out + self._unfolded(x_nodes)
        return self.act(out)
