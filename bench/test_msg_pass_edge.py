"""GENConv with edge features (DeeperGCN on ogbn-proteins): keypointops against PyG.

One GENConv layer as PyG's ogbn-proteins DeeperGCN example builds it (softmax aggregation with a
learnable t, edge encoder Linear(8, 64) as ``lin_edge``, 64 channels, the two-layer MLP with
LayerNorm), forward and forward+backward, on a graph shaped like a sampled ogbn-proteins subgraph:
20,000 nodes with about 50 incoming edges each (1,000,000 edges in random order) and 8-dim edge
features in [0, 1) (ogbn-proteins: 132,534 nodes, 39.6M edges, 8-dim edge features; the example
trains on random node partitions of it).  Implementations, same weights:

- ``keypointops-graph``: ``keypointops.nn.GENConv`` on a ``keypointops.Graph`` built once (as
  across the layers of a DeeperGCN);
- ``keypointops-edge_index``: the same on the ``edge_index`` (CSR built at each call);
- ``pyg``: ``torch_geometric.nn.GENConv`` (the baseline).
"""
import pytest
import torch

from keypointops.graphs import Graph
from keypointops.nn import GENConv

from conftest import SMALL, timed_pass

pyg_nn = pytest.importorskip("torch_geometric.nn")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NODES = 2_000 if SMALL else 20_000
DEGREE = 50
CHANNELS, EDGE_DIM = 64, 8
IMPLS = ["keypointops-graph", "keypointops-edge_index", "pyg"]
OPTIONS = dict(aggr="softmax", t=1.0, learn_t=True, num_layers=2, norm="layer", edge_dim=EDGE_DIM)


def make_case(device):
    gen = torch.Generator().manual_seed(0)
    num_edges = NODES * DEGREE
    edge_index = torch.stack([torch.randint(0, NODES, (num_edges,), generator=gen),
                              torch.randint(0, NODES, (num_edges,), generator=gen)])
    x = torch.randn(NODES, CHANNELS, generator=gen)
    edge_attr = torch.rand(num_edges, EDGE_DIM, generator=gen)
    return x.to(device), edge_index.to(device), edge_attr.to(device)


def make_fn(impl, device, backward):
    x, edge_index, edge_attr = make_case(device)
    torch.manual_seed(0)
    theirs = pyg_nn.GENConv(CHANNELS, CHANNELS, **OPTIONS)
    if impl == "pyg":
        conv, graph = theirs, edge_index
    else:
        conv = GENConv(CHANNELS, CHANNELS, **OPTIONS)
        conv.load_state_dict(theirs.state_dict(), strict=True)
        graph = Graph.from_edge_index(edge_index, NODES) if impl == "keypointops-graph" else edge_index
    conv.to(device)
    x = x.requires_grad_(backward)
    return timed_pass(lambda: conv(x, graph, edge_attr), [x, *conv.parameters()], backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gen_conv_edge_features(measure, impl, backward, device):
    fn = make_fn(impl, device, backward)
    measure(fn, group=f"GENConv edge_dim={EDGE_DIM} proteins-like {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "pyg")
