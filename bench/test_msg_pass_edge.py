"""GENConv with edge features (DeeperGCN on ogbn-proteins): keypointops against PyG, the layer and
the edge-feature message passing alone, with the softmax and with the power-mean aggregation.

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

The message passing alone (edge features already encoded to 64 channels, in edge_index order):
``keypointops.msg_pass(x, graph, t, edge_attr=e)`` on a prebuilt Graph against PyG's GENConv
message ``relu(x_j + e_ji) + eps`` and ``SoftmaxAggregation(learn=True)``; gradients for x, e, t.

The power mean (DeeperGCN's PowerMean_Agg): the same layer with ``aggr="powermean", learn_p=True``
(p = 1 initially: a learnable p is clamped and powered like any other), and the message passing
alone as ``msg_pass(..., aggr="powermean", p=p)`` against PyG's ``PowerMeanAggregation(learn=True)``
on the same messages, at p = 1.5; gradients for x, e, p.
"""
import pytest
import torch

import keypointops
from keypointops.graphs import Graph
from keypointops.nn import GENConv

from conftest import SMALL, timed_pass

pyg_nn = pytest.importorskip("torch_geometric.nn")
pyg_aggr = pytest.importorskip("torch_geometric.nn.aggr")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NODES = 2_000 if SMALL else 20_000
DEGREE = 50
CHANNELS, EDGE_DIM = 64, 8
IMPLS = ["keypointops-graph", "keypointops-edge_index", "pyg"]
AGGR_OPTIONS = {"softmax": dict(aggr="softmax", t=1.0, learn_t=True),
                "powermean": dict(aggr="powermean", p=1.0, learn_p=True)}
OPTIONS = dict(num_layers=2, norm="layer", edge_dim=EDGE_DIM)
POWER = 1.5     # the power of the message-passing benchmark


def group_name(aggr: str, name: str) -> str:
    """The group name, with the aggregation named unless it is the softmax."""
    return name if aggr == "softmax" else f"{name.split(' ', 1)[0]} {aggr} {name.split(' ', 1)[1]}"


def make_case(device):
    gen = torch.Generator().manual_seed(0)
    num_edges = NODES * DEGREE
    edge_index = torch.stack([torch.randint(0, NODES, (num_edges,), generator=gen),
                              torch.randint(0, NODES, (num_edges,), generator=gen)])
    x = torch.randn(NODES, CHANNELS, generator=gen)
    edge_attr = torch.rand(num_edges, EDGE_DIM, generator=gen)
    return x.to(device), edge_index.to(device), edge_attr.to(device)


def make_fn(impl, device, backward, aggr):
    x, edge_index, edge_attr = make_case(device)
    torch.manual_seed(0)
    options = dict(OPTIONS, **AGGR_OPTIONS[aggr])
    theirs = pyg_nn.GENConv(CHANNELS, CHANNELS, **options)
    if impl == "pyg":
        conv, graph = theirs, edge_index
    else:
        conv = GENConv(CHANNELS, CHANNELS, **options)
        conv.load_state_dict(theirs.state_dict(), strict=True)
        graph = Graph.from_edge_index(edge_index, NODES) if impl == "keypointops-graph" else edge_index
    conv.to(device)
    x = x.requires_grad_(backward)
    return timed_pass(lambda: conv(x, graph, edge_attr), [x, *conv.parameters()], backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggr", list(AGGR_OPTIONS))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
def test_gen_conv_edge_features(measure, impl, backward, aggr, device):
    fn = make_fn(impl, device, backward, aggr)
    name = f"GENConv edge_dim={EDGE_DIM} proteins-like {'fwd+bwd' if backward else 'fwd'} {device}"
    measure(fn, group=group_name(aggr, name), impl=impl, device=device, baseline=impl == "pyg")


def make_message_passing_case(device):
    """x, edge_index and edge features already encoded to CHANNELS (in edge_index order)."""
    x, edge_index, _ = make_case(device)
    edge_attr = torch.randn(edge_index.size(1), CHANNELS, generator=torch.Generator().manual_seed(1)).to(device)
    return x, edge_index, edge_attr


def make_message_passing_fn(impl, device, backward, aggr):
    x, edge_index, edge_attr = make_message_passing_case(device)
    x, edge_attr = x.requires_grad_(backward), edge_attr.requires_grad_(backward)
    eps = 1e-7
    if impl == "pyg":
        if aggr == "softmax":
            aggregation = pyg_aggr.SoftmaxAggregation(learn=True)
        else:
            aggregation = pyg_aggr.PowerMeanAggregation(p=POWER, learn=True)
        aggregation.to(device)
        src, dst = edge_index

        def forward():
            return aggregation((x[src] + edge_attr).relu() + eps, dst, dim_size=NODES)
        leaves = [x, edge_attr, *aggregation.parameters()]
    else:
        graph = Graph.from_edge_index(edge_index, NODES)
        value = torch.full((1,), 1.0 if aggr == "softmax" else POWER, device=device, requires_grad=backward)
        parameter = dict(t=value) if aggr == "softmax" else dict(p=value)

        def forward():
            return keypointops.msg_pass(x, graph, eps=eps, edge_attr=edge_attr, aggr=aggr, **parameter)
        leaves = [x, edge_attr, value]
    return timed_pass(forward, leaves, backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggr", list(AGGR_OPTIONS))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["keypointops", "pyg"])
def test_edge_feature_message_passing(measure, impl, backward, aggr, device):
    fn = make_message_passing_fn(impl, device, backward, aggr)
    name = f"msg_pass edge_attr C={CHANNELS} proteins-like {'fwd+bwd' if backward else 'fwd'} {device}"
    measure(fn, group=group_name(aggr, name), impl=impl, device=device, baseline=impl == "pyg")
