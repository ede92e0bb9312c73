"""A small case of one op's CUDA kernels, forward and backward, for compute-sanitizer.

Run: ``compute-sanitizer --tool memcheck --error-exitcode 1 python3 tools/sanitize_case.py OP``
with OP one of keypoint_gather, msg_pass, part_pool, window_graph_conv (``tools/gpu_check.sh``
does).  Set ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation and
an access past its end is caught.  Each case covers the kernels' edge paths at a size where the
sanitizer's slowdown does not matter: odd channel counts, float32 and float16, NCHW and
channels_last, keypoints outside the map, nodes without in-edges, windows cut by the clip ends.
Results are also compared with ``keypointops.reference``.  Exit status 0 when all ran and agreed.
``SANITIZE_CASE_DEVICE=cpu`` runs the same cases on the CPU kernels (float32 only): a check of
this driver on a machine without a GPU.
"""
from __future__ import annotations

import os
import sys

import torch

import keypointops
from keypointops import reference
from keypointops import window_graph_conv_output_length
from keypointops.graphs import Graph

DEVICE = os.environ.get("SANITIZE_CASE_DEVICE", "cuda")
DTYPES = (torch.float32, torch.float16) if DEVICE == "cuda" else (torch.float32,)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2)}


def _check(out, expected, dtype) -> None:
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


def _forward_backward(fn, ref_fn, inputs, dtype) -> None:
    """fn and ref_fn agree in forward and in the gradients of ``inputs``."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().float().requires_grad_() for t in inputs]
    out, expected = fn(*leaves), ref_fn(*ref_leaves)
    _check(out, expected, dtype)
    grad = torch.randn(out.shape, device=DEVICE, dtype=torch.float32)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    for leaf, ref_leaf in zip(leaves, ref_leaves):
        _check(leaf.grad, ref_leaf.grad, dtype)


def keypoint_gather(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    keypoints = torch.rand(3, 9, 2, generator=gen) * torch.tensor([5 * 4.0, 7 * 4.0]) * 1.4 - 4
    keypoints = keypoints.to(DEVICE)
    valid = (torch.rand(3, 9, generator=gen) > 0.2).to(DEVICE)
    for layout in (torch.contiguous_format, torch.channels_last):
        features = torch.randn(3, 37, 7, 5, generator=gen).to(DEVICE, dtype).contiguous(memory_format=layout)
        sizes = (torch.rand(3, 9, 2, generator=gen) * 12).to(DEVICE)
        for roi_size, ratio, aligned, bins in ((1.0, 1, False, None), (0.0, 1, True, None), (6.0, 2, True, None),
                                               (9.0, -1, False, None), (sizes, 2, True, 3), (sizes, -1, False, 2)):
            kwargs = dict(roi_size=roi_size, sampling_ratio=ratio, aligned=aligned, valid=valid, output_size=bins)
            _forward_backward(
                lambda f: keypointops.keypoint_gather(f, keypoints, 0.25, backend=DEVICE, **kwargs),
                lambda f: reference.keypoint_gather(f, keypoints.float(), 0.25, **kwargs), [features], dtype)


def msg_pass(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    graph = Graph.spatial_temporal("coco17", frames=3, batch=2)
    # Plus one isolated node (no in-edges, no out-edges) at the end.
    edge_index = torch.cat([graph.edge_index, torch.tensor([[0], [1]])], 1)
    graph = Graph.from_edge_index(edge_index, graph.num_nodes + 1).to(DEVICE)
    x = torch.randn(graph.num_nodes, 37, generator=gen).to(DEVICE, dtype)
    t = (torch.rand(37, generator=gen) + 0.5).to(DEVICE)
    _forward_backward(lambda x_, t_: keypointops.msg_pass(x_, graph, t_, backend=DEVICE),
                      lambda x_, t_: reference.msg_pass(x_, graph, t_), [x, t], dtype)
    edge_attr = torch.randn(graph.num_edges, 37, generator=gen).to(DEVICE, dtype)   # in edge_index order
    _forward_backward(lambda x_, e_, t_: keypointops.msg_pass(x_, graph, t_, edge_attr=e_, backend=DEVICE),
                      lambda x_, e_, t_: reference.msg_pass(x_, graph, t_, edge_attr=e_), [x, edge_attr, t], dtype)


def part_pool(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for layout in (torch.contiguous_format, torch.channels_last):
        features = torch.randn(2, 37, 9, 5, generator=gen).to(DEVICE, dtype).contiguous(memory_format=layout)
        heatmaps = torch.randn(2, 17, 9, 5, generator=gen).to(DEVICE, dtype)
        groups = torch.rand(5, 17, generator=gen).to(DEVICE, dtype)
        _forward_backward(lambda f, h, g: keypointops.part_pool(f, h, g, temperature=0.7, backend=DEVICE),
                          lambda f, h, g: reference.part_pool(f, h, g, 0.7), [features, heatmaps, groups], dtype)
        _forward_backward(lambda f, h: keypointops.part_pool(f, h, backend=DEVICE),
                          lambda f, h: reference.part_pool(f, h), [features, heatmaps], dtype)


def window_graph_conv(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 37, generator=gen).to(DEVICE, dtype)
    for window, dilation, stride, scales in ((3, 1, 1, 1), (5, 2, 1, 1), (4, 1, 2, 3)):
        size, windows = window * 4, window_graph_conv_output_length(5, window, dilation, stride)
        for shape in ((scales * size, size), (2, scales * size, size), (2, windows, scales * size, size)):
            adj = (torch.randn(shape, generator=gen) / size).to(DEVICE, dtype)
            _forward_backward(
                lambda x_, a: keypointops.window_graph_conv(x_, a, window, dilation=dilation, stride=stride,
                                                            backend=DEVICE),
                lambda x_, a: reference.window_graph_conv(x_, a, window, dilation=dilation, stride=stride),
                [x, adj], dtype)


CASES = {"keypoint_gather": keypoint_gather, "msg_pass": msg_pass, "part_pool": part_pool,
         "window_graph_conv": window_graph_conv}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(CASES)}}}")
    if DEVICE == "cuda" and not keypointops.has_cuda_ops(sys.argv[1]):
        sys.exit(f"{sys.argv[1]}: keypointops._C has no CUDA kernel (build with FORCE_CUDA=1)")
    for dtype in DTYPES:
        CASES[sys.argv[1]](dtype)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print(f"{sys.argv[1]} ({DEVICE}): forward and backward ran and match the reference "
          f"({', '.join(str(d).split('.')[1] for d in DTYPES)})")
