"""keypointops.nn.GENConv and DeepGCNLayer against PyTorch Geometric's, with PyG weights loaded."""
import importlib.util

import pytest
import torch

import keypointops
from keypointops.graphs import Graph
from keypointops.nn import DeepGCNLayer, GENConv
from keypointops.nn import gen_conv as gen_conv_module

from helpers import DEVICES, device_backend_params, tolerances

EMPTY_NODES = 2  # nodes 0..1 of random_edge_index get no incoming edge
F32_TOL = dict(rtol=1e-5, atol=1e-5)
# Weight gradients sum over every node and edge through several layers: two float32 orders of
# summation (msg_pass's backward is closer to float64 than PyG's autograd) differ by ~1e-5 there.
F32_GRAD_TOL = dict(rtol=1e-5, atol=3e-5)


def backend_params():
    """The fused msg_pass backends here (Triton only where its msg_pass module exists) + the reference."""
    has_triton_msg_pass = importlib.util.find_spec("keypointops.triton.msg_pass") is not None
    params = []
    for param in device_backend_params():
        device, backend = param.values
        marks = list(param.marks)
        if backend == "triton":
            marks.append(pytest.mark.skipif(not has_triton_msg_pass,
                                            reason="keypointops.triton.msg_pass not in this build"))
        params.append(pytest.param(device, backend, marks=marks, id=param.id))
    return params + [pytest.param(device, "reference", id=f"{device}-reference") for device in DEVICES]


def random_edge_index(num_nodes, num_edges, seed=0, device="cpu"):
    """Random edges plus self loops and duplicates; nodes 0..1 have no incoming edge."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    dst = torch.randint(EMPTY_NODES, num_nodes, (num_edges,), generator=gen)
    loops = torch.arange(EMPTY_NODES, num_nodes, 4)
    src = torch.cat([src, loops, src[:5]])
    dst = torch.cat([dst, loops, dst[:5]])
    return torch.stack([src, dst]).to(device)


def graphs(device):
    """(edge_index, Graph) pairs: KMPNet's coco17 spatial-temporal graph and a random graph."""
    keypoint_graph = Graph.spatial_temporal("coco17", frames=4, batch=2, device=device)
    edge_index = random_edge_index(37, 120, device=device)
    return [(keypoint_graph.edge_index, keypoint_graph),
            (edge_index, Graph.from_edge_index(edge_index, 37))]


def randomise_(module, seed):
    """Gives every parameter and norm buffer a random value, so that loaded weights matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict(keep_vars=True).items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype)
            if name.endswith("running_var") or name.endswith(".t"):
                tensor.copy_(0.5 + noise)                       # positive variances, t in [0.5, 1.5]
            elif name.endswith("weight") and tensor.dim() == 1:
                tensor.copy_(0.8 + 0.4 * noise)                 # norm scales near 1
            else:
                tensor.add_(0.2 * (noise - 0.5))


def assert_same_forward_backward(ours, theirs, x, our_graph, their_graph, seed=0):
    """Output, gradient of x and of every trainable parameter (matched by name), and the state
    afterwards (BatchNorm running statistics in train mode) agree to 1e-5 in float32."""
    x_ours = x.clone().requires_grad_()
    x_theirs = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out_ours = ours(x_ours, our_graph)
    torch.manual_seed(seed)
    out_theirs = theirs(x_theirs, their_graph)
    torch.testing.assert_close(out_ours, out_theirs, **F32_TOL)
    grad_out = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(seed + 1))
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    out_ours.backward(grad_out)      # not autograd.grad: PyG checkpoints with use_reentrant=True
    out_theirs.backward(grad_out)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **F32_TOL)
    our_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(our_params[name].grad, param.grad, **F32_GRAD_TOL,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")
    our_state = ours.state_dict()
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(our_state[name], value, **F32_TOL)


# --- msg_pass against PyG's SoftmaxAggregation ------------------------------------------------

@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t_channels", [1, 9])
def test_msg_pass_matches_pyg_softmax_aggregation(device, backend, dtype, t_channels):
    aggr_module = pytest.importorskip("torch_geometric.nn.aggr")
    gen = torch.Generator().manual_seed(1)
    eps = 1e-7
    edge_index = random_edge_index(37, 150, device=device)
    x = (torch.randn(37, 9, generator=gen, dtype=dtype) * 2).to(device)
    aggr = aggr_module.SoftmaxAggregation(learn=True, channels=t_channels).to(device, dtype)
    with torch.no_grad():
        aggr.t.copy_(torch.rand(t_channels, generator=gen, dtype=dtype) * 4 - 1)   # some t < 0
    t = aggr.t.detach().clone().requires_grad_()
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()

    out = keypointops.msg_pass(x_ours, edge_index, t, eps, backend=backend)
    messages = x_theirs[edge_index[0]].relu() + eps
    expected = aggr(messages, index=edge_index[1], dim_size=37)
    tol = F32_TOL if dtype == torch.float32 else tolerances(dtype)
    torch.testing.assert_close(out, expected, **tol)
    assert (out[:EMPTY_NODES] == 0).all()

    grad_out = torch.randn(out.shape, generator=gen, dtype=dtype).to(device)
    got = torch.autograd.grad(out, (x_ours, t), grad_out)
    want = torch.autograd.grad(expected, (x_theirs, aggr.t), grad_out)
    for name, g, w in zip(("x", "t"), got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m, name=name: f"grad of {name}: {m}")


# --- GENConv against PyG's GENConv --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("learn_t", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("graph_input", ["edge_index", "graph"])
def test_gen_conv_matches_pyg(device, norm, num_layers, learn_t, training, graph_input):
    pyg_nn = pytest.importorskip("torch_geometric.nn")
    kwargs = dict(aggr="softmax", t=0.7, learn_t=learn_t, norm=norm, num_layers=num_layers)
    theirs = pyg_nn.GENConv(16, 16, **kwargs)
    randomise_(theirs, seed=2)
    ours = GENConv(16, 16, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.to(device).train(training)
    theirs.to(device).train(training)
    for seed, (edge_index, graph) in enumerate(graphs(device)):
        x = torch.randn(graph.num_nodes, 16, generator=torch.Generator().manual_seed(seed)).to(device)
        our_graph = graph if graph_input == "graph" else edge_index
        assert_same_forward_backward(ours, theirs, x, our_graph, edge_index, seed=seed)


OTHER_OPTIONS = {
    "msg_norm": dict(msg_norm=True, learn_msg_scale=True, learn_t=True),
    "msg_norm_fixed_scale": dict(msg_norm=True, norm="layer"),
    "instance_norm_3_layers_bias": dict(norm="instance", num_layers=3, expansion=3, bias=True),
    "no_norm_eps": dict(norm=None, eps=1e-3, t=2.5),
    "per_channel_t": dict(aggr_kwargs=dict(t=0.5, learn=True, channels=16), norm="layer"),
}


@pytest.mark.filterwarnings("ignore:input's size at dim=0 does not match num_features")  # as PyG's
@pytest.mark.parametrize("options", OTHER_OPTIONS.values(), ids=OTHER_OPTIONS.keys())
@pytest.mark.parametrize("in_channels", [16, 11])
def test_gen_conv_other_options_match_pyg(options, in_channels):
    pyg_nn = pytest.importorskip("torch_geometric.nn")
    theirs = pyg_nn.GENConv(in_channels, 16, **options)
    randomise_(theirs, seed=3)
    ours = GENConv(in_channels, 16, **options)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)       # and the other way round
    for seed, (edge_index, graph) in enumerate(graphs("cpu")):
        x = torch.randn(graph.num_nodes, in_channels, generator=torch.Generator().manual_seed(seed))
        assert_same_forward_backward(ours, theirs, x, graph, edge_index, seed=seed)


@pytest.mark.parametrize("device,backend", backend_params())
def test_gen_conv_passes_backend_to_msg_pass(device, backend, monkeypatch):
    seen = []

    def recording_msg_pass(*args, **kwargs):
        seen.append(kwargs["backend"])
        return keypointops.msg_pass(*args, **kwargs)

    monkeypatch.setattr(gen_conv_module, "msg_pass", recording_msg_pass)
    edge_index, graph = graphs(device)[0]
    conv = GENConv(8, 8, learn_t=True, backend=backend).to(device)
    default = GENConv(8, 8, learn_t=True).to(device)
    default.load_state_dict(conv.state_dict())
    x = torch.randn(graph.num_nodes, 8, device=device)
    torch.testing.assert_close(conv(x, graph), default(x, graph), **F32_TOL)
    assert seen == [backend, "auto"]


def test_gen_conv_gradcheck_float64():
    """Without PyG: float64 gradients of the whole layer for x and the learned t and msg_norm scale."""
    conv = GENConv(5, 5, learn_t=True, msg_norm=True, learn_msg_scale=True, norm="layer").double()
    graph = Graph.from_edge_index(random_edge_index(11, 30), 11)
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_()     # away from relu's kink
    t = torch.tensor([0.8], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.3], dtype=torch.float64, requires_grad=True)

    def layer(x, t, scale):
        return torch.func.functional_call(conv, {"aggr_module.t": t, "msg_norm.scale": scale}, (x, graph))

    assert torch.autograd.gradcheck(layer, (x, t, scale))


# --- DeepGCNLayer -------------------------------------------------------------------------------

def deep_gcn_stack(conv_class, layer_class, channels, num_layers, ckpt_grad=False, block="res+",
                   dropout=0.0):
    """The layer stack of PyG's examples/ogbn_proteins_deepgcn.py (without the edge encoder)."""
    layers = torch.nn.ModuleList()
    for i in range(num_layers):
        conv = conv_class(channels, channels, aggr="softmax", t=1.0, learn_t=True, num_layers=2, norm="layer")
        norm = torch.nn.LayerNorm(channels, elementwise_affine=True)
        act = torch.nn.ReLU(inplace=True)
        layers.append(layer_class(conv, norm, act, block=block, dropout=dropout,
                                  ckpt_grad=ckpt_grad and i % 2 == 1))
    return layers


class DeeperGCN(torch.nn.Module):
    """As PyG's example: first conv alone, then the res+ layers, then the first layer's norm and act."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x, edge_index):
        x = self.layers[0].conv(x, edge_index)
        for layer in self.layers[1:]:
            x = layer(x, edge_index)
        return self.layers[0].act(self.layers[0].norm(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ckpt_grad", [False, True])
@pytest.mark.parametrize("graph_input", ["edge_index", "graph"])
def test_res_plus_deeper_gcn_matches_pyg(device, ckpt_grad, graph_input):
    pyg_nn = pytest.importorskip("torch_geometric.nn")
    theirs = DeeperGCN(deep_gcn_stack(pyg_nn.GENConv, pyg_nn.DeepGCNLayer, 16, 3, ckpt_grad)).to(device)
    randomise_(theirs, seed=4)
    ours = DeeperGCN(deep_gcn_stack(GENConv, DeepGCNLayer, 16, 3, ckpt_grad)).to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for seed, (edge_index, graph) in enumerate(graphs(device)):
        x = torch.randn(graph.num_nodes, 16, generator=torch.Generator().manual_seed(seed)).to(device)
        our_graph = graph if graph_input == "graph" else edge_index
        assert_same_forward_backward(ours, theirs, x, our_graph, edge_index, seed=seed)


@pytest.mark.parametrize("block", ["res+", "res", "dense", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_deep_gcn_layer_blocks_with_dropout_match_pyg(block, training):
    pyg_nn = pytest.importorskip("torch_geometric.nn")
    theirs = deep_gcn_stack(pyg_nn.GENConv, pyg_nn.DeepGCNLayer, 12, 1, block=block, dropout=0.3)[0]
    randomise_(theirs, seed=5)
    ours = deep_gcn_stack(GENConv, DeepGCNLayer, 12, 1, block=block, dropout=0.3)[0]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.train(training)
    theirs.train(training)
    edge_index, graph = graphs("cpu")[0]
    x = torch.randn(graph.num_nodes, 12, generator=torch.Generator().manual_seed(6))
    assert_same_forward_backward(ours, theirs, x, graph, edge_index, seed=7)   # same dropout masks
    assert ours.block == theirs.block and repr(ours) == repr(theirs)


def test_deep_gcn_layer_blocks_compute_their_formulas():
    """Without PyG: each block's formula, with a conv that ignores the graph."""
    gen = torch.Generator().manual_seed(8)
    conv = torch.nn.Linear(6, 6)
    norm = torch.nn.LayerNorm(6)
    act = torch.nn.Tanh()
    x = torch.randn(10, 6, generator=gen)
    edge_index = random_edge_index(10, 20)

    class IgnoringGraph(torch.nn.Module):
        def forward(self, h, graph):
            return conv(h)

    expected = {"res+": x + conv(act(norm(x))), "res": x + act(norm(conv(x))),
                "dense": torch.cat([x, act(norm(conv(x)))], -1), "plain": act(norm(conv(x)))}
    for block, want in expected.items():
        layer = DeepGCNLayer(IgnoringGraph(), norm, act, block=block.upper()).eval()
        torch.testing.assert_close(layer(x, edge_index), want)


def test_res_plus_stack_compiles_fullgraph():
    graph = Graph.spatial_temporal("coco17", frames=4, batch=2)
    model = DeeperGCN(deep_gcn_stack(GENConv, DeepGCNLayer, 8, 3))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(graph.num_nodes, 8, generator=torch.Generator().manual_seed(10), requires_grad=True)
    got = compiled(x, graph)
    want = model(x, graph)
    torch.testing.assert_close(got, want)
    params = list(model.parameters())
    for g, w in zip(torch.autograd.grad(got.sum(), [x] + params), torch.autograd.grad(want.sum(), [x] + params)):
        torch.testing.assert_close(g, w)


# --- bad arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(aggr="mean"), NotImplementedError, "only aggr='softmax'"),
    (dict(aggr="powermean"), NotImplementedError, "only aggr='softmax'"),
    (dict(aggr=["softmax", "max"]), NotImplementedError, "only aggr='softmax'"),
    (dict(aggr="softmax_sg"), NotImplementedError, "semi-gradient"),
    (dict(aggr_kwargs=dict(t=1.0, semi_grad=True)), NotImplementedError, "semi_grad"),
    (dict(aggr_kwargs=dict(t=1.0, learn=True, semi_grad=True)), ValueError, "semi_grad"),
    (dict(aggr_kwargs=dict(learn=True, channels=5)), ValueError, "channels must be 1 or out_channels"),
    (dict(aggr_kwargs=dict(channels=8)), ValueError, "channels must be 1 when t is not learned"),
    (dict(aggr_kwargs=dict(beta=1.0)), NotImplementedError, "aggr_kwargs may only hold"),
    (dict(edge_dim=4), NotImplementedError, "edge features"),
    (dict(edge_dim=8), NotImplementedError, "edge features"),
    (dict(in_channels=-1), NotImplementedError, "lazy in_channels"),
    (dict(in_channels=(4, 8)), NotImplementedError, "bipartite"),
    (dict(in_channels=0), ValueError, "in_channels must be positive"),
    (dict(out_channels=0), ValueError, "out_channels must be a positive int"),
    (dict(norm="group"), ValueError, "norm must be"),
    (dict(num_layers=0), ValueError, "num_layers must be an int >= 1"),
    (dict(expansion=0), ValueError, "expansion must be"),
    (dict(t=float("nan")), ValueError, "t must be a finite float"),
    (dict(eps=float("inf")), ValueError, "eps must be a finite float"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(flow="target_to_source"), NotImplementedError, r"MessagePassing arguments \['flow'\]"),
])
def test_gen_conv_bad_arguments_raise(kwargs, error, match):
    args = dict(in_channels=8, out_channels=8)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        GENConv(**args)


def test_gen_conv_bad_forward_arguments_raise():
    conv = GENConv(8, 8)
    x = torch.randn(10, 8)
    edge_index = random_edge_index(10, 20)
    with pytest.raises(NotImplementedError, match="edge_attr is not supported"):
        conv(x, edge_index, torch.randn(edge_index.size(1), 8))
    with pytest.raises(NotImplementedError, match="bipartite"):
        conv((x, x), edge_index)
    with pytest.raises(NotImplementedError, match="size is not supported"):
        conv(x, edge_index, size=(10, 10))
    with pytest.raises(NotImplementedError, match="sparse adjacency"):
        conv(x, torch.sparse_coo_tensor(edge_index, torch.ones(edge_index.size(1)), (10, 10),
                                                 check_invariants=True))
    with pytest.raises(ValueError, match="graph has 136 nodes but x has 10 rows"):
        conv(x, Graph.spatial_temporal("coco17", frames=4, batch=2))


def test_deep_gcn_layer_bad_arguments_raise():
    with pytest.raises(ValueError, match="block must be one of"):
        DeepGCNLayer(GENConv(8, 8), block="resnet")
    with pytest.raises(ValueError, match="dropout must be a probability"):
        DeepGCNLayer(GENConv(8, 8), dropout=1.5)

