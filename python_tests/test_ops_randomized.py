"""Randomized agreement of every op with ``keypointops.reference`` (``rank_stats`` with a per-query
oracle of torchreid's rules), forward and backward.

Each op runs ``KEYPOINTOPS_RANDOM_CASES`` random cases per backend (default 8, so that the suite stays
small; set it to 1000 or more for the full run) drawn from a fixed seed per op (``KEYPOINTOPS_RANDOM_SEED``,
default 0, shifts every seed: a long campaign with another value draws cases the suite never ran,
and a failure names the seed and case index that reproduce it): random sizes with zero-sized
dimensions, float32 and float64, sharp softmaxes (inverse temperatures up to 1e10, part temperatures
down to 1e-3, heatmaps scaled by 50) and huge values (inputs up to 1e5, keypoints at 1e9 pixels,
float64 inverse temperatures up to 1e30).  The reference runs in float64 on the same values: it is
the ground truth, also for float32 kernels; except for ``keypoint_gather``, whose reference runs in
the case's dtype: its adaptive sampling grid is the ceil of a box size computed in that dtype, a
discontinuity that rounding moves.

Tolerance: outputs ``|got - want| <= tol * max(1, max|want|)`` elementwise, tol = 1e-9 for float64
and 2e-5 for float32.  Gradients are compared where the inputs are moderate (inverse temperature
<= 1000, values <= 1000; beyond, the reference's own logits t * m carry rounding errors of
ulp(t * m), too large for a ground truth of gradients): float64 with the output rule, float32 by the
rule that float32 gradients must be as accurate as plain autograd's float32 gradients of the
reference, ``max|got - want| <= 2 * max|autograd - want| + 1e-5 * max(1, max|want|)``.
"""
import math
import os

import numpy as np
import pytest
import torch

import keypointops
from keypointops import reference
from keypointops import window_graph_conv_output_length
from keypointops.graphs import Graph

from helpers import device_backend_params
from test_evaluation import assert_matches_oracle, torchreid_eval

CASES = int(os.environ.get("KEYPOINTOPS_RANDOM_CASES", "8"))
SEED = int(os.environ.get("KEYPOINTOPS_RANDOM_SEED", "0"))


def case_rng(stream: int) -> np.random.Generator:
    """The generator of one op's cases: its fixed stream shifted by ``KEYPOINTOPS_RANDOM_SEED``."""
    return np.random.default_rng([SEED, stream]) if SEED else np.random.default_rng(stream)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}


class Case:
    """One random case: the op's inputs (float64 values, converted to the case's dtype), keyword
    arguments and whether float32 gradients are checked."""

    def __init__(self, rng: np.random.Generator, name: str):
        self.rng = rng
        self.name = name
        self.dtype = torch.float32 if rng.random() < 0.5 else torch.float64
        self.moderate = True

    def size(self, high: int, zero: float = 0.15) -> int:
        """A size in [1, high], or 0 with probability ``zero``."""
        return 0 if self.rng.random() < zero else int(self.rng.integers(1, high + 1))

    def tensor(self, *shape, scale=1.0) -> torch.Tensor:
        """Standard normal values times ``scale``, rounded to the case's dtype."""
        return torch.from_numpy(self.rng.standard_normal(shape) * scale).to(self.dtype).double()

    def choice(self, values):
        return values[int(self.rng.integers(len(values)))]


def assert_agrees(got: torch.Tensor, want: torch.Tensor, tol: float, what: str, case: Case, slack: float = 0.0):
    """``|got - want| <= slack + tol * max(1, max|want|)`` elementwise, and the same finiteness."""
    assert got.shape == want.shape, f"{case.name}: {what} shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    finite, finite_wanted = bool(torch.isfinite(got).all()), bool(torch.isfinite(want).all())
    assert finite == finite_wanted, f"{case.name}: {what} finite: {finite}, reference: {finite_wanted}"
    if want.numel() == 0:
        return
    bound = slack + tol * max(1.0, float(want.abs().max()))
    error = float((got - want).abs().max())
    assert error <= bound, f"{case.name}: {what} differs by {error:.3g} > {bound:.3g}"


def check_op(case: Case, kernel, ref, inputs: list, grad_inputs: list):
    """Forward of ``kernel`` on the inputs in the case's dtype against ``ref`` in float64; backward
    with one random grad_out for the inputs flagged in ``grad_inputs`` (float32: against the float64
    reference, allowing twice the error of ``ref``'s own float32 autograd)."""
    def leaves(dtype):
        return [i.to(dtype).requires_grad_(g) if isinstance(i, torch.Tensor) else i
                for i, g in zip(inputs, grad_inputs)]

    def gradients(output, leaves, grad_out):
        wanted = [i for i, g in zip(leaves, grad_inputs) if g]
        grads = torch.autograd.grad(output, wanted, grad_out.to(output.dtype), allow_unused=True)
        return [torch.zeros_like(i) if g is None else g for i, g in zip(wanted, grads)]

    typed, exact = leaves(case.dtype), [i.to(case.dtype).double() if isinstance(i, torch.Tensor) else i
                                       for i in inputs]
    exact = [i.requires_grad_(g) if isinstance(i, torch.Tensor) else i for i, g in zip(exact, grad_inputs)]
    got, want = kernel(*typed), ref(*exact)
    assert got.dtype == case.dtype
    assert_agrees(got, want, TOLERANCE[case.dtype], "output", case)
    if not any(grad_inputs) or not case.moderate:
        return
    grad_out = case.tensor(*want.shape)
    expected = gradients(want, exact, grad_out)
    autograd = [None] * len(expected)
    if case.dtype == torch.float32:
        plain = leaves(torch.float32)
        autograd = gradients(ref(*plain), plain, grad_out)
    for k, (g, e, a) in enumerate(zip(gradients(got, typed, grad_out), expected, autograd)):
        slack = 0.0 if a is None or not a.numel() else 2 * float((a.double() - e).abs().max())
        assert_agrees(g, e, TOLERANCE[case.dtype] if a is None else 1e-5, f"gradient {k}", case, slack)


def msg_pass_case(case: Case, backend: str):
    num_nodes, channels = case.size(12), case.size(6)
    num_edges = int(case.rng.integers(0, 4 * num_nodes + 1)) if num_nodes else 0
    edge_index = torch.from_numpy(case.rng.integers(0, max(num_nodes, 1), (2, num_edges)))
    graph = Graph.from_edge_index(edge_index, num_nodes)
    scale = case.choice([1.0, 3.0, 1e3, 1e5])
    x = case.tensor(num_nodes, channels, scale=scale)
    t_scale = case.choice([0.01, 1.0, 100.0, 1000.0, 1e5, 1e10] + ([1e30] if case.dtype == torch.float64 else []))
    case.moderate = t_scale <= 1000 and scale <= 1000
    if case.rng.random() < 0.5:
        t = float(t_scale * case.choice([1.0, -1.0]))
        check_op(case, lambda x: keypointops.msg_pass(x, graph, t, backend=backend),
                 lambda x: reference.msg_pass(x, graph, t), [x], [True])
    else:
        t = torch.from_numpy(case.rng.uniform(-1, 1, channels) * t_scale)
        check_op(case, lambda x, t: keypointops.msg_pass(x, graph, t, backend=backend),
                 lambda x, t: reference.msg_pass(x, graph, t), [x, t], [True, True])


def part_pool_case(case: Case, backend: str):
    batch, channels, joints = case.size(3), case.size(5), case.size(5)
    height, width = int(case.rng.integers(1, 7)), int(case.rng.integers(1, 7))
    scale = case.choice([1.0, 50.0, 1e4])
    temperature = case.choice([100.0, 1.0, 0.05, 0.01, 1e-3])
    case.moderate = scale <= 1000
    features = case.tensor(batch, channels, height, width, scale=case.choice([1.0, 1e3]))
    heatmaps = case.tensor(batch, joints, height, width, scale=scale)
    channels_last = case.rng.random() < 0.3

    def layout(f):
        return f.contiguous(memory_format=torch.channels_last) if channels_last else f
    if case.rng.random() < 0.4:  # the identity grouping
        check_op(case, lambda f, h: keypointops.part_pool(layout(f), h, temperature=temperature, backend=backend),
                 lambda f, h: reference.part_pool(f, h, temperature=temperature),
                 [features, heatmaps], [True, True])
    else:
        groups = torch.from_numpy(case.rng.random((case.size(4), joints))).to(case.dtype).double()
        check_op(case, lambda f, h, g: keypointops.part_pool(layout(f), h, g, temperature=temperature,
                                                             backend=backend),
                 lambda f, h, g: reference.part_pool(f, h, g, temperature=temperature),
                 [features, heatmaps, groups], [True, True, True])


def window_graph_conv_case(case: Case, backend: str):
    batch, frames, nodes, channels = case.size(3), case.size(6), case.size(4), case.size(5)
    window, dilation = case.choice([1, 2, 3, 4, 5]), int(case.rng.integers(1, 3))
    stride, scales = int(case.rng.integers(1, 4)), int(case.rng.integers(1, 3))
    size = window * nodes
    windows = window_graph_conv_output_length(frames, window, dilation, stride)
    scale = case.choice([1.0, 1e4])
    case.moderate = scale <= 1000
    x = case.tensor(batch, frames, nodes, channels, scale=scale)
    adj = case.choice([lambda: case.tensor(scales * size, size), lambda: case.tensor(batch, scales * size, size),
                       lambda: case.tensor(batch, windows, scales * size, size)])()
    check_op(case, lambda x, a: keypointops.window_graph_conv(x, a, window, dilation=dilation, stride=stride,
                                                              backend=backend),
             lambda x, a: reference.window_graph_conv(x, a, window, dilation=dilation, stride=stride), [x, adj],
             [True, True])


def keypoint_gather_case(case: Case, backend: str):
    batch, channels, points = case.size(3), case.size(5), case.size(6)
    height, width = int(case.rng.integers(1, 8)), int(case.rng.integers(1, 8))
    spatial_scale = case.choice([1.0, 0.5, 0.25])
    extent = max(height, width) / spatial_scale
    keypoints = torch.from_numpy(case.rng.uniform(-0.2 * extent, 1.2 * extent, (batch, points, 3)))
    keypoints[..., 2] = torch.from_numpy(case.rng.uniform(-0.5, 1.0, (batch, points)))  # confidence
    far = torch.from_numpy(case.rng.random((batch, points)) < 0.1)
    keypoints[..., 0] = torch.where(far, torch.full_like(keypoints[..., 0], 1e9), keypoints[..., 0])
    scale = case.choice([1.0, 1e4])
    case.moderate = scale <= 1000
    features = case.tensor(batch, channels, height, width, scale=scale)
    options = dict(roi_size=case.choice([0.0, 1.0, 3.5]), sampling_ratio=case.choice([-1, 1, 2]),
                   aligned=bool(case.rng.random() < 0.5))
    if case.rng.random() < 0.5:
        keypoints = keypoints[..., :2]
        options["valid"] = torch.from_numpy(case.rng.random((batch, points)) < 0.8)
    kp = keypoints.to(case.dtype)
    check_op(case, lambda f: keypointops.keypoint_gather(f, kp, spatial_scale, backend=backend, **options),
             lambda f: reference.keypoint_gather(f.to(case.dtype), kp, spatial_scale, **options), [features], [True])


OPS = {"msg_pass": msg_pass_case, "part_pool": part_pool_case, "window_graph_conv": window_graph_conv_case,
       "keypoint_gather": keypoint_gather_case}


@pytest.mark.parametrize("device,backend", [p for p in device_backend_params() if p.values[0] == "cpu"])  # CPU tensors
@pytest.mark.parametrize("op", list(OPS))
def test_agrees_with_reference_on_random_cases(op, device, backend):
    rng = case_rng(sorted(OPS).index(op))
    for index in range(CASES):
        OPS[op](Case(rng, f"{op} case {index} (seed {SEED})"), backend)


@pytest.mark.skipif(not keypointops.has_ops(), reason="keypointops._C not built")
def test_window_graph_conv_on_the_gemm_library_route_agrees_on_random_cases():
    """The same cases with the CPU kernel's work on PyTorch's GEMMs (keypointops.cpu_gemm_route;
    float32 / float64 with dilation 1, the other cases on the loops)."""
    before = torch.ops.keypointops._cpu_gemm_route()
    torch.ops.keypointops._set_cpu_gemm_route("library")
    try:
        rng = case_rng(sorted(OPS).index("window_graph_conv"))
        for index in range(CASES):
            window_graph_conv_case(Case(rng, f"window_graph_conv case {index}, seed {SEED} (GEMM library route)"), "cpu")
    finally:
        torch.ops.keypointops._set_cpu_gemm_route(before)


def test_rank_stats_agrees_with_oracle_on_random_cases():
    rng = case_rng(7)
    for _ in range(CASES):
        num_q, num_g = int(rng.integers(1, 30)), int(rng.integers(1, 80))
        num_ids, num_cams = int(rng.integers(1, 10)), int(rng.integers(1, 4))
        q_pids, g_pids = rng.integers(-1, num_ids, num_q), rng.integers(-1, num_ids, num_g)
        q_cams, g_cams = rng.integers(0, num_cams, num_q), rng.integers(0, num_cams, num_g)
        scale = float(rng.choice([1.0, 1e30]))
        dist = (rng.integers(0, 5, (num_q, num_g)) if rng.random() < 0.5 else rng.random((num_q, num_g))) * scale
        dist = dist.astype(np.float32 if rng.random() < 0.5 else np.float64)
        try:
            torchreid_eval(dist, q_pids, g_pids, q_cams, g_cams)
        except AssertionError:  # no valid query: make query 0 one
            q_pids[0], g_pids[0], g_cams[0] = 0, 0, q_cams[0] + 1
        assert_matches_oracle(dist, q_pids, g_pids, q_cams, g_cams, max_rank=int(rng.integers(1, 60)))


@pytest.mark.parametrize("num_q,num_g", [(0, 5), (3, 0), (0, 0)])
def test_rank_stats_zero_sized(num_q, num_g):
    """No query or an empty gallery: every query is skipped (first = -1), nothing is read."""
    first, ap, inp = torch.ops.keypointops.rank_stats(
        torch.zeros(num_q, num_g), torch.zeros(num_q, dtype=torch.int64), torch.zeros(num_q, dtype=torch.int64),
        torch.zeros(num_g, dtype=torch.int64), torch.ones(num_g, dtype=torch.int64))
    assert first.shape == ap.shape == inp.shape == (num_q,)
    assert (first == -1).all()
    assert math.isfinite(float(ap.sum())) and math.isfinite(float(inp.sum()))
