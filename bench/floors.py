"""The floors of a benchmark case: what the op must do, and how fast this machine can do it.

Work (one function per op, from the case's sizes): the bytes the op must move, each input read
once and each output written once (forward + backward: the forward's bytes plus the backward's,
which reads the output gradient and the inputs the gradients depend on and writes the gradients),
and the FLOPs it must do, of which the matrix products are listed as ``Gemm`` shapes.

Floors (measured in the run that times the ops, at its thread count, each the fastest of at least
5 calls; ``measure_floors``):

- memory: the bytes at the bandwidth of a streaming copy (``Tensor.copy_``, half read, half
  written) as large as the case's footprint (the tensors its accesses spread over: the bytes it
  moves, or for a gather the whole map it picks from), so a case that fits a cache is held to that
  cache's bandwidth and a sparse read of a large tensor to the memory's.  Footprints above
  ``COPY_CAP_BYTES`` share the capped copy's bandwidth: beyond the last-level cache it no longer
  depends on the size.
- compute: the seconds ``torch.matmul`` takes for the case's matrix products at their shapes (on
  contiguous operands: the BLAS PyTorch calls), plus the remaining FLOPs (softmax, bilinear
  weights, the messages) at the rate of a square 1024 x 1024 x 1024 matmul: a bound no
  elementwise code reaches, so an op without matrix products is always memory-bound here.

The fraction of a floor is floor seconds / measured seconds: 1 is the floor; the larger of the two
floors binds.  A memory fraction above 1 means the op moves fewer bytes than counted (it reuses
data that a separate copy streams), not that the floor is wrong.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field

import torch

FLOAT_BYTES = 4
INDEX_BYTES = 8
COPY_CAP_BYTES = 512 * 2**20
SQUARE_GEMM = 1024


@dataclass(frozen=True)
class Gemm:
    """``[batch, m, k] @ [batch, k, n]`` (batch 1: one matrix product)."""
    batch: int
    m: int
    k: int
    n: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n


@dataclass(frozen=True)
class Work:
    """Bytes an op must move and FLOPs it must do; ``gemms`` are the matrix products among them;
    ``footprint``: the bytes of the tensors its accesses spread over (None: ``bytes``)."""
    bytes: int
    flops: int
    gemms: tuple[Gemm, ...] = field(default=())
    footprint: int | None = None

    @property
    def spread(self) -> int:
        return self.bytes if self.footprint is None else self.footprint

    def __add__(self, other: "Work") -> "Work":
        footprint = None if self.footprint is None and other.footprint is None else self.spread + other.spread
        return Work(self.bytes + other.bytes, self.flops + other.flops, self.gemms + other.gemms, footprint)

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> "Work":
        return Work(values["bytes"], values["flops"], tuple(Gemm(**g) for g in values["gemms"]),
                    values.get("footprint"))


def part_pool(images: int, channels: int, pixels: int, joints: int, parts: int, grouped: bool,
              backward: bool) -> Work:
    """``part_pool`` of [B, C, S] features and [B, J, S] heatmaps into [B, P, C] (float32).

    Forward: out = softmax(groups @ heatmaps) @ features^T, a [P, S] x [S, C] product per image;
    the logits cost 2 J flops per (part, pixel) when grouped, the softmax ~4 (max, exp, sum, divide).
    Backward: the logits and softmax again, grad_features = dout^T @ p and grad_p = dout @
    features (two more products per image), the softmax backward (~4 per (part, pixel)) and, when
    grouped, grad_heatmaps = groups^T @ grad_r (2 J per (part, pixel)).
    """
    b, c, s, j, p = images, channels, pixels, joints, parts
    logits = 2 * b * p * j * s if grouped else 0
    forward = Work(bytes=FLOAT_BYTES * (b * c * s + b * j * s + (p * j if grouped else 0) + b * p * c),
                   flops=2 * b * p * s * c + logits + 4 * b * p * s, gemms=(Gemm(b, p, s, c),))
    if not backward:
        return forward
    return forward + Work(
        bytes=FLOAT_BYTES * (b * p * c + 2 * b * c * s + 2 * b * j * s),
        flops=2 * 2 * b * p * s * c + 2 * logits + (4 + 4) * b * p * s,
        gemms=(Gemm(b, c, p, s), Gemm(b, p, c, s)))


def window_graph_conv(batch: int, frames: int, nodes: int, channels: int, window: int, per_sample: bool,
                      backward: bool, stride: int = 1, scales: int = 1) -> Work:
    """``window_graph_conv`` of x [B, T, N, C] with an adjacency of ``scales * L`` rows and L =
    window * N columns, shared ([R, L]) or per sample ([B, R, L]), into [B, T', R, C] (float32).

    The matrix work: adj @ [the L x C windows side by side], one product (shared adjacency: all
    B T' windows as its columns) or one per sample (its T' windows).  Backward: grad_x from
    adj^T @ grad_out and grad_adj = grad_out @ windows^T, the same shapes transposed.
    """
    size, rows = window * nodes, scales * window * nodes
    out_frames = (frames - 1) // stride + 1
    adj_batch = batch if per_sample else 1
    columns = (batch // adj_batch) * out_frames * channels
    x_elems, adj_elems = batch * frames * nodes * channels, adj_batch * rows * size
    out_elems = batch * out_frames * rows * channels
    product = Gemm(adj_batch, rows, size, columns)
    forward = Work(bytes=FLOAT_BYTES * (x_elems + adj_elems + out_elems), flops=product.flops, gemms=(product,))
    if not backward:
        return forward
    grad_x, grad_adj = Gemm(adj_batch, size, rows, columns), Gemm(adj_batch, rows, columns, size)
    return forward + Work(bytes=FLOAT_BYTES * (out_elems + 2 * x_elems + 2 * adj_elems),
                          flops=grad_x.flops + grad_adj.flops, gemms=(grad_x, grad_adj))


def msg_pass(nodes: int, edges: int, channels: int, backward: bool) -> Work:
    """``msg_pass`` of x [N, C] over a CSR graph of E edges into [N, C] (float32, int64 indices).

    Forward per (edge, channel): m = relu(x) + eps, t m, exp, the sum and the weighted sum: 7
    flops (the online softmax's rescaling not counted); a division per (node, channel).  Backward:
    reads grad_out, x, out and the transposed CSR, writes grad_x (and the scalar grad_t); per
    (edge, channel) the weight again and its two gradient terms: 10 flops.
    """
    features, index = nodes * channels, (nodes + 1 + edges) * INDEX_BYTES
    forward = Work(bytes=FLOAT_BYTES * 2 * features + index, flops=7 * edges * channels + features)
    if not backward:
        return forward
    return forward + Work(bytes=FLOAT_BYTES * 4 * features + index, flops=10 * edges * channels)


def keypoint_gather(images: int, channels: int, height: int, width: int, keypoints: int, spread: float,
                    samples: int, bins: int, backward: bool) -> Work:
    """``keypoint_gather`` of [B, C, H, W] features at K keypoints into [B, K, C, bins] (float32).

    ``spread``: the distance between a keypoint's first and last sample along an axis, in feature
    pixels (mean over keypoints); ``samples``: bilinear samples per output bin.  Forward reads each
    keypoint's footprint, (ceil(spread) + 1)^2 pixels (at least the 2 x 2 of one bilinear sample,
    at most the whole map) of C channels: the elements, not the cache lines that an NCHW layout
    brings with them; 4 taps x 2 flops per sample and channel.  Backward reads grad_out and writes
    the whole grad_features (zeros included), scattering the same taps.
    """
    side = max(2, math.ceil(spread) + 1)
    footprint = min(keypoints * side * side, height * width)
    out_elems = images * keypoints * channels * bins
    flops = 8 * out_elems * samples
    points, features = images * keypoints * 2, images * channels * height * width
    forward = Work(bytes=FLOAT_BYTES * (images * footprint * channels + points + out_elems), flops=flops,
                   footprint=FLOAT_BYTES * (features + points + out_elems))
    if not backward:
        return forward
    return forward + Work(bytes=FLOAT_BYTES * (out_elems + points + features), flops=flops)


def _best_seconds(fn, min_rounds: int = 5, budget_s: float = 0.25, max_rounds: int = 200) -> float:
    """The fastest call after a warm-up, of at least ``min_rounds`` and as many more as fit in
    ``budget_s`` (at most ``max_rounds``): a floor is the best the machine does.  On a shared
    machine a short parallel call often waits a scheduler time slice for one of its threads; the
    many rounds of a short call find one that did not."""
    fn()
    best, spent, rounds = math.inf, 0.0, 0
    while rounds < min_rounds or (spent < budget_s and rounds < max_rounds):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, rounds = min(best, elapsed), spent + elapsed, rounds + 1
    return best


def copy_bandwidth(nbytes: int) -> float:
    """Bytes/s (read + written) of a streaming ``copy_`` that moves ``nbytes`` (at most
    ``COPY_CAP_BYTES``), and never less than that of the capped copy: a smaller copy streams from a
    cache at least as fast as from memory, so a slower reading is one that other jobs disturbed."""
    moved = min(max(nbytes, 2 * FLOAT_BYTES), COPY_CAP_BYTES)
    bandwidth = _copy_bandwidth(moved)
    return bandwidth if moved == COPY_CAP_BYTES else max(bandwidth, _copy_bandwidth(COPY_CAP_BYTES))


@functools.cache
def _copy_bandwidth(moved: int) -> float:
    src = torch.ones(moved // (2 * FLOAT_BYTES))
    dst = torch.empty_like(src)
    return moved / _best_seconds(lambda: dst.copy_(src))


@functools.cache
def gemm_seconds(gemm: Gemm) -> float:
    """Seconds ``torch.matmul`` takes for one product of that shape (float32, contiguous)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(gemm.batch, gemm.m, gemm.k, generator=gen)
    b = torch.rand(gemm.batch, gemm.k, gemm.n, generator=gen)
    out = torch.empty(gemm.batch, gemm.m, gemm.n)
    return _best_seconds(lambda: torch.matmul(a, b, out=out))


def square_gemm_rate() -> float:
    """FLOP/s of a square float32 matmul of side ``SQUARE_GEMM``: the compute rate of this machine."""
    square = Gemm(1, SQUARE_GEMM, SQUARE_GEMM, SQUARE_GEMM)
    return square.flops / gemm_seconds(square)


def measure_floors(work: Work) -> dict:
    """The case's memory and compute floors in seconds on this machine, at the current threads."""
    gemm_flops = sum(g.flops for g in work.gemms)
    compute = sum(gemm_seconds(g) for g in work.gemms) + (work.flops - gemm_flops) / square_gemm_rate()
    return {"memory_s": work.bytes / copy_bandwidth(work.spread), "compute_s": compute}
