"""Graphs and skeletons: the CSR ``Graph`` of the message-passing ops, the keypoint skeletons, and
the adjacency builders of the graph convolutions.

``Graph`` stores a graph as a CSR over *incoming* edges: the sources of the edges into node ``v``
are ``col[rowptr[v]:rowptr[v + 1]]``.  It also holds the transposed CSR (the targets of the edges
leaving each node), built once at construction, which the backward kernels walk so that they need
no atomics, and the edge permutations of both CSRs (CSR position -> edge id in the order the graph
was given), through which the ops read per-edge features in that order, in place.
``edge_index`` follows PyTorch Geometric: row 0 the source, row 1 the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Graph", "Skeleton", "SKELETONS", "skeleton", "normalize_adjacency", "block_adjacency",
           "multiscale_adjacency"]


@dataclass(frozen=True)
class Skeleton:
    """A named keypoint layout: joint names and undirected edges (pairs of joint indices)."""

    name: str
    joints: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]

    @property
    def num_joints(self) -> int:
        return len(self.joints)

    def adjacency(self, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        """The symmetric 0/1 ``[K, K]`` adjacency of the undirected edges, without self loops."""
        adj = torch.zeros(self.num_joints, self.num_joints, dtype=dtype, device=device)
        if self.edges:
            a, b = torch.tensor(self.edges, device=device).t()
            adj[a, b] = 1.0
            adj[b, a] = 1.0
        return adj


_COCO17_JOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                  "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                  "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")
# The COCO keypoint skeleton (19 limbs), zero-based.
_COCO17_EDGES = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
                 (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5),
                 (4, 6))
_OPENPOSE18_JOINTS = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist",
                      "left_shoulder", "left_elbow", "left_wrist", "right_hip", "right_knee",
                      "right_ankle", "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye",
                      "right_ear", "left_ear")
_OPENPOSE18_EDGES = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
                     (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
_BODY25_JOINTS = ("nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder",
                  "left_elbow", "left_wrist", "mid_hip", "right_hip", "right_knee", "right_ankle",
                  "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye", "right_ear",
                  "left_ear", "left_big_toe", "left_small_toe", "left_heel", "right_big_toe",
                  "right_small_toe", "right_heel")
_BODY25_EDGES = ((1, 8), (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10),
                 (10, 11), (8, 12), (12, 13), (13, 14), (1, 0), (0, 15), (15, 17), (0, 16),
                 (16, 18), (14, 19), (19, 20), (14, 21), (11, 22), (22, 23), (11, 24))


def _subset(name: str, joints: tuple[str, ...], edges, keep: list[int]) -> Skeleton:
    """The skeleton induced by the joints ``keep`` (edges with both ends kept, renumbered)."""
    index = {old: new for new, old in enumerate(keep)}
    sub_edges = tuple((index[a], index[b]) for a, b in edges if a in index and b in index)
    return Skeleton(name, tuple(joints[k] for k in keep), sub_edges)


SKELETONS: dict[str, Skeleton] = {
    "coco17": Skeleton("coco17", _COCO17_JOINTS, _COCO17_EDGES),
    "openpose18": Skeleton("openpose18", _OPENPOSE18_JOINTS, _OPENPOSE18_EDGES),
    "body25": Skeleton("body25", _BODY25_JOINTS, _BODY25_EDGES),
    # KMPNet's headless graph (docs/models/kmpnet.md): COCO-17 without nose, eyes and ears, and without the
    # hip-hip limb of the COCO skeleton: 11 edges, a tree, as the authors' released graph builder.
    "kmpnet12": _subset("kmpnet12", _COCO17_JOINTS, tuple(e for e in _COCO17_EDGES if e != (11, 12)),
                        list(range(5, 17))),
    # COCO-18 (OpenPose order) joints 0..13: no eyes and ears.
    "pose14": _subset("pose14", _OPENPOSE18_JOINTS, _OPENPOSE18_EDGES, list(range(14))),
}


def skeleton(name: str | Skeleton) -> Skeleton:
    """Looks up a skeleton by name (``coco17``, ``openpose18``, ``body25``, ``kmpnet12``, ``pose14``)."""
    if isinstance(name, Skeleton):
        return name
    if name not in SKELETONS:
        raise ValueError(f"skeleton: unknown skeleton {name!r}; known: {sorted(SKELETONS)}")
    return SKELETONS[name]


def _csr_from_targets(sources: Tensor, targets: Tensor, num_nodes: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR grouped by ``targets`` (stable: edges keep their relative order within a group):
    ``(rowptr, col, perm)`` with ``perm[k]`` the index into ``sources`` of CSR position ``k``."""
    order = torch.argsort(targets, stable=True)
    rowptr = torch.searchsorted(targets[order],
                                torch.arange(num_nodes + 1, device=targets.device, dtype=targets.dtype))
    return rowptr, sources[order].contiguous(), order


class Graph:
    """A directed graph as a CSR over incoming edges, with its transposed CSR cached.

    Args:
        rowptr: ``[N + 1]`` int64, non-decreasing, ``rowptr[0] == 0``, ``rowptr[N] == E``.
        col: ``[E]`` int64 source node of each incoming edge, in ``[0, N)``.
        validate: check the index contents (one pass over the indices; skipped under
            ``torch.compile`` tracing).

    Edge ids: a graph built from an ``edge_index`` numbers its edges in that ``edge_index``'s
    order, one built from ``(rowptr, col)`` in CSR order; per-edge features (``edge_attr`` of
    :func:`keypointops.msg_pass`) are rows in that order.  ``perm`` / ``perm_t`` (``[E]`` int64)
    give the edge id of every position of the CSR / transposed CSR.

    Build one with :meth:`from_edge_index` or :meth:`spatial_temporal`; reuse it across calls
    (construction sorts the edges once; the ops never do).
    """

    def __init__(self, rowptr: Tensor, col: Tensor, *, validate: bool = True,
                 _transposed: tuple[Tensor, Tensor, Tensor] | None = None, _perm: Tensor | None = None):
        _check_index_tensor(rowptr, "rowptr")
        _check_index_tensor(col, "col")
        if rowptr.numel() < 1:
            raise ValueError("Graph: rowptr must have N + 1 >= 1 entries, got an empty tensor")
        if rowptr.device != col.device:
            raise ValueError(f"Graph: rowptr ({rowptr.device}) and col ({col.device}) must be on the "
                             "same device")
        self.rowptr = rowptr.contiguous()
        self.col = col.contiguous()
        if validate and not torch.compiler.is_compiling():
            _validate_csr(self.rowptr, self.col, "rowptr", "col")
        if _transposed is None:
            dst = self.targets()
            _transposed = _csr_from_targets(dst, self.col, self.num_nodes)
        self.rowptr_t, self.col_t, self.perm_t = _transposed
        self.perm = torch.arange(self.num_edges, device=self.device) if _perm is None else _perm

    @property
    def num_nodes(self) -> int:
        return self.rowptr.numel() - 1

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.col.device

    def targets(self) -> Tensor:
        """``[E]`` target node of each edge, in CSR order."""
        return torch.repeat_interleave(torch.arange(self.num_nodes, device=self.device),
                                       self.in_degree(), output_size=self.num_edges)

    def in_degree(self) -> Tensor:
        return self.rowptr[1:] - self.rowptr[:-1]

    @property
    def edge_index(self) -> Tensor:
        """``[2, E]`` (source, target) in CSR order, PyTorch Geometric convention."""
        return torch.stack([self.col, self.targets()])

    def to(self, device: torch.device | str) -> "Graph":
        """A copy on ``device`` (the transposed CSR is moved, not rebuilt)."""
        return Graph(self.rowptr.to(device), self.col.to(device), validate=False,
                     _transposed=(self.rowptr_t.to(device), self.col_t.to(device), self.perm_t.to(device)),
                     _perm=self.perm.to(device))

    def __repr__(self) -> str:
        return f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges}, device={self.device})"

    @classmethod
    def from_edge_index(cls, edge_index: Tensor, num_nodes: int | None = None) -> "Graph":
        """From a PyG-style ``edge_index`` ``[2, E]`` (row 0 source, row 1 target), int64 or int32;
        edge ``e`` of the graph is column ``e`` of ``edge_index``."""
        if isinstance(edge_index, Tensor) and edge_index.dtype == torch.int32:
            edge_index = edge_index.long()
        _check_index_tensor(edge_index, "edge_index", dim=2)
        if edge_index.size(0) != 2:
            raise ValueError(f"Graph: edge_index must be [2, E], got {list(edge_index.shape)}")
        if num_nodes is None:
            num_nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
        if not torch.compiler.is_compiling() and edge_index.numel():
            lo, hi = int(edge_index.min()), int(edge_index.max())
            if lo < 0 or hi >= num_nodes:
                raise ValueError(f"Graph: edge_index holds node indices in [{lo}, {hi}], out of range "
                                 f"[0, {num_nodes})")
        src, dst = edge_index[0], edge_index[1]
        rowptr, col, perm = _csr_from_targets(src, dst, num_nodes)
        transposed = _csr_from_targets(dst, src, num_nodes)
        return cls(rowptr, col, validate=False, _transposed=transposed, _perm=perm)

    @classmethod
    def spatial_temporal(cls, skeleton_name: str | Skeleton, frames: int, batch: int = 1,
                         temporal: bool = True, device: torch.device | str = "cpu") -> "Graph":
        """KMPNet's spatial-temporal keypoint graph for ``batch`` clips of ``frames`` frames.

        Node ``(b * frames + t) * K + k`` is joint ``k`` of frame ``t`` of clip ``b``.  Every
        skeleton edge appears in both directions in every frame; with ``temporal`` the same joint
        is linked between frames ``t`` and ``t + 1`` in both directions.  No self loops.
        """
        skel = skeleton(skeleton_name)
        if frames < 1 or batch < 1:
            raise ValueError(f"Graph.spatial_temporal: frames and batch must be >= 1, got {frames}, {batch}")
        K = skel.num_joints
        pairs = torch.tensor(skel.edges, dtype=torch.long).reshape(-1, 2)
        spatial = torch.cat([pairs, pairs.flip(1)])  # both directions, [2S, 2]
        frame_base = torch.arange(batch * frames, dtype=torch.long) * K  # every (clip, frame)
        edges = [(frame_base[:, None, None] + spatial[None]).reshape(-1, 2)]
        if temporal and frames > 1:
            t = torch.arange(frames - 1, dtype=torch.long)
            base = ((torch.arange(batch)[:, None] * frames + t[None]) * K).reshape(-1)
            joint = torch.arange(K, dtype=torch.long)
            now = (base[:, None] + joint[None]).reshape(-1)
            edges += [torch.stack([now, now + K], 1), torch.stack([now + K, now], 1)]
        edge_index = torch.cat(edges).t().contiguous().to(device)
        return cls.from_edge_index(edge_index, batch * frames * K)


def _check_index_tensor(tensor, name: str, dim: int = 1) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"Graph: {name} must be a Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.long:
        raise ValueError(f"Graph: {name} must be int64 (torch.long), got {tensor.dtype}")
    if tensor.dim() != dim:
        raise ValueError(f"Graph: {name} must have {dim} dimension(s), got shape {list(tensor.shape)}")


def _validate_csr(rowptr: Tensor, col: Tensor, rowptr_name: str, col_name: str) -> None:
    num_nodes = rowptr.numel() - 1
    if int(rowptr[0]) != 0:
        raise ValueError(f"Graph: {rowptr_name}[0] must be 0, got {int(rowptr[0])}")
    if int(rowptr[-1]) != col.numel():
        raise ValueError(f"Graph: {rowptr_name}[-1] must equal the number of edges ({col.numel()}), "
                         f"got {int(rowptr[-1])}")
    if num_nodes and bool((rowptr[1:] < rowptr[:-1]).any()):
        raise ValueError(f"Graph: {rowptr_name} must be non-decreasing")
    if col.numel() and (int(col.min()) < 0 or int(col.max()) >= num_nodes):
        raise ValueError(f"Graph: {col_name} holds node indices in [{int(col.min())}, {int(col.max())}], "
                         f"out of range [0, {num_nodes})")


# --- part groupings: which joints (heatmap channels) make up each body part ----------------------

def _check_square(adj, name: str, fn: str) -> None:
    if not isinstance(adj, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(adj).__name__}")
    if adj.dim() < 2 or adj.size(-1) != adj.size(-2):
        raise ValueError(f"{fn}: {name} must be [..., N, N], got shape {list(adj.shape)}")
    if not adj.is_floating_point():
        raise ValueError(f"{fn}: {name} must be floating point, got {adj.dtype}")


def normalize_adjacency(adj: Tensor, add_self_loops: bool = True) -> Tensor:
    """Symmetric normalisation ``D^-1/2 (A + I) D^-1/2`` of a dense adjacency (GCN, MS-G3D).

    Args:
        adj: ``[..., N, N]`` floating point adjacency (a batch of them is normalised one by one);
            differentiable, so a learnable part of it trains through the normalisation.
        add_self_loops: add the identity before normalising; pass False when ``adj`` already holds
            its self loops (as :func:`block_adjacency` builds them).

    Returns:
        ``[..., N, N]``: ``d_i^-1/2 (A + I)_ij d_j^-1/2`` with ``d`` the row sums of ``A + I``; the
        rows and columns of a node whose degree is ``<= 0`` are 0 (never inf or NaN, nor in the
        gradient).
    """
    _check_square(adj, "adj", "normalize_adjacency")
    if add_self_loops:
        adj = adj + torch.eye(adj.size(-1), dtype=adj.dtype, device=adj.device)
    degree = adj.sum(-1)
    positive = degree > 0
    # rsqrt of 1 where the degree is <= 0, so that its (discarded) branch has a finite gradient.
    inv_sqrt = torch.where(positive, torch.where(positive, degree, 1.0).rsqrt(), 0.0)
    return inv_sqrt[..., :, None] * adj * inv_sqrt[..., None, :]


def block_adjacency(adj: Tensor, window: int) -> Tensor:
    """The ``[L, L]`` adjacency of a window of ``window`` frames (``L = window * N``), as MS-G3D builds it.

    Every ``N x N`` block ``(w, w')`` is ``A + I``: a joint is linked to its skeleton neighbours
    and to itself, in its own frame and in every other frame of the window (MS-G3D's
    ``build_spatial_temporal_graph``: ``np.tile(A + I, (window, window))``).  Window node
    ``w * N + n`` is joint ``n`` of slot ``w``, the order :func:`keypointops.window_graph_conv`
    uses.  Normalise the result with ``normalize_adjacency(..., add_self_loops=False)`` (its
    diagonal already holds the self loops).

    Args:
        adj: ``[..., N, N]`` adjacency without self loops (e.g. a skeleton's 0/1 matrix).
        window: number of frames of the window, ``>= 1``.
    """
    _check_square(adj, "adj", "block_adjacency")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"block_adjacency: window must be an int >= 1, got {window!r}")
    with_loops = adj + torch.eye(adj.size(-1), dtype=adj.dtype, device=adj.device)
    return with_loops.repeat(*([1] * (adj.dim() - 2)), window, window)


def multiscale_adjacency(adj: Tensor, num_scales: int, *, disentangled: bool = True) -> Tensor:
    """MS-G3D's multi-scale adjacency (Liu et al., "Disentangling and Unifying Graph Convolutions
    for Skeleton-Based Action Recognition", CVPR 2020): ``S`` normalised ``[L, L]`` adjacencies
    stacked as ``[S * L, L]``, scale ``s`` in rows ``s * L .. (s + 1) * L - 1``.

    ``disentangled=True`` (MS-G3D's default): scale ``k`` links the nodes exactly ``k`` hops apart
    in ``adj`` (reachable in ``k`` steps of ``A + I`` but not in ``k - 1``), plus self loops; scale
    0 is the identity.  ``disentangled=False``: scale ``k`` is the ``k``-th power of the
    normalised ``adj`` (``adj`` must then hold its self loops).  Every disentangled scale is
    normalised ``D^-1/2 A D^-1/2`` (:func:`normalize_adjacency` without added self loops, row sums
    as degrees).  :func:`keypointops.window_graph_conv` takes the result as its ``[S * L, L]``
    adjacency and reads each window once for all the scales.

    Args:
        adj: ``[L, L]`` 0/1 adjacency, e.g. ``block_adjacency(A, window)`` for MS-G3D's G3D.
        num_scales: ``S >= 1``.
        disentangled: see above.
    """
    _check_square(adj, "adj", "multiscale_adjacency")
    if adj.dim() != 2:
        raise ValueError(f"multiscale_adjacency: adj must be [L, L], got shape {list(adj.shape)}")
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales < 1:
        raise ValueError(f"multiscale_adjacency: num_scales must be an int >= 1, got {num_scales!r}")
    eye = torch.eye(adj.size(-1), dtype=adj.dtype, device=adj.device)
    if not disentangled:
        normalised = normalize_adjacency(adj, add_self_loops=False)
        powers = [eye]
        for _ in range(1, num_scales):
            powers.append(powers[-1] @ normalised)
        return torch.cat(powers)
    scales, reach, step = [eye], eye, adj + eye        # reach: linked in at most k - 1 steps
    for _ in range(1, num_scales):
        farther = (reach @ step).clamp(max=1)            # linked in at most k steps
        scales.append(normalize_adjacency(farther - reach, add_self_loops=True))
        reach = farther
    return torch.cat(scales)
