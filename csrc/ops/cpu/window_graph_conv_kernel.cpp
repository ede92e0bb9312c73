// window_graph_conv CPU kernel: small GEMMs on views of x, adj and grad_out.
//
// Window slot w of output frame t reads frame f_w = t - pad + w * dilation; the slots whose frame is
// in [0, T) form one range [lo, hi) (the others read zeros and are skipped).  A_bt = adj[b, t]
// (the same matrix for every t, or every (b, t), when adj is per sample or shared).
// Forward, per (b, t):   out[b, t] = sum_w A_bt[:, wN:(w+1)N] @ x[b, f_w]          ([L, N] @ [N, C])
//   With dilation 1 the frames of the slots lo..hi-1 are consecutive rows of x[b] viewed as
//   [T*N, C]: a single [L, K] @ [K, C] GEMM with K = (hi - lo) * N.
// grad_x, per (b, f), over the slots w whose window t = f + pad - w * dilation is in [0, T):
//   grad_x[b, f] = sum_w A_bt[:, wN:(w+1)N]^T @ grad_out[b, t]                     ([N, L] @ [L, C])
//   Each frame of grad_x has one writer: no atomics, deterministic.
// grad_adj, per (b, t):  grad_A_bt[:, wN:(w+1)N] += grad_out[b, t] @ x[b, f_w]^T   ([L, C] @ [C, K])
//   accumulated per window (per-window adj), over t per sample (per-sample adj), or over fixed
//   chunks of (b, t) for a shared adj whose [chunks, L, L] partial sums are then added in chunk
//   order: the chunks depend on B * T only, so the result is the same for any thread count.
// The GEMMs run in BLAS (at::cpu::mm_out / addmm_) on from_blob views, one (b, t) or (b, f) per
// task of at::parallel_for (BLAS single-threaded inside it).
// Memory: forward only the output [B, T, L, C]; backward grad_x, grad_adj and, for a shared adj,
// at most kSharedAdjChunks [L, L] partials.  The unfolded window tensor [B, T, L, C] is never built.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <torch/library.h>

#include <algorithm>

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

// Row-major [rows, cols] matrix over raw memory with row stride ld, and its transpose [cols, rows]:
// the GEMM operands (plain tensors: no autograd, no dispatcher call to make them).
template <typename scalar_t>
at::Tensor matrix(const scalar_t* data, int64_t rows, int64_t cols, int64_t ld,
                  const at::TensorOptions& options) {
  return at::from_blob(const_cast<scalar_t*>(data), {rows, cols}, {ld, 1}, options);
}

template <typename scalar_t>
at::Tensor matrix_t(const scalar_t* data, int64_t rows, int64_t cols, int64_t ld,
                    const at::TensorOptions& options) {
  return at::from_blob(const_cast<scalar_t*>(data), {cols, rows}, {1, ld}, options);
}

// c = a @ b, or c += a @ b.
void gemm(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    at::cpu::addmm_(c, a, b);
  } else {
    at::cpu::mm_out(c, a, b);
  }
}

// Calls fn(w_begin, w_end, frame) for runs of slots [w_begin, w_end) that read consecutive frames
// from `frame` on: the whole valid range with dilation 1, one slot at a time otherwise.
template <typename Fn>
void for_each_frame_run(const Shape& s, int64_t t, Fn&& fn) {
  const SlotRange slots = slots_in_range(t, s.T, s.window, s.dilation);
  const int64_t first = t - s.pad;  // frame of slot 0
  if (s.dilation == 1) {
    if (slots.lo < slots.hi) fn(slots.lo, slots.hi, first + slots.lo);
    return;
  }
  for (int64_t w = slots.lo; w < slots.hi; ++w) fn(w, w + 1, first + w * s.dilation);
}

template <typename scalar_t>
void forward_window(const Shape& s, const scalar_t* x, const scalar_t* adj, int64_t b, int64_t t,
                    scalar_t* out, const at::TensorOptions& options) {
  const scalar_t* a = adj + s.adj_offset(b, t);
  const scalar_t* x_b = x + b * s.T * s.N * s.C;
  auto out_bt = matrix(out + (b * s.T + t) * s.L * s.C, s.L, s.C, s.C, options);
  bool accumulate = false;
  for_each_frame_run(s, t, [&](int64_t w_begin, int64_t w_end, int64_t frame) {
    const int64_t K = (w_end - w_begin) * s.N;
    gemm(out_bt, matrix(a + w_begin * s.N, s.L, K, s.L, options),
         matrix(x_b + frame * s.N * s.C, K, s.C, s.C, options), accumulate);
    accumulate = true;
  });
  if (!accumulate) out_bt.zero_();
}

template <typename scalar_t>
void grad_x_frame(const Shape& s, const scalar_t* grad_out, const scalar_t* adj, int64_t b,
                  int64_t f, scalar_t* grad_x, const at::TensorOptions& options) {
  auto grad_x_bf = matrix(grad_x + (b * s.T + f) * s.N * s.C, s.N, s.C, s.C, options);
  const SlotRange slots = slots_reading_frame(f, s.T, s.window, s.dilation);
  bool accumulate = false;
  for (int64_t w = slots.lo; w < slots.hi; ++w) {
    const int64_t t = f + s.pad - w * s.dilation;
    gemm(grad_x_bf, matrix_t(adj + s.adj_offset(b, t) + w * s.N, s.L, s.N, s.L, options),
         matrix(grad_out + (b * s.T + t) * s.L * s.C, s.L, s.C, s.C, options), accumulate);
    accumulate = true;
  }
  if (!accumulate) grad_x_bf.zero_();
}

// target[:, wN:(w+1)N] += grad_out[b, t] @ x[b, f_w]^T for the valid slots of window (b, t).
template <typename scalar_t>
void add_grad_adj_window(const Shape& s, const scalar_t* grad_out, const scalar_t* x, int64_t b,
                         int64_t t, scalar_t* target, const at::TensorOptions& options) {
  const auto g = matrix(grad_out + (b * s.T + t) * s.L * s.C, s.L, s.C, s.C, options);
  const scalar_t* x_b = x + b * s.T * s.N * s.C;
  for_each_frame_run(s, t, [&](int64_t w_begin, int64_t w_end, int64_t frame) {
    const int64_t K = (w_end - w_begin) * s.N;
    auto block = matrix(target + w_begin * s.N, s.L, K, s.L, options);
    gemm(block, g, matrix_t(x_b + frame * s.N * s.C, K, s.C, s.C, options), true);
  });
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
  const auto options = x.options();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "window_graph_conv_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = adj.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        forward_window<scalar_t>(s, xp, ap, r / s.T, r % s.T, op, options);
      }
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
  if (x.numel() == 0 || windows == 0 || s.L == 0) {
    if (compute_grad_x) grad_x.zero_();
    return {grad_x, grad_adj};
  }
  // grad_adj work units: each adds the windows [unit * per_unit, (unit + 1) * per_unit) into its
  // own [L, L] target: one window (per-window adj), one sample (per-sample adj), or one chunk of a
  // shared adj, whose partial sums are added up afterwards.
  const bool shared = adj.dim() == 2;
  const int64_t per_unit = adj.dim() == 4 ? 1
                           : adj.dim() == 3 ? s.T
                                            : (windows + kSharedAdjChunks - 1) / kSharedAdjChunks;
  const int64_t units = (windows + per_unit - 1) / per_unit;
  auto targets = compute_grad_adj && shared ? at::zeros({units, s.L, s.L}, options) : grad_adj;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "window_graph_conv_backward_cpu", [&] {
    const scalar_t* gp = grad_out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ap = adj.data_ptr<scalar_t>();
    if (compute_grad_x) {
      scalar_t* gxp = grad_x.data_ptr<scalar_t>();
      at::parallel_for(0, windows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          grad_x_frame<scalar_t>(s, gp, ap, r / s.T, r % s.T, gxp, options);
        }
      });
    }
    if (compute_grad_adj) {
      scalar_t* tp = targets.data_ptr<scalar_t>();
      at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
        for (int64_t unit = begin; unit < end; ++unit) {
          for (int64_t r = unit * per_unit; r < std::min(windows, (unit + 1) * per_unit); ++r) {
            add_grad_adj_window<scalar_t>(s, gp, xp, r / s.T, r % s.T,
                                          tp + unit * s.L * s.L, options);
          }
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
