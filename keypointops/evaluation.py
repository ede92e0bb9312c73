"""Re-ID evaluation: chunked distances, CMC / mAP / mINP (MARS / torchreid rules), re-ranking.

Protocol (torchreid's ``eval_market1501``, used for MARS and every video benchmark): for each query,
gallery items with the query's pid *and* camid are removed, as are junk items (pid -1, which
torchreid's MARS reader drops on loading); the remaining items with the query's pid are its true
matches. Queries left without a true match are skipped (``num_valid_queries`` counts the others).
Ties in distance are ordered by gallery index, as a stable argsort orders them.

Speed: AP, INP and CMC need only the rank of each true match among the query's remaining gallery
items, not a sorted row: :func:`keypointops.ops.rank_stats` computes them without sorting the rows
(see its docstring), against the ``O(Q * G * log G)`` full argsort of each row that torchreid
starts with. It needs the compiled extension (like every CPU op).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from keypointops._extension import require_ops
from keypointops.ops.rank_stats import rank_stats

__all__ = ["compute_distance", "evaluate", "evaluate_rank", "re_ranking"]

# Entries of a block of queries x gallery processed at once (bounds the temporaries to ~100 MB).
_BLOCK_ELEMENTS = 1 << 21


def compute_distance(qf, gf, metric: str = "euclidean", *, chunk: int = 4096) -> torch.Tensor:
    """Distance matrix ``[Q, G]`` between query features ``qf [Q, D]`` and gallery features
    ``gf [G, D]``, computed ``chunk`` query rows at a time.

    ``"euclidean"``: the squared euclidean distance (torchreid's, same ranking as the distance);
    ``"cosine"``: ``1 - cos`` of the L2-normalised features.
    """
    qf, gf = torch.as_tensor(qf), torch.as_tensor(gf)
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"qf and gf must be [Q, D] and [G, D] with the same D, got {tuple(qf.shape)} and "
                         f"{tuple(gf.shape)}")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    qf, gf = qf.float(), gf.float()
    if metric == "cosine":
        qf = torch.nn.functional.normalize(qf, dim=1)
        gf = torch.nn.functional.normalize(gf, dim=1)
    g_sq = gf.pow(2).sum(1)
    out = torch.empty(qf.shape[0], gf.shape[0], dtype=torch.float32, device=qf.device)
    for start in range(0, qf.shape[0], chunk):
        q = qf[start:start + chunk]
        if metric == "cosine":
            torch.sub(1.0, q @ gf.t(), out=out[start:start + chunk])
        else:
            block = torch.addmm(g_sq[None, :], q, gf.t(), beta=1.0, alpha=-2.0)
            block += q.pow(2).sum(1, keepdim=True)
            out[start:start + chunk] = block.clamp_(min=0)
    return out


def _as_ids(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int64).reshape(-1)


class _RankAccumulator:
    """Sums the per-query statistics (:func:`keypointops.ops.rank_stats`) of the blocks of one evaluation."""

    def __init__(self, g_pids, g_camids, max_rank: int):
        require_ops("cpu", "rank_stats")  # fail before any distance is computed
        self.g_pids, self.g_camids = _as_ids(g_pids), _as_ids(g_camids)
        if self.g_pids.numel() != self.g_camids.numel():
            raise ValueError("g_pids and g_camids must have the same length")
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        # torchreid's rule: a gallery smaller than max_rank shortens the CMC curve.
        self.max_rank = min(max_rank, self.g_pids.numel())
        self.first_hist = torch.zeros(self.max_rank, dtype=torch.int64)
        self.num_valid = 0
        self.ap_sum = 0.0
        self.inp_sum = 0.0

    def add(self, dist: torch.Tensor, q_pids: torch.Tensor, q_camids: torch.Tensor):
        if dist.shape != (q_pids.numel(), self.g_pids.numel()):
            raise ValueError(f"distmat block of shape {tuple(dist.shape)} does not match "
                             f"{q_pids.numel()} queries x {self.g_pids.numel()} gallery items")
        if dist.dtype != torch.float64:
            dist = dist.float()
        first, ap, inp = rank_stats(dist, q_pids, q_camids, self.g_pids, self.g_camids)
        valid = first >= 0
        first = first[valid]
        self.first_hist += torch.bincount(first[first < self.max_rank], minlength=self.max_rank)
        self.num_valid += int(valid.sum())
        self.ap_sum += float(ap[valid].sum())
        self.inp_sum += float(inp[valid].sum())

    def result(self) -> dict:
        if self.num_valid == 0:
            raise ValueError("no query has a true match in the gallery (same pid, another camera)")
        cmc = torch.cumsum(self.first_hist, 0).double() / self.num_valid
        return {"cmc": cmc.numpy(), "mAP": self.ap_sum / self.num_valid, "mINP": self.inp_sum / self.num_valid,
                "num_valid_queries": self.num_valid}


def _query_block(num_gallery: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, num_gallery))


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, *, max_rank: int = 50) -> dict:
    """CMC, mAP and mINP of a ``[Q, G]`` distance matrix (numpy or torch) under the MARS / torchreid
    rules (see the module docstring).

    Returns ``{"cmc": float64 array of length min(max_rank, G), "mAP": float, "mINP": float,
    "num_valid_queries": int}``; ``cmc[k]`` is the fraction of valid queries with a true match
    within the first ``k + 1`` remaining gallery items. Raises ``ValueError`` when no query has a
    true match.
    """
    dist = torch.as_tensor(distmat).detach().cpu()
    if dist.dim() != 2:
        raise ValueError(f"distmat must be [Q, G], got shape {tuple(dist.shape)}")
    q_pids, q_camids = _as_ids(q_pids), _as_ids(q_camids)
    if not q_pids.numel() == q_camids.numel() == dist.shape[0]:
        raise ValueError("q_pids and q_camids must have one entry per distmat row")
    acc = _RankAccumulator(g_pids, g_camids, max_rank)
    step = _query_block(dist.shape[1])
    for start in range(0, dist.shape[0], step):
        acc.add(dist[start:start + step], q_pids[start:start + step], q_camids[start:start + step])
    return acc.result()


def evaluate(qf, gf, q_pids, g_pids, q_camids, g_camids, *, metric: str = "euclidean", max_rank: int = 50,
             rerank: bool = False, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> dict:
    """Evaluates query features ``qf [Q, D]`` against gallery features ``gf [G, D]``.

    Without re-ranking, distances are computed and ranked one block of queries at a time, so
    memory stays bounded by a block (a 2,000 x 100,000 evaluation holds about 20 query rows of
    distances at once). With ``rerank=True`` the k-reciprocal re-ranking of Zhong et al. (2017)
    needs the full ``(Q + G)^2`` distance matrix. Returns the dict of :func:`evaluate_rank`.
    """
    qf, gf = torch.as_tensor(qf).detach().cpu().float(), torch.as_tensor(gf).detach().cpu().float()
    if rerank:
        dist = re_ranking(compute_distance(qf, gf, metric), compute_distance(qf, qf, metric),
                          compute_distance(gf, gf, metric), k1=k1, k2=k2, lambda_value=lambda_value)
        return evaluate_rank(dist, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    q_pids, q_camids = _as_ids(q_pids), _as_ids(q_camids)
    if not q_pids.numel() == q_camids.numel() == qf.shape[0]:
        raise ValueError("q_pids and q_camids must have one entry per query feature")
    acc = _RankAccumulator(g_pids, g_camids, max_rank)
    step = _query_block(gf.shape[0])
    blocks = range(0, qf.shape[0], step)
    for start in tqdm(blocks, desc="ranking", leave=False, mininterval=2, disable=None if len(blocks) > 1 else True):
        dist = compute_distance(qf[start:start + step], gf, metric)
        acc.add(dist, q_pids[start:start + step], q_camids[start:start + step])
    return acc.result()


def _reciprocal_sets(nearest: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k + 1]`` mask over ``nearest[:, :k + 1]``: j is in i's k-nearest and i in j's."""
    forward = nearest[:, :k + 1]
    backward = nearest[forward][:, :, :k + 1]  # [N, k+1, k+1]
    return (backward == torch.arange(nearest.shape[0])[:, None, None]).any(-1)


def re_ranking(q_g_dist, q_q_dist, g_g_dist, *, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> torch.Tensor:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), the reference implementation's algorithm
    (as in torchreid's ``re_ranking``): returns the re-ranked ``[Q, G]`` distances.

    Inputs are the query-gallery, query-query and gallery-gallery distances. Uses ``(Q + G)^2``
    memory. Neighbour lists come from a stable sort (ties ordered by index).
    """
    q_g = torch.as_tensor(q_g_dist).float().cpu()
    q_q = torch.as_tensor(q_q_dist).float().cpu()
    g_g = torch.as_tensor(g_g_dist).float().cpu()
    num_q = q_g.shape[0]
    full = torch.cat([torch.cat([q_q, q_g], 1), torch.cat([q_g.t(), g_g], 1)], 0).pow(2)
    original = (full / full.max(0).values.clamp(min=1e-12)).t().contiguous()
    n = original.shape[0]
    nearest = torch.argsort(original, dim=1, stable=True)[:, :max(k1, k2) + 1]
    half = int(np.around(k1 / 2.0))
    # k-reciprocal sets R(i, k1) and R(c, k1/2), as index lists padded with -1.
    r_full = torch.where(_reciprocal_sets(nearest, k1), nearest[:, :k1 + 1], -1)  # [N, k1+1]
    r_half = torch.where(_reciprocal_sets(nearest, half), nearest[:, :half + 1], -1)  # [N, half+1]
    # Expansion: add R(c, k1/2) of each candidate c in R(i, k1) sharing > 2/3 of it with R(i, k1).
    cand = r_full.clamp(min=0)
    cand_sets = r_half[cand]  # [N, k1+1, half+1]
    in_r = (cand_sets[..., None] == r_full[:, None, None, :]).any(-1) & (cand_sets >= 0)
    size = (cand_sets >= 0).sum(-1)
    accept = (in_r.sum(-1) > 2.0 / 3.0 * size) & (r_full >= 0)
    members = torch.zeros(n, n + 1, dtype=torch.bool)
    rows = torch.arange(n)
    members[rows[:, None], torch.where(r_full >= 0, r_full, n)] = True
    expanded = torch.where(accept[..., None] & (cand_sets >= 0), cand_sets, n).reshape(n, -1)
    members[rows[:, None], expanded] = True
    members = members[:, :n]
    weight = torch.exp(-original) * members
    v = weight / weight.sum(1, keepdim=True)
    if k2 != 1:  # query expansion: the mean of V over the k2 nearest neighbours
        step = max(1, _BLOCK_ELEMENTS // (k2 * n))
        v = torch.cat([v[nearest[start:start + step, :k2]].mean(1) for start in range(0, n, step)])
    # Jaccard distance through the shared non-zero columns of V (sparse rows).
    jaccard = torch.empty(num_q, n)
    for i in range(num_q):
        cols = v[i].nonzero(as_tuple=True)[0]
        shared = torch.minimum(v[i, cols][None, :], v[:, cols]).sum(1)
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lambda_value) + original[:num_q] * lambda_value
    return final[:, num_q:]
