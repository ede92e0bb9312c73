"""The work counts of bench/floors.py against the tensors of small cases, and its floor measurements."""
import math

import pytest
import torch

import floors
from conftest import SMALL
import keypointops
from keypointops.graphs import Graph


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def gemm_outputs(work):
    return [g.batch * g.m * g.n for g in work.gemms]


@pytest.mark.parametrize("grouped", [False, True])
def test_part_pool_work(grouped):
    features, heatmaps = torch.randn(3, 16, 4, 5), torch.randn(3, 6, 4, 5)
    groups = torch.rand(2, 6) if grouped else None
    out = keypointops.part_pool(features, heatmaps, groups, backend="reference")
    parts = out.size(1)
    forward = floors.part_pool(3, 16, 20, 6, parts, grouped, backward=False)
    inputs = nbytes(features, heatmaps) + (nbytes(groups) if grouped else 0)
    assert forward.bytes == inputs + nbytes(out)
    assert gemm_outputs(forward) == [out.numel()]
    assert forward.gemms[0].flops == 2 * out.numel() * 20
    both = floors.part_pool(3, 16, 20, 6, parts, grouped, backward=True)
    # backward: grad_out, features and heatmaps read, their gradients written
    assert both.bytes - forward.bytes == nbytes(out) + 2 * nbytes(features, heatmaps)
    assert gemm_outputs(both)[1:] == [features.numel(), 3 * parts * 20]


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("stride,scales", [(1, 1), (2, 3)])
def test_window_graph_conv_work(per_sample, stride, scales):
    batch, frames, nodes, channels, window = 2, 7, 4, 5, 3
    size = window * nodes
    x = torch.randn(batch, frames, nodes, channels)
    adj = torch.rand((batch,) * per_sample + (scales * size, size))
    out = keypointops.window_graph_conv(x, adj, window, stride=stride, backend="reference")
    forward = floors.window_graph_conv(batch, frames, nodes, channels, window, per_sample, False,
                                       stride=stride, scales=scales)
    assert forward.bytes == nbytes(x, adj, out)
    assert gemm_outputs(forward) == [out.numel()]
    both = floors.window_graph_conv(batch, frames, nodes, channels, window, per_sample, True,
                                    stride=stride, scales=scales)
    assert both.bytes - forward.bytes == nbytes(out) + 2 * nbytes(x, adj)
    # grad of the windows (the unfolded input) and of the adjacency
    assert gemm_outputs(both)[1:] == [out.numel() // scales, adj.numel()]


def test_msg_pass_work():
    graph = Graph.spatial_temporal("coco17", frames=3, batch=2)
    x = torch.randn(graph.num_nodes, 8)
    out = keypointops.msg_pass(x, graph, 1.0, backend="reference")
    forward = floors.msg_pass(graph.num_nodes, graph.num_edges, 8, backward=False)
    assert forward.bytes == nbytes(x, out, graph.rowptr, graph.col)
    assert forward.gemms == ()
    both = floors.msg_pass(graph.num_nodes, graph.num_edges, 8, backward=True)
    assert both.bytes - forward.bytes == 4 * nbytes(x) + nbytes(graph.rowptr_t, graph.col_t)


def test_keypoint_gather_work():
    features = torch.randn(2, 3, 16, 8)
    # one bilinear sample per keypoint: 2 x 2 pixels; a 3-pixel spread: 4 x 4, at most the map
    point = floors.keypoint_gather(2, 3, 16, 8, 5, 0.0, 1, 1, backward=False)
    assert point.bytes == 4 * (2 * 5 * 4 * 3 + 2 * 5 * 2 + 2 * 5 * 3)
    wide = floors.keypoint_gather(2, 3, 16, 8, 10, 2.5, 4, 9, backward=False)
    assert wide.bytes == 4 * (2 * 3 * 128 + 2 * 10 * 2 + 2 * 10 * 3 * 9)
    both = floors.keypoint_gather(2, 3, 16, 8, 5, 0.0, 1, 1, backward=True)
    assert both.bytes - point.bytes == 4 * (2 * 5 * 3 + 2 * 5 * 2) + nbytes(features)
    assert both.flops == 2 * point.flops == 2 * 8 * 2 * 5 * 3
    # the footprint, which sets the bandwidth: the whole map a sparse read picks from
    assert point.footprint == nbytes(features) + 4 * (2 * 5 * 2 + 2 * 5 * 3)
    assert both.spread == 2 * point.footprint


def test_measured_floors(monkeypatch):
    work = floors.part_pool(2, 8, 16, 3, 3, False, backward=True)
    measured = floors.measure_floors(work)
    assert all(math.isfinite(v) and v > 0 for v in measured.values())
    assert floors.Work.from_dict(work.as_dict()) == work
    # a copy beyond the cap is measured at the cap; a smaller one is never slower than the capped one
    monkeypatch.setattr(floors, "COPY_CAP_BYTES", 2**16)
    floors._copy_bandwidth.cache_clear()
    try:
        assert floors.copy_bandwidth(2**10) >= floors.copy_bandwidth(2**20) == floors.copy_bandwidth(2**16) > 0
        assert floors._copy_bandwidth.cache_info().currsize == 2
    finally:
        floors._copy_bandwidth.cache_clear()


@pytest.mark.skipif(not SMALL, reason="measures every case at its size: a smoke test at the small sizes")
def test_floor_gaps():
    """bench/floor_gaps.py: every case measured, each bound at least its floor, one table row each."""
    import floor_gaps

    rows = floor_gaps.gather_rows(rounds=1) + floor_gaps.msg_pass_rows(rounds=1)
    assert [row["case"].split()[0] for row in rows] == ["keypoint_gather"] * 6 + ["msg_pass"] * 2
    for row in rows:
        assert row["op"] > 0 and row["extra"] > 0 and row["bound"] >= row["floor"] > 0
    assert floor_gaps.table(rows).count("\n") == len(rows) + 1
