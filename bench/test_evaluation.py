"""evaluate_rank at the MARS size: 1,980 queries x 9,330 gallery tracklets of random distances,
625 identities over 6 cameras, max_rank 50.

Baseline: ``np.argsort`` of every row, the first step of torchreid's evaluation (its compiled
Cython ``eval_market1501`` spends most of its time there, then loops over the queries), so the
speed-up shown is a lower bound on the speed-up over torchreid.
"""
import numpy as np
import pytest

from keypointops.evaluation import evaluate_rank

from conftest import SMALL

NUM_Q, NUM_G = (198, 933) if SMALL else (1980, 9330)


@pytest.fixture(scope="module")
def mars_case():
    rng = np.random.default_rng(0)
    q_pids, g_pids = rng.integers(1, 626, NUM_Q), rng.integers(1, 626, NUM_G)
    q_cams, g_cams = rng.integers(1, 7, NUM_Q), rng.integers(1, 7, NUM_G)
    dist = rng.random((NUM_Q, NUM_G), dtype=np.float32)
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("impl", ["evaluate_rank", "argsort_rows"])
def test_evaluate_rank_mars(benchmark, measure, mars_case, impl):
    dist, q_pids, g_pids, q_cams, g_cams = mars_case
    if impl == "argsort_rows":
        def fn():
            return np.argsort(dist, axis=1)
    else:
        def fn():
            return evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50)
    measure(fn, group=f"evaluate_rank {NUM_Q}x{NUM_G}", impl=impl, device="cpu", baseline=impl == "argsort_rows")
