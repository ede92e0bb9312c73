"""``WindowGraphConv3D``: CTL's 3D graph conv layer (3D-GCL) on :func:`keypointops.window_graph_conv`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from keypointops._checks import check_choice
from keypointops.graphs import Skeleton, block_adjacency, normalize_adjacency, skeleton
from keypointops.ops.window_graph_conv import window_graph_conv

__all__ = ["ContextTopology", "WindowGraphConv3D"]

_CONTEXT_MODES = (None, "window", "sample")


def _unfold_windows(z: Tensor, window: int, dilation: int = 1) -> Tensor:
    """``[B, T, N]`` per-node scalars -> ``[B, T, window * N]``: the values of every window's nodes.

    Entry ``w * N + n`` of window ``t`` is ``z[:, t - pad + w * dilation, n]`` (0 outside
    ``[0, T)``), the node order of :func:`keypointops.window_graph_conv`.  Only for scalars per node
    (the context block's squeezed features); the ``C``-channel windows are never unfolded.
    """
    batch, frames, nodes = z.shape
    pad = (window - 1) * dilation // 2
    span = (window - 1) * dilation + 1
    padded = F.pad(z, (0, 0, pad, span - 1 - pad))                       # [B, T + span - 1, N]
    windows = padded.unfold(1, span, 1)[..., ::dilation]                 # [B, T, N, window]
    return windows.transpose(-1, -2).reshape(batch, frames, window * nodes)


class ContextTopology(nn.Module):
    r"""CTL's context block (docs/models/ctl.md): a data-dependent window adjacency ``A_c``.

    From the layer input ``x`` ``[B, T, N, C]``, with ``L = window * N``:

    1. a 1x1 conv ``C -> 1`` of every node of the zero-padded windows, BN, ReLU -> ``[B, T, L]``;
    2. a 1x1 conv over the ``T`` windows as channels: ``T -> T`` (``mode="window"``, CTL's advanced
       block: one topology per window) or ``T -> 1`` (``mode="sample"``: one per sample; with
       ``window=1`` CTL's basic frame-level block), BN, ReLU;
    3. a linear map ``L -> L * L`` (with bias), rows L2-normalised:
       ``[B, T, L, L]`` (``"window"``) or ``[B, L, L]`` (``"sample"``).

    Step 1 is linear in the features, so it runs on the ``T * N`` nodes and only the scalars are
    unfolded into windows (:func:`_unfold_windows`; a padded slot gets the conv's bias, as the conv of
    a zero feature): the same numbers as convolving the unfolded ``[B, C, T, L]`` input, without it.
    """

    def __init__(self, channels: int, nodes: int, window: int, frames: int, mode: str = "window",
                 *, dilation: int = 1):
        super().__init__()
        if mode not in ("window", "sample"):
            raise ValueError(f"ContextTopology: mode must be 'window' or 'sample', got {mode!r}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"ContextTopology: frames must be a positive int (the block's temporal "
                             f"conv has T input channels), got {frames!r}")
        self.window, self.dilation, self.frames, self.mode = window, dilation, frames, mode
        self.size = window * nodes
        outputs = frames if mode == "window" else 1
        self.squeeze = nn.Linear(channels, 1)
        self.squeeze_norm = nn.BatchNorm1d(1)
        self.temporal = nn.Conv1d(frames, outputs, 1)
        self.temporal_norm = nn.BatchNorm1d(outputs)
        self.expand = nn.Linear(self.size, self.size * self.size)

    def forward(self, x: Tensor) -> Tensor:
        batch, frames = x.shape[:2]
        if frames != self.frames:
            raise ValueError(f"ContextTopology: x holds T = {frames} frames but the block was built "
                             f"for frames = {self.frames} (its temporal conv has T input channels)")
        z = _unfold_windows(F.linear(x, self.squeeze.weight).squeeze(-1), self.window, self.dilation)
        z = self.squeeze_norm((z + self.squeeze.bias).view(batch, 1, -1)).relu()
        z = self.temporal_norm(self.temporal(z.view(batch, frames, self.size))).relu()
        adj = F.normalize(self.expand(z).view(batch, -1, self.size, self.size), p=2, dim=-1)
        return adj.squeeze(1) if self.mode == "sample" else adj


class WindowGraphConv3D(nn.Module):
    r"""CTL's 3D graph conv layer (docs/models/ctl.md, Eqs. 2-4): graph conv over windows of frames, then collapse.

    For ``x`` ``[B, T, N, C_in]`` (``N`` nodes of ``T`` frames), with ``L = window * N``:

    1. ``h = x W``: per-node linear map ``C_in -> C_out`` (no bias), applied before the aggregation
       (same result, on ``T * N`` rows rather than ``T * L``).
    2. The window adjacency (Eq. 3 + Eq. 4's self loops):

       ``Â = D^-1/2 (tile(A_p + I) + I_L) D^-1/2 + tile(A_m) + A_c``

       ``A_p`` the physical graph (fixed), tiled over the ``window x window`` blocks with self links
       (:func:`keypointops.graphs.block_adjacency`, a node linked to its copies in the other frames)
       and degree-normalised once (a buffer); ``A_m`` a learnable ``[N, N]`` matrix (zero at
       initialisation, ``learned=True``) tiled the same way; ``A_c`` the :class:`ContextTopology` of
       the input (``context="window"``: per window ``[B, T, L, L]``; ``"sample"``: ``[B, L, L]``;
       ``None``: no context term).  ``A_m`` and ``A_c`` are added to the normalised skeleton, as
       2s-AGCN (Shi et al., CVPR 2019) and MS-G3D (Liu et al., CVPR 2020) add their learned and
       data-dependent adjacencies, rather than normalised with it (see the deviation below).
    3. ``y = relu(window_graph_conv(h, Â, window))``: ``[B, T, L, C_out]``, the window of every
       frame aggregated without building the unfolded input.
    4. Window collapse (``collapse=True``): MS-G3D's ``Conv3d(C_out, C_out, (1, window, 1))`` without
       bias over the window slots (a linear map of each node's ``window * C_out`` slot features),
       ``BatchNorm``, ReLU: ``z`` ``[B, T, N, C_out]``.  ``collapse=False`` (``window=1`` only) is the
       frame-level graph conv of CTL's "+ContRe" ablation row, Kipf and Welling's GCN (ICLR 2017) on
       Eq. 2's adjacency: ``z = y`` with the fixed part ``D^-1/2 (A_p + I) D^-1/2`` (one self loop;
       a window of one frame has no other frames to link a node to) and no collapse layer or BN.
    5. ``out = x + z`` with ``residual=True`` (needs ``C_in == C_out``), else ``out = z``: CTL adds the
       shortcut from its second layer on.

    Deviation from the paper (docs/models/ctl.md): Eq. 4 normalises by the degrees of the full
    ``Â``, but ``A_m`` and ``A_c`` are signed, and a row of ``A_c`` (unit L2 norm) sums to as much as
    ``+-sqrt(L)``, as much as the sparsest fixed rows (at least 3 in a frame-level graph of 17
    keypoints, against ``sqrt(17) = 4.1``; at least 7 in a 3-frame window, against
    ``sqrt(51) = 7.1``).  Degrees then reach zero or below, where ``D^-1/2`` is undefined, and near
    zero they scale a node's row and column by ``1/sqrt(d)``.  Normalising the fixed part only keeps
    every node and bounds the signed terms (``|A_c| <= 1``; ``A_m`` learned).

    Args:
        in_channels, out_channels: ``C_in`` and ``C_out``.
        adjacency: the frame graph ``A_p``: a skeleton name of :mod:`keypointops.graphs` (e.g.
            ``"coco17"``), a :class:`~keypointops.graphs.Skeleton`, or an ``[N, N]`` 0/1 adjacency
            without self loops.
        window: frames per window (odd); CTL's ``tau``.
        dilation: frame step inside a window.
        learned: include the learnable ``A_m``.
        context: ``"window"``, ``"sample"`` or None: the context term ``A_c`` (see above).
        frames: ``T``, required with a context term (its temporal conv has ``T`` input channels).
        residual: add the identity shortcut.
        collapse: the window-collapse layer (step 4); False: the frame-level GCN (``window=1``).
        backend: backend of :func:`keypointops.window_graph_conv`.
    """

    def __init__(self, in_channels: int, out_channels: int, adjacency: str | Skeleton | Tensor,
                 window: int = 3, *, dilation: int = 1, learned: bool = True, context: str | None = None,
                 frames: int | None = None, residual: bool = False, collapse: bool = True,
                 backend: str = "auto"):
        super().__init__()
        joint_adjacency = (adjacency if isinstance(adjacency, Tensor)
                           else skeleton(adjacency).adjacency())
        if joint_adjacency.dim() != 2 or joint_adjacency.size(0) != joint_adjacency.size(1):
            raise ValueError(f"WindowGraphConv3D: adjacency must be [N, N], got shape "
                             f"{list(joint_adjacency.shape)}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"WindowGraphConv3D: window must be a positive odd int, got {window!r}")
        check_choice("WindowGraphConv3D", "context", context, _CONTEXT_MODES)
        if residual and in_channels != out_channels:
            raise ValueError(f"WindowGraphConv3D: residual needs in_channels == out_channels, got "
                             f"{in_channels} and {out_channels}")
        if not isinstance(collapse, bool) or (not collapse and window != 1):
            raise ValueError(f"WindowGraphConv3D: collapse must be True, or False with window 1 (the "
                             f"frame-level graph conv), got collapse={collapse!r} with window {window!r}")
        self.num_joints = joint_adjacency.size(0)
        self.window, self.dilation, self.residual, self.backend = window, dilation, residual, backend
        size = window * self.num_joints
        fixed = (block_adjacency(joint_adjacency.float(), window) + torch.eye(size) if collapse
                 else joint_adjacency.float() + torch.eye(size))
        self.register_buffer("physical", normalize_adjacency(fixed, add_self_loops=False))
        self.learned = nn.Parameter(torch.zeros(self.num_joints, self.num_joints)) if learned else None
        self.context = (ContextTopology(in_channels, self.num_joints, window, frames, context,
                                        dilation=dilation) if context is not None else None)
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.collapse = nn.Linear(window * out_channels, out_channels, bias=False) if collapse else None
        self.norm = nn.BatchNorm1d(out_channels) if collapse else None

    def adjacency(self, x: Tensor | None = None) -> Tensor:
        """The window adjacency ``Â`` of step 2: ``[L, L]``, or with a context term (computed from the
        layer input ``x``) ``[B, T, L, L]`` / ``[B, L, L]``."""
        adj = self.physical
        if self.learned is not None:
            adj = adj + self.learned.repeat(self.window, self.window)
        if self.context is not None:
            if x is None:
                raise ValueError("WindowGraphConv3D.adjacency: x is required with a context term")
            adj = adj + self.context(x)
        return adj

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``[B, T, N, C_in]`` -> ``[B, T, N, C_out]``."""
        if x.dim() != 4 or x.size(2) != self.num_joints:
            raise ValueError(f"WindowGraphConv3D: x must be [B, T, N, C] with N = {self.num_joints}, "
                             f"got shape {list(x.shape)}")
        batch, frames, joints, _ = x.shape
        h = self.linear(x)
        adj = self.adjacency(x).to(h.dtype)
        y = window_graph_conv(h, adj, self.window, dilation=self.dilation, backend=self.backend)
        if self.collapse is None:                                             # window 1: [B, T, N, C]
            z = y.relu()
            return x + z if self.residual else z
        # Each node's window slots side by side ([B, T, N, window * C]) for the collapse GEMM.  The
        # one copy of y is made before the ReLU, which then runs in place on it: y itself is not
        # kept for backward, so the layer holds a single [B, T, L, C] tensor.
        slots = y.view(batch, frames, self.window, joints, -1).transpose(2, 3)
        slots = slots.reshape(batch, frames, joints, -1).relu_()
        z = self.collapse(slots)
        z = self.norm(z.view(-1, z.size(-1))).relu_().view_as(z)
        return x + z if self.residual else z
