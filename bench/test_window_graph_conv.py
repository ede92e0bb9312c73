"""window_graph_conv against MS-G3D's unfold + einsum (the baseline) and the reference.

Cases: (a) CTL: 32 clips x 6 frames x 17 COCO joints, C=2048, window 3; (b) skeleton-action sized:
64 clips x 16 frames x 25 joints, C=256, window 5.  Each with a shared [L, L] adjacency and with a
per-sample [B, L, L] one.  The baseline runs in MS-G3D's own layout: its input is given contiguous
as [B, C, T, V] and its output stays [B, C, T, L] (no layout conversion is timed against it).
"""
import pytest
import torch

import keypointops
from keypointops._opdefs.backend import triton_available

from conftest import SMALL, timed_pass

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = {
    "ctl": dict(batch=2 if SMALL else 32, frames=6, nodes=17, channels=64 if SMALL else 2048, window=3),
    "skeleton": dict(batch=2 if SMALL else 64, frames=6 if SMALL else 16, nodes=25, channels=32 if SMALL else 256,
                     window=5),
}
ADJ_KINDS = ["shared", "per_sample"]
IMPLS = ["keypointops", "triton", "reference", "unfold_einsum"]


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


def make_fn(impl, x, adj, window, backward):
    adj = adj.detach().requires_grad_(backward)
    if impl == "unfold_einsum":
        x = x.permute(0, 3, 1, 2).contiguous().requires_grad_(backward)  # MS-G3D's layout

        def forward():
            return unfold_einsum(x, adj, window)
    else:
        x = x.detach().requires_grad_(backward)
        backend = {"keypointops": "auto", "triton": "triton", "reference": "reference"}[impl]

        def forward():
            return keypointops.window_graph_conv(x, adj, window, backend=backend)

    return timed_pass(forward, [x, adj], backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("adj_kind", ADJ_KINDS)
@pytest.mark.parametrize("case", list(CASES))
def test_window_graph_conv(measure, case, adj_kind, impl, backward, device):
    if impl == "triton" and (not triton_available(torch.device(device)) or (device == "cpu" and not SMALL)):
        pytest.skip("Triton runs on GPU (on CPU only interpreted, as a small smoke run)")
    x, adj, window = make_case(case, adj_kind, device)
    fn = make_fn(impl, x, adj, window, backward)
    measure(fn, group=f"window_graph_conv {case} {adj_kind} {'fwd+bwd' if backward else 'fwd'} {device}",
            impl=impl, device=device, baseline=impl == "unfold_einsum")
