"""window_graph_conv: every fused backend against the reference and MS-G3D's unfold + einsum,
gradients, registration, bad input; the adjacency helpers of graphs.py; WindowGraphConv3D."""

import pytest
import torch

import keypointops
from keypointops import reference
from keypointops import window_graph_conv_output_length
from keypointops.graphs import block_adjacency, multiscale_adjacency, normalize_adjacency, skeleton
from keypointops.nn import MSG3DWindow, WindowGraphConv3D

from helpers import best_cpu_times, check_autocast_policy, device_backend_params, tolerances

# (window, dilation, T, N, C): window 1 / 3 / 5, dilation 1 / 2, T smaller than the window (and
# than its dilated span), T = 1, N = 1, odd C.
CASES = [
    (1, 1, 4, 3, 5),
    (3, 1, 5, 4, 7),
    (3, 2, 6, 3, 5),
    (5, 1, 7, 2, 3),
    (5, 1, 3, 2, 5),
    (5, 2, 4, 3, 9),
    (3, 1, 1, 5, 4),
    (5, 1, 6, 1, 6),
]
# (window, dilation, stride, T, N, C, scales): MS-G3D's options. Stride 2 / 3 / 4 (T not a multiple
# of the stride, a stride longer than the window), even windows (2, 4, 6; with stride 1 they give
# T - 1 windows), S stacked scales ([S * L, L] adjacencies), a clip shorter than one window (T' = 0).
STRIDED_CASES = [
    (3, 1, 2, 7, 4, 5, 1),
    (4, 1, 1, 6, 3, 5, 1),
    (4, 1, 2, 7, 3, 6, 3),
    (5, 2, 3, 8, 2, 4, 2),
    (2, 1, 2, 5, 3, 4, 1),
    (6, 2, 2, 9, 2, 3, 2),
    (3, 1, 4, 6, 3, 5, 1),
    (1, 1, 2, 5, 3, 2, 4),
    (4, 1, 2, 1, 2, 3, 2),
]
ADJ_KINDS = ["shared", "per_sample", "per_window"]
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: tolerances(torch.float64)}


def make_inputs(batch, frames, nodes, channels, window, adj_kind, *, dtype=torch.float32,
                device="cpu", seed=0, requires_grad=False, dilation=1, stride=1, scales=1):
    gen = torch.Generator().manual_seed(seed)
    size = window * nodes
    rows, windows = scales * size, window_graph_conv_output_length(frames, window, dilation, stride)
    adj_shape = {"shared": (rows, size), "per_sample": (batch, rows, size),
                 "per_window": (batch, windows, rows, size)}[adj_kind]
    x = torch.randn(batch, frames, nodes, channels, generator=gen, dtype=dtype).to(device)
    adj = torch.randn(adj_shape, generator=gen, dtype=dtype).to(device)
    return x.requires_grad_(requires_grad), adj.requires_grad_(requires_grad)


def msg3d_unfold_einsum(x, adj, window, dilation, stride=1):
    """MS-G3D's G3D aggregation, its way: ``UnfoldTemporalWindows`` (``nn.Unfold`` in the
    ``[B, C, T, V]`` layout) then ``einsum('vu,nctu->nctv')`` with its stacked multi-scale
    ``[S * L, L]`` adjacency; returned as ``[B, T', S * L, C]``."""
    batch, frames, nodes, channels = x.shape
    padding = (window + (window - 1) * (dilation - 1) - 1) // 2
    unfold = torch.nn.Unfold(kernel_size=(window, 1), dilation=(dilation, 1), stride=(stride, 1),
                             padding=(padding, 0))
    windows = unfold(x.permute(0, 3, 1, 2))                                   # [B, C*window, T*V]
    windows = windows.view(batch, channels, window, -1, nodes).permute(0, 1, 3, 2, 4).contiguous()
    windows = windows.view(batch, channels, -1, window * nodes)              # [B, C, T, L]
    pattern = "vu,nctu->nctv" if adj.dim() == 2 else "nvu,nctu->nctv"
    return torch.einsum(pattern, adj, windows).permute(0, 2, 3, 1)


@pytest.fixture
def gemm_route(request):
    """The CPU kernels' GEMM route (keypointops.cpu_gemm_route) for one test: "library" or "own"."""
    before = torch.ops.keypointops._cpu_gemm_route()
    torch.ops.keypointops._set_cpu_gemm_route(request.param)
    yield request.param
    torch.ops.keypointops._set_cpu_gemm_route(before)


def check_against(fn, expected_fn, x, adj, dtype):
    out = fn(x, adj)
    expected = expected_fn(x, adj)
    torch.testing.assert_close(out, expected, **tolerances(dtype))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(99), dtype=dtype)
    got = torch.autograd.grad(out, (x, adj), grad.to(out.device))
    want = torch.autograd.grad(expected, (x, adj), grad.to(out.device))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **GRAD_TOL[dtype])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
@pytest.mark.parametrize("window,dilation,frames,nodes,channels", CASES)
def test_matches_reference(device, backend, dtype, adj_kind, window, dilation, frames, nodes,
                           channels):
    x, adj = make_inputs(2, frames, nodes, channels, window, adj_kind, dtype=dtype, device=device,
                         requires_grad=True)
    check_against(
        lambda x, adj: keypointops.window_graph_conv(x, adj, window, dilation=dilation, backend=backend),
        lambda x, adj: reference.window_graph_conv(x, adj, window, dilation),
        x, adj, dtype)


@pytest.mark.parametrize("device,backend", device_backend_params() + [("cpu", "reference")])
@pytest.mark.parametrize("adj_kind", ["shared", "per_sample"])
@pytest.mark.parametrize("window,dilation", [(3, 1), (5, 2)])
def test_matches_msg3d_unfold_einsum(device, backend, adj_kind, window, dilation):
    x, adj = make_inputs(3, 6, 4, 5, window, adj_kind, dtype=torch.float64, device=device, seed=1,
                         requires_grad=True)
    check_against(
        lambda x, adj: keypointops.window_graph_conv(x, adj, window, dilation=dilation, backend=backend),
        lambda x, adj: msg3d_unfold_einsum(x, adj, window, dilation),
        x, adj, torch.float64)


@pytest.mark.parametrize("device,backend", device_backend_params() + [("cpu", "reference")])
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
@pytest.mark.parametrize("window,dilation,stride,frames,nodes,channels,scales", STRIDED_CASES)
def test_stride_even_windows_and_scales(device, backend, adj_kind, window, dilation, stride, frames,
                                        nodes, channels, scales):
    """Every backend against MS-G3D's own unfold (stride, even window) + einsum with the stacked
    multi-scale adjacency (the reference as well: it builds its windows independently)."""
    x, adj = make_inputs(2, frames, nodes, channels, window, adj_kind, dtype=torch.float64,
                         device=device, seed=14, requires_grad=True, dilation=dilation,
                         stride=stride, scales=scales)
    out = keypointops.window_graph_conv(x, adj, window, dilation=dilation, stride=stride,
                                        backend=backend)
    windows = window_graph_conv_output_length(frames, window, dilation, stride)
    assert out.shape == (2, windows, scales * window * nodes, channels)
    if adj_kind == "per_window":  # MS-G3D has no per-window adjacency: against the reference
        expected = reference.window_graph_conv(x, adj, window, dilation, stride)
    elif windows == 0:            # nn.Unfold refuses a clip shorter than one window
        expected = torch.zeros_like(out)
        assert reference.window_graph_conv(x, adj, window, dilation, stride).shape == out.shape
    else:
        expected = msg3d_unfold_einsum(x, adj, window, dilation, stride)
    torch.testing.assert_close(out, expected, **tolerances(torch.float64))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    got = torch.autograd.grad(out, (x, adj), grad.to(device))
    want = torch.autograd.grad(reference.window_graph_conv(x, adj, window, dilation, stride), (x, adj),
                               grad.to(device))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerances(torch.float64))


def test_window_count_is_nn_unfold():
    """T' is the number of windows nn.Unfold makes with MS-G3D's padding, for every option."""
    for window in range(1, 7):
        for dilation in (1, 2, 3):
            for stride in (1, 2, 3):
                for frames in range(1, 12):
                    padding = (window + (window - 1) * (dilation - 1) - 1) // 2
                    if frames + 2 * padding < (window - 1) * dilation + 1:
                        assert window_graph_conv_output_length(frames, window, dilation, stride) == 0
                        continue
                    unfold = torch.nn.Unfold((window, 1), dilation=(dilation, 1), stride=(stride, 1),
                                             padding=(padding, 0))
                    expected = unfold(torch.zeros(1, 1, frames, 1)).size(-1)
                    assert window_graph_conv_output_length(frames, window, dilation, stride) == expected


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
@pytest.mark.parametrize("window,stride,scales", [(3, 1, 1), (4, 2, 2)])
def test_reduced_precision(device, backend, dtype, adj_kind, window, stride, scales):
    """float16/bfloat16 x and adj: float32 accumulation, out and gradients in the inputs' dtype;
    out within :func:`tolerances` of that dtype (bfloat16: 2e-2, float16: 1e-2) of the float32
    reference of the same values, the gradients (sums of up to 4 * S * L or C rounded products,
    each output rounded once) within 5e-2 (adj: atol 0.2 for its larger entries).  Also MS-G3D's
    options: an even window, stride 2 and two stacked scales."""
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes tl.dot wrong for bfloat16 (triton-lang/triton#11584)")
    x, adj = make_inputs(2, 5, 7, 40, window, adj_kind, device=device, seed=2, stride=stride,
                         scales=scales)
    adj = adj / 8
    x16, adj16 = x.to(dtype).requires_grad_(), adj.to(dtype).requires_grad_()
    out = keypointops.window_graph_conv(x16, adj16, window, stride=stride, backend=backend)
    assert out.dtype == dtype
    expected = reference.window_graph_conv(x16.float(), adj16.float(), window, 1, stride)
    torch.testing.assert_close(out.float(), expected, **tolerances(dtype))
    grad = torch.randn_like(expected)
    gx, gadj = torch.autograd.grad(out, (x16, adj16), grad.to(dtype))
    x32, adj32 = x16.detach().float().requires_grad_(), adj16.detach().float().requires_grad_()
    wx, wadj = torch.autograd.grad(reference.window_graph_conv(x32, adj32, window, 1, stride),
                                   (x32, adj32), grad)
    torch.testing.assert_close(gx.float(), wx, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gadj.float(), wadj, rtol=5e-2, atol=2e-1)


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
def test_gradcheck(device, backend, adj_kind):
    x, adj = make_inputs(2, 4, 2, 3, 3, adj_kind, dtype=torch.float64, device=device, seed=3,
                         requires_grad=True)
    # The Triton interpreter is slow: on CPU its check takes gradcheck's fast mode (random
    # projections of the Jacobians instead of every entry).
    fast_mode = backend == "triton" and device == "cpu"
    for dilation in (1, 2):
        assert torch.autograd.gradcheck(
            lambda x, adj: keypointops.window_graph_conv(x, adj, 3, dilation=dilation, backend=backend),
            (x, adj), fast_mode=fast_mode)
    # MS-G3D's options: window 4, stride 2, two stacked scales.
    x, adj = make_inputs(2, 5, 2, 3, 4, adj_kind, dtype=torch.float64, device=device, seed=3,
                         requires_grad=True, stride=2, scales=2)
    assert torch.autograd.gradcheck(
        lambda x, adj: keypointops.window_graph_conv(x, adj, 4, stride=2, backend=backend),
        (x, adj), fast_mode=fast_mode)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_only_the_needed_gradient(device, backend):
    x, adj = make_inputs(2, 5, 3, 4, 3, "per_sample", device=device, seed=4)
    out = keypointops.window_graph_conv(x.requires_grad_(), adj, 3, backend=backend)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(
        reference.window_graph_conv(x, adj, 3).sum(), x)[0])
    x.requires_grad_(False)
    adj.requires_grad_()
    (gadj,) = torch.autograd.grad(keypointops.window_graph_conv(x, adj, 3, backend=backend).sum(), adj)
    torch.testing.assert_close(gadj, torch.autograd.grad(
        reference.window_graph_conv(x, adj, 3).sum(), adj)[0])


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
def test_backward_is_deterministic(device, backend, adj_kind):
    batch, frames = (8, 20) if backend != "triton" or device == "cuda" else (3, 6)
    x, adj = make_inputs(batch, frames, 5, 33, 3, adj_kind, device=device, seed=5,
                         requires_grad=True)
    out = keypointops.window_graph_conv(x, adj, 3, backend=backend)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(device)
    first = torch.autograd.grad(out, (x, adj), grad, retain_graph=True)
    second = torch.autograd.grad(out, (x, adj), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C not built")
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
def test_cpu_results_do_not_depend_on_the_thread_count(adj_kind):
    x, adj = make_inputs(5, 9, 7, 35, 3, adj_kind, seed=12, requires_grad=True)
    grad = torch.randn(5, 9, 21, 35, generator=torch.Generator().manual_seed(13))
    threads = torch.get_num_threads()
    results = []
    try:
        for num_threads in (1, 3):
            torch.set_num_threads(num_threads)
            out = keypointops.window_graph_conv(x, adj, 3, dilation=2, backend="cpu")
            results.append((out, *torch.autograd.grad(out, (x, adj), grad)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.skipif(not keypointops.has_ops() or keypointops.cpu_capability() == "default",
                    reason="needs the CPU kernels' AVX2 or AVX512 build (16-bit loads and stores vectorised)")
@pytest.mark.parametrize("gemm_route", ["own"], indirect=True)  # both dtypes in the loops
def test_cpu_bfloat16_is_not_slower_than_float32(gemm_route):
    """The bfloat16 CPU kernel runs the float32 inner loops on operands widened once: its forward
    and forward+backward take no more CPU time than float32's, up to a margin for timing noise
    (one thread, CPU time, the best of 9 interleaved rounds).  A 16-bit instance whose
    accumulators live on the stack is slower than float32 by more than that margin (figures in
    docs/benchmarks.md)."""
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(8, 6, 17, 512, generator=gen)
    adj32 = torch.rand(51, 51, generator=gen) / 51
    grad32 = torch.randn(8, 6, 51, 512, generator=gen)

    def passes(dtype):
        x, adj, grad = x32.to(dtype).requires_grad_(), adj32.to(dtype).requires_grad_(), grad32.to(dtype)

        def forward():
            keypointops.window_graph_conv(x, adj, 3, backend="cpu")

        def forward_backward():
            torch.autograd.grad(keypointops.window_graph_conv(x, adj, 3, backend="cpu"), (x, adj), grad)
        return forward, forward_backward

    for float32_fn, bfloat16_fn in zip(passes(torch.float32), passes(torch.bfloat16)):
        (float32_time, bfloat16_time), rounds = best_cpu_times([float32_fn, bfloat16_fn])
        assert bfloat16_time < 1.2 * float32_time, f"{bfloat16_fn.__name__}: {rounds}"


needs_ops = pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C not built")


@needs_ops
@pytest.mark.parametrize("gemm_route", ["library"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
@pytest.mark.parametrize("window,dilation,stride,frames,nodes,channels,scales",
                         [case[:2] + (1,) + case[2:] + (1,) for case in CASES] + STRIDED_CASES)
def test_library_route_matches_reference(gemm_route, dtype, adj_kind, window, dilation, stride, frames,
                                         nodes, channels, scales):
    """The CPU kernel on PyTorch's GEMMs (float32 / float64 with dilation 1; dilation 2 keeps the
    loops) against the reference, edge windows, strides, even windows and stacked scales included."""
    x, adj = make_inputs(3, frames, nodes, channels, window, adj_kind, dtype=dtype, seed=21,
                         requires_grad=True, dilation=dilation, stride=stride, scales=scales)
    check_against(
        lambda x, a: keypointops.window_graph_conv(x, a, window, dilation=dilation, stride=stride, backend="cpu"),
        lambda x, a: reference.window_graph_conv(x, a, window, dilation=dilation, stride=stride), x, adj, dtype)


@needs_ops
@pytest.mark.parametrize("gemm_route", ["library"], indirect=True)
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
def test_library_route_gradcheck_and_determinism(gemm_route, adj_kind):
    for window, stride, scales in ((3, 1, 1), (4, 2, 2), (5, 1, 1)):
        x, adj = make_inputs(2, 5, 2, 3, window, adj_kind, dtype=torch.float64, seed=3, requires_grad=True,
                             stride=stride, scales=scales)
        assert torch.autograd.gradcheck(
            lambda x, adj: keypointops.window_graph_conv(x, adj, window, stride=stride, backend="cpu"), (x, adj))
    x, adj = make_inputs(6, 12, 5, 33, 3, adj_kind, seed=5, requires_grad=True)
    out = keypointops.window_graph_conv(x, adj, 3, backend="cpu")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    first = torch.autograd.grad(out, (x, adj), grad, retain_graph=True)
    second = torch.autograd.grad(out, (x, adj), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_ops
@pytest.mark.parametrize("gemm_route", ["library"], indirect=True)
@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 0, 3, 5), (2, 4, 3, 0), (2, 4, 0, 5), (2, 1, 3, 5)])
@pytest.mark.parametrize("adj_dims", [2, 3, 4])
def test_library_route_empty_and_short_inputs(gemm_route, shape, adj_dims):
    x = torch.randn(shape, requires_grad=True)
    size = 5 * shape[2]
    windows = window_graph_conv_output_length(shape[1], 5, 1, 1)
    adj = torch.randn((shape[0], windows)[:adj_dims - 2] + (size, size), requires_grad=True)
    out = keypointops.window_graph_conv(x, adj, 5, backend="cpu")
    expected = reference.window_graph_conv(x, adj, 5)
    torch.testing.assert_close(out, expected, **tolerances(torch.float32))
    got = torch.autograd.grad(out.sum(), (x, adj))
    want = torch.autograd.grad(expected.sum(), (x, adj))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **GRAD_TOL[torch.float32])


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_non_contiguous_inputs(device, backend):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 5, 3, generator=gen).to(device).transpose(1, 3)    # [2, 3, 5, 6] strided
    adj = torch.randn(15, 15, generator=gen).to(device).t()
    torch.testing.assert_close(keypointops.window_graph_conv(x, adj, 3, backend=backend),
                               reference.window_graph_conv(x, adj, 3))
    adj_expanded = torch.randn(15, 15, generator=gen).to(device).expand(2, 15, 15)
    torch.testing.assert_close(keypointops.window_graph_conv(x, adj_expanded, 3, backend=backend),
                               reference.window_graph_conv(x, adj_expanded, 3))


@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("shape", [(0, 4, 3, 5), (2, 0, 3, 5), (2, 4, 3, 0), (2, 4, 0, 5)])
@pytest.mark.parametrize("adj_dims", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_inputs(device, backend, shape, adj_dims, dtype):
    """Zero-sized dimensions give empty results and zero adjacency gradients of adj's shape (a
    [B, L, L] adjacency with no frame included)."""
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    size = 3 * shape[2]
    adj = torch.randn(shape[:adj_dims - 2] + (size, size), device=device, dtype=dtype, requires_grad=True)
    out = keypointops.window_graph_conv(x, adj, 3, backend=backend)
    assert out.shape == (shape[0], shape[1], size, shape[3])
    gx, gadj = torch.autograd.grad(out.sum(), (x, adj), allow_unused=True)
    assert gx.shape == x.shape and gadj.shape == adj.shape
    assert (gadj == 0).all()


def _op_samples(device):
    samples = []
    for adj_kind, window, dilation, stride, scales in (("shared", 3, 1, 1, 1), ("per_sample", 3, 2, 1, 1),
                                                       ("per_window", 3, 1, 1, 1), ("shared", 4, 1, 2, 2),
                                                       ("per_window", 3, 2, 2, 3)):
        x, adj = make_inputs(2, 5, 3, 4, window, adj_kind, dtype=torch.float64, device=device, seed=8,
                             requires_grad=True, dilation=dilation, stride=stride, scales=scales)
        samples.append((x, adj, window, dilation, stride))
    return samples


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_opcheck(device, backend):
    if backend == "triton":
        from keypointops.triton import window_graph_conv as triton_window_graph_conv
        op = triton_window_graph_conv.window_graph_conv_triton
    else:
        op = torch.ops.keypointops.window_graph_conv.default
    for args in _op_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device,backend", device_backend_params())
def test_torch_compile_fullgraph(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not trace Triton kernels in the interpreter on CPU tensors")
    x, adj = make_inputs(2, 5, 3, 8, 3, "per_sample", device=device, seed=9, requires_grad=True)

    def layer(x, adj):
        return keypointops.window_graph_conv(x, adj.softmax(-1), 3, dilation=2, backend=backend).relu().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(x, adj)
    torch.testing.assert_close(got, layer(x, adj))
    for g, w in zip(torch.autograd.grad(got, (x, adj)), torch.autograd.grad(layer(x, adj), (x, adj))):
        torch.testing.assert_close(g, w)


# --- bad input ----------------------------------------------------------------------------------

def test_bad_input_raises_naming_the_argument():
    x = torch.randn(2, 5, 4, 3)
    adj = torch.randn(12, 12)
    with pytest.raises(ValueError, match=r"adj must be \[R, L\].*L = window \* N = 3 \* 4 = 12"):
        keypointops.window_graph_conv(x, torch.randn(10, 10), 3)
    with pytest.raises(ValueError, match=r"adj must be \[R, L\].*R = S \* L"):
        keypointops.window_graph_conv(x, torch.randn(18, 12), 3)
    with pytest.raises(ValueError, match=r"adj must be \[R, L\].*got shape \[12, 24\]"):
        keypointops.window_graph_conv(x, torch.randn(12, 24), 3)
    with pytest.raises(ValueError, match="window must be >= 1"):
        keypointops.window_graph_conv(x, adj, 0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        keypointops.window_graph_conv(x, adj, 3, stride=0)
    with pytest.raises(TypeError, match="stride must be an int"):
        keypointops.window_graph_conv(x, adj, 3, stride=2.0)
    with pytest.raises(TypeError, match="window must be an int"):
        keypointops.window_graph_conv(x, adj, 3.0)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        keypointops.window_graph_conv(x, adj, 3, dilation=0)
    with pytest.raises(ValueError, match="adj holds 3 samples .* but x holds B = 2"):
        keypointops.window_graph_conv(x, torch.randn(3, 12, 12), 3)
    with pytest.raises(ValueError, match="adj holds 4 windows per sample .* but x's T = 5 frames make T' = 5"):
        keypointops.window_graph_conv(x, torch.randn(2, 4, 12, 12), 3)
    with pytest.raises(ValueError, match="adj holds 5 windows per sample .* make T' = 3 windows"):
        keypointops.window_graph_conv(x, torch.randn(2, 5, 12, 12), 3, stride=2)
    with pytest.raises(ValueError, match=r"x must be \[B, T, N, C\]"):
        keypointops.window_graph_conv(torch.randn(5, 4, 3), adj, 3)
    with pytest.raises(ValueError, match="adj .* must have the dtype of x"):
        keypointops.window_graph_conv(x, adj.double(), 3)
    with pytest.raises(ValueError, match="x must be float32, float64"):
        keypointops.window_graph_conv(x.long(), adj.long(), 3)
    with pytest.raises(TypeError, match="adj must be a Tensor"):
        keypointops.window_graph_conv(x, adj.tolist(), 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        keypointops.window_graph_conv(x, adj, 3, backend="gpu")


@pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C not built")
def test_compiled_op_checks_its_arguments_itself():
    """Called directly (no Python checks), the C++ kernels still refuse bad shapes."""
    op = torch.ops.keypointops.window_graph_conv
    x = torch.randn(2, 5, 4, 3)
    with pytest.raises(RuntimeError, match="adj must be .* L = window \\* N = 12"):
        op(x, torch.randn(10, 10), 3, 1, 1)
    with pytest.raises(RuntimeError, match="adj must be .* R = S \\* L"):
        op(x, torch.randn(18, 12), 3, 1, 1)
    with pytest.raises(RuntimeError, match="window must be positive"):
        op(x, torch.randn(0, 0), 0, 1, 1)
    with pytest.raises(RuntimeError, match="stride must be positive"):
        op(x, torch.randn(12, 12), 3, 1, 0)
    with pytest.raises(RuntimeError, match="adj holds 3 samples but x holds B = 2"):
        op(x, torch.randn(3, 12, 12), 3, 1, 1)
    with pytest.raises(RuntimeError, match="adj holds 4 windows per sample but x's T = 5 frames make T' = 5"):
        op(x, torch.randn(2, 4, 12, 12), 3, 1, 1)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.keypointops.window_graph_conv_backward(torch.randn(2, 5, 12, 4), x,
                                                         torch.randn(12, 12), 3, 1, 1, True, True)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[B, T', R, C\] = \[2, 3, 24, 3\]"):
        torch.ops.keypointops.window_graph_conv_backward(torch.randn(2, 5, 24, 3), x,
                                                         torch.randn(24, 12), 3, 1, 2, True, True)


def test_device_mismatch_raises():
    other = "cuda" if torch.cuda.is_available() else "meta"
    with pytest.raises(ValueError, match=r"x \(cpu\) and adj \(.*\) must be on the same device"):
        keypointops.window_graph_conv(torch.randn(2, 5, 4, 3), torch.randn(12, 12, device=other), 3)


# --- graphs.normalize_adjacency, graphs.block_adjacency -------------------------------------------

def test_normalize_adjacency():
    gen = torch.Generator().manual_seed(10)
    adj = torch.rand(3, 6, 6, generator=gen, dtype=torch.float64)
    for add_self_loops in (True, False):
        a = adj + torch.eye(6, dtype=torch.float64) if add_self_loops else adj
        degree = a.sum(-1)
        expected = torch.diag_embed(degree.rsqrt()) @ a @ torch.diag_embed(degree.rsqrt())
        torch.testing.assert_close(normalize_adjacency(adj, add_self_loops), expected)
    torch.testing.assert_close(normalize_adjacency(adj[0]), normalize_adjacency(adj)[0])


def test_normalize_adjacency_zero_degree_gives_zero_and_finite_gradient():
    adj = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], requires_grad=True)
    norm = normalize_adjacency(adj)                  # node 2: degree 1 + (-1) = 0
    assert (norm[2] == 0).all() and (norm[:, 2] == 0).all()
    torch.testing.assert_close(norm[:2, :2], torch.full((2, 2), 0.5))
    (grad,) = torch.autograd.grad(norm.sum(), adj)
    assert torch.isfinite(grad).all()
    isolated = normalize_adjacency(torch.zeros(4, 4), add_self_loops=False)
    assert (isolated == 0).all()


def test_block_adjacency_is_msg3d_tiling():
    joints = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    block = block_adjacency(joints, 3)
    assert block.shape == (9, 9)
    with_loops = joints + torch.eye(3)
    for w in range(3):
        for v in range(3):
            torch.testing.assert_close(block[3 * w:3 * w + 3, 3 * v:3 * v + 3], with_loops)
    batched = block_adjacency(torch.stack([joints, 2 * joints]), 2)
    torch.testing.assert_close(batched[1], block_adjacency(2 * joints, 2))
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        block_adjacency(joints, 0)
    with pytest.raises(ValueError, match=r"adj must be \[..., N, N\]"):
        block_adjacency(torch.ones(2, 3), 3)


def test_block_adjacency_window_graph_conv_links_a_joint_across_frames():
    """Joint n of frame t receives joint n of frames t - 1 and t + 1 through the identity blocks."""
    adj = normalize_adjacency(block_adjacency(torch.zeros(2, 2), 3), add_self_loops=False)
    x = torch.zeros(1, 3, 2, 1)
    x[0, 0, 1, 0] = 1.0                                          # joint 1 of frame 0
    out = keypointops.window_graph_conv(x, adj, 3)               # [1, 3, 6, 1]
    received = out[0, :, :, 0].view(3, 3, 2).sum(1)              # per (window, joint)
    torch.testing.assert_close(received, torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]))


# --- nn.WindowGraphConv3D -------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", device_backend_params())
@pytest.mark.parametrize("context", [None, "window", "sample"])
def test_window_graph_conv_3d_matches_reference_backend(device, backend, context):
    torch.manual_seed(11)
    options = dict(context=context, frames=4, residual=False)
    layer = WindowGraphConv3D(6, 10, "coco17", 3, backend=backend, **options).to(device).double()
    twin = WindowGraphConv3D(6, 10, "coco17", 3, backend="reference", **options).to(device).double()
    with torch.no_grad():
        layer.learned.normal_(0, 0.1)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 17, 6, dtype=torch.float64, device=device)
    out = layer(x)
    expected = twin(x)
    assert out.shape == (2, 4, 17, 10)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
    want = torch.autograd.grad(expected.square().sum(), list(twin.parameters()))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)


def test_window_graph_conv_3d_options_and_errors():
    x = torch.randn(2, 5, 4, 8)
    ring = torch.roll(torch.eye(4), 1, 0) + torch.roll(torch.eye(4), -1, 0)
    same = WindowGraphConv3D(8, 8, ring, 5, dilation=2, residual=True)
    assert same(x).shape == (2, 5, 4, 8)
    plain = WindowGraphConv3D(8, 3, ring, 1, residual=False)
    assert plain(x).shape == (2, 5, 4, 3)
    assert (plain(x) >= 0).all()
    # A zero learned part: the adjacency is the normalised physical graph (tiled A + I, plus I).
    torch.testing.assert_close(same.adjacency(), normalize_adjacency(block_adjacency(ring, 5)))
    fixed = WindowGraphConv3D(8, 8, ring, 5, learned=False)
    assert fixed.learned is None and fixed.adjacency() is fixed.physical   # normalised once, in __init__
    torch.testing.assert_close(fixed.adjacency(), same.adjacency())
    with_context = WindowGraphConv3D(8, 8, ring, 5, context="window", frames=5)
    assert with_context.adjacency(x).shape == (2, 5, 20, 20)
    with pytest.raises(ValueError, match="window must be a positive odd int"):
        WindowGraphConv3D(8, 8, ring, 4)
    with pytest.raises(ValueError, match="context must be one of"):
        WindowGraphConv3D(8, 8, ring, 3, context="frame")
    with pytest.raises(ValueError, match="residual needs in_channels == out_channels"):
        WindowGraphConv3D(8, 3, ring, 3, residual=True)
    with pytest.raises(ValueError, match="collapse must be True, or False with window 1"):
        WindowGraphConv3D(8, 8, ring, 3, collapse=False)
    frame_level = WindowGraphConv3D(8, 8, ring, 1, collapse=False)
    assert frame_level.collapse is None and frame_level(x).shape == (2, 5, 4, 8)
    torch.testing.assert_close(frame_level.adjacency(), normalize_adjacency(ring))   # A_p + I, one self loop
    with pytest.raises(ValueError, match="frames must be a positive int"):
        WindowGraphConv3D(8, 8, ring, 3, context="sample")
    with pytest.raises(ValueError, match="built for frames = 5"):
        with_context(torch.randn(2, 4, 4, 8))
    with pytest.raises(ValueError, match=r"x must be \[B, T, N, C\] with N = 4"):
        same(torch.randn(2, 5, 3, 8))


# --- nn.MSG3DWindow against MS-G3D's own forward -------------------------------------------------

def msg3d_scales(a_binary, num_scales, window, disentangled):
    """MS-G3D's ``A_scales``, its way: ``A_large = tile(A + I)``, then per scale ``k`` its
    ``k_adjacency`` (``min((A + I)^k, 1) - min((A + I)^(k-1), 1) + I``) normalised, or the ``k``-th
    matrix power of the normalised ``A_large``; stacked ``[S * L, L]``."""
    def normalise(a):
        inv_sqrt = a.sum(-1).pow(-0.5)
        return torch.diag(inv_sqrt) @ a @ torch.diag(inv_sqrt)

    a_large = (a_binary + torch.eye(len(a_binary), dtype=a_binary.dtype)).repeat(window, window)
    eye = torch.eye(len(a_large), dtype=a_large.dtype)
    if not disentangled:
        return torch.cat([torch.linalg.matrix_power(normalise(a_large), k) for k in range(num_scales)])
    scales = []
    for k in range(num_scales):
        if k == 0:
            scales.append(eye)
            continue
        power = torch.linalg.matrix_power(a_large + eye, k).clamp(max=1)
        previous = torch.linalg.matrix_power(a_large + eye, k - 1).clamp(max=1)
        scales.append(normalise(power - previous + eye))
    return torch.cat(scales)


def msg3d_forward(state, x, a_binary, num_scales, window, stride, dilation, disentangled, residual,
                  training):
    """MS-G3D's ``UnfoldTemporalWindows`` + ``SpatialTemporal_MS_GCN.forward`` in plain PyTorch
    (unfold, einsum, view / permute, 1x1 conv, BatchNorm, residual, ReLU) on an MS-G3D state dict."""
    batch, channels, frames, nodes = x.shape
    conv = "mlp.layers.1" if "mlp.layers.2.weight" in state else "mlp.layers.0"
    norm = "mlp.layers.2" if conv == "mlp.layers.1" else "mlp.layers.1"
    padding = (window + (window - 1) * (dilation - 1) - 1) // 2
    unfold = torch.nn.Unfold((window, 1), dilation=(dilation, 1), stride=(stride, 1), padding=(padding, 0))
    xu = unfold(x).view(batch, channels, window, -1, nodes).permute(0, 1, 3, 2, 4).contiguous()
    xu = xu.view(batch, channels, -1, window * nodes)                              # [N, C, T', L]
    a = msg3d_scales(a_binary, num_scales, window, disentangled).to(x.dtype) + state.get("A_res", 0)
    agg = torch.einsum("vu,nctu->nctv", a, xu)
    agg = agg.view(batch, channels, -1, num_scales, window * nodes).permute(0, 3, 1, 2, 4).contiguous()
    agg = agg.view(batch, num_scales * channels, -1, window * nodes)

    def conv_bn(h, conv, norm):
        h = torch.nn.functional.conv2d(h, state[f"{conv}.weight"], state[f"{conv}.bias"])
        return torch.nn.functional.batch_norm(h, state[f"{norm}.running_mean"].clone(),
                                              state[f"{norm}.running_var"].clone(), state[f"{norm}.weight"],
                                              state[f"{norm}.bias"], training=training)

    out = conv_bn(agg, conv, norm)
    if residual == "projection":
        out = out + conv_bn(xu, "residual.layers.0", "residual.layers.1")
    elif residual == "identity":
        out = out + xu
    return out.relu()


def msg3d_state_dict(in_channels, out_channels, num_scales, size, *, dropout, residual, seed):
    """A random state dict with the names and shapes of MS-G3D's ``SpatialTemporal_MS_GCN``."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, low=-1.0, high=1.0):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low)

    def conv_bn(prefix, first, c_in, c_out):
        return {f"{prefix}.layers.{first}.weight": rand(c_out, c_in, 1, 1) / c_in ** 0.5,
                f"{prefix}.layers.{first}.bias": rand(c_out),
                f"{prefix}.layers.{first + 1}.weight": rand(c_out, low=0.5, high=1.5),
                f"{prefix}.layers.{first + 1}.bias": rand(c_out),
                f"{prefix}.layers.{first + 1}.running_mean": rand(c_out),
                f"{prefix}.layers.{first + 1}.running_var": rand(c_out, low=0.5, high=2.0),
                f"{prefix}.layers.{first + 1}.num_batches_tracked": torch.tensor(7)}

    state = {"A_res": rand(num_scales * size, size) * 0.1}
    state.update(conv_bn("mlp", 1 if dropout else 0, in_channels * num_scales, out_channels))
    if residual == "projection":
        state.update(conv_bn("residual", 0, in_channels, out_channels))
    return state


# (in, out, window, stride, dilation, scales, disentangled, residual, dropout): MS-G3D's G3D blocks
# (window 3, stride 1 and 2, 6 scales at full size), even windows, dilation, both aggregations,
# both residuals, the Dropout that shifts the parameter names.
MSG3D_CASES = [
    (3, 5, 3, 1, 1, 3, True, None, 0.0),
    (4, 6, 3, 2, 1, 2, True, None, 0.0),
    (4, 4, 4, 2, 1, 2, False, "identity", 0.0),
    (3, 5, 5, 2, 2, 2, True, "projection", 0.3),
]


@pytest.mark.parametrize("device,backend", device_backend_params() + [("cpu", "reference")])
@pytest.mark.parametrize("c_in,c_out,window,stride,dilation,scales,disentangled,residual,dropout", MSG3D_CASES)
def test_msg3d_window_loads_msg3d_state_dict_and_matches_its_forward(
        device, backend, c_in, c_out, window, stride, dilation, scales, disentangled, residual, dropout):
    ring = torch.roll(torch.eye(5, dtype=torch.float64), 1, 0) + torch.roll(torch.eye(5, dtype=torch.float64), -1, 0)
    ring[0, 2] = ring[2, 0] = 1.0
    state = msg3d_state_dict(c_in, c_out, scales, window * 5, dropout=dropout, residual=residual, seed=16)
    layer = MSG3DWindow(c_in, c_out, ring, scales, window, stride, dilation, disentangled_agg=disentangled,
                        residual=residual is not None, dropout=dropout, backend=backend).double()
    layer.load_state_dict(state, strict=True)
    assert set(layer.state_dict()) == set(state)
    layer.to(device).eval()
    x = torch.randn(2, c_in, 7, 5, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    state = {k: v.to(device) for k, v in state.items()}
    x = x.to(device).requires_grad_()
    out = layer(x)
    expected = msg3d_forward(state, x, ring.to(device), scales, window, stride, dilation, disentangled,
                             residual, training=False)
    assert out.shape == (2, c_out, window_graph_conv_output_length(7, window, dilation, stride), window * 5)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)   # MS-G3D's A_scales in float32
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(18), dtype=torch.float64).to(device)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               rtol=1e-6, atol=1e-6)


def test_msg3d_window_trains_like_msg3d():
    """Training mode (BatchNorm on batch statistics): output and the gradients of every parameter
    (A_res, the projection, BatchNorm) equal those of MS-G3D's forward on the same state."""
    ring = torch.roll(torch.eye(4, dtype=torch.float64), 1, 0) + torch.roll(torch.eye(4, dtype=torch.float64), -1, 0)
    state = msg3d_state_dict(3, 5, 2, 16, dropout=0.0, residual=None, seed=19)
    layer = MSG3DWindow(3, 5, ring, 2, 4, 2).double()
    layer.load_state_dict(state)
    params = {k: v.clone().requires_grad_(v.is_floating_point() and "running" not in k) for k, v in state.items()}
    x = torch.randn(3, 3, 9, 4, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    out = layer(x)
    expected = msg3d_forward(params, x, ring, 2, 4, 2, 1, True, None, training=True)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    names = [k for k, v in params.items() if v.requires_grad]
    got = dict(zip(names, torch.autograd.grad(out, [dict(layer.named_parameters())[k] for k in names], grad)))
    want = dict(zip(names, torch.autograd.grad(expected, [params[k] for k in names], grad)))
    for name in names:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=name)


def test_multiscale_adjacency_is_msg3d_a_scales():
    joints = skeleton("coco17").adjacency().double()
    for disentangled in (True, False):
        for window in (1, 3, 4):
            torch.testing.assert_close(multiscale_adjacency(block_adjacency(joints, window), 4,
                                                            disentangled=disentangled),
                                       msg3d_scales(joints, 4, window, disentangled))
    with pytest.raises(ValueError, match="num_scales must be an int >= 1"):
        multiscale_adjacency(torch.eye(3), 0)
    with pytest.raises(ValueError, match=r"adj must be \[L, L\]"):
        multiscale_adjacency(torch.eye(3).expand(2, 3, 3), 2)


def test_msg3d_window_errors():
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        MSG3DWindow(3, 4, "coco17", 2, 0)
    with pytest.raises(ValueError, match="activation must be one of"):
        MSG3DWindow(3, 4, "coco17", 2, 3, activation="gelu")
    layer = MSG3DWindow(3, 4, "coco17", 2, 3, use_Ares=False)
    assert "A_res" not in layer.state_dict() and "A_scales" not in layer.state_dict()
    with pytest.raises(ValueError, match=r"x must be \[B, C_in, T, V\] with C_in = 3 and V = 17"):
        layer(torch.randn(2, 3, 5, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_policy(dtype):
    """Under autocast adj follows reduced-precision x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 5, generator=g)
    check_autocast_policy(keypointops.window_graph_conv, x, dict(adj=torch.rand(9, 9, generator=g)), ("adj",),
                          window=3, dtype=dtype, uses_dot=True)
