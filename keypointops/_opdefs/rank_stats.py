"""``rank_stats``: the argument checks and the fake kernel of the compiled op (CPU only, no autograd)."""
from __future__ import annotations

import torch
from torch import Tensor

from keypointops._opdefs.backend import check_same_device, check_tensors


def check_args(dist, q_pids, q_camids, g_pids, g_camids) -> None:
    check_tensors("rank_stats", dist=dist, q_pids=q_pids, q_camids=q_camids, g_pids=g_pids, g_camids=g_camids)
    if dist.dim() != 2:
        raise ValueError(f"rank_stats: dist must be [Q, G], got shape {list(dist.shape)}")
    if dist.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"rank_stats: dist must be float32 or float64, got {dist.dtype}")
    num_queries, num_gallery = dist.shape
    for name, ids, size in (("q_pids", q_pids, num_queries), ("q_camids", q_camids, num_queries),
                            ("g_pids", g_pids, num_gallery), ("g_camids", g_camids, num_gallery)):
        if ids.dtype != torch.int64 or ids.shape != (size,):
            raise ValueError(f"rank_stats: {name} must be int64 [{size}], got {ids.dtype} {list(ids.shape)}")
        check_same_device("rank_stats", "dist", dist.device, name, ids.device)


def _fake_rank_stats(dist: Tensor, q_pids, q_camids, g_pids, g_camids):
    num_queries = dist.shape[0]
    return (dist.new_empty(num_queries, dtype=torch.int64), dist.new_empty(num_queries, dtype=torch.float64),
            dist.new_empty(num_queries, dtype=torch.float64))


def register_kernels_of(name: str) -> None:
    """Registers the fake kernel of the compiled op (it has no gradient)."""
    torch.library.register_fake(name)(_fake_rank_stats)
