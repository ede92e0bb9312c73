"""Graph (CSR + transposed CSR), skeletons and the spatial-temporal graph builder."""
import pytest
import torch

from keypointops.graphs import SKELETONS, Graph, skeleton


@pytest.mark.parametrize("name,joints,edges", [("coco17", 17, 19), ("openpose18", 18, 17),
                                               ("body25", 25, 24), ("kmpnet12", 12, 11), ("pose14", 14, 13)])
def test_skeletons(name, joints, edges):
    skel = skeleton(name)
    assert skel.num_joints == joints and len(skel.joints) == len(set(skel.joints))
    assert len(skel.edges) == edges
    for a, b in skel.edges:
        assert 0 <= a < joints and 0 <= b < joints and a != b
    # connected: every skeleton is one tree-like body
    reached, frontier = {0}, [0]
    while frontier:
        k = frontier.pop()
        for a, b in skel.edges:
            for u, v in ((a, b), (b, a)):
                if u == k and v not in reached:
                    reached.add(v)
                    frontier.append(v)
    assert reached == set(range(joints))


def test_kmpnet12_is_coco17_without_the_head():
    assert SKELETONS["kmpnet12"].joints == SKELETONS["coco17"].joints[5:]
    # KMPNet's 11 edges (docs/models/kmpnet.md): no L-hip - R-hip link (nodes 6, 7)
    assert sorted(tuple(sorted(e)) for e in SKELETONS["kmpnet12"].edges) == sorted(
        [(8, 10), (6, 8), (0, 6), (7, 9), (9, 11), (1, 7), (2, 4), (0, 2), (0, 1), (1, 3), (3, 5)])
    assert SKELETONS["pose14"].joints == SKELETONS["openpose18"].joints[:14]
    with pytest.raises(ValueError, match="unknown skeleton"):
        skeleton("coco19")


def test_from_edge_index_builds_both_csrs():
    edge_index = torch.tensor([[0, 2, 1, 2, 2, 3], [1, 1, 0, 3, 3, 2]])
    graph = Graph.from_edge_index(edge_index, num_nodes=5)
    assert graph.rowptr.tolist() == [0, 1, 3, 4, 6, 6]     # node 4: no incoming edge
    assert graph.col.tolist() == [1, 0, 2, 3, 2, 2]         # sources, grouped by target, stable
    assert graph.rowptr_t.tolist() == [0, 1, 2, 5, 6, 6]
    assert graph.col_t.tolist() == [1, 0, 1, 3, 3, 2]       # targets, grouped by source
    # edge_index round trip (as a multiset of edges)
    got = sorted(map(tuple, graph.edge_index.t().tolist()))
    assert got == sorted(map(tuple, edge_index.t().tolist()))


def test_spatial_temporal_graph():
    K, T, B = 17, 3, 2
    graph = Graph.spatial_temporal("coco17", frames=T, batch=B)
    assert graph.num_nodes == B * T * K
    spatial = 2 * 19 * B * T
    temporal = 2 * K * (T - 1) * B
    assert graph.num_edges == spatial + temporal
    edges = set(map(tuple, graph.edge_index.t().tolist()))
    assert all(u != v for u, v in edges)                       # no self loops
    assert all((v, u) in edges for u, v in edges)              # both directions
    node = lambda b, t, k: (b * T + t) * K + k  # noqa: E731
    assert (node(1, 2, 5), node(1, 2, 7)) in edges             # shoulder-elbow in clip 1, frame 2
    assert (node(0, 0, 9), node(0, 1, 9)) in edges             # same joint, next frame
    assert (node(0, 2, 9), node(1, 0, 9)) not in edges         # never across clips
    no_time = Graph.spatial_temporal("coco17", frames=T, batch=B, temporal=False)
    assert no_time.num_edges == spatial


def _transposed_edges(graph):
    sources = torch.repeat_interleave(torch.arange(graph.num_nodes), graph.rowptr_t.diff())
    return sorted(zip(sources.tolist(), graph.col_t.tolist()))


def test_transposed_csr_holds_the_same_edges():
    graph = Graph.spatial_temporal("kmpnet12", frames=2)
    assert _transposed_edges(graph) == sorted(map(tuple, graph.edge_index.t().tolist()))
    moved = graph.to("cpu")
    assert torch.equal(moved.rowptr_t, graph.rowptr_t) and torch.equal(moved.col_t, graph.col_t)
    built = Graph(graph.rowptr, graph.col)          # transposed CSR built from a plain CSR
    assert _transposed_edges(built) == _transposed_edges(graph)


def test_edge_permutations_give_each_csr_position_its_edge_id():
    """perm / perm_t map every position of the CSR / transposed CSR to the column of the given
    edge_index (int64 or int32) that holds that edge; a graph built from a CSR numbers its edges
    in CSR order; both survive .to()."""
    gen = torch.Generator().manual_seed(0)
    edge_index = torch.randint(0, 9, (2, 40), generator=gen)
    for given in (edge_index, edge_index.int()):
        graph = Graph.from_edge_index(given, 9)
        assert torch.equal(graph.edge_index, edge_index[:, graph.perm])
        sources = torch.repeat_interleave(torch.arange(9), graph.rowptr_t.diff())
        assert torch.equal(torch.stack([sources, graph.col_t]), edge_index[:, graph.perm_t])
        assert sorted(graph.perm.tolist()) == sorted(graph.perm_t.tolist()) == list(range(40))
    built = Graph(graph.rowptr, graph.col)
    assert torch.equal(built.perm, torch.arange(40))
    sources = torch.repeat_interleave(torch.arange(9), built.rowptr_t.diff())
    assert torch.equal(torch.stack([sources, built.col_t]), built.edge_index[:, built.perm_t])
    moved = graph.to("cpu")
    assert torch.equal(moved.perm, graph.perm) and torch.equal(moved.perm_t, graph.perm_t)


def test_bad_graphs():
    with pytest.raises(ValueError, match="rowptr\\[0\\] must be 0"):
        Graph(torch.tensor([1, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="rowptr\\[-1\\] must equal the number of edges"):
        Graph(torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="edge_index must be \\[2, E\\]"):
        Graph.from_edge_index(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="col must be a Tensor"):
        Graph(torch.tensor([0]), [0])
    with pytest.raises(ValueError, match="frames and batch must be >= 1"):
        Graph.spatial_temporal("coco17", frames=0)
