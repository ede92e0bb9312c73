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
reference, ``max|got - want| <= PLAIN_FACTOR * max|autograd - want| + 1e-5 * max(1, max|want|)``
(float32 outputs alike, with 2e-5), with autograd's error the largest over the inputs as given,
moved by one ulp and, for ``part_pool``, relabelled to round differently (:func:`check_op` and
``PLAIN_FACTOR`` say why).  ``msg_pass``'s float64 gradients
are checked against a 50-digit evaluation of their closed form (:func:`msg_pass_gradients_mp`)
instead of the float64 reference: at values of 1e3 a saturated softmax's gradient is about 0 while
the reference's autograd cancels terms of ``|grad_out| * |m|^2`` (1e6 and more) and is off by 1e-9
there, more than the tolerance.
"""
import math
import os

import mpmath
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
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5}
# A float32 result may err this many times as much as plain float32 PyTorch (check_op): one ulp of a
# softmax's normaliser, which a kernel that sums in another order may round to, moves part_pool's
# heatmap-gradient error at a sharp softmax 3.4x or 5.4x, and no relabelling of the inputs moves
# the reference's normaliser with it.
PLAIN_FACTOR = 6.0


def case_rng(stream: int) -> np.random.Generator:
    """The generator of one op's cases: its fixed stream shifted by ``KEYPOINTOPS_RANDOM_SEED``."""
    return np.random.default_rng([SEED, stream]) if SEED else np.random.default_rng(stream)


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


def max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach().double()).abs().max()) if want.numel() else 0.0


def assert_agrees(got: torch.Tensor, want: torch.Tensor, tol: float, what: str, case: Case, slack: float = 0.0):
    """``|got - want| <= slack + tol * max(1, max|want|)`` elementwise, and the same finiteness."""
    assert got.shape == want.shape, f"{case.name}: {what} shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.detach().double(), want.detach().double()
    finite, finite_wanted = bool(torch.isfinite(got).all()), bool(torch.isfinite(want).all())
    assert finite == finite_wanted, f"{case.name}: {what} finite: {finite}, reference: {finite_wanted}"
    if want.numel() == 0:
        return
    bound = slack + tol * max(1.0, float(want.abs().max()))
    error = max_error(got, want)
    assert error <= bound, f"{case.name}: {what} differs by {error:.3g} > {bound:.3g}"


def one_ulp_moved(*inputs):
    """The floating-point tensors of ``inputs`` with each element moved to a random neighbour (up
    or down one unit in the last place; a fixed seed), differentiably: the gradient flows back to
    the unmoved tensor unchanged."""
    generator = torch.Generator().manual_seed(0)

    def move(value):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or not value.numel():
            return value
        up = torch.rand(value.shape, generator=generator) < 0.5
        target = torch.where(up, torch.full_like(value, math.inf), torch.full_like(value, -math.inf))
        neighbour = torch.nextafter(value.detach(), target)
        return value + (torch.where(torch.isfinite(neighbour), neighbour, value.detach()) - value.detach())
    return tuple(move(value) for value in inputs)


def check_op(case: Case, kernel, ref, inputs: list, grad_inputs: list, exact_gradients=None, equivalents=()):
    """Forward of ``kernel`` on the inputs in the case's dtype against ``ref`` in float64; backward
    with one random grad_out for the inputs flagged in ``grad_inputs`` (float32: against the float64
    reference, with the slack below).  ``exact_gradients(inputs,
    grad_out)``, when given, is the ground truth of the float64 gradients instead of ``ref``'s.
    A float32 result may err ``PLAIN_FACTOR`` times as much as plain float32 PyTorch, whose error is
    the largest of ``ref``'s float32 errors (outputs; gradients
    by autograd) on the inputs as given, on the inputs moved by one unit in the last place (each
    element to a random float32 neighbour: the rounding every float32 evaluation starts from) and on
    ``equivalents``: functions of the inputs whose output is the same in exact arithmetic but rounds
    differently (part_pool: joints and pixels in reverse order, heatmaps shifted by a constant).  A
    single evaluation's rounding can be several times luckier than another's: part_pool's heatmap
    gradient at a sharp softmax errs 0.0021 or 0.0090 depending only on the order of one sum over
    12 pixels, and 0.0022, 0.0075 or 0.0120 as the softmax's normaliser rounds to one float32 or
    to its neighbours; which says nothing about a kernel's accuracy."""
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
    # Plain float32 evaluations of ref, where the ground truth is float64 (keypoint_gather's runs in
    # the case's dtype: moving its inputs could move its sampling grid).
    orders = [lambda *inputs: inputs, one_ulp_moved, *equivalents]
    plain_runs = []
    if case.dtype == torch.float32 and want.dtype == torch.float64:
        for order in orders:
            plain = leaves(torch.float32)
            plain_runs.append((plain, ref(*order(*plain))))
    assert_agrees(got, want, TOLERANCE[case.dtype], "output", case,
                  max((PLAIN_FACTOR * max_error(output, want) for _, output in plain_runs), default=0.0))
    if not any(grad_inputs) or not case.moderate:
        return
    grad_out = case.tensor(*want.shape)
    if exact_gradients is not None and case.dtype == torch.float64:
        expected = exact_gradients([i.detach() if isinstance(i, torch.Tensor) else i for i in exact], grad_out)
    else:
        expected = gradients(want, exact, grad_out)
    if case.dtype == torch.float64:
        for k, (g, e) in enumerate(zip(gradients(got, typed, grad_out), expected)):
            assert_agrees(g, e, TOLERANCE[torch.float64], f"gradient {k}", case)
        return
    if not plain_runs:  # keypoint_gather: its reference's own float32 autograd
        plain = leaves(torch.float32)
        plain_runs.append((plain, ref(*plain)))
    plain_gradients = list(zip(*(gradients(output, plain, grad_out) for plain, output in plain_runs)))
    for k, (g, e, plain) in enumerate(zip(gradients(got, typed, grad_out), expected, plain_gradients)):
        slack = max(PLAIN_FACTOR * max_error(p, e) for p in plain)
        assert_agrees(g, e, 1e-5, f"gradient {k}", case, slack)


def msg_pass_gradients_mp(x: torch.Tensor, graph: Graph, t, grad_out: torch.Tensor, digits: int = 50) -> list:
    """The gradients of ``reference.msg_pass(x, graph, t)`` (softmax aggregation, eps 1e-7) for
    ``grad_out``, evaluated in ``digits``-digit arithmetic from their closed form: with the messages
    ``m_e = relu(x_u) + eps`` into node v, ``a_e = softmax_e(t m_e)`` and ``out_v = sum_e a_e m_e``,
    ``d out_v / d m_e = a_e (1 + t (m_e - out_v))`` and ``d out_v / d t = sum_e a_e m_e (m_e - out_v)``.
    Returns ``[grad_x]``, plus ``grad_t`` when ``t`` is a tensor (per channel)."""
    src, dst = graph.edge_index[:, torch.argsort(graph.perm)].tolist()
    grad_x, grad_t = torch.zeros_like(x), torch.zeros(x.size(1), dtype=torch.float64)
    incoming = {}
    for e, v in enumerate(dst):
        incoming.setdefault(v, []).append(e)
    with mpmath.workdps(digits):
        for c in range(x.size(1)):
            tc = mpmath.mpf(float(t[c]) if isinstance(t, torch.Tensor) else t)
            total_t = mpmath.mpf(0)
            sums = [mpmath.mpf(0)] * x.size(0)
            for v, edges in incoming.items():
                m = [max(mpmath.mpf(float(x[src[e], c])), 0) + mpmath.mpf(1e-7) for e in edges]
                shift = max(tc * mi for mi in m)
                w = [mpmath.exp(tc * mi - shift) for mi in m]
                z = mpmath.fsum(w)
                a = [wi / z for wi in w]
                out = mpmath.fsum(ai * mi for ai, mi in zip(a, m))
                g = mpmath.mpf(float(grad_out[v, c]))
                total_t += g * mpmath.fsum(ai * mi * (mi - out) for ai, mi in zip(a, m))
                for e, ai, mi in zip(edges, a, m):
                    if x[src[e], c] > 0:
                        sums[src[e]] += g * ai * (1 + tc * (mi - out))
            grad_x[:, c] = torch.tensor([float(value) for value in sums], dtype=torch.float64)
            grad_t[c] = float(total_t)
    return [grad_x, grad_t] if isinstance(t, torch.Tensor) else [grad_x]


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
                 lambda x: reference.msg_pass(x, graph, t), [x], [True],
                 lambda inputs, grad_out: msg_pass_gradients_mp(inputs[0], graph, t, grad_out))
    else:
        t = torch.from_numpy(case.rng.uniform(-1, 1, channels) * t_scale)
        check_op(case, lambda x, t: keypointops.msg_pass(x, graph, t, backend=backend),
                 lambda x, t: reference.msg_pass(x, graph, t), [x, t], [True, True],
                 lambda inputs, grad_out: msg_pass_gradients_mp(inputs[0], graph, inputs[1], grad_out))


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

    def reversed_order(f, h, *groups):  # the same pooling, its sums over joints and pixels reversed
        if not groups:  # the identity grouping: each joint is its own part, the joint order stays
            return f.flip(2, 3), h.flip(2, 3)
        return f.flip(2, 3), h.flip(1, 2, 3), *(g.flip(1) for g in groups)

    def shifted(sign):  # heatmaps + a constant: every part's logits shift alike, the softmax is the same
        def shift(f, h, *groups):
            scale = max(1.0, float(h.detach().abs().max())) if h.numel() else 1.0
            return f, h + sign * 2.0 ** -10 * scale, *groups
        return shift
    equivalents = (reversed_order, shifted(1.0), shifted(-1.0))
    if case.rng.random() < 0.4:  # the identity grouping
        check_op(case, lambda f, h: keypointops.part_pool(layout(f), h, temperature=temperature, backend=backend),
                 lambda f, h: reference.part_pool(f, h, temperature=temperature),
                 [features, heatmaps], [True, True], equivalents=equivalents)
    else:
        groups = torch.from_numpy(case.rng.random((case.size(4), joints))).to(case.dtype).double()
        check_op(case, lambda f, h, g: keypointops.part_pool(layout(f), h, g, temperature=temperature,
                                                             backend=backend),
                 lambda f, h, g: reference.part_pool(f, h, g, temperature=temperature),
                 [features, heatmaps, groups], [True, True, True], equivalents=equivalents)


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


def test_msg_pass_gradient_oracle_agrees_with_autograd_where_float64_is_exact_enough():
    """The 50-digit closed form against the float64 reference's autograd at moderate values (|x| ~ 1,
    |t| <= 3, where the reference is accurate to ~1e-14): the oracle computes the same gradients."""
    rng = np.random.default_rng(123)
    for _ in range(20):
        num_nodes, channels = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        edge_index = torch.from_numpy(rng.integers(0, num_nodes, (2, int(rng.integers(0, 3 * num_nodes + 1)))))
        graph = Graph.from_edge_index(edge_index, num_nodes)
        x = torch.from_numpy(rng.standard_normal((num_nodes, channels))).requires_grad_()
        t = torch.from_numpy(rng.uniform(-3, 3, channels)).requires_grad_()
        grad_out = torch.from_numpy(rng.standard_normal((num_nodes, channels)))
        want = torch.autograd.grad(reference.msg_pass(x, graph, t), [x, t], grad_out)
        for got, expected in zip(msg_pass_gradients_mp(x.detach(), graph, t.detach(), grad_out), want):
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


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
