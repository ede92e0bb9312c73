"""msg_pass: every fused backend against the reference, gradients, registration, bad input."""
import pytest
import torch

import keypointops
from keypointops import reference
from keypointops.graphs import Graph

from conftest import device_backend_params, tolerances

EMPTY_NODES = 3  # nodes 0..2 get no incoming edge


def random_graph(num_nodes, num_edges, *, hub_edges=0, seed=0, device="cpu"):
    """Random edges plus self loops and duplicates; nodes 0..2 have no incoming edge; with
    ``hub_edges`` the last node gets that many more incoming edges."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes, (num_edges,), generator=gen)
    dst = torch.randint(EMPTY_NODES, num_nodes, (num_edges,), generator=gen)
    loops = torch.arange(EMPTY_NODES, num_nodes, 5)
    src = torch.cat([src, loops, src[:7]])            # self loops, then duplicated edges
    dst = torch.cat([dst, loops, dst[:7]])
    if hub_edges:
        src = torch.cat([src, torch.randint(0, num_nodes, (hub_edges,), generator=gen)])
        dst = torch.cat([dst, torch.full((hub_edges,), num_nodes - 1)])
    return Graph.from_edge_index(torch.stack([src, dst]).to(device), num_nodes)


def make_t(kind, channels, dtype, device, gen):
    if kind == "float":
        return 0.7
    if kind == "scalar":
        return torch.tensor(1.3, dtype=dtype, device=device)
    return (torch.rand(channels, generator=gen, dtype=dtype) * 4 - 1).to(device)  # [C], some < 0


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t_kind", ["float", "scalar", "channels"])
def test_matches_reference(device, backend, dtype, t_kind):
    gen = torch.Generator().manual_seed(1)
    graph = random_graph(41, 150, device=device)
    x = torch.randn(41, 13, generator=gen, dtype=dtype).to(device) * 3
    t = make_t(t_kind, 13, dtype, device, gen)
    out = keypointops.msg_pass(x, graph, t, backend=backend)
    expected = reference.msg_pass(x, graph, t)
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    assert (out[:EMPTY_NODES] == 0).all()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_hub_node_with_10000_edges(device, backend):
    gen = torch.Generator().manual_seed(2)
    graph = random_graph(23, 60, hub_edges=10_000, device=device)
    x = torch.randn(23, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.tensor([0.5, 1.0, 2.0, -1.0, 3.0], dtype=torch.float64, device=device, requires_grad=True)
    out = keypointops.msg_pass(x, graph, t, backend=backend)
    expected = reference.msg_pass(x, graph, t)
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    got = torch.autograd.grad(out, (x, t), grad)
    want = torch.autograd.grad(expected, (x, t), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_values_stay_finite(device, backend, dtype):
    gen = torch.Generator().manual_seed(3)
    graph = random_graph(30, 120, device=device)
    x = (torch.rand(30, 9, generator=gen, dtype=dtype) * 1e4).to(device).requires_grad_()
    t = torch.full((9,), 2.0, dtype=dtype, device=device, requires_grad=True)
    out = keypointops.msg_pass(x, graph, t, backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.msg_pass(x, graph, t), rtol=1e-5, atol=1e-3)
    gx, gt = torch.autograd.grad(out.sum(), (x, t))
    assert torch.isfinite(gx).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t_kind", ["scalar", "channels"])
def test_gradients_match_reference(device, backend, dtype, t_kind):
    gen = torch.Generator().manual_seed(4)
    graph = random_graph(29, 100, device=device)
    x = torch.randn(29, 11, generator=gen, dtype=dtype).to(device).requires_grad_()
    t = make_t(t_kind, 11, dtype, device, gen).requires_grad_()
    grad = torch.randn(29, 11, generator=gen, dtype=dtype).to(device)
    got = torch.autograd.grad(keypointops.msg_pass(x, graph, t, backend=backend), (x, t), grad)
    want = torch.autograd.grad(reference.msg_pass(x, graph, t), (x, t), grad)
    tol = tolerances(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_gradcheck(device, backend):
    gen = torch.Generator().manual_seed(5)
    graph = random_graph(13, 40, device=device)
    # Keep x away from 0 where relu has a kink that finite differences straddle.
    x = torch.randn(13, 6, generator=gen, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).to(device).requires_grad_()
    t = torch.tensor([0.5, 1.0, 2.0, -1.0, 3.0, 0.0], dtype=torch.float64, device=device,
                     requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: keypointops.msg_pass(x, graph, t, backend=backend),
                                    (x, t))
    scalar_t = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: keypointops.msg_pass(x, graph, t, backend=backend),
                                    (x, scalar_t))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_backward_is_deterministic(device, backend):
    gen = torch.Generator().manual_seed(6)
    graph = random_graph(200, 3000, hub_edges=500, device=device)
    x = torch.randn(200, 33, generator=gen).to(device).requires_grad_()
    t = torch.rand(33, generator=gen).to(device).requires_grad_()
    out = keypointops.msg_pass(x, graph, t, backend=backend)
    grad = torch.randn(out.shape, generator=gen).to(device)
    first = torch.autograd.grad(out, (x, t), grad, retain_graph=True)
    second = torch.autograd.grad(out, (x, t), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _op_samples(device, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    graph = random_graph(17, 50, device=device)
    x = torch.randn(17, 7, generator=gen, dtype=dtype).to(device).requires_grad_()
    t = torch.rand(7, generator=gen, dtype=dtype).to(device).requires_grad_()
    return [(x, graph.rowptr, graph.col, graph.rowptr_t, graph.col_t, t, 1e-7)]


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_opcheck(device, backend):
    if backend == "triton":
        from keypointops.triton import msg_pass as triton_msg_pass
        op = triton_msg_pass.msg_pass_triton
    else:
        op = torch.ops.keypointops.msg_pass.default
    for args in _op_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_torch_compile_fullgraph(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not trace Triton kernels in the interpreter on CPU tensors")
    gen = torch.Generator().manual_seed(8)
    graph = random_graph(19, 60, device=device)
    x = torch.randn(19, 8, generator=gen).to(device).requires_grad_()
    t = torch.ones(8, device=device, requires_grad=True)

    def layer(x, t):
        return keypointops.msg_pass(x, graph, t, backend=backend).relu().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x, t)
    torch.testing.assert_close(got, layer(x, t))
    grads = torch.autograd.grad(got, (x, t))
    want = torch.autograd.grad(layer(x, t), (x, t))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_edge_index_input_and_empty_graph(device, backend):
    x = torch.randn(6, 4, device=device)
    edge_index = torch.tensor([[0, 1, 2, 5], [1, 2, 1, 1]], device=device)
    torch.testing.assert_close(keypointops.msg_pass(x, edge_index, backend=backend),
                               reference.msg_pass(x, edge_index))
    no_edges = torch.empty(2, 0, dtype=torch.long, device=device)
    assert (keypointops.msg_pass(x, no_edges, backend=backend) == 0).all()


def test_non_contiguous_x_and_t():
    gen = torch.Generator().manual_seed(9)
    graph = random_graph(21, 70)
    x = torch.randn(9, 21, generator=gen).t()          # [21, 9], non-contiguous
    t = torch.rand(18, generator=gen)[::2]              # [9], strided
    torch.testing.assert_close(keypointops.msg_pass(x, graph, t), reference.msg_pass(x, graph, t))


# --- bad input ----------------------------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    graph = random_graph(10, 30)
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="x must be"):
        keypointops.msg_pass(torch.randn(10), graph)
    with pytest.raises(ValueError, match="graph has 10 nodes but x has 9"):
        keypointops.msg_pass(torch.randn(9, 4), graph)
    with pytest.raises(ValueError, match="t must be"):
        keypointops.msg_pass(x, graph, torch.ones(3))
    with pytest.raises(ValueError, match="t must be finite"):
        keypointops.msg_pass(x, graph, torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="t must be a finite float"):
        keypointops.msg_pass(x, graph, float("inf"))
    with pytest.raises(ValueError, match="backend must be one of"):
        keypointops.msg_pass(x, graph, backend="gpu")
    with pytest.raises(ValueError, match="edge_index must be int64"):
        keypointops.msg_pass(x, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="edge_index holds node indices"):
        keypointops.msg_pass(x, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(ValueError, match="rowptr must be non-decreasing"):
        Graph(torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="col holds node indices"):
        Graph(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="rowptr must be int64"):
        Graph(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0]))


@pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C not built")
def test_compiled_op_checks_indices_itself():
    """Called directly (no Graph validation), the C++ kernel still refuses bad indices."""
    x = torch.randn(3, 2)
    t = torch.ones(2)
    ok_t = (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="col holds node index 7"):
        torch.ops.keypointops.msg_pass(x, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 7, 2]), *ok_t, t, 1e-7)
    with pytest.raises(RuntimeError, match="rowptr must be non-decreasing"):
        torch.ops.keypointops.msg_pass(x, torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]), *ok_t, t, 1e-7)
    with pytest.raises(RuntimeError, match="must be int64"):
        torch.ops.keypointops.msg_pass(x, torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                                       torch.tensor([0, 1, 2]), *ok_t, t, 1e-7)


def test_device_mismatch_raises():
    other = "cuda" if torch.cuda.is_available() else "meta"
    graph = random_graph(10, 30)
    with pytest.raises(ValueError, match=r"x \(.*\) and graph \(cpu\) must be on the same device"):
        keypointops.msg_pass(torch.randn(10, 4, device=other), graph)
    with pytest.raises(ValueError, match=r"x \(cpu\) and t \(.*\) must be on the same device"):
        keypointops.msg_pass(torch.randn(10, 4), graph, torch.ones(4, device=other))
