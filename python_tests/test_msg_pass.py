"""msg_pass: every fused backend against the reference, gradients, registration, bad input."""
import pytest
import torch

import keypointops
from keypointops import reference
from keypointops.graphs import Graph
from keypointops._opdefs.backend import triton_available

from helpers import best_cpu_times, check_autocast_policy, device_backend_params, gradient_errors, tolerances

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
def test_hub_node_with_thousands_of_edges(device, backend):
    """A node with 10,000 incoming edges: a long CSR segment, walked in many steps.  Triton's
    interpreter runs each step (BLOCK_E edges) in Python: there 2,000 edges, still 125 steps of the
    same loop."""
    gen = torch.Generator().manual_seed(2)
    hub_edges = 2_000 if backend == "triton" and device == "cpu" else 10_000
    graph = random_graph(23, 60, hub_edges=hub_edges, device=device)
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
@pytest.mark.parametrize("dtype,t,x", [
    (torch.float32, 1e10, [1.0, 1.0, 0.0]),   # t * m: 1e10 * (1 + 1e-7) is not exact in float32
    (torch.float32, 1e5, [123456.7, 123456.7, 0.0]),
    (torch.float64, 1e30, [1.0, 1.0, 0.0]),
    (torch.float32, -1e10, [1.0, 1.0, 3.0]),  # a negative t: the smallest messages win
])
def test_huge_logits_are_exact(device, backend, dtype, t, x):
    """Node 2 gets two equal messages and a third one at a huge inverse temperature: the two equal
    exponents must be exactly 0 (out = their message, gradient 1/2 each), never the rounding error
    of t * m (which overflows exp and gives NaN)."""
    x = torch.tensor(x, dtype=dtype, device=device)[:, None].requires_grad_()
    edge_index = torch.tensor([[0, 1, 2], [2, 2, 2]], device=device)
    out = keypointops.msg_pass(x, edge_index, t, backend=backend)
    torch.testing.assert_close(out, reference.msg_pass(x, edge_index, t), rtol=0, atol=0)
    assert out[2, 0] == x[0, 0] + torch.tensor(1e-7, dtype=dtype)
    (grad,) = torch.autograd.grad(out[2, 0], x)
    assert grad.flatten().tolist() == [0.5, 0.5, 0.0]


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("t", [0.01, 1.0, 100.0, 1000.0])
def test_float32_gradients_as_accurate_as_autograd(device, backend, t):
    """At any temperature the float32 gradients err (against float64) at most twice as much as plain
    autograd's float32 gradients of the reference: the largest error over several random graphs.
    A sharp softmax (large t) must not cancel t * m_u - t * out_v in float32."""
    worst = {"kernel": [0.0, 0.0], "autograd": [0.0, 0.0]}
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        graph = random_graph(50, 300, seed=seed, device=device)
        x = (3 * torch.randn(50, 16, generator=gen, dtype=torch.float64)).to(device)
        t_c = torch.full((16,), t, dtype=torch.float64, device=device)
        grad_out = torch.randn(50, 16, generator=gen, dtype=torch.float64).to(device)
        for name, function in (("kernel", lambda x, t: keypointops.msg_pass(x, graph, t, backend=backend)),
                               ("autograd", lambda x, t: reference.msg_pass(x, graph, t))):
            errors = gradient_errors(function, [x, t_c], grad_out)
            worst[name] = [max(a, b) for a, b in zip(worst[name], errors)]
    for which, kernel, autograd in zip(("x", "t"), worst["kernel"], worst["autograd"]):
        assert kernel <= 2 * autograd, f"grad_{which}: error {kernel:.3g} vs autograd's {autograd:.3g}"


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
    # The interpreter runs every op of every program in Python: there the randomised (fast) mode;
    # the Triton gradients are also checked entry by entry against the reference
    # (test_gradients_match_reference, float64).
    fast = backend == "triton" and device == "cpu"
    assert torch.autograd.gradcheck(lambda x, t: keypointops.msg_pass(x, graph, t, backend=backend),
                                    (x, t), fast_mode=fast)
    scalar_t = torch.tensor(0.8, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: keypointops.msg_pass(x, graph, t, backend=backend),
                                    (x, scalar_t), fast_mode=fast)


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


def ops_of(backend):
    """The (forward, backward) ops of a fused backend."""
    if backend == "triton":
        from keypointops.triton import msg_pass as triton_msg_pass
        return triton_msg_pass.msg_pass_triton, torch.ops.keypointops.msg_pass_triton_backward.default
    return torch.ops.keypointops.msg_pass.default, torch.ops.keypointops.msg_pass_backward.default


def gpu_kernel_params():
    """The (device, backend) pairs of the CUDA and Triton kernels: every pair but the CPU kernel."""
    return [p for p in device_backend_params() if p.values[1] != "cpu"]


def _op_samples(device, dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    graph = random_graph(17, 50, device=device)
    x = torch.randn(17, 7, generator=gen, dtype=dtype).to(device).requires_grad_()
    t = torch.rand(7, generator=gen, dtype=dtype).to(device).requires_grad_()
    return [(x, graph.rowptr, graph.col, graph.rowptr_t, graph.col_t, t, 1e-7)]


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_opcheck(device, backend):
    op, _ = ops_of(backend)
    for args in _op_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("aggr", ["softmax", "powermean"])
def test_torch_compile_fullgraph(device, backend, aggr):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not trace Triton kernels in the interpreter on CPU tensors")
    gen = torch.Generator().manual_seed(8)
    graph = random_graph(19, 60, device=device)
    x = torch.randn(19, 8, generator=gen).to(device).requires_grad_()
    t = torch.full((8,), 1.5, device=device, requires_grad=True)   # the power p for the power mean

    def layer(x, t):
        parameter = dict(t=t) if aggr == "softmax" else dict(p=t)
        return keypointops.msg_pass(x, graph, aggr=aggr, backend=backend, **parameter).relu().sum()

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


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("channels", [64, 200])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_wide_and_misaligned_rows(device, backend, channels, offset):
    """C = 64 and 200 take the GPU kernels' vectorised paths (200: several channel blocks, lanes
    looping over channel chunks); x starting one element into its storage cannot be loaded in
    16-byte vectors (scalar fallback)."""
    gen = torch.Generator().manual_seed(11)
    graph = random_graph(23, 90, device=device)
    x = torch.randn(23 * channels + offset, generator=gen).to(device)[offset:].view(23, channels)
    x.requires_grad_()
    t = (torch.rand(channels, generator=gen) * 2).to(device).requires_grad_()
    out = keypointops.msg_pass(x, graph, t, backend=backend)
    expected = reference.msg_pass(x, graph, t)
    torch.testing.assert_close(out, expected, **tolerances(torch.float32))
    grad = torch.randn(out.shape, generator=gen).to(device)
    for g, w in zip(torch.autograd.grad(out, (x, t), grad), torch.autograd.grad(expected, (x, t), grad)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="needs the Triton interpreter")
def test_triton_gpu_tile_shapes_in_the_interpreter(monkeypatch):
    """The interpreter runs the Triton kernels with larger tiles than the GPU; the GPU's tile shapes
    (several programs per graph, several steps per hub segment) must give the same results."""
    from keypointops.triton import msg_pass as triton_msg_pass
    monkeypatch.setattr(triton_msg_pass, "INTERPRETER_TILE", triton_msg_pass.GPU_TILE)
    gen = torch.Generator().manual_seed(13)
    graph = random_graph(23, 70, hub_edges=40)
    x = torch.randn(23, 70, generator=gen, dtype=torch.float64).requires_grad_()
    t = torch.rand(70, generator=gen, dtype=torch.float64).requires_grad_()
    out = keypointops.msg_pass(x, graph, t, backend="triton")
    expected = reference.msg_pass(x, graph, t)
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(out, (x, t), grad), torch.autograd.grad(expected, (x, t), grad)):
        torch.testing.assert_close(g, w, **tolerances(torch.float64))
    # ... and the GPU's tile with edge features.
    monkeypatch.setattr(triton_msg_pass, "INTERPRETER_TILE", triton_msg_pass.GPU_EDGE_TILE)
    edge_attr = torch.randn(graph.num_edges, 70, generator=gen, dtype=torch.float64).requires_grad_()
    out = keypointops.msg_pass(x, graph, t, edge_attr=edge_attr, backend="triton")
    expected = reference.msg_pass(x, graph, t, edge_attr=edge_attr)
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))
    inputs = (x, t, edge_attr)
    for g, w in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(expected, inputs, grad)):
        torch.testing.assert_close(g, w, **tolerances(torch.float64))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision(device, backend, dtype):
    """float16/bfloat16 x: float32 accumulation and statistics; out and grad_x in x's dtype, within
    :func:`tolerances` of that dtype (bfloat16: 2e-2, float16: 1e-2) of the reference; grad_t
    (float32) within the bound below.  An empty graph and zero channels included."""
    gen = torch.Generator().manual_seed(10)
    graph = random_graph(37, 130, device=device)
    x = (torch.randn(37, 24, generator=gen) * 2).to(device, dtype).requires_grad_()
    t = torch.rand(24, generator=gen).to(device).requires_grad_()
    forward, _ = ops_of(backend)
    _, row_max, row_sum = forward(x, graph.rowptr, graph.col, graph.rowptr_t, graph.col_t, t, 1e-7)
    assert row_max.dtype == row_sum.dtype == torch.float32
    out = keypointops.msg_pass(x, graph, t, backend=backend)
    expected = reference.msg_pass(x, graph, t)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    grad_x, grad_t = torch.autograd.grad(out, (x, t), grad)
    want_x, want_t = torch.autograd.grad(expected, (x, t), grad)
    assert grad_x.dtype == dtype and grad_t.dtype == torch.float32
    torch.testing.assert_close(grad_x, want_x, **tolerances(dtype))
    # Backward reads out as saved, rounded to x's dtype (unit roundoff u), so grad_t, a sum over the
    # nodes of terms centred on out, is off by up to u * sum_v |grad_out_v| * out_v^2 per channel.
    bound = torch.finfo(dtype).eps / 2 * (grad.float().abs() * expected.float() ** 2).sum(0)
    assert ((grad_t - want_t).abs() <= bound + 1e-4 * (1 + want_t.abs())).all()
    no_edges = torch.empty(2, 0, dtype=torch.long, device=device)
    assert (keypointops.msg_pass(x, no_edges, t, backend=backend) == 0).all()
    no_channels = x[:, :0].detach().requires_grad_()
    out = keypointops.msg_pass(no_channels, graph, t[:0], backend=backend)
    assert out.shape == (37, 0) and out.dtype == dtype
    assert torch.autograd.grad(out.sum(), no_channels)[0].shape == (37, 0)



@pytest.mark.skipif(not keypointops.has_ops(), reason="needs the CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_edges", [False, True], ids=["nodes", "edges"])
def test_reduced_precision_softmax_rounds_the_float32_result(dtype, with_edges):
    """The 16-bit softmax kernels (their weights from an inline exp of relative error under 4e-7)
    give the float32 kernels' results on the same values rounded to x's dtype, up to one unit in the
    last place where a float32 result lies next to a rounding boundary: forward, and backward from the
    same grad_out and saved statistics (out as the 16-bit forward saved it)."""
    gen = torch.Generator().manual_seed(31)
    graph = random_graph(60, 400, hub_edges=40)
    x = (torch.randn(60, 19, generator=gen) * 3).to(dtype)  # 19 channels: a full vector and a tail
    t = torch.rand(19, generator=gen) * 8 - 2                # sharp, flat and negative temperatures
    edge_attr = torch.randn(graph.num_edges, 19, generator=gen).to(dtype) if with_edges else None
    grad_out = torch.randn(60, 19, generator=gen).to(dtype)
    forward, backward = ops_of("cpu")
    csr = (graph.rowptr, graph.col, graph.rowptr_t, graph.col_t)
    edges = (graph.perm, graph.perm_t) if with_edges else (None, None)

    def run(cast, saved=None):
        e = None if edge_attr is None else edge_attr.to(cast)
        out, row_max, row_sum = forward(x.to(cast), *csr, t, 1e-7, e, *edges)
        saved_out, saved_max, saved_sum = saved or (out, row_max, row_sum)
        grads = backward(grad_out.to(cast), x.to(cast), saved_out.to(cast), saved_max, saved_sum,
                         graph.rowptr_t, graph.col_t, t, 1e-7, True, e, edges[1])
        return out, row_max, row_sum, grads

    got = run(dtype)
    want = run(torch.float32, saved=got[:3])
    ulp = torch.finfo(dtype).eps
    pairs = [(got[0], want[0]), (got[3][0], want[3][0])] + ([(got[3][2], want[3][2])] if with_edges else [])
    for g, w in pairs:
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.to(dtype).float(), rtol=ulp, atol=1e-5)
    for g, w in [(got[1], want[1]), (got[2], want[2]), (got[3][1], want[3][1])]:  # float32 statistics, grad_t
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


@pytest.mark.skipif(not keypointops.has_ops() or keypointops.cpu_capability() == "default",
                    reason="needs the CPU kernels' AVX2 or AVX512 build (16-bit loads and stores vectorised)")
def test_cpu_bfloat16_forward_is_not_slower_than_float32():
    """KMPNet's graph (32 clips x 8 frames x 17 joints, 17,344 edges, 64 channels): the softmax
    forward takes no more CPU time in bfloat16 than in float32, up to a margin for timing noise (one
    thread, CPU time, the best of 9 interleaved rounds).  Its time is mostly the weights' exp: the
    16-bit forward is at parity only with the inline exp (with Sleef's out-of-line exp, as float32
    takes, it is slower; figures in docs/benchmarks.md); the margin of 1.2 (as for keypoint_gather)
    absorbs the noise of a shared 2-core VM, so the test catches larger regressions than a return
    to Sleef's exp."""
    gen = torch.Generator().manual_seed(0)
    graph = Graph.spatial_temporal("coco17", frames=8, batch=32)
    x32 = torch.randn(graph.num_nodes, 64, generator=gen)
    t = torch.ones(1)

    def forward(dtype):
        x = x32.to(dtype)

        def run():
            with torch.no_grad():
                for _ in range(5):
                    keypointops.msg_pass(x, graph, t, 1e-7, backend="cpu")
        return run

    (float32_time, bfloat16_time), rounds = best_cpu_times([forward(torch.float32), forward(torch.bfloat16)])
    assert bfloat16_time < 1.2 * float32_time, rounds


@pytest.mark.skipif(not keypointops.has_ops(), reason="needs the compiled CPU kernels")
def test_cpu_forward_hides_the_latency_of_random_rows():
    """The CPU kernel prefetches the source rows of the nodes ahead, so a graph whose sources are
    random rows of a 51 MB x (200,000 nodes x 64 channels, 5 in-edges each: larger than the caches
    of the CPUs here) runs about as fast as one whose sources are each node's next 5 rows (one
    thread, CPU time, the best of 7 interleaved rounds).  With the prefetches compiled out, as GCC
    does to __builtin_prefetch there (ops/cpu/prefetch.h), the random rows' latency shows: the bound
    of 1.8 fails that build and leaves room for timing noise and CPUs with slower memory (figures in
    docs/benchmarks.md).  On a CPU whose caches hold x the two run alike whatever the prefetches do."""
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    dst = torch.arange(n).repeat_interleave(5)
    random_sources = Graph.from_edge_index(torch.stack([torch.randint(0, n, (5 * n,), generator=gen), dst]), n)
    next_rows = Graph.from_edge_index(torch.stack([(dst + torch.arange(1, 6).repeat(n)) % n, dst]), n)
    x = torch.randn(n, 64, generator=gen)
    t = torch.ones(1)

    def forward(graph):
        def run():
            with torch.no_grad():
                keypointops.msg_pass(x, graph, t, 1e-7, backend="cpu")
        return run

    (random_time, next_rows_time), rounds = best_cpu_times([forward(random_sources), forward(next_rows)], rounds=7)
    assert random_time < 1.8 * next_rows_time, rounds


@pytest.mark.parametrize("device,backend", gpu_kernel_params())
def test_out_of_range_indices_are_skipped(device, backend):
    """The CUDA and Triton kernels do not validate index contents (Graph does, on the CPU): they
    skip edges whose node index lies outside [0, N) and clamp rowptr to [0, E], never reading
    out of range."""
    forward, backward = ops_of(backend)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device)
    t = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device)
    index = lambda *values: torch.tensor(values, device=device)  # noqa: E731
    # Valid edges 1 -> 0 and 0 -> 1; node 1 also lists source N = 4, node 3 only source -5.
    rowptr, col = index(0, 1, 3, 3, 4), index(1, 4, 0, -5)
    rowptr_t, col_t = index(0, 2, 3, 3, 4), index(1, 99, 0, 4)
    out, row_max, row_sum = forward(x, rowptr, col, rowptr_t, col_t, t, 1e-7)
    valid = index([1, 0], [0, 1])
    x_ref = x.clone().requires_grad_()
    t_ref = t.clone().requires_grad_()
    expected = reference.msg_pass(x_ref, valid, t_ref)
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))
    assert (row_max[3] == 0).all() and (row_sum[3] == 1).all()
    grad = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(device)
    got = backward(grad, x, out, row_max, row_sum, rowptr_t, col_t, t, 1e-7, True)
    want = torch.autograd.grad(expected, (x_ref, t_ref), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerances(torch.float64))
    bad_rowptr = index(0, 7, 2, -3, 4)  # decreasing, beyond E, negative
    out, _, _ = forward(x, bad_rowptr, col, bad_rowptr, col_t, t, 1e-7)
    assert torch.isfinite(out).all()


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
        keypointops.msg_pass(x, torch.tensor([[0, 1], [1, 2]], dtype=torch.int16))
    with pytest.raises(ValueError, match=r"edge_attr must be \[E, C\] = \[39, 4\]"):
        keypointops.msg_pass(x, graph, edge_attr=torch.randn(31, 4))
    with pytest.raises(ValueError, match="edge_attr must be torch.float32 like x"):
        keypointops.msg_pass(x, graph, edge_attr=torch.randn(39, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="edge_attr must be a Tensor"):
        keypointops.msg_pass(x, graph, edge_attr=[[0.0] * 4] * 39)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_policy(dtype):
    """Under autocast a float32 learnable t stays float32 beside reduced-precision x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    graph = Graph.from_edge_index(torch.tensor([[0, 1, 2, 3, 4, 5, 1], [1, 2, 3, 4, 5, 0, 3]]), 6)
    check_autocast_policy(keypointops.msg_pass, x, dict(graph=graph, t=torch.rand(5, generator=g) + 0.5), (),
                          dtype=dtype)


# --- edge features --------------------------------------------------------------------------------

def shuffled_edge_index(num_nodes, num_edges, *, seed=0, dtype=torch.int64, device="cpu"):
    """A random edge_index in random (unsorted) order, with empty nodes, self loops and duplicates:
    its edge order differs from both CSR orders, so a kernel reading edge_attr in the wrong
    order fails."""
    graph = random_graph(num_nodes, num_edges, seed=seed)
    order = torch.randperm(graph.num_edges, generator=torch.Generator().manual_seed(seed))
    return graph.edge_index[:, order].to(dtype).to(device)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t_kind", ["float", "channels"])
def test_edge_attr_matches_reference(device, backend, dtype, t_kind):
    gen = torch.Generator().manual_seed(13)
    edge_index = shuffled_edge_index(37, 140, seed=1, device=device)
    x = torch.randn(37, 13, generator=gen, dtype=dtype).to(device).requires_grad_()
    edge_attr = torch.randn(edge_index.size(1), 13, generator=gen, dtype=dtype).to(device).requires_grad_()
    t = make_t(t_kind, 13, dtype, device, gen)
    if isinstance(t, torch.Tensor):
        t.requires_grad_()
    inputs = (x, edge_attr, t) if isinstance(t, torch.Tensor) else (x, edge_attr)
    out = keypointops.msg_pass(x, edge_index, t, edge_attr=edge_attr, backend=backend)
    expected = reference.msg_pass(x, edge_index, t, edge_attr=edge_attr)
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    assert (out[:EMPTY_NODES] == 0).all()
    grad = torch.randn(out.shape, generator=gen, dtype=dtype).to(device)
    got = torch.autograd.grad(out, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    tol = tolerances(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_edge_attr_reduced_precision(device, backend, dtype):
    """float16/bfloat16 x and edge_attr: messages, statistics and sums in float32; out, grad_x and
    grad_edge_attr in x's dtype within :func:`tolerances` of that dtype of the reference, grad_t
    (float32) within the bound of :func:`test_reduced_precision`."""
    gen = torch.Generator().manual_seed(16)
    edge_index = shuffled_edge_index(37, 140, seed=2, device=device)
    x = (torch.randn(37, 24, generator=gen) * 2).to(device, dtype).requires_grad_()
    edge_attr = torch.randn(edge_index.size(1), 24, generator=gen).to(device, dtype).requires_grad_()
    t = torch.rand(24, generator=gen).to(device).requires_grad_()
    out = keypointops.msg_pass(x, edge_index, t, edge_attr=edge_attr, backend=backend)
    expected = reference.msg_pass(x, edge_index, t, edge_attr=edge_attr)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grad = torch.randn(out.shape, generator=gen).to(device, dtype)
    grad_x, grad_e, grad_t = torch.autograd.grad(out, (x, edge_attr, t), grad)
    want_x, want_e, want_t = torch.autograd.grad(expected, (x, edge_attr, t), grad)
    assert grad_x.dtype == grad_e.dtype == dtype and grad_t.dtype == torch.float32
    torch.testing.assert_close(grad_x, want_x, **tolerances(dtype))
    torch.testing.assert_close(grad_e, want_e, **tolerances(dtype))
    bound = torch.finfo(dtype).eps / 2 * (grad.float().abs() * expected.float() ** 2).sum(0)
    assert ((grad_t - want_t).abs() <= bound + 1e-4 * (1 + want_t.abs())).all()


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_edge_attr_follows_the_graph_edge_order(device, backend):
    """A Graph numbers its edges in the order of the edge_index it was built from (the order the
    edge features follow), one built from a CSR in CSR order; both agree with the edge_index call."""
    gen = torch.Generator().manual_seed(14)
    edge_index = shuffled_edge_index(23, 80, seed=2, device=device)
    x = torch.randn(23, 6, generator=gen, dtype=torch.float64).to(device)
    edge_attr = torch.randn(edge_index.size(1), 6, generator=gen, dtype=torch.float64).to(device)
    want = reference.msg_pass(x, edge_index, 1.5, edge_attr=edge_attr)
    graph = Graph.from_edge_index(edge_index, 23)
    torch.testing.assert_close(keypointops.msg_pass(x, graph, 1.5, edge_attr=edge_attr, backend=backend), want)
    csr_graph = Graph(graph.rowptr, graph.col)  # edges in CSR order: edge_attr permuted to match
    got = keypointops.msg_pass(x, csr_graph, 1.5, edge_attr=edge_attr[graph.perm], backend=backend)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_edge_attr_gradcheck(device, backend):
    gen = torch.Generator().manual_seed(15)
    edge_index = shuffled_edge_index(7, 14, seed=3, device=device)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    edge_attr = torch.randn(edge_index.size(1), 3, generator=gen, dtype=torch.float64).to(device)
    # Keep x_u + e_uv away from 0 where relu has a kink that finite differences straddle.
    pre = x.detach()[edge_index[0]] + edge_attr
    edge_attr = (edge_attr + 0.3 * pre.sign() * (pre.abs() < 0.3)).requires_grad_()
    t = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64, device=device, requires_grad=True)
    graph = Graph.from_edge_index(edge_index, 7)
    # The interpreter runs every op of every program in Python: there the randomised (fast) mode;
    # the Triton gradients are also checked entry by entry against the reference above.
    assert torch.autograd.gradcheck(
        lambda x, e, t: keypointops.msg_pass(x, graph, t, edge_attr=e, backend=backend),
        (x, edge_attr, t), atol=1e-6, fast_mode=backend == "triton" and device == "cpu")


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_edge_attr_opcheck(device, backend):
    op, _ = ops_of(backend)
    gen = torch.Generator().manual_seed(16)
    graph = Graph.from_edge_index(shuffled_edge_index(17, 50, seed=4, device=device), 17)
    x = torch.randn(17, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    edge_attr = torch.randn(graph.num_edges, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    t = torch.rand(7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    torch.library.opcheck(op, (x, graph.rowptr, graph.col, graph.rowptr_t, graph.col_t, t, 1e-7, edge_attr,
                               graph.perm, graph.perm_t))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_edge_attr_edge_cases(device, backend):
    """No edges (E = 0), no nodes (N = 0), int32 edge_index, and a deterministic backward."""
    x = torch.randn(5, 3, device=device, requires_grad=True)
    no_edges = torch.empty(2, 0, dtype=torch.int32, device=device)
    empty_attr = torch.empty(0, 3, device=device, requires_grad=True)
    out = keypointops.msg_pass(x, no_edges, edge_attr=empty_attr, backend=backend)
    assert out.shape == (5, 3) and (out == 0).all()
    grad_x, grad_e = torch.autograd.grad(out.sum(), (x, empty_attr))
    assert (grad_x == 0).all() and grad_e.shape == (0, 3)
    nothing = torch.empty(0, 3, device=device, requires_grad=True)
    out = keypointops.msg_pass(nothing, torch.empty(2, 0, dtype=torch.long, device=device),
                               edge_attr=torch.empty(0, 3, device=device), backend=backend)
    assert out.shape == (0, 3)
    gen = torch.Generator().manual_seed(17)
    edge_index = shuffled_edge_index(60, 500, seed=5, device=device)
    x = torch.randn(60, 9, generator=gen).to(device).requires_grad_()
    edge_attr = torch.randn(edge_index.size(1), 9, generator=gen).to(device).requires_grad_()
    out = keypointops.msg_pass(x, edge_index.int(), edge_attr=edge_attr, backend=backend)
    torch.testing.assert_close(out, keypointops.msg_pass(x, edge_index, edge_attr=edge_attr, backend=backend),
                               rtol=0, atol=0)
    grad = torch.randn(out.shape, generator=gen).to(device)
    first = torch.autograd.grad(out, (x, edge_attr), grad, retain_graph=True)
    second = torch.autograd.grad(out, (x, edge_attr), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C not built")
def test_compiled_op_checks_edge_arguments():
    graph = random_graph(6, 10)
    x, t = torch.randn(6, 2), torch.ones(2)
    csr = (graph.rowptr, graph.col, graph.rowptr_t, graph.col_t)
    edge_attr = torch.randn(graph.num_edges, 2)
    bad_perm = graph.perm.clone()
    bad_perm[0] = graph.num_edges
    with pytest.raises(RuntimeError, match="perm holds edge id"):
        torch.ops.keypointops.msg_pass(x, *csr, t, 1e-7, edge_attr, bad_perm, graph.perm_t)
    twice = graph.perm.clone()
    twice[1] = twice[0]
    with pytest.raises(RuntimeError, match="perm must be a permutation"):
        torch.ops.keypointops.msg_pass(x, *csr, t, 1e-7, edge_attr, twice, graph.perm_t)
    with pytest.raises(RuntimeError, match="edge_attr and perm must be given together"):
        torch.ops.keypointops.msg_pass(x, *csr, t, 1e-7, edge_attr, None, graph.perm_t)
    with pytest.raises(RuntimeError, match="edge_attr must be"):
        torch.ops.keypointops.msg_pass(x, *csr, t, 1e-7, edge_attr[1:], graph.perm, graph.perm_t)


# --- power mean and mean ------------------------------------------------------------------------

def make_p(kind, channels, dtype, device, gen):
    """The power: a float, a 0-dim tensor or a [C] tensor with negative and fractional powers."""
    if kind == "float":
        return 2.5
    if kind == "scalar":
        return torch.tensor(0.7, dtype=dtype, device=device)
    return (torch.rand(channels, generator=gen, dtype=dtype) * 6 - 2).add(0.25).to(device)  # [C], some < 0


def power_mean_inputs(device, dtype, *, num_nodes=31, num_edges=110, channels=9, seed=20):
    """x with messages above clamp_max (100) and at clamp_min (relu zeros), a graph with empty
    nodes and duplicate edges (random edge order), and edge features."""
    gen = torch.Generator().manual_seed(seed)
    edge_index = shuffled_edge_index(num_nodes, num_edges, seed=seed, device=device)
    x = (torch.randn(num_nodes, channels, generator=gen, dtype=torch.float64) * 3)
    x[::7] *= 60                                                   # messages past clamp_max
    edge_attr = torch.randn(edge_index.size(1), channels, generator=gen, dtype=torch.float64)
    return edge_index, x.to(device, dtype), edge_attr.to(device, dtype), gen


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aggr,p_kind", [("powermean", "float"), ("powermean", "scalar"),
                                         ("powermean", "channels"), ("mean", None)])
@pytest.mark.parametrize("with_edges", [False, True], ids=["nodes", "edges"])
def test_power_mean_matches_reference(device, backend, dtype, aggr, p_kind, with_edges):
    """Output and gradients (x, edge_attr, p) equal to the reference's autograd, with messages
    clamped at both bounds and nodes without incoming edges; backward deterministic."""
    edge_index, x, edge_attr, gen = power_mean_inputs(device, dtype)
    graph = Graph.from_edge_index(edge_index, x.size(0))
    x.requires_grad_()
    edge_attr = edge_attr.requires_grad_() if with_edges else None
    p = make_p(p_kind, x.size(1), dtype, device, gen) if p_kind else 1.0
    if isinstance(p, torch.Tensor):
        p.requires_grad_()
    kwargs = dict(edge_attr=edge_attr, aggr=aggr, p=p)
    out = keypointops.msg_pass(x, graph, backend=backend, **kwargs)
    expected = reference.msg_pass(x, graph, **kwargs)
    tol = tolerances(dtype) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, expected, **tol)
    if aggr == "mean":
        assert (out[:EMPTY_NODES] == 0).all()
    else:   # PyG's rule: the empty mean 0 is clamped to clamp_min
        p_c = torch.as_tensor(p, dtype=dtype, device=device).expand(x.size(1))
        torch.testing.assert_close(out[:EMPTY_NODES], (1e-4 ** (1 / p_c.detach())).expand(EMPTY_NODES, -1),
                                   **tol)
    leaves = [v for v in (x, edge_attr, p) if isinstance(v, torch.Tensor) and v.requires_grad]
    grad = torch.randn(out.shape, generator=gen, dtype=dtype).to(device)
    got = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    want = torch.autograd.grad(expected, leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **(tol if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-4)))
    again = torch.autograd.grad(out, leaves, grad)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


def test_power_mean_matches_pyg():
    """The op against PyG's PowerMeanAggregation on GENConv's messages: a learnable [1] p, a
    per-channel p, a plain p of 1 (the unclamped mean), and clamp bounds of None."""
    aggr = pytest.importorskip("torch_geometric.nn.aggr")
    edge_index, x, edge_attr, gen = power_mean_inputs("cpu", torch.float64, seed=21)
    for kwargs in (dict(p=2.0, learn=True), dict(p=0.5, learn=True, channels=9), dict(p=1.0),
                   dict(p=3.0, learn=True, clamp_min=None, clamp_max=50.0)):
        theirs = aggr.PowerMeanAggregation(**kwargs).double()
        clamp = dict(clamp_min=theirs.min_value, clamp_max=theirs.max_value)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        es = [edge_attr.clone().requires_grad_() for _ in range(2)]
        messages = (xs[1][edge_index[0]] + es[1]).relu() + 1e-7
        want = theirs(messages, edge_index[1], dim_size=x.size(0))
        got = keypointops.msg_pass(xs[0], edge_index, edge_attr=es[0], aggr="powermean", p=theirs.p, **clamp)
        torch.testing.assert_close(got, want, **tolerances(torch.float64))
        params = [theirs.p] if isinstance(theirs.p, torch.Tensor) else []
        grad = torch.randn(got.shape, generator=gen, dtype=torch.float64)
        ours_grads = torch.autograd.grad(got, [xs[0], es[0], *params], grad)
        their_grads = torch.autograd.grad(want, [xs[1], es[1], *params], grad)
        for g, w in zip(ours_grads, their_grads):
            torch.testing.assert_close(g, w, **tolerances(torch.float64))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("with_edges", [False, True], ids=["nodes", "edges"])
def test_power_mean_gradcheck(device, backend, with_edges):
    gen = torch.Generator().manual_seed(22)
    edge_index = shuffled_edge_index(9, 20, seed=6, device=device)
    x = torch.randn(9, 4, generator=gen, dtype=torch.float64)
    x = (x + 0.3 * x.sign()).to(device).requires_grad_()     # away from relu's kink
    edge_attr = None
    if with_edges:
        edge_attr = torch.randn(edge_index.size(1), 4, generator=gen, dtype=torch.float64).to(device)
        pre = x.detach()[edge_index[0]] + edge_attr
        edge_attr = (edge_attr + 0.3 * pre.sign() * (pre.abs() < 0.3)).requires_grad_()
    # No p of exactly 1: a node whose messages are all clamp_min would have its mean clamp_min ** p
    # on the clamp bound, where finite differences straddle the kink.
    p = torch.tensor([0.5, 1.2, 2.5, -1.5], dtype=torch.float64, device=device, requires_grad=True)
    graph = Graph.from_edge_index(edge_index, 9)
    fast = backend == "triton" and device == "cpu"    # the interpreter: the randomised (fast) mode
    if with_edges:
        assert torch.autograd.gradcheck(
            lambda x, e, p: keypointops.msg_pass(x, graph, edge_attr=e, aggr="powermean", p=p, backend=backend),
            (x, edge_attr, p), atol=1e-6, fast_mode=fast)
        assert torch.autograd.gradcheck(
            lambda x, e: keypointops.msg_pass(x, graph, edge_attr=e, aggr="mean", backend=backend),
            (x, edge_attr), atol=1e-6, fast_mode=fast)
    else:
        assert torch.autograd.gradcheck(
            lambda x, p: keypointops.msg_pass(x, graph, aggr="powermean", p=p, backend=backend), (x, p),
            fast_mode=fast)
        assert torch.autograd.gradcheck(lambda x: keypointops.msg_pass(x, graph, aggr="mean", backend=backend),
                                        (x,), fast_mode=fast)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_power_mean_opcheck(device, backend):
    op, _ = ops_of(backend)
    gen = torch.Generator().manual_seed(23)
    graph = Graph.from_edge_index(shuffled_edge_index(17, 50, seed=7, device=device), 17)
    x = torch.randn(17, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    edge_attr = torch.randn(graph.num_edges, 7, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    p = (torch.rand(7, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    csr = (graph.rowptr, graph.col, graph.rowptr_t, graph.col_t)
    torch.library.opcheck(op, (x, *csr, p, 1e-7, edge_attr, graph.perm, graph.perm_t, "powermean", 1e-4, 100.0))
    torch.library.opcheck(op, (x, *csr, p, 1e-7, None, None, None, "powermean", 1e-4, 100.0))
    torch.library.opcheck(op, (x, *csr, p, 1e-7, edge_attr, graph.perm, graph.perm_t, "mean", 1e-4, 100.0))


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_power_mean_edge_cases(device, backend):
    """No edges (E = 0: every node gets clamp_min ** (1/p), with its gradient for p), no nodes
    (N = 0), zero channels, and float16 / bfloat16 against the reference."""
    x = torch.randn(5, 3, device=device, requires_grad=True)
    p = torch.tensor([2.0, -1.0, 0.5], device=device, requires_grad=True)
    no_edges = torch.empty(2, 0, dtype=torch.long, device=device)
    empty_attr = torch.empty(0, 3, device=device, requires_grad=True)
    out = keypointops.msg_pass(x, no_edges, edge_attr=empty_attr, aggr="powermean", p=p, backend=backend)
    expected = reference.msg_pass(x, no_edges, edge_attr=empty_attr, aggr="powermean", p=p)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, (1e-4 ** (1 / p.detach())).expand(5, 3))
    grad_x, grad_e, grad_p = torch.autograd.grad(out.sum(), (x, empty_attr, p))
    assert (grad_x == 0).all() and grad_e.shape == (0, 3)
    torch.testing.assert_close(grad_p, torch.autograd.grad(expected.sum(), p)[0])
    assert (keypointops.msg_pass(x, no_edges, aggr="mean", backend=backend) == 0).all()
    for aggr in ("powermean", "mean"):
        out = keypointops.msg_pass(torch.empty(0, 3, device=device), no_edges, aggr=aggr, p=p, backend=backend)
        assert out.shape == (0, 3)
        nothing = x[:, :0].detach().requires_grad_()
        out = keypointops.msg_pass(nothing, no_edges, aggr=aggr, p=p[:0], backend=backend)
        assert out.shape == (5, 0) and torch.autograd.grad(out.sum(), nothing)[0].shape == (5, 0)
    edge_index, x32, edge_attr32, gen = power_mean_inputs(device, torch.float32, seed=24)
    for dtype in (torch.float16, torch.bfloat16):
        x16, e16 = x32.clamp(-60, 60).to(dtype).requires_grad_(), edge_attr32.to(dtype).requires_grad_()
        p32 = torch.tensor(1.5, device=device, requires_grad=True)
        out = keypointops.msg_pass(x16, edge_index, edge_attr=e16, aggr="powermean", p=p32, backend=backend)
        expected = reference.msg_pass(x16, edge_index, edge_attr=e16, aggr="powermean", p=p32)
        assert out.dtype == dtype
        torch.testing.assert_close(out, expected, **tolerances(dtype))
        grad = torch.randn(out.shape, generator=gen).to(device, dtype)
        got = torch.autograd.grad(out, (x16, e16, p32), grad)
        want = torch.autograd.grad(expected, (x16, e16, p32), grad)
        for g, w in zip(got[:2], want[:2]):
            torch.testing.assert_close(g, w, **tolerances(dtype))
        torch.testing.assert_close(got[2], want[2], rtol=2e-2, atol=2e-2 * float(grad.float().abs().sum()) ** 0.5)


def test_power_mean_and_mean_ignore_t():
    """The power mean and the mean read no t: a t unfit for the softmax is not looked at (a plain p
    of 1 runs the mean)."""
    graph = random_graph(10, 30)
    x = torch.randn(10, 4)
    mean = keypointops.msg_pass(x, graph, aggr="mean")
    for t in (torch.ones(3), float("nan")):
        torch.testing.assert_close(keypointops.msg_pass(x, graph, t, aggr="powermean", p=1.0), mean)
        torch.testing.assert_close(keypointops.msg_pass(x, graph, t, aggr="mean"), mean)


def test_power_mean_bad_input_raises_naming_the_argument():
    graph = random_graph(10, 30)
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"aggr must be one of \('softmax', 'softmax_sg', 'powermean', 'mean'\), "
                                         r"got 'max'"):
        keypointops.msg_pass(x, graph, aggr="max")
    with pytest.raises(ValueError, match="p must be a finite and non-zero float"):
        keypointops.msg_pass(x, graph, aggr="powermean", p=0.0)
    with pytest.raises(ValueError, match="p must be finite and non-zero"):
        keypointops.msg_pass(x, graph, aggr="powermean", p=torch.tensor([1.0, 0.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"p must be a float, a 0-dim or \[1\] tensor, or a \[C\]"):
        keypointops.msg_pass(x, graph, aggr="powermean", p=torch.ones(3))
    with pytest.raises(ValueError, match="clamp_min must be a float or None"):
        keypointops.msg_pass(x, graph, aggr="powermean", p=2.0, clamp_min=float("nan"))
    if keypointops.has_ops():
        csr = (graph.rowptr, graph.col, graph.rowptr_t, graph.col_t)
        with pytest.raises(ValueError, match="aggr must be 'softmax', 'softmax_sg', 'powermean' or 'mean', got"):
            torch.ops.keypointops.msg_pass(x, *csr, torch.ones(4), 1e-7, None, None, None, "max")


# --- semi-gradient softmax ----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("with_edges", [False, True], ids=["nodes", "edges"])
def test_semi_gradient_softmax_matches_reference(device, backend, with_edges):
    """aggr="softmax_sg": the softmax's output, with the gradients of the weights as constants
    (PyG's semi_grad), equal to the reference's autograd; a t that requires grad is refused."""
    edge_index, x, edge_attr, gen = power_mean_inputs(device, torch.float64, seed=25)
    x = (x / 10).requires_grad_()
    edge_attr = edge_attr.requires_grad_() if with_edges else None
    t = (torch.rand(x.size(1), generator=gen, dtype=torch.float64) * 4 - 1).to(device)
    out = keypointops.msg_pass(x, edge_index, t, edge_attr=edge_attr, aggr="softmax_sg", backend=backend)
    expected = reference.msg_pass(x, edge_index, t, edge_attr=edge_attr, aggr="softmax_sg")
    torch.testing.assert_close(out, keypointops.msg_pass(x, edge_index, t, edge_attr=edge_attr, backend=backend))
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))
    leaves = [x] + ([edge_attr] if with_edges else [])
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(expected, leaves, grad)
    full = torch.autograd.grad(reference.msg_pass(x, edge_index, t, edge_attr=edge_attr), leaves, grad)
    for g, w, f in zip(got, want, full):
        torch.testing.assert_close(g, w, **tolerances(torch.float64))
        assert not torch.allclose(g, f)
    with pytest.raises(ValueError, match="t cannot require grad with aggr='softmax_sg'"):
        keypointops.msg_pass(x, edge_index, t.clone().requires_grad_(), aggr="softmax_sg", backend=backend)
