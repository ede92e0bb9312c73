"""window_graph_conv against MS-G3D's unfold + einsum (the baseline) and the reference.

Cases: (a) CTL: 32 clips x 6 frames x 17 COCO joints, C=2048, window 3; (b) skeleton-action sized:
64 clips x 16 frames x 25 joints, C=256, window 5.  Each with a shared [L, L] adjacency and with a
per-sample [B, L, L] one.  The baseline runs in MS-G3D's own layout: its input is given contiguous
as [B, C, T, V] and its output stays [B, C, T, L] (no layout conversion is timed against it).

MS-G3D (test_window_graph_conv_msg3d): its G3D pathway of the second block on NTU-sized input,
T = 300 frames of 25 joints, C = 96, window 3, temporal stride 2, 6 stacked scales ([6 L, L]),
64 sequences (MS-G3D's 32 clips x 2 persons; the baseline's [B, 6 C, T', L] aggregate and its
gradients take a few GiB).  The
baseline is MS-G3D's code path: UnfoldTemporalWindows with stride 2, the einsum with A_large, the
view / permute of the scales into channels ([B, 6 C, T', L], what its 1x1 conv reads).  The op
returns [B, T', 6 L, C] with the adjacency rows scale-minor, i.e. [B, T', L, 6 C]: the same
aggregate, laid out for the 1x1 projection as a matrix product (nn.MSG3DWindow).
"keypointops-stride1-slice" is the workaround without a stride: every window, then every other.

"keypointops" runs the CPU kernel's GEMM route that ``keypointops.cpu_gemm_route()`` chose for this
machine; "keypointops-gemm-library" / "keypointops-gemm-own" time the other route in the same group
(PyTorch's GEMMs or the kernel's own loops; the one equal to the chosen route is skipped), so that a
table shows both on every CPU.
"""
import pytest
import torch

import keypointops
from keypointops._opdefs.backend import triton_available

import floors
from conftest import SMALL, timed_pass

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = {
    "ctl": dict(batch=2 if SMALL else 32, frames=6, nodes=17, channels=64 if SMALL else 2048, window=3),
    "skeleton": dict(batch=2 if SMALL else 64, frames=6 if SMALL else 16, nodes=25, channels=32 if SMALL else 256,
                     window=5),
}
ADJ_KINDS = ["shared", "per_sample"]
# The CPU kernel's GEMM routes (keypointops.cpu_gemm_route), as impls that force one of them.
ROUTE_IMPLS = {"keypointops-gemm-library": "library", "keypointops-gemm-own": "own"}
IMPLS = ["keypointops", *ROUTE_IMPLS, "triton", "reference", "unfold_einsum"]


def skip_unless_runs(impl, device):
    """Skips an impl this machine and device do not time: Triton off GPU (except the small smoke
    run), and a forced GEMM route on CUDA or where it is the route "keypointops" already runs."""
    if impl == "triton" and (not triton_available(torch.device(device)) or (device == "cpu" and not SMALL)):
        pytest.skip("Triton runs on GPU (on CPU only interpreted, as a small smoke run)")
    if impl in ROUTE_IMPLS:
        if device != "cpu" or not keypointops.has_ops():
            pytest.skip("the GEMM route is the CPU kernel's")
        if ROUTE_IMPLS[impl] == keypointops.cpu_gemm_route():
            pytest.skip(f"the {ROUTE_IMPLS[impl]} route is this machine's choice: the 'keypointops' row")


def on_gemm_route(fn, impl):
    """``fn`` run with the CPU kernel's GEMM route forced to ``impl``'s (restored after every call,
    so that interleaved rounds of the other impls keep theirs); other impls: ``fn`` itself."""
    if impl not in ROUTE_IMPLS:
        return fn

    def run():
        before = keypointops.cpu_gemm_route()
        torch.ops.keypointops._set_cpu_gemm_route(ROUTE_IMPLS[impl])
        try:
            return fn()
        finally:
            torch.ops.keypointops._set_cpu_gemm_route(before)
    return run


def make_case(case, adj_kind, device):
    p = CASES[case]
    gen = torch.Generator().manual_seed(0)
    size = p["window"] * p["nodes"]
    x = torch.randn(p["batch"], p["frames"], p["nodes"], p["channels"], generator=gen)
    adj_shape = (size, size) if adj_kind == "shared" else (p["batch"], size, size)
    adj = torch.rand(adj_shape, generator=gen) / size
    return x.to(device), adj.to(device), p["window"]


def unfold_einsum(x_nctv, adj, window):
    """MS-G3D's UnfoldTemporalWindows + SpatialTemporal_MS_GCN aggregation: [B, C, T, V] -> [B, C, T, L]."""
    batch, channels, _, nodes = x_nctv.shape
    unfold = torch.nn.Unfold(kernel_size=(window, 1), padding=((window - 1) // 2, 0))
    windows = unfold(x_nctv).view(batch, channels, window, -1, nodes).permute(0, 1, 3, 2, 4)
    windows = windows.contiguous().view(batch, channels, -1, window * nodes)
    return torch.einsum("vu,nctu->nctv" if adj.dim() == 2 else "nvu,nctu->nctv", adj, windows)


MSG3D = dict(batch=1 if SMALL else 64, frames=7 if SMALL else 300, nodes=25, channels=8 if SMALL else 96,
             window=3, stride=2, scales=2 if SMALL else 6)
MSG3D_IMPLS = ["keypointops", *ROUTE_IMPLS, "keypointops-stride1-slice", "triton", "unfold_einsum"]


def msg3d_aggregate(x_nctv, a_large, window, stride, scales):
    """MS-G3D's UnfoldTemporalWindows(window, stride) + SpatialTemporal_MS_GCN's aggregation with
    A_large [S * L, L], scales moved into the channels: [B, C, T, V] -> [B, S * C, T', L]."""
    batch, channels, _, nodes = x_nctv.shape
    size = window * nodes
    unfold = torch.nn.Unfold(kernel_size=(window, 1), stride=(stride, 1), padding=((window - 1) // 2, 0))
    windows = unfold(x_nctv).view(batch, channels, window, -1, nodes).permute(0, 1, 3, 2, 4)
    windows = windows.contiguous().view(batch, channels, -1, size)
    agg = torch.einsum("vu,nctu->nctv", a_large, windows)
    agg = agg.view(batch, channels, -1, scales, size).permute(0, 3, 1, 2, 4).contiguous()
    return agg.view(batch, scales * channels, -1, size)


def make_msg3d_case(device):
    """x [B, T, V, C], A_large [S L, L] in MS-G3D's row order (scale-major) and the same rows
    scale-minor (v * S + s), for which the op's [B, T', S L, C] output is [B, T', L, S C]."""
    p = MSG3D
    gen = torch.Generator().manual_seed(0)
    size, scales = p["window"] * p["nodes"], p["scales"]
    x = torch.randn(p["batch"], p["frames"], p["nodes"], p["channels"], generator=gen).to(device)
    a_large = (torch.rand(scales * size, size, generator=gen) / size).to(device)
    rows_scale_minor = a_large.view(scales, size, size).transpose(0, 1).reshape(scales * size, size)
    return x, a_large, rows_scale_minor


def make_msg3d_fn(impl, device, backward):
    """(fn, check): the timed pass and, on the first sequence, the aggregate as [B, S * C, T', L]."""
    p = MSG3D
    size, scales = p["window"] * p["nodes"], p["scales"]
    x, a_large, rows_scale_minor = make_msg3d_case(device)
    window, stride = p["window"], p["stride"]
    if impl == "unfold_einsum":
        x_in = x.permute(0, 3, 1, 2).contiguous().requires_grad_(backward)           # MS-G3D's layout
        adj = a_large.clone().requires_grad_(backward)

        def forward(x_in=x_in):
            return msg3d_aggregate(x_in, adj, window, stride, scales)

        def check():
            return forward(x_in[:1].detach())
    else:
        x_in = x.detach().requires_grad_(backward)
        adj = rows_scale_minor.clone().requires_grad_(backward)
        backend = "triton" if impl == "triton" else "auto"

        def forward(x_in=x_in):
            if impl == "keypointops-stride1-slice":
                return keypointops.window_graph_conv(x_in, adj, window, backend=backend)[:, ::stride]
            return keypointops.window_graph_conv(x_in, adj, window, stride=stride, backend=backend)

        def check():
            out = forward(x_in[:1].detach())
            return out.reshape(1, out.size(1), size, -1).permute(0, 3, 1, 2)
    return on_gemm_route(timed_pass(forward, [x_in, adj], backward), impl), on_gemm_route(check, impl)


def make_fn(impl, x, adj, window, backward):
    adj = adj.detach().requires_grad_(backward)
    if impl == "unfold_einsum":
        x = x.permute(0, 3, 1, 2).contiguous().requires_grad_(backward)  # MS-G3D's layout

        def forward():
            return unfold_einsum(x, adj, window)
    else:
        x = x.detach().requires_grad_(backward)
        backend = {"triton": "triton", "reference": "reference"}.get(impl, "auto")

        def forward():
            return keypointops.window_graph_conv(x, adj, window, backend=backend)

    return on_gemm_route(timed_pass(forward, [x, adj], backward), impl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_window_graph_conv(measure, case, adj_kind, impl, backward, device):
    skip_unless_runs(impl, device)
    x, adj, window = make_case(case, adj_kind, device)
    fn = make_fn(impl, x, adj, window, backward)
    work = floors.window_graph_conv(*x.shape, window, adj_kind == "per_sample", backward)
    measure(fn, group=f"window_graph_conv {case} {adj_kind} {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "unfold_einsum", work=work)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", MSG3D_IMPLS)
def test_window_graph_conv_msg3d(measure, impl, backward, device):
    skip_unless_runs(impl, device)
    fn, check = make_msg3d_fn(impl, device, backward)
    with torch.no_grad():
        _, baseline_check = make_msg3d_fn("unfold_einsum", device, False)
        torch.testing.assert_close(check(), baseline_check(), rtol=1e-4, atol=1e-4)
    p = MSG3D
    work = floors.window_graph_conv(p["batch"], p["frames"], p["nodes"], p["channels"], p["window"], False,
                                    backward, stride=p["stride"], scales=p["scales"])
    measure(fn, group=f"window_graph_conv msg3d stride 2 {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "unfold_einsum", work=work)
