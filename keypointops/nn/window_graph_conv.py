"""``WindowGraphConv3D``: CTL's 3D graph conv layer (3D-GCL) on :func:`keypointops.window_graph_conv`."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from keypointops.graphs import Skeleton, block_adjacency, normalize_adjacency, skeleton
from keypointops.ops.window_graph_conv import window_graph_conv

__all__ = ["WindowGraphConv3D"]


def _skeleton_adjacency(layout: str | Skeleton) -> Tensor:
    """0/1 ``[N, N]`` adjacency of a skeleton's undirected edges (no self loops)."""
    skel = skeleton(layout)
    adj = torch.zeros(skel.num_joints, skel.num_joints)
    for a, b in skel.edges:
        adj[a, b] = adj[b, a] = 1.0
    return adj


class WindowGraphConv3D(nn.Module):
    r"""3D graph conv layer of CTL: graph conv over sliding windows of frames, then window collapse.

    For ``x`` ``[B, T, N, C_in]`` (``N`` joints of ``T`` frames):

    1. ``h = x W``: per-frame linear map ``C_in -> C_out`` (no bias), applied before the
       aggregation so that it runs on ``T * N`` rows rather than ``T * window * N``.
    2. ``A = normalize_adjacency(A_p + A_m [+ A_c], add_self_loops=False)``, ``[L, L]`` with
       ``L = window * N``: ``A_p = block_adjacency(skeleton, window)`` the physical connections
       tiled over the window (each block ``A + I``, as MS-G3D), ``A_m`` a learnable ``[L, L]``
       matrix (zero at initialisation, so the layer starts from the normalised physical graph),
       ``A_c`` the optional per-sample context topology given to :meth:`forward` (CTL's
       context-reinforced topology), which makes ``A`` per sample ``[B, L, L]``.
    3. ``y = relu(window_graph_conv(h, A, window, dilation))``: ``[B, T, L, C_out]``, the window
       of every frame aggregated without building the unfolded input.
    4. Window collapse: MS-G3D's ``Conv3d`` with kernel ``(1, window, 1)`` over the window slots,
       i.e. a linear map of each joint's ``window * C_out`` slot features to ``C_out`` (with bias),
       then ``BatchNorm`` over the channels: ``z`` ``[B, T, N, C_out]``.
    5. ``out = relu(z + res(x))`` with ``res`` the identity when ``C_in == C_out``, else a linear
       map and ``BatchNorm`` (``residual=False``: ``out = relu(z)``).

    Args:
        in_channels, out_channels: ``C_in`` and ``C_out``.
        adjacency: the joints' graph, a skeleton name of :mod:`keypointops.graphs` (e.g.
            ``"coco17"``) or a :class:`~keypointops.graphs.Skeleton`, or an ``[N, N]`` adjacency
            without self loops.
        window: frames per window (odd); CTL's ``tau``.
        dilation: frame step inside a window.
        residual: add the residual branch.
        backend: backend of :func:`keypointops.window_graph_conv`.
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: str | Skeleton | Tensor,
                 window: int = 3, *, dilation: int = 1, residual: bool = True,
                 backend: str = "auto"):
        super().__init__()
        joint_adjacency = (adjacency if isinstance(adjacency, Tensor)
                           else _skeleton_adjacency(adjacency))
        if joint_adjacency.dim() != 2 or joint_adjacency.size(0) != joint_adjacency.size(1):
            raise ValueError(f"WindowGraphConv3D: adjacency must be [N, N], got shape "
                             f"{list(joint_adjacency.shape)}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"WindowGraphConv3D: window must be a positive odd int, got {window!r}")
        self.num_joints = joint_adjacency.size(0)
        self.window, self.dilation, self.backend = window, dilation, backend
        size = window * self.num_joints
        self.register_buffer("physical", block_adjacency(joint_adjacency.float(), window))
        self.learned = nn.Parameter(torch.zeros(size, size))
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.collapse = nn.Linear(window * out_channels, out_channels)
        self.norm = nn.BatchNorm1d(out_channels)
        if not residual:
            self.residual = None
        elif in_channels == out_channels:
            self.residual = nn.Identity()
        else:
            self.residual = nn.Sequential(nn.Linear(in_channels, out_channels, bias=False),
                                          nn.BatchNorm1d(out_channels))

    def adjacency(self, context: Tensor | None = None) -> Tensor:
        """The normalised window adjacency: ``[L, L]``, or ``[B, L, L]`` with a context topology.

        ``context``: ``[B, N, N]`` joint-to-joint context topology (tiled over the window slots)
        or ``[B, L, L]`` already in window form.
        """
        adj = self.physical + self.learned
        if context is not None:
            size = self.window * self.num_joints
            if context.dim() == 3 and context.shape[1:] == (self.num_joints, self.num_joints):
                context = context.repeat(1, self.window, self.window)
            if context.dim() != 3 or context.shape[1:] != (size, size):
                raise ValueError(f"WindowGraphConv3D: context must be [B, N, N] = [B, "
                                 f"{self.num_joints}, {self.num_joints}] or [B, L, L] = [B, {size}, "
                                 f"{size}], got shape {list(context.shape)}")
            adj = adj + context
        return normalize_adjacency(adj, add_self_loops=False)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``x`` ``[B, T, N, C_in]`` -> ``[B, T, N, C_out]``; ``context`` as in :meth:`adjacency`."""
        if x.dim() != 4 or x.size(2) != self.num_joints:
            raise ValueError(f"WindowGraphConv3D: x must be [B, T, N, C] with N = {self.num_joints}, "
                             f"got shape {list(x.shape)}")
        batch, frames, joints, _ = x.shape
        h = self.linear(x)
        adj = self.adjacency(context).to(h.dtype)
        y = window_graph_conv(h, adj, self.window, dilation=self.dilation, backend=self.backend).relu()
        # [B, T, window * N, C] -> per joint, its window slots' features side by side.
        slots = y.view(batch, frames, self.window, joints, -1).permute(0, 1, 3, 2, 4)
        z = self.collapse(slots.reshape(batch, frames, joints, -1))
        z = self.norm(z.reshape(-1, z.size(-1))).view_as(z)
        if self.residual is not None:
            z = z + self._residual(x)
        return z.relu()

    def _residual(self, x: Tensor) -> Tensor:
        if isinstance(self.residual, nn.Identity):
            return x
        linear, norm = self.residual
        r = linear(x)
        return norm(r.reshape(-1, r.size(-1))).view_as(r)
