"""keypointops.nn.GENConv and DeepGCNLayer against PyTorch Geometric's, with PyG weights loaded."""
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
    """The fused msg_pass backends here + the reference."""
    return device_backend_params() + [pytest.param(device, "reference", id=f"{device}-reference") for device in DEVICES]


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
    (dict(aggr=["softmax", "max"]), NotImplementedError, "aggr must be one of"),
    (dict(aggr="median"), NotImplementedError, r"aggr must be one of \('softmax', 'softmax_sg', 'powermean'"),
    (dict(aggr="softmax_sg", learn_t=True), ValueError, "semi_grad"),
    (dict(aggr_kwargs=dict(t=1.0, learn=True, semi_grad=True)), ValueError, "semi_grad"),
    (dict(aggr_kwargs=dict(learn=True, channels=5)), ValueError, "channels must be 1 or out_channels"),
    (dict(aggr_kwargs=dict(channels=8)), ValueError, "channels must be 1 when t is not learned"),
    (dict(aggr_kwargs=dict(beta=1.0)), NotImplementedError, "aggr_kwargs may only hold"),
    (dict(aggr="powermean", aggr_kwargs=dict(t=1.0)), NotImplementedError, "aggr_kwargs may only hold"),
    (dict(aggr="powermean", p=0.0), ValueError, "p must be a finite non-zero float"),
    (dict(aggr="mean", aggr_kwargs=dict(p=1.0)), NotImplementedError, "aggr_kwargs are not supported"),
    (dict(edge_dim=-1), NotImplementedError, "lazy edge_dim"),
    (dict(edge_dim=0), ValueError, "edge_dim must be a positive int"),
    (dict(in_channels=-1), NotImplementedError, "lazy in_channels"),
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
    with pytest.raises(ValueError, match="edge_attr must have out_channels = 8 columns"):
        conv(x, edge_index, torch.randn(edge_index.size(1), 5))
    with pytest.raises(ValueError, match="x_src has 10 rows but the graph's size is 12"):
        conv(x, edge_index, size=(12, 12))
    with pytest.raises(ValueError, match="edge_index must be an int64 or int32"):
        conv(x, edge_index.float())
    with pytest.raises(TypeError, match="x must be a Tensor or a pair"):
        conv([x], edge_index)
    with pytest.raises(TypeError, match="edge_index must be"):
        conv(x, edge_index.tolist())
    with pytest.raises(ValueError, match="x_src has 10 rows but the graph's size is 136"):
        conv(x, Graph.spatial_temporal("coco17", frames=4, batch=2))


def test_deep_gcn_layer_bad_arguments_raise():
    with pytest.raises(ValueError, match="block must be one of"):
        DeepGCNLayer(GENConv(8, 8), block="resnet")
    with pytest.raises(ValueError, match="dropout must be a probability"):
        DeepGCNLayer(GENConv(8, 8), dropout=1.5)



# --- the DeeperGCN feature set: edge features, power mean, int32, size, bipartite, sparse input -------

def assert_same_call(ours, theirs, make_inputs, our_call, their_call, tol=F32_TOL, grad_tol=F32_GRAD_TOL):
    """Output, gradients of every input tensor (``make_inputs()`` makes fresh leaves for each side)
    and of every trainable parameter (by name) agree with PyG's."""
    our_inputs, their_inputs = make_inputs(), make_inputs()
    out_ours, out_theirs = our_call(ours, *our_inputs), their_call(theirs, *their_inputs)
    torch.testing.assert_close(out_ours, out_theirs, **tol)
    grad_out = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(1), dtype=out_ours.dtype)
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    out_ours.backward(grad_out.to(out_ours.device))
    out_theirs.backward(grad_out.to(out_theirs.device))
    for a, b in zip(our_inputs, their_inputs):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            torch.testing.assert_close(a.grad.cpu(), b.grad.cpu(), **grad_tol)
    our_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if param.grad is None:   # unused (e.g. lin_dst without x_dst): unused in ours too
            assert our_params[name].grad is None, name
            continue
        torch.testing.assert_close(our_params[name].grad.cpu(), param.grad.cpu(), **grad_tol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def pyg_pair(in_channels, out_channels, seed=0, **kwargs):
    """(ours, PyG's) GENConv with the same random weights, loaded both ways (strict)."""
    pyg_nn = pytest.importorskip("torch_geometric.nn")
    backend = kwargs.pop("backend", "auto")
    theirs = pyg_nn.GENConv(in_channels, out_channels, **kwargs)
    randomise_(theirs, seed=seed)
    ours = GENConv(in_channels, out_channels, **kwargs, backend=backend)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def shuffled_edges(num_src, num_dst, num_edges, seed):
    """Random bipartite edges in random order, with duplicates; destinations 0..1 get none."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_src, (num_edges,), generator=gen)
    dst = torch.randint(EMPTY_NODES, num_dst, (num_edges,), generator=gen)
    return torch.stack([torch.cat([src, src[:4]]), torch.cat([dst, dst[:4]])])


def leaves(*shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return lambda: tuple(torch.randn(*shape, generator=gen.manual_seed(seed + i)).requires_grad_()
                         for i, shape in enumerate(shapes))


AGGRS = ["softmax", "powermean"]


@pytest.mark.parametrize("aggr", AGGRS)
def test_pyg_gen_conv_scenario(aggr):
    """PyTorch Geometric's own GENConv test (edge features through the edge encoder, message
    norm, size, sparse adjacency with and without edge values, bipartite input, unequal input
    sizes, reset_parameters), run as a PyG user would, on keypointops.nn.GENConv, and against
    PyG's GENConv with the same weights."""
    torch.manual_seed(12345)
    x1, x2 = torch.randn(4, 16), torch.randn(2, 16)
    edge_index = torch.tensor([[0, 1, 2, 3], [0, 0, 1, 1]])
    value = torch.randn(edge_index.size(1), 16)
    csc = lambda values, size: torch.sparse_coo_tensor(edge_index, values, size).coalesce().to_sparse_csc()  # noqa: E731
    adj1 = csc(torch.ones(4), (4, 4))
    adj2 = torch.sparse_coo_tensor(edge_index, value, (4, 4, 16)).coalesce()

    conv, theirs = pyg_pair(16, 32, aggr=aggr, edge_dim=16, msg_norm=True)
    assert str(conv) == str(theirs) == f"GENConv(16, 32, aggr={aggr})"
    out1 = conv(x1, edge_index)
    assert out1.size() == (4, 32)
    torch.testing.assert_close(out1, theirs(x1, edge_index), **F32_TOL)
    torch.testing.assert_close(conv(x1, edge_index, size=(4, 4)), out1, atol=1e-6, rtol=0)
    torch.testing.assert_close(conv(x1, adj1.t()), out1, atol=1e-6, rtol=0)
    torch.testing.assert_close(conv(x1, edge_index.int()), out1, atol=1e-6, rtol=0)

    out2 = conv(x1, edge_index, value)
    assert out2.size() == (4, 32)
    torch.testing.assert_close(out2, theirs(x1, edge_index, value), **F32_TOL)
    torch.testing.assert_close(conv(x1, edge_index, value, (4, 4)), out2, atol=1e-6, rtol=0)
    torch.testing.assert_close(conv(x1, adj2.transpose(1, 0).coalesce()), out2, atol=1e-6, rtol=0)
    torch.testing.assert_close(theirs(x1, adj2.transpose(1, 0).coalesce()), out2, **F32_TOL)

    # Bipartite message passing.
    adj1 = csc(torch.ones(4), (4, 2))
    adj2 = torch.sparse_coo_tensor(edge_index, value, (4, 2, 16)).coalesce()
    out1 = conv((x1, x2), edge_index)
    assert out1.size() == (2, 32)
    torch.testing.assert_close(out1, theirs((x1, x2), edge_index), **F32_TOL)
    torch.testing.assert_close(conv((x1, x2), edge_index, size=(4, 2)), out1, atol=1e-6, rtol=0)
    torch.testing.assert_close(conv((x1, x2), adj1.t()), out1, atol=1e-6, rtol=0)
    out2 = conv((x1, x2), edge_index, value)
    assert out2.size() == (2, 32)
    torch.testing.assert_close(out2, theirs((x1, x2), edge_index, value), **F32_TOL)
    torch.testing.assert_close(conv((x1, x2), edge_index, value, (4, 2)), out2, atol=1e-6, rtol=0)
    torch.testing.assert_close(conv((x1, x2), adj2.transpose(1, 0).coalesce()), out2, atol=1e-6, rtol=0)

    conv.reset_parameters()
    assert float(conv.msg_norm.scale) == 1

    # Bipartite message passing with unequal feature sizes.
    x1 = torch.randn(4, 8)
    conv, theirs = pyg_pair((8, 16), 32, aggr=aggr)
    assert str(conv) == str(theirs) == f"GENConv((8, 16), 32, aggr={aggr})"
    out1 = conv((x1, x2), edge_index)
    assert out1.size() == (2, 32)
    torch.testing.assert_close(out1, theirs((x1, x2), edge_index), **F32_TOL)
    torch.testing.assert_close(conv((x1, x2), edge_index, size=(4, 2)), out1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("aggr", AGGRS)
@pytest.mark.parametrize("edge_dim", [None, 8, 24], ids=["no_encoder", "encoder", "edge_dim_eq_out"])
def test_edge_features_match_pyg(device, backend, aggr, edge_dim):
    """Outputs and gradients (x, edge_attr, every parameter) equal to PyG's with edge features in
    random edge order, through the edge encoder or without it."""
    ours, theirs = pyg_pair(16, 24, seed=4, aggr=aggr, edge_dim=edge_dim, learn_t=True, learn_p=True,
                            p=1.5, norm="layer", backend=backend)
    ours.to(device)
    edge_index = shuffled_edges(30, 30, 120, seed=5)
    inputs = leaves((30, 16), (edge_index.size(1), edge_dim or 24), seed=6)
    assert_same_call(ours, theirs, inputs,
                     lambda conv, x, e: conv(x.to(device), edge_index.to(device), e.to(device)).cpu(),
                     lambda conv, x, e: conv(x, edge_index, e))


@pytest.mark.parametrize("device,backend", backend_params())
@pytest.mark.parametrize("aggr", AGGRS)
@pytest.mark.parametrize("num_src,num_dst", [(25, 14), (9, 21)], ids=["more_sources", "more_targets"])
def test_bipartite_and_size_match_pyg(device, backend, aggr, num_src, num_dst):
    """Bipartite (x_src, x_dst) with in_channels=(a, b) and size=(N_src, N_dst), int32 indices,
    and x_dst None, equal to PyG's (outputs and gradients)."""
    ours, theirs = pyg_pair((12, 10), 16, seed=7, aggr=aggr, edge_dim=6, msg_norm=True, bias=True,
                            backend=backend)
    ours.to(device)
    edge_index = shuffled_edges(num_src, num_dst, 90, seed=8)
    size = (num_src, num_dst)
    inputs = leaves((num_src, 12), (num_dst, 10), (edge_index.size(1), 6), seed=9)
    assert_same_call(ours, theirs, inputs,
                     lambda conv, a, b, e: conv((a.to(device), b.to(device)), edge_index.int().to(device),
                                                e.to(device), size).cpu(),
                     lambda conv, a, b, e: conv((a, b), edge_index, e, size))
    src_only = leaves((num_src, 12), seed=10)
    ours_none, theirs_none = pyg_pair((12, 10), 16, seed=7, aggr=aggr, backend=backend)
    ours_none.to(device)
    assert_same_call(ours_none, theirs_none, src_only,
                     lambda conv, a: conv((a.to(device), None), edge_index.to(device), size=size).cpu(),
                     lambda conv, a: conv((a, None), edge_index, size=size))


@pytest.mark.parametrize("layout", ["coo", "csr", "csc", "edge_index_class"])
@pytest.mark.parametrize("aggr", AGGRS)
def test_sparse_and_edge_index_inputs_match_pyg(layout, aggr):
    """Torch sparse adjacency adj_t (COO, CSR, CSC; edge features as [E, D] values) and PyG's
    EdgeIndex as graph inputs, equal to PyG's with the same input (PyG 2.8 refuses CSC: there
    PyG gets the same adjacency as COO)."""
    pyg = pytest.importorskip("torch_geometric")
    ours, theirs = pyg_pair(8, 8, seed=11, aggr=aggr, learn_t=True)
    edge_index = shuffled_edges(20, 20, 70, seed=12)
    coo = torch.sparse_coo_tensor(edge_index.flip(0), torch.ones(edge_index.size(1)), (20, 20)).coalesce()
    edge_index = coo.indices().flip(0)                 # no duplicates: a sparse tensor holds none
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(13))
    if layout == "edge_index_class":
        graph = pyg.EdgeIndex(edge_index, sparse_size=(20, 20))
    else:
        adj_t = torch.sparse_coo_tensor(edge_index.flip(0), torch.ones(edge_index.size(1)), (20, 20)).coalesce()
        graph = {"coo": adj_t, "csr": adj_t.to_sparse_csr(), "csc": adj_t.to_sparse_csc()}[layout]
    inputs = lambda: (x.clone().requires_grad_(),)  # noqa: E731
    their_graph = graph.to_sparse_coo().coalesce() if layout == "csc" else graph
    assert_same_call(ours, theirs, inputs, lambda conv, x: conv(x, graph), lambda conv, x: conv(x, their_graph))
    torch.testing.assert_close(ours(x, graph), ours(x, edge_index), atol=1e-6, rtol=0)
    if layout == "coo":
        values = torch.randn(edge_index.size(1), 8, generator=torch.Generator().manual_seed(14))
        adj_t = torch.sparse_coo_tensor(edge_index.flip(0), values, (20, 20, 8)).coalesce()
        torch.testing.assert_close(ours(x, adj_t), theirs(x, adj_t), **F32_TOL)
        torch.testing.assert_close(ours(x, adj_t), ours(x, edge_index, values), atol=1e-6, rtol=0)


@pytest.mark.parametrize("aggr,kwargs", [
    ("powermean", dict(p=2.0)), ("powermean", dict(p=0.5, learn_p=True)),
    ("powermean", dict(aggr_kwargs=dict(p=1.0, learn=True, channels=16))),
    ("powermean", dict(aggr_kwargs=dict(p=3.0, clamp_min=None, clamp_max=50.0))),
    ("power", dict(p=1.0)), ("add", {}), ("sum", {}), ("mean", {}), ("max", {}), ("min", {}),
    ("softmax_sg", dict(t=0.5)), ("softmax", dict(aggr_kwargs=dict(t=2.0, semi_grad=True))),
])
def test_other_aggregations_match_pyg(aggr, kwargs):
    """The power mean (learnable p, per-channel p, PyG's clamping, isolated nodes), the plain
    reductions and the semi-gradient softmax, with edge features, equal to PyG's (outputs and
    gradients); repr as PyG's."""
    ours, theirs = pyg_pair(16, 16, seed=15, aggr=aggr, edge_dim=5, **kwargs)
    assert repr(ours) == repr(theirs)
    edge_index = shuffled_edges(26, 26, 100, seed=16)
    inputs = leaves((26, 16), (edge_index.size(1), 5), seed=17)
    assert_same_call(ours, theirs, inputs, lambda conv, x, e: conv(x, edge_index, e),
                     lambda conv, x, e: conv(x, edge_index, e))


def test_edge_features_gradcheck_float64():
    gen = torch.Generator().manual_seed(18)
    conv = GENConv(6, 6, edge_dim=3, learn_t=True, norm=None, bias=True).double()
    edge_index = shuffled_edges(9, 9, 25, seed=19)
    x = torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    e = torch.randn(edge_index.size(1), 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, e: conv(x, edge_index, e), (x, e), atol=1e-6)
    # ... and the edge encoder's own backward (weight and bias gradients).
    w = conv.lin_edge.weight.detach().clone().requires_grad_()
    b = conv.lin_edge.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(gen_conv_module._EdgeEncoder.apply, (e, w, b))
