"""``rank_stats``: per-query re-ID ranking statistics of a distance matrix (first true-match rank, AP, INP)."""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops import reference
from keypointops._checks import check_choice
from keypointops._extension import has_ops, require_ops
from keypointops._opdefs.rank_stats import check_args, register_kernels_of

__all__ = ["rank_stats"]


def rank_stats(dist: Tensor, q_pids: Tensor, q_camids: Tensor, g_pids: Tensor, g_camids: Tensor, *,
               backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    r"""The ranking statistics of each query of a ``[Q, G]`` distance matrix, under the MARS /
    torchreid rules: gallery items with the query's pid and camera, and junk items (pid -1), are
    removed; the other items with the query's pid are its true matches; ties in distance are ordered
    by gallery index (a stable argsort).

    With ``rank_k`` the 0-based rank of the ``k``-th of the ``M`` true matches among the kept items:
    ``first = rank_0``, :math:`\mathrm{AP} = \frac{1}{M}\sum_k \frac{k + 1}{\mathrm{rank}_k + 1}`,
    :math:`\mathrm{INP} = \frac{M}{\mathrm{rank}_{M-1} + 1}`; a query without a true match gets
    ``first = -1`` and AP = INP = 0.

    The compiled kernel sorts no row: it sorts each query's few true matches and counts the kept
    items before each (``O(G M)`` per query, vectorised; a query with very many matches sorts its
    row instead), where torchreid starts with an ``O(G log G)`` argsort of every row.

    Args:
        dist: ``[Q, G]`` float32 or float64 distances (finite), on the CPU.
        q_pids, q_camids: ``[Q]`` int64 query identities and cameras.
        g_pids, g_camids: ``[G]`` int64 gallery identities and cameras.
        backend: ``"auto"`` or ``"cpu"`` (the compiled CPU kernel) or ``"reference"`` (plain PyTorch).

    Returns:
        ``(first int64 [Q], ap float64 [Q], inp float64 [Q])``.
    """
    check_args(dist, q_pids, q_camids, g_pids, g_camids)
    check_choice("rank_stats", "backend", backend, ("auto", "cpu", "reference"))
    if backend == "reference":
        return reference.rank_stats(dist, q_pids, q_camids, g_pids, g_camids)
    if dist.device.type != "cpu":
        raise ValueError(f"rank_stats: the compiled kernel runs on CPU tensors, got {dist.device}")
    require_ops("cpu", "rank_stats")
    return torch.ops.keypointops.rank_stats(dist, q_pids, q_camids, g_pids, g_camids)


if has_ops():
    register_kernels_of("keypointops::rank_stats")
