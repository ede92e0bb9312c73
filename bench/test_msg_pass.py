"""msg_pass against PyG (gather relu(x_j) + eps, then SoftmaxAggregation(learn=True)) and the reference.

Cases: (a) KMPNet: 32 clips x 8 frames x 17 COCO keypoints, C=64, spatial-temporal graph;
(b) large: 1,000,000 nodes with 5 random incoming edges each, C=64.
"""
import pytest
import torch

import keypointops
from keypointops.graphs import Graph
from keypointops._opdefs.backend import triton_available

import floors
from conftest import SMALL, timed_pass

pyg_aggr = pytest.importorskip("torch_geometric.nn.aggr")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = {
    "kmpnet": dict(batch=2 if SMALL else 32),
    # SMALL: 12,000 nodes still take the CPU kernel's parallel path over several chunks (72,000 edges + nodes)
    "large": dict(nodes=12_000 if SMALL else 1_000_000),
}
INTERPRETED_NODES = 1_200  # the large case in Triton's interpreter (SMALL, CPU): the same kernels, a tenth of the nodes
IMPLS = ["keypointops", "triton", "reference", "pyg"]
EPS = 1e-7


def make_case(case, device, nodes=None):
    gen = torch.Generator().manual_seed(0)
    if case == "kmpnet":
        graph = Graph.spatial_temporal("coco17", frames=8, batch=CASES[case]["batch"], device=device)
    else:
        n = nodes or CASES[case]["nodes"]
        src = torch.randint(0, n, (5 * n,), generator=gen)
        dst = torch.arange(n).repeat_interleave(5)
        graph = Graph.from_edge_index(torch.stack([src, dst]).to(device), n)
    x = torch.randn(graph.num_nodes, 64, generator=gen).to(device)
    return x, graph


def make_fn(impl, x, graph, device, backward):
    x = x.detach().requires_grad_(backward)
    if impl == "pyg":
        aggr = pyg_aggr.SoftmaxAggregation(learn=True).to(device)
        src, dst = graph.edge_index
        t = None

        def forward():
            return aggr((x[src].relu() + EPS), dst, dim_size=graph.num_nodes)
    else:
        t = torch.ones(1, device=device, requires_grad=backward)
        backend = {"keypointops": "auto", "triton": "triton", "reference": "reference"}[impl]

        def forward():
            return keypointops.msg_pass(x, graph, t, EPS, backend=backend)

    return timed_pass(forward, [x] if t is None else [x, t], backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_msg_pass(measure, case, impl, backward, device):
    interpreted = impl == "triton" and device == "cpu"
    if impl == "triton" and (not triton_available(torch.device(device)) or (interpreted and not SMALL)):
        pytest.skip("Triton runs on GPU (on CPU only interpreted, as a small smoke run)")
    x, graph = make_case(case, device, INTERPRETED_NODES if interpreted else None)
    fn = make_fn(impl, x, graph, device, backward)
    work = floors.msg_pass(graph.num_nodes, graph.num_edges, x.size(1), backward)
    measure(fn, group=f"msg_pass {case} {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "pyg", work=work)
