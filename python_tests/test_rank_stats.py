"""rank_stats: the compiled CPU kernel against keypointops.reference.rank_stats (ties, junk, same-camera
items, queries without a match, a query with many matches), a hand-computed case, the fake kernel,
and bad input."""
import pytest
import torch

from keypointops import reference
from keypointops._extension import has_ops
from keypointops.ops import rank_stats

needs_ops = pytest.mark.skipif(not has_ops(), reason="keypointops._C not built")


def ranking_problem(num_queries=9, num_gallery=300, num_ids=6, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dist = torch.randint(0, 20, (num_queries, num_gallery), generator=gen).to(dtype)  # many ties
    q_pids = torch.randint(0, num_ids, (num_queries,), generator=gen)
    g_pids = torch.randint(-1, num_ids, (num_gallery,), generator=gen)               # -1: junk
    g_pids[:200] = q_pids[0]                       # query 0 has more than 128 true matches
    q_pids[1] = num_ids + 1                        # query 1 has none
    return (dist, q_pids, torch.randint(0, 3, (num_queries,), generator=gen), g_pids,
            torch.randint(0, 3, (num_gallery,), generator=gen))


def test_reference_by_hand():
    # gallery order by distance (ties by index): 2 (pid 1, cam 0: removed), 0 (pid 1), 3 (junk), 1 (pid 2), 4 (pid 1)
    dist = torch.tensor([[1.0, 3.0, 0.5, 1.0, 4.0]])
    ids = dict(q_pids=torch.tensor([1]), q_camids=torch.tensor([0]), g_pids=torch.tensor([1, 2, 1, -1, 1]),
               g_camids=torch.tensor([1, 1, 0, 1, 2]))
    first, ap, inp = reference.rank_stats(dist, **ids)
    # kept items in order: 0 (match, rank 0), 1 (rank 1), 4 (match, rank 2)
    assert first.tolist() == [0]
    assert ap.item() == pytest.approx((1 / 1 + 2 / 3) / 2) and inp.item() == pytest.approx(2 / 3)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_matches_reference(dtype):
    args = ranking_problem(dtype=dtype)
    got, want = rank_stats(*args), rank_stats(*args, backend="reference")
    assert got[0].dtype == torch.int64 and got[1].dtype == got[2].dtype == torch.float64
    assert torch.equal(got[0], want[0]) and got[0][1] == -1
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)


@needs_ops
def test_opcheck_and_fake():
    args = ranking_problem(num_queries=3, num_gallery=20)
    torch.library.opcheck(torch.ops.keypointops.rank_stats.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in args]
        first, ap, inp = torch.ops.keypointops.rank_stats(*fake)
    assert first.shape == ap.shape == inp.shape == (3,) and first.dtype == torch.int64


def test_bad_input_names_the_argument():
    dist, q_pids, q_camids, g_pids, g_camids = ranking_problem(num_queries=2, num_gallery=5)
    with pytest.raises(ValueError, match="dist must be \\[Q, G\\]"):
        rank_stats(dist[0], q_pids, q_camids, g_pids, g_camids)
    with pytest.raises(ValueError, match="dist must be float32 or float64"):
        rank_stats(dist.half(), q_pids, q_camids, g_pids, g_camids)
    with pytest.raises(ValueError, match="g_camids must be int64 \\[5\\]"):
        rank_stats(dist, q_pids, q_camids, g_pids, g_camids[:4])
    with pytest.raises(ValueError, match="q_pids must be int64"):
        rank_stats(dist, q_pids.int(), q_camids, g_pids, g_camids)
    with pytest.raises(TypeError, match="dist must be a Tensor"):
        rank_stats(dist.tolist(), q_pids, q_camids, g_pids, g_camids)
    with pytest.raises(ValueError, match="backend must be one of"):
        rank_stats(dist, q_pids, q_camids, g_pids, g_camids, backend="cuda")
    dist[0, 1] = float("nan")
    with pytest.raises(ValueError, match="must be finite"):
        rank_stats(dist, q_pids, q_camids, g_pids, g_camids, backend="reference")
    if has_ops():
        with pytest.raises(ValueError, match="must be finite"):
            rank_stats(dist, q_pids, q_camids, g_pids, g_camids)
