"""Evaluation: CMC / mAP / mINP against hand-computed values and a per-query oracle with torchreid's
semantics; chunked distances; streamed evaluation; k-reciprocal re-ranking against a loop port of
the reference implementation."""
import numpy as np
import pytest
import torch

from keypointops import evaluation
from keypointops.evaluation import compute_distance, evaluate, evaluate_rank, re_ranking


def torchreid_eval(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid's ``eval_market1501`` (Python version), per query, with a stable argsort (torchreid's
    default quicksort leaves the order of equal distances unspecified) and junk (pid -1) gallery
    items removed as torchreid's MARS reader removes them on loading."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1, kind="stable")
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for q_idx in range(num_q):
        order = indices[q_idx]
        remove = ((g_pids[order] == q_pids[q_idx]) & (g_camids[order] == q_camids[q_idx])) | (g_pids[order] == -1)
        raw_cmc = matches[q_idx][~remove]
        if q_pids[q_idx] == -1 or not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        max_pos_idx = np.max(np.where(raw_cmc == 1))
        all_inp.append(cmc[max_pos_idx] / (max_pos_idx + 1.0))
        cmc[cmc > 1] = 1
        # Ranks past the remaining gallery keep the last value (every valid query has matched).
        all_cmc.append(np.pad(cmc[:max_rank], (0, max(0, max_rank - cmc.size)), mode="edge"))
        tmp_cmc = raw_cmc.cumsum() / (np.arange(raw_cmc.size) + 1.0) * raw_cmc
        all_ap.append(tmp_cmc.sum() / raw_cmc.sum())
    assert all_cmc, "no valid query"
    return np.asarray(all_cmc, dtype=np.float64).mean(0), np.mean(all_ap), np.mean(all_inp), len(all_cmc)


def assert_matches_oracle(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    got = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank)
    cmc, m_ap, m_inp, valid = torchreid_eval(np.asarray(distmat), np.asarray(q_pids), np.asarray(g_pids),
                                             np.asarray(q_camids), np.asarray(g_camids), max_rank)
    assert got["num_valid_queries"] == valid
    np.testing.assert_allclose(got["cmc"], cmc, rtol=0, atol=1e-12)
    assert got["mAP"] == pytest.approx(m_ap, rel=1e-12)
    assert got["mINP"] == pytest.approx(m_inp, rel=1e-12)


def test_hand_computed_single_query():
    # Gallery 0..5; query pid 1 cam 0. Item 1 (pid 1, cam 0) is removed, item 3 is junk.
    g_pids = np.array([2, 1, 1, -1, 3, 1])
    g_cams = np.array([1, 0, 1, 1, 1, 2])
    dist = np.array([[0.1, 0.0, 0.3, 0.05, 0.2, 0.4]])
    out = evaluate_rank(dist, [1], g_pids, [0], g_cams, max_rank=4)
    # Remaining order by distance: item 0 (neg), 4 (neg), 2 (match), 5 (match).
    np.testing.assert_allclose(out["cmc"], [0, 0, 1, 1])
    assert out["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert out["mINP"] == pytest.approx(2 / 4)
    assert out["num_valid_queries"] == 1


def test_query_without_valid_match_is_skipped():
    g_pids = np.array([1, 2, 3])
    g_cams = np.array([0, 1, 1])
    dist = np.array([[0.1, 0.2, 0.3],    # pid 1 cam 0: its only match has the same camera
                     [0.3, 0.1, 0.2]])   # pid 2 cam 0: match at rank 1
    out = evaluate_rank(dist, [1, 2], g_pids, [0, 0], g_cams)
    assert out["num_valid_queries"] == 1
    assert out["mAP"] == 1.0 and out["mINP"] == 1.0
    np.testing.assert_allclose(out["cmc"], [1, 1, 1])  # gallery of 3 < max_rank: 3 ranks
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_rank(dist[:1], [1], g_pids, [0], g_cams)


def test_all_matches_and_junk_query():
    g_pids = np.array([4, 4, 4, 4])
    g_cams = np.array([1, 2, 3, 0])
    dist = np.array([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    out = evaluate_rank(dist, [4, -1], g_pids, [0, 1], g_cams, max_rank=10)
    # Item 3 (cam 0) removed; the three others all match: AP = INP = 1; the junk query is skipped.
    assert out["num_valid_queries"] == 1
    assert out["mAP"] == 1.0 and out["mINP"] == 1.0
    assert out["cmc"].shape == (4,) and np.all(out["cmc"] == 1)


def test_ties_are_broken_by_gallery_index():
    g_pids = np.array([7, 5, 5, 7])
    g_cams = np.array([1, 1, 1, 1])
    dist = np.zeros((1, 4))
    out = evaluate_rank(dist, [5], g_pids, [0], g_cams, max_rank=4)
    # All tied: order 0 (neg), 1, 2 (matches), 3 (neg).
    np.testing.assert_allclose(out["cmc"], [0, 1, 1, 1])
    assert out["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["mINP"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(6))
def test_equals_torchreid_semantics_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    num_q, num_g = rng.integers(1, 40), rng.integers(1, 120)
    num_ids, num_cams = rng.integers(2, 12), rng.integers(1, 4)
    q_pids = rng.integers(-1, num_ids, num_q)
    g_pids = rng.integers(-1, num_ids, num_g)
    q_cams, g_cams = rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g)
    # Few distinct values: many ties, between matches and between matches and negatives.
    dist = rng.integers(0, 6, (num_q, num_g)).astype(np.float32) if seed % 2 else rng.random((num_q, num_g))
    if seed == 4:
        dist = -dist  # negative distances
    try:
        torchreid_eval(dist, q_pids, g_pids, q_cams, g_cams)
    except AssertionError:
        q_pids[0], g_pids[0], g_cams[0] = 1, 1, (q_cams[0] + 1) % max(num_cams, 2)  # one valid query
    assert_matches_oracle(dist, q_pids, g_pids, q_cams, g_cams, max_rank=int(rng.integers(1, 60)))


def test_equals_oracle_across_blocks(monkeypatch):
    monkeypatch.setattr(evaluation, "_BLOCK_ELEMENTS", 500)  # many small query blocks
    rng = np.random.default_rng(3)
    q_pids, g_pids = rng.integers(0, 20, 90), rng.integers(0, 20, 300)
    q_cams, g_cams = rng.integers(0, 3, 90), rng.integers(0, 3, 300)
    dist = torch.rand(90, 300)
    dist[:, ::7] = 0.5  # a column of ties in every row
    assert_matches_oracle(dist, q_pids, g_pids, q_cams, g_cams)


def test_many_true_matches_per_query():
    """Hundreds of true matches per query (a frame-level gallery), with ties among them."""
    rng = np.random.default_rng(11)
    q_pids, g_pids = rng.integers(0, 3, 12), rng.integers(0, 3, 900)
    q_cams, g_cams = rng.integers(0, 4, 12), rng.integers(0, 4, 900)
    dist = rng.integers(0, 50, (12, 900)).astype(np.float64)
    assert_matches_oracle(dist, q_pids, g_pids, q_cams, g_cams)


def test_bad_distances_are_rejected():
    with pytest.raises(ValueError, match="finite"):
        evaluate_rank(np.array([[np.nan, 1.0]]), [1], [1, 2], [0], [1, 1])
    with pytest.raises(ValueError, match="finite"):  # a query without a true match is checked too
        evaluate_rank(np.array([[np.inf, 1.0], [0.0, 1.0]]), [3, 1], [1, 2], [0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"\[Q, G\]"):
        evaluate_rank(np.zeros(3), [1], [1, 2, 3], [0], [1, 1, 1])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_compute_distance_in_chunks(metric):
    qf, gf = torch.randn(13, 8, dtype=torch.float64), torch.randn(21, 8, dtype=torch.float64)
    if metric == "cosine":
        expected = 1 - torch.nn.functional.normalize(qf, dim=1) @ torch.nn.functional.normalize(gf, dim=1).t()
    else:
        expected = torch.cdist(qf, gf).pow(2)
    got = compute_distance(qf, gf, metric, chunk=4)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


def test_evaluate_streams_blocks(monkeypatch):
    rng = np.random.default_rng(5)
    qf, gf = torch.randn(40, 6), torch.randn(150, 6)
    q_pids, g_pids = rng.integers(0, 10, 40), rng.integers(0, 10, 150)
    q_cams, g_cams = rng.integers(0, 2, 40), rng.integers(0, 2, 150)
    full = evaluate_rank(compute_distance(qf, gf), q_pids, g_pids, q_cams, g_cams)
    monkeypatch.setattr(evaluation, "_BLOCK_ELEMENTS", 300)  # two queries per block
    streamed = evaluate(qf, gf, q_pids, g_pids, q_cams, g_cams)
    np.testing.assert_allclose(streamed["cmc"], full["cmc"])
    assert streamed["mAP"] == pytest.approx(full["mAP"]) and streamed["num_valid_queries"] == full["num_valid_queries"]


def re_ranking_loop(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """The reference implementation of Zhong et al. (as in torchreid), loops as written there,
    with a stable argsort."""
    original_dist = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                                    np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    original_dist = np.power(original_dist, 2).astype(np.float32)
    original_dist = np.transpose(1. * original_dist / np.max(original_dist, axis=0))
    V = np.zeros_like(original_dist).astype(np.float32)
    initial_rank = np.argsort(original_dist, kind="stable").astype(np.int32)
    query_num = q_g_dist.shape[0]
    all_num = original_dist.shape[0]
    for i in range(all_num):
        forward_k_neigh_index = initial_rank[i, :k1 + 1]
        backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
        fi = np.where(backward_k_neigh_index == i)[0]
        k_reciprocal_index = forward_k_neigh_index[fi]
        k_reciprocal_expansion_index = k_reciprocal_index
        for j in range(len(k_reciprocal_index)):
            candidate = k_reciprocal_index[j]
            half = int(np.around(k1 / 2.)) + 1
            candidate_forward_k_neigh_index = initial_rank[candidate, :half]
            candidate_backward_k_neigh_index = initial_rank[candidate_forward_k_neigh_index, :half]
            fi_candidate = np.where(candidate_backward_k_neigh_index == candidate)[0]
            candidate_k_reciprocal_index = candidate_forward_k_neigh_index[fi_candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2. / 3 * len(
                    candidate_k_reciprocal_index):
                k_reciprocal_expansion_index = np.append(k_reciprocal_expansion_index, candidate_k_reciprocal_index)
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        weight = np.exp(-original_dist[i, k_reciprocal_expansion_index])
        V[i, k_reciprocal_expansion_index] = 1. * weight / np.sum(weight)
    original_dist = original_dist[:query_num, ]
    if k2 != 1:
        V_qe = np.zeros_like(V, dtype=np.float32)
        for i in range(all_num):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(all_num)]
    jaccard_dist = np.zeros_like(original_dist, dtype=np.float32)
    for i in range(query_num):
        temp_min = np.zeros(shape=[1, all_num], dtype=np.float32)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            temp_min[0, indImages[j]] = temp_min[0, indImages[j]] + np.minimum(V[i, indNonZero[j]],
                                                                                 V[indImages[j], indNonZero[j]])
        jaccard_dist[i] = 1 - temp_min / (2. - temp_min)
    final_dist = jaccard_dist * (1 - lambda_value) + original_dist * lambda_value
    return final_dist[:query_num, query_num:]


@pytest.mark.parametrize("k1,k2", [(20, 6), (5, 1), (4, 3)])
def test_re_ranking_equals_reference_loops(k1, k2):
    torch.manual_seed(k1)
    centres = torch.randn(6, 5)
    qf = centres[torch.arange(12) % 6] + 0.3 * torch.randn(12, 5)
    gf = centres[torch.arange(40) % 6] + 0.3 * torch.randn(40, 5)
    q_g, q_q, g_g = compute_distance(qf, gf), compute_distance(qf, qf), compute_distance(gf, gf)
    got = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2)
    expected = re_ranking_loop(q_g.double().numpy(), q_q.double().numpy(), g_g.double().numpy(), k1, k2)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_evaluate_with_re_ranking():
    torch.manual_seed(0)
    centres = torch.randn(8, 16)
    pids_q, pids_g = torch.arange(16) % 8, torch.arange(64) % 8
    qf = centres[pids_q] + 0.8 * torch.randn(16, 16)
    gf = centres[pids_g] + 0.8 * torch.randn(64, 16)
    cams_q, cams_g = torch.zeros(16), torch.ones(64)
    got = evaluate(qf, gf, pids_q, pids_g, cams_q, cams_g, rerank=True, k1=6, k2=3)
    dist = re_ranking_loop(*(compute_distance(a, b).double().numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))),
                           k1=6, k2=3)
    assert_matches_oracle(dist, pids_q.numpy(), pids_g.numpy(), cams_q.numpy(), cams_g.numpy())
    assert got["mAP"] == pytest.approx(evaluate_rank(dist, pids_q, pids_g, cams_q, cams_g)["mAP"], rel=1e-6)
