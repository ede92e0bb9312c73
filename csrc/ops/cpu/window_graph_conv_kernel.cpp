// window_graph_conv CPU kernel: register-blocked small GEMMs whose operands are gathered through
// row-pointer tables (the unfolded input is never built).
//
// Slot w of window t (t < T') reads frame f_w = t * stride - pad + w * dilation; the slots whose
// frame is in [0, T) form one range [lo, hi), the others read zeros and are skipped.  A_bt =
// adj[b, t] ([R, L]: R = S * L rows, S stacked scales; the same matrix for every t, or every (b, t),
// when adj is per sample or shared).
// Forward, per (b, t):   out[b, t] = sum_{valid j} A_bt[:, j] (x) x[b, f(j), j % N]
//   ([R, C] = sum over the K <= L valid window nodes of a column of A times a row of x: x is read
//   once for all S scales).
// grad_x, per (b, f), over the slots w whose window t = (f + pad - w * dilation) / stride exists:
//   grad_x[b, f] = sum_{w, i} A_bt[i, wN:(w+1)N]^T (x) grad_out[b, t, i]   (K = slots * R terms)
//   Each frame of grad_x has one writer: no atomics.  With stride > 1 a frame is read by fewer
//   windows, and frames read by none get zeros.
// grad_adj, per (b, t): grad_A_bt = sum_c grad_out[b, t, :, c] (x) Xt[c, :]   (K = C terms)
//   with Xt [C, L] the window's x rows transposed (zero for slots outside the clip), a per-thread
//   copy of L * C elements per window against its R * L * C multiply-adds.  Accumulated per window
//   (per-window adj), over t per sample (per-sample adj), or over fixed chunks of windows for a
//   shared adj, whose [chunks, R, L] partial sums are then added in chunk order.  The chunks depend
//   on B * T' only, and every sum runs in a fixed order: bitwise the same for any thread count.
// All three are "broadcast" GEMMs: a block of up to 6 rows x 2 vectors of the output stays in
// registers while the terms stream by (one broadcast of the left operand per row and term, the
// right operand's row vectorised), over chunks of the right rows packed contiguously per strip.
// One parallel pass over (b, t) windows, (b, f) frames or chunks, the tasks handed to the threads
// one at a time (ops/cpu/dynamic_tasks.h); no BLAS call, so no nested threading.
// These loops are the "own" GEMM route (ops/cpu/gemm_route.h); on the library route, float32 and
// float64 with dilation 1 go through PyTorch's GEMMs instead (ops/cpu/window_graph_conv_gemm.cpp).
// Memory: forward only the output [B, T', R, C]; backward grad_x, grad_adj and, for a shared adj,
// at most kSharedAdjChunks [R, L] partials, plus per thread a pointer table of <= window * L
// entries, Xt [C, L] and a packed strip of kTermChunk x 2 vectors.  The unfolded window tensor
// [B, T', L, C] is never built.
// float16 / bfloat16: x, grad_out, out and grad_x are 16-bit in memory; the packed strips, Xt and
// every accumulator are float32 (ops/cpu/reduced_precision.h), a 16-bit output takes all its terms
// in one chunk (so that each element is rounded once), and grad_adj is summed in float32 ([R, L]
// adj or the chunk partials) and rounded at the end.  The broadcast (left) operands are widened
// beforehand, so the inner loops are the float32 ones: adj once per call (a float32 copy of adj),
// a window's grad_out rows (R x C) per window of grad_adj.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#if defined(CPU_CAPABILITY_DEFAULT)  // the build that registers the op with torch (below)
#include <torch/library.h>
#endif

#include <algorithm>
#include <vector>

#include "ops/cpu/cpu_capability.h"
#include "ops/cpu/dynamic_tasks.h"
#include "ops/cpu/huge_pages.h"
#include "ops/cpu/reduced_precision.h"
#include "ops/cpu/window_graph_conv_gemm.h"
#include "ops/cpu/window_graph_conv_shape.h"
#include "ops/window_graph_conv.h"

namespace keypointops {
namespace CPU_CAPABILITY {  // this build's capability (ops/cpu/cpu_capability.h)
namespace {

// Chunks of (b, t) windows for the partial sums of a shared adj's gradient.
constexpr int64_t kSharedAdjChunks = 64;

// The K terms of a product sum_k left_k (x) right_k: term k has a left column (element m at
// left[k][m * left_stride]) and a right row (element n at right[k][n], contiguous); `packed` is
// the scratch buffer of broadcast_gemm, in the accumulation dtype.
template <typename left_t, typename right_t = left_t>
struct Terms {
  std::vector<const left_t*> left;
  std::vector<const right_t*> right;
  std::vector<acc_t<left_t>> packed;

  void clear() {
    left.clear();
    right.clear();
  }
  void add(const left_t* l, const right_t* r) {
    left.push_back(l);
    right.push_back(r);
  }
  int64_t size() const { return static_cast<int64_t>(left.size()); }
};

// Terms per packed column strip: kTermChunk x 2 vectors (16 KiB of float) stay in L1 while every
// row block of the output streams over them.
constexpr int64_t kTermChunk = 256;

// out[m0 + r, n0 : n0 + count] (+)= sum_{k0 <= k < k1} left[k][(m0 + r) * stride] *
// packed[k - k0][0 : count] for r < kRows; the 2 * kRows accumulators stay in registers.
// `accumulate` adds to out instead of overwriting it.  left and out may be 16-bit.
template <typename left_t, typename out_t, int kRows>
void broadcast_block(const left_t* const* left, const acc_t<left_t>* packed, int64_t k0, int64_t k1,
                     int64_t stride, int64_t m0, int64_t n0, int64_t count, bool accumulate,
                     out_t* out, int64_t ld_out) {
  using Vec = AccVec<left_t>;
  using acc = acc_t<left_t>;
  constexpr int64_t VL = Vec::size();
  const int64_t count0 = std::min(VL, count), count1 = count - count0;
  // Every loop over the rows is unrolled in full and the accumulators leave the arrays by value,
  // so that each acc0[r] / acc1[r] is a register.  Otherwise (a 16-bit out_t, whose partial loads
  // and stores are calls) the arrays stay in memory and the term loop stores every accumulator to
  // the stack after each FMA: one store per FMA, the store port rather than the FMA units bounds it.
  static_assert(kRows <= 8, "the row loops unroll 8 in full");
  Vec acc0[kRows], acc1[kRows];
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    const out_t* o = out + (m0 + r) * ld_out + n0;
    acc0[r] = accumulate ? load_acc(o, count0) : Vec(acc(0));
    acc1[r] = accumulate && count1 > 0 ? load_acc(o + VL, count1) : Vec(acc(0));
  }
  for (int64_t k = k0; k < k1; ++k, packed += 2 * VL) {
    const Vec b0 = Vec::loadu(packed), b1 = Vec::loadu(packed + VL);
    const left_t* a = left[k] + m0 * stride;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const Vec a_r(static_cast<acc>(a[r * stride]));
      acc0[r] = at::vec::fmadd(a_r, b0, acc0[r]);
      acc1[r] = at::vec::fmadd(a_r, b1, acc1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < kRows; ++r) {
    out_t* o = out + (m0 + r) * ld_out + n0;
    const Vec lo = acc0[r], hi = acc1[r];
    if constexpr (is_reduced_precision<out_t>) {
      if (count == 2 * VL) {  // both vectors rounded into one 16-bit vector, one full store
        at::vec::convert_from_float<out_t>(lo, hi).store(o);
        continue;
      }
    }
    store_acc(lo, o, count0);
    if (count1 > 0) store_acc(hi, o + VL, count1);
  }
}

// Rows per block of broadcast_gemm: 6 (12 accumulators), and 4 in the AVX512 build, where GCC keeps
// the accumulators of a 5- or 6-row block (any dtype) in stack memory and stores them after every
// term, so that the store port rather than the FMAs bounds the loop (docs/benchmarks.md, the
// instruction-set builds).  4 rows x 2 vectors are 8 FMA chains, of 16 float lanes each there.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kMaxRows = 4;
#else
constexpr int64_t kMaxRows = 6;
#endif

// out[m, n] (+)= sum_k left[k][m * stride] * right[k][n] for m < M, n < N (out row stride
// ld_out); without `accumulate` and without terms, zeros.  The terms go in chunks of kTermChunk;
// per chunk and column strip of 2 vectors the right rows are packed contiguously (zeros past N:
// no masked loads; and the rows, often a power of two apart, no longer fight over L1 sets), then
// ceil(M / kMaxRows) row blocks of nearly equal size run over the packed strip (25 rows at 6: 5 x 5,
// not 6 + 6 + 6 + 4 + 3: a block of r rows keeps 2r FMA chains in flight, and fewer than 8 leave
// the FMA units waiting on their latency).  A 16-bit out takes all K terms in one chunk.
template <typename left_t, typename right_t, typename out_t>
void broadcast_gemm(Terms<left_t, right_t>& terms, int64_t stride, int64_t M, int64_t N, out_t* out,
                    int64_t ld_out, bool accumulate = false) {
  using acc = acc_t<left_t>;
  constexpr int64_t kCols = 2 * AccVec<left_t>::size();
  const int64_t K = terms.size();
  const int64_t blocks = (M + kMaxRows - 1) / kMaxRows;
  if (blocks == 0) return;
  const int64_t chunk = is_reduced_precision<out_t> ? std::max<int64_t>(K, 1) : kTermChunk;
  terms.packed.resize(chunk * kCols);
  acc* packed = terms.packed.data();
  const left_t* const* left = terms.left.data();
  for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += chunk) {
    const int64_t k1 = std::min(K, k0 + chunk);
    const bool add = accumulate || k0 > 0;
    for (int64_t n0 = 0; n0 < N; n0 += kCols) {
      const int64_t count = std::min(kCols, N - n0);
      for (int64_t k = k0; k < k1; ++k) {
        acc* row = packed + (k - k0) * kCols;
        if constexpr (is_reduced_precision<right_t>) {  // widened a vector at a time, zeros past N
          constexpr int64_t VL = AccVec<right_t>::size();
          load_acc(terms.right[k] + n0, std::min(VL, count)).store(row);
          load_acc(terms.right[k] + n0 + VL, std::max<int64_t>(count - VL, 0)).store(row + VL);
        } else {
          std::copy_n(terms.right[k] + n0, count, row);
          std::fill(row + count, row + kCols, acc(0));
        }
      }
      for (int64_t block = 0, m0 = 0; block < blocks; ++block) {
        const int64_t rows = M / blocks + (block < M % blocks ? 1 : 0);
        switch (rows) {
#define KEYPOINTOPS_BLOCK(R)                                                                    \
  case R:                                                                                       \
    if constexpr (R <= kMaxRows) {  /* rows <= kMaxRows: larger blocks are never built */       \
      broadcast_block<left_t, out_t, R>(left, packed, k0, k1, stride, m0, n0, count, add, out, ld_out); \
    }                                                                                           \
    break;
          KEYPOINTOPS_BLOCK(6)
          KEYPOINTOPS_BLOCK(5)
          KEYPOINTOPS_BLOCK(4)
          KEYPOINTOPS_BLOCK(3)
          KEYPOINTOPS_BLOCK(2)
          default: KEYPOINTOPS_BLOCK(1)
#undef KEYPOINTOPS_BLOCK
        }
        m0 += rows;
      }
    }
  }
}

// Appends the terms of window (b, t)'s valid nodes j: column j of A_bt and the row of x it reads.
template <typename scalar_t>
void window_terms(const Shape& s, const scalar_t* x, const acc_t<scalar_t>* a_bt, int64_t b, int64_t t,
                  Terms<acc_t<scalar_t>, scalar_t>& terms) {
  const SlotRange slots = s.slots(t);
  for (int64_t w = slots.lo; w < slots.hi; ++w) {
    const scalar_t* frame = x + ((b * s.T + s.start(t) + w * s.dilation) * s.N) * s.C;
    for (int64_t n = 0; n < s.N; ++n) terms.add(a_bt + w * s.N + n, frame + n * s.C);
  }
}

// out[b, t] of window r = b * T' + t.
template <typename scalar_t>
void forward_window(const Shape& s, const scalar_t* x, const acc_t<scalar_t>* adj, int64_t r,
                    Terms<acc_t<scalar_t>, scalar_t>& terms, scalar_t* out) {
  const int64_t b = r / s.To, t = r % s.To;
  terms.clear();
  window_terms(s, x, adj + s.adj_offset(b, t), b, t, terms);
  broadcast_gemm(terms, s.L, s.R, s.C, out + r * s.R * s.C, s.C);
}

// grad_x[b, f] of frame r = b * T + f.
template <typename scalar_t>
void grad_x_frame(const Shape& s, const scalar_t* grad_out, const acc_t<scalar_t>* adj, int64_t r,
                  Terms<acc_t<scalar_t>, scalar_t>& terms, scalar_t* grad_x) {
  const int64_t b = r / s.T, f = r % s.T;
  terms.clear();
  for (int64_t w = 0; w < s.window; ++w) {
    const int64_t t = window_reading_frame(f, w, s.To, s.window, s.dilation, s.stride);
    if (t < 0) continue;
    const acc_t<scalar_t>* a = adj + s.adj_offset(b, t) + w * s.N;  // A_bt[:, wN:(w+1)N]
    const scalar_t* g = grad_out + (b * s.To + t) * s.R * s.C;
    for (int64_t i = 0; i < s.R; ++i) terms.add(a + i * s.L, g + i * s.C);
  }
  broadcast_gemm(terms, 1, s.N, s.C, grad_x + r * s.N * s.C, s.C);
}

// target = grad_A summed over the windows [begin, end): per window r, grad_A[i, j] +=
// sum_c G[i, c] Xt[c, j] with G = grad_out[r] ([R, C]) and Xt ([C, L]) the window's x rows
// transposed, zero for the slots outside the clip: a broadcast GEMM over the C channels.
// g_rows: where a 16-bit window of grad_out is widened.
template <typename scalar_t>
void grad_adj_windows(const Shape& s, const scalar_t* grad_out, const scalar_t* x, int64_t begin,
                      int64_t end, std::vector<acc_t<scalar_t>>& xt, std::vector<acc_t<scalar_t>>& g_rows,
                      Terms<acc_t<scalar_t>>& terms, acc_t<scalar_t>* target) {
  using acc = acc_t<scalar_t>;
  xt.resize(s.C * s.L);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / s.To, t = r % s.To;
    const SlotRange slots = s.slots(t);
    for (int64_t w = 0; w < s.window; ++w) {
      const bool inside = w >= slots.lo && w < slots.hi;
      const scalar_t* frame = x + ((b * s.T + s.start(t) + w * s.dilation) * s.N) * s.C;
      for (int64_t n = 0; n < s.N; ++n) {
        acc* column = xt.data() + w * s.N + n;
        for (int64_t c = 0; c < s.C; ++c) column[c * s.L] = inside ? static_cast<acc>(frame[n * s.C + c]) : acc(0);
      }
    }
    terms.clear();
    const acc* g = in_acc(grad_out + r * s.R * s.C, s.R * s.C, g_rows);
    for (int64_t c = 0; c < s.C; ++c) terms.add(g + c, xt.data() + c * s.L);
    broadcast_gemm(terms, s.C, s.R, s.L, target, s.L, /*accumulate=*/true);
  }
}

at::Tensor window_graph_conv_cpu(const at::Tensor& x_in, const at::Tensor& adj_in, int64_t window,
                                 int64_t dilation, int64_t stride) {
  check_window_graph_conv_args(x_in, adj_in, window, dilation, stride);
  const Shape s(x_in, adj_in, window, dilation, stride);
  const auto x = x_in.contiguous();
  const auto adj = adj_in.to(at::toOpMathType(x.scalar_type())).contiguous();
  if (window_graph_conv_takes_library(x, dilation)) return window_graph_conv_library(x, adj, window, stride);
  auto out = at::empty({s.B, s.To, s.R, s.C}, x.options());
  if (out.numel() == 0) return out;
  populate_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_graph_conv_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc* ap = adj.data_ptr<acc>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_task(s.B * s.To, [&] {
      return [&, terms = Terms<acc, scalar_t>()](int64_t r) mutable {
        forward_window<scalar_t>(s, xp, ap, r, terms, op);
      };
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& adj_in, int64_t window,
    int64_t dilation, int64_t stride, bool compute_grad_x, bool compute_grad_adj) {
  check_window_graph_conv_args(x_in, adj_in, window, dilation, stride);
  check_window_graph_conv_grad_out(grad_out_in, x_in, adj_in, window, dilation, stride);
  const Shape s(x_in, adj_in, window, dilation, stride);
  const auto grad_out = grad_out_in.contiguous();
  const auto x = x_in.contiguous();
  const auto adj = adj_in.to(at::toOpMathType(x.scalar_type())).contiguous();
  if (window_graph_conv_takes_library(x, dilation)) {
    return window_graph_conv_backward_library(grad_out, x, adj, window, stride, compute_grad_x, compute_grad_adj);
  }
  const auto options = x.options();
  const auto acc_options = options.dtype(at::toOpMathType(x.scalar_type()));
  const bool reduced = acc_options.dtype() != options.dtype();
  auto grad_x = compute_grad_x ? at::empty(x.sizes(), options) : at::empty({0}, options);
  auto grad_adj = compute_grad_adj ? at::zeros(adj.sizes(), options) : at::empty({0}, options);
  const int64_t windows = s.B * s.To;
  if (x.numel() == 0) {
    return {grad_x, grad_adj};
  }
  const bool shared = adj.dim() == 2;
  const AdjGradUnits work = adj_grad_units(adj.dim(), s.B, s.To, kSharedAdjChunks);
  const int64_t per_unit = work.windows_per_unit, units = work.units;
  // Where grad_adj is summed: per-chunk partials (shared adj), a float32 grad_adj (16-bit adj), or
  // grad_adj itself.
  auto targets = !compute_grad_adj ? grad_adj
                 : shared          ? at::zeros({units, s.R, s.L}, acc_options)
                 : reduced         ? at::zeros(adj.sizes(), acc_options)
                                   : grad_adj;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_graph_conv_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc* ap = adj.data_ptr<acc>();
    if (compute_grad_x) {
      advise_huge_pages(grad_x);
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      for_each_task(s.B * s.T, [&] {
        return [&, terms = Terms<acc, scalar_t>()](int64_t r) mutable {
          grad_x_frame<scalar_t>(s, gp, ap, r, terms, gxp);
        };
      });
    }
    if (compute_grad_adj) {
      acc* tp = targets.data_ptr<acc>();
      for_each_task(units, [&] {
        return [&, xt = std::vector<acc>(), g_rows = std::vector<acc>(),
                terms = Terms<acc>()](int64_t unit) mutable {
          grad_adj_windows<scalar_t>(s, gp, xp, unit * per_unit,
                                     std::min(windows, (unit + 1) * per_unit), xt, g_rows, terms,
                                     tp + unit * s.R * s.L);
        };
      });
    }
  });
  if (compute_grad_adj && shared) {
    // Chunk partials summed in chunk order (elementwise adds: bitwise reproducible).
    auto sum = reduced ? at::zeros(adj.sizes(), acc_options) : grad_adj;
    for (int64_t unit = 0; unit < units; ++unit) sum.add_(targets[unit]);
    if (reduced) grad_adj.copy_(sum);
  } else if (compute_grad_adj && reduced) {
    grad_adj.copy_(targets);
  }
  return {grad_x, grad_adj};
}

}  // namespace
}  // namespace CPU_CAPABILITY

KEYPOINTOPS_CPU_KERNEL(window_graph_conv, CPU_CAPABILITY::window_graph_conv_cpu)
KEYPOINTOPS_CPU_KERNEL(window_graph_conv_backward, CPU_CAPABILITY::window_graph_conv_backward_cpu)

#if defined(CPU_CAPABILITY_DEFAULT)  // one registration, for every capability's build
TORCH_LIBRARY_IMPL(keypointops, CPU, m) {
  m.impl("window_graph_conv", KEYPOINTOPS_CPU_DISPATCH(window_graph_conv, CPU_CAPABILITY::window_graph_conv_cpu));
  m.impl("window_graph_conv_backward", KEYPOINTOPS_CPU_DISPATCH(window_graph_conv_backward, CPU_CAPABILITY::window_graph_conv_backward_cpu));
}
#endif

}  // namespace keypointops
