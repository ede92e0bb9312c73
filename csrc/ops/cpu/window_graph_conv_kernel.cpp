// window_graph_conv CPU kernel: register-blocked small GEMMs whose operands are gathered through
// row-pointer tables (nothing is copied).
//
// Window slot w of output frame t reads frame f_w = t - pad + w * dilation; the slots whose frame is
// in [0, T) form one range [lo, hi), the others read zeros and are skipped.  A_bt = adj[b, t] (the
// same matrix for every t, or every (b, t), when adj is per sample or shared).
// Forward, per (b, t):   out[b, t] = sum_{valid j} A_bt[:, j] (x) x[b, f(j), j % N]
//   ([L, C] = sum over the K <= L valid window nodes of a column of A times a row of x).
// grad_x, per (b, f), over the slots w whose window t = f + pad - w * dilation is in [0, T):
//   grad_x[b, f] = sum_{w, i} A_bt[i, wN:(w+1)N]^T (x) grad_out[b, t, i]   (K = slots * L terms)
//   Each frame of grad_x has one writer: no atomics.
// Both are "broadcast" GEMMs: a 6-row x 2-vector block of the output stays in registers while the
// K terms stream by (one broadcast of the left operand per row and term, channels vectorised).
// grad_adj, per (b, t): grad_A_bt[i, j] += grad_out[b, t, i, :] . x[b, f(j), j % N, :] (dot
// products over the channels, 3 x 3 blocks of vector accumulators), accumulated per window
// (per-window adj), over t per sample (per-sample adj), or over fixed chunks of windows for a shared
// adj, whose [chunks, L, L] partial sums are then added in chunk order.  The chunks depend on B * T
// only, and every sum runs in a fixed order: the results are bitwise the same for any thread count.
// One at::parallel_for per pass over (b, t) windows, (b, f) frames or chunks; no BLAS call, so no
// nested threading.
// Memory: forward only the output [B, T, L, C]; backward grad_x, grad_adj and, for a shared adj,
// at most kSharedAdjChunks [L, L] partials (plus per-thread pointer tables of <= window * L
// entries).  The unfolded window tensor [B, T, L, C] is never built.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ops/cpu/huge_pages.h"
#include "ops/window_graph_conv.h"

namespace keypointops {
namespace {

// Chunks of (b, t) windows for the partial sums of a shared adj's gradient.
constexpr int64_t kSharedAdjChunks = 64;

struct Shape {
  int64_t B, T, N, C, window, dilation, pad, L;
  int64_t adj_batch, adj_windows;  // adj as [adj_batch, adj_windows, L, L]: 1 or B, 1 or T

  Shape(const at::Tensor& x, const at::Tensor& adj, int64_t window_, int64_t dilation_)
      : B(x.size(0)), T(x.size(1)), N(x.size(2)), C(x.size(3)), window(window_),
        dilation(dilation_), pad(window_pad(window_, dilation_)), L(window_ * x.size(2)),
        adj_batch(adj.dim() >= 3 ? adj.size(0) : 1), adj_windows(adj.dim() == 4 ? adj.size(1) : 1) {}

  int64_t adj_offset(int64_t b, int64_t t) const {
    return ((adj_batch == 1 ? 0 : b) * adj_windows + (adj_windows == 1 ? 0 : t)) * L * L;
  }
};

// The K terms of a product sum_k left_k (x) right_k: term k has a left column (element m at
// left[k][m * left_stride]) and a right row (element n at right[k][n], contiguous).
template <typename scalar_t>
struct Terms {
  std::vector<const scalar_t*> left, right;

  void clear() {
    left.clear();
    right.clear();
  }
  void add(const scalar_t* l, const scalar_t* r) {
    left.push_back(l);
    right.push_back(r);
  }
  int64_t size() const { return static_cast<int64_t>(left.size()); }
};

// out[m0 + r, n0 : n0 + count] = sum_k left[k][(m0 + r) * stride] * right[k][n0 : n0 + count] for
// r < kRows, count <= 2 vectors; the 2 * kRows accumulators stay in registers.
template <typename scalar_t, int kRows>
void broadcast_block(const Terms<scalar_t>& terms, int64_t stride, int64_t m0, int64_t n0,
                     int64_t count, scalar_t* out, int64_t ld_out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  Vec acc0[kRows], acc1[kRows];
  for (int r = 0; r < kRows; ++r) acc0[r] = acc1[r] = Vec(scalar_t(0));
  const int64_t count0 = std::min(VL, count), count1 = count - count0;
  const scalar_t* const* left = terms.left.data();
  const scalar_t* const* right = terms.right.data();
  const int64_t K = terms.size();
  if (count == 2 * VL) {
    for (int64_t k = 0; k < K; ++k) {
      const Vec b0 = Vec::loadu(right[k] + n0), b1 = Vec::loadu(right[k] + n0 + VL);
      const scalar_t* a = left[k] + m0 * stride;
      for (int r = 0; r < kRows; ++r) {
        const Vec a_r(a[r * stride]);
        acc0[r] = at::vec::fmadd(a_r, b0, acc0[r]);
        acc1[r] = at::vec::fmadd(a_r, b1, acc1[r]);
      }
    }
  } else {  // channel tail: masked loads (lanes past `count` read as 0)
    for (int64_t k = 0; k < K; ++k) {
      const Vec b0 = Vec::loadu(right[k] + n0, count0);
      const Vec b1 = count1 > 0 ? Vec::loadu(right[k] + n0 + VL, count1) : Vec(scalar_t(0));
      const scalar_t* a = left[k] + m0 * stride;
      for (int r = 0; r < kRows; ++r) {
        const Vec a_r(a[r * stride]);
        acc0[r] = at::vec::fmadd(a_r, b0, acc0[r]);
        acc1[r] = at::vec::fmadd(a_r, b1, acc1[r]);
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    scalar_t* o = out + (m0 + r) * ld_out + n0;
    acc0[r].store(o, count0);
    if (count1 > 0) acc1[r].store(o + VL, count1);
  }
}

// out[m, n] = sum_k left[k][m * stride] * right[k][n] for m < M, n < N (out row stride ld_out);
// zeros when there is no term.
template <typename scalar_t>
void broadcast_gemm(const Terms<scalar_t>& terms, int64_t stride, int64_t M, int64_t N,
                    scalar_t* out, int64_t ld_out) {
  constexpr int64_t kCols = 2 * at::vec::Vectorized<scalar_t>::size();
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    const int64_t count = std::min(kCols, N - n0);
    // 6-row blocks, then one block of the 1-5 rows left, except that 7 rows left go as 4 + 3: a
    // single-row block does 2 FMAs per 5 loads, so it is left only when M is 1.
    int64_t m0 = 0;
    for (; M - m0 >= 6 && M - m0 != 7; m0 += 6) {
      broadcast_block<scalar_t, 6>(terms, stride, m0, n0, count, out, ld_out);
    }
    if (M - m0 == 7) {
      broadcast_block<scalar_t, 4>(terms, stride, m0, n0, count, out, ld_out);
      m0 += 4;
    }
    switch (M - m0) {
      case 5: broadcast_block<scalar_t, 5>(terms, stride, m0, n0, count, out, ld_out); break;
      case 4: broadcast_block<scalar_t, 4>(terms, stride, m0, n0, count, out, ld_out); break;
      case 3: broadcast_block<scalar_t, 3>(terms, stride, m0, n0, count, out, ld_out); break;
      case 2: broadcast_block<scalar_t, 2>(terms, stride, m0, n0, count, out, ld_out); break;
      case 1: broadcast_block<scalar_t, 1>(terms, stride, m0, n0, count, out, ld_out); break;
      default: break;
    }
  }
}

constexpr int kDotBlock = 3;  // 3 x 3 vector accumulators (+ 3 + 1 loaded vectors: 13 registers)

// target[i * L + cols[k]] += rows_a[i] . rows_b[k] (length C) for i < M, k < K.  Tails of i and k
// reuse the last row and drop its results, so every block has the same 3 x 3 shape.
template <typename scalar_t>
void dot_add(const scalar_t* const* rows_a, int64_t M, const scalar_t* const* rows_b,
             const int64_t* cols, int64_t K, int64_t C, scalar_t* target, int64_t L) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  for (int64_t i0 = 0; i0 < M; i0 += kDotBlock) {
    const scalar_t* a[kDotBlock];
    for (int r = 0; r < kDotBlock; ++r) a[r] = rows_a[std::min(i0 + r, M - 1)];
    for (int64_t k0 = 0; k0 < K; k0 += kDotBlock) {
      const scalar_t* b[kDotBlock];
      for (int s = 0; s < kDotBlock; ++s) b[s] = rows_b[std::min(k0 + s, K - 1)];
      Vec acc[kDotBlock][kDotBlock];
      for (auto& row : acc) {
        for (auto& v : row) v = Vec(scalar_t(0));
      }
      for (int64_t c = 0; c < C; c += VL) {
        const int64_t count = std::min(VL, C - c);
        Vec bv[kDotBlock];
        for (int s = 0; s < kDotBlock; ++s) bv[s] = Vec::loadu(b[s] + c, count);
        for (int r = 0; r < kDotBlock; ++r) {
          const Vec av = Vec::loadu(a[r] + c, count);
          for (int s = 0; s < kDotBlock; ++s) acc[r][s] = at::vec::fmadd(av, bv[s], acc[r][s]);
        }
      }
      for (int r = 0; r < kDotBlock && i0 + r < M; ++r) {
        for (int s = 0; s < kDotBlock && k0 + s < K; ++s) {
          scalar_t lanes[VL];
          acc[r][s].store(lanes);
          scalar_t sum = 0;
          for (int64_t v = 0; v < VL; ++v) sum += lanes[v];
          target[(i0 + r) * L + cols[k0 + s]] += sum;
        }
      }
    }
  }
}

// Appends the terms of window (b, t)'s valid nodes j: column j of A_bt and the row of x it reads.
template <typename scalar_t>
void window_terms(const Shape& s, const scalar_t* x, const scalar_t* a_bt, int64_t b, int64_t t,
                  Terms<scalar_t>& terms) {
  const SlotRange slots = slots_in_range(t, s.T, s.window, s.dilation);
  for (int64_t w = slots.lo; w < slots.hi; ++w) {
    const scalar_t* frame = x + ((b * s.T + t - s.pad + w * s.dilation) * s.N) * s.C;
    for (int64_t n = 0; n < s.N; ++n) terms.add(a_bt + w * s.N + n, frame + n * s.C);
  }
}

template <typename scalar_t>
void forward_windows(const Shape& s, const scalar_t* x, const scalar_t* adj, int64_t begin,
                     int64_t end, scalar_t* out) {
  Terms<scalar_t> terms;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / s.T, t = r % s.T;
    terms.clear();
    window_terms(s, x, adj + s.adj_offset(b, t), b, t, terms);
    broadcast_gemm(terms, s.L, s.L, s.C, out + r * s.L * s.C, s.C);
  }
}

template <typename scalar_t>
void grad_x_frames(const Shape& s, const scalar_t* grad_out, const scalar_t* adj, int64_t begin,
                   int64_t end, scalar_t* grad_x) {
  Terms<scalar_t> terms;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / s.T, f = r % s.T;
    terms.clear();
    const SlotRange slots = slots_reading_frame(f, s.T, s.window, s.dilation);
    for (int64_t w = slots.lo; w < slots.hi; ++w) {
      const int64_t t = f + s.pad - w * s.dilation;
      const scalar_t* a = adj + s.adj_offset(b, t) + w * s.N;  // A_bt[:, wN:(w+1)N]
      const scalar_t* g = grad_out + (b * s.T + t) * s.L * s.C;
      for (int64_t i = 0; i < s.L; ++i) terms.add(a + i * s.L, g + i * s.C);
    }
    broadcast_gemm(terms, 1, s.N, s.C, grad_x + r * s.N * s.C, s.C);
  }
}

// target += grad_A of the windows [begin, end).
template <typename scalar_t>
void add_grad_adj_windows(const Shape& s, const scalar_t* grad_out, const scalar_t* x,
                          int64_t begin, int64_t end, scalar_t* target) {
  std::vector<const scalar_t*> grad_rows(s.L), x_rows;
  std::vector<int64_t> cols;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / s.T, t = r % s.T;
    x_rows.clear();
    cols.clear();
    const SlotRange slots = slots_in_range(t, s.T, s.window, s.dilation);
    for (int64_t w = slots.lo; w < slots.hi; ++w) {
      const scalar_t* frame = x + ((b * s.T + t - s.pad + w * s.dilation) * s.N) * s.C;
      for (int64_t n = 0; n < s.N; ++n) {
        x_rows.push_back(frame + n * s.C);
        cols.push_back(w * s.N + n);
      }
    }
    for (int64_t i = 0; i < s.L; ++i) grad_rows[i] = grad_out + (r * s.L + i) * s.C;
    dot_add(grad_rows.data(), s.L, x_rows.data(), cols.data(), static_cast<int64_t>(cols.size()),
            s.C, target, s.L);
  }
}

void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "window_graph_conv: the CPU kernel takes float32 or float64 x, got ", x.scalar_type());
}

at::Tensor window_graph_conv_cpu(const at::Tensor& x_in, const at::Tensor& adj_in, int64_t window,
                                 int64_t dilation) {
  check_window_graph_conv_args(x_in, adj_in, window, dilation);
  check_cpu_dtype(x_in);
  const Shape s(x_in, adj_in, window, dilation);
  const auto x = x_in.contiguous();
  const auto adj = adj_in.contiguous();
  auto out = at::empty({s.B, s.T, s.L, s.C}, x.options());
  if (out.numel() == 0) return out;
  advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "window_graph_conv_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = adj.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.T, 1, [&](int64_t begin, int64_t end) {
      forward_windows<scalar_t>(s, xp, ap, begin, end, op);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& adj_in, int64_t window,
    int64_t dilation, bool compute_grad_x, bool compute_grad_adj) {
  check_window_graph_conv_args(x_in, adj_in, window, dilation);
  check_window_graph_conv_grad_out(grad_out_in, x_in, window);
  check_cpu_dtype(x_in);
  const Shape s(x_in, adj_in, window, dilation);
  const auto grad_out = grad_out_in.contiguous();
  const auto x = x_in.contiguous();
  const auto adj = adj_in.contiguous();
  const auto options = x.options();
  auto grad_x = compute_grad_x ? at::empty(x.sizes(), options) : at::empty({0}, options);
  auto grad_adj = compute_grad_adj ? at::zeros(adj.sizes(), options) : at::empty({0}, options);
  const int64_t windows = s.B * s.T;
  if (x.numel() == 0) {
    return {grad_x, grad_adj};
  }
  const bool shared = adj.dim() == 2;
  const AdjGradUnits work = adj_grad_units(adj.dim(), s.B, s.T, kSharedAdjChunks);
  const int64_t per_unit = work.windows_per_unit, units = work.units;
  auto targets = compute_grad_adj && shared ? at::zeros({units, s.L, s.L}, options) : grad_adj;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "window_graph_conv_backward_cpu", [&] {
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = adj.data_ptr<scalar_t>();
    if (compute_grad_x) {
      advise_huge_pages(grad_x);
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, windows, 1, [&](int64_t begin, int64_t end) {
        grad_x_frames<scalar_t>(s, gp, ap, begin, end, gxp);
      });
    }
    if (compute_grad_adj) {
      scalar_t* tp = targets.data_ptr<scalar_t>();
      at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit) {
          add_grad_adj_windows<scalar_t>(s, gp, xp, unit * per_unit,
                                         std::min(windows, (unit + 1) * per_unit),
                                         tp + unit * s.L * s.L);
        }
      });
    }
  });
  if (compute_grad_adj && shared) {
    // Chunk partials summed in chunk order (elementwise adds: bitwise reproducible).
    for (int64_t unit = 0; unit < units; ++unit) grad_adj.add_(targets[unit]);
  }
  return {grad_x, grad_adj};
}

}  // namespace

TORCH_LIBRARY_IMPL(keypointops, CPU, m) {
  m.impl("window_graph_conv", &window_graph_conv_cpu);
  m.impl("window_graph_conv_backward", &window_graph_conv_backward_cpu);
}

}  // namespace keypointops
