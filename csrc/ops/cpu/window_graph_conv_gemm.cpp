// window_graph_conv through PyTorch's GEMM library (at::bmm / at::mm / at::baddbmm on strided
// views of the inputs; ops/cpu/gemm_route.h says when).  Compiled once, without instruction-set
// flags: the library dispatches on the CPU itself.
//
// With dilation 1, window t's valid slots [lo, hi) (ops/window_graph_conv.h) read the consecutive
// frames s_t + lo .. s_t + hi - 1 (s_t = t * stride - pad), i.e. (hi - lo) * N consecutive rows of
// x[b] ([T * N, C], rows contiguous).  The windows whose slots are all valid, t in [t0, t1), are
// therefore the matrices of one overlapping strided view, [t1 - t0, L, C] with batch stride
// stride * N * C, that the library reads in place: the unfolded [B, T', L, C] tensor is never built.
// Per clip b, with A_bt = adj[b, t] ([R, L]; shared and per-sample adj as stride-0 views over t):
//   out[b, t0:t1] = bmm(A_b[t0:t1], windows_b)
//   out[b, t]     = A_bt[:, lo N:hi N] @ x[b, s_t + lo : s_t + hi]        (the other windows)
// grad_x of frame f sums A_bt[:, wN:(w+1)N]^T @ grad_out[b, t] over the windows t whose slot w
// reads f.  With stride 1 and an adj shared over t, the frames read by all `window` windows, f in
// [f0, f1), read windows t = f + pad - window + 1 .. f + pad, consecutive [window * R, C] rows of
// grad_out[b] (one more overlapping strided view), with one matrix for every such frame:
//   grad_x[b, f0:f1] = bmm(Ab, grad_out windows),  Ab = [A_{window-1}^T | ... | A_0^T]  [N, window R]
// and the other frames sum their valid slots one product at a time.  Otherwise (stride > 1 or a
// per-window adj), per clip b and slot w, over the windows t whose slot w is valid (frames s_t + w,
// which for one w are distinct and stride frames apart: again a strided view):
//   grad_x[b, s_t + w] += A_bt[:, wN:(w+1)N]^T @ grad_out[b, t]             (baddbmm, in slot order)
// grad_adj, per window: grad_out[b, t] @ x-window^T ([R, C] x [C, L]), on the same views;
// summed over t (per-sample adj) and over b (shared adj) in blocks of at most kWindowBlock
// windows (one bmm into a [block, R, L] buffer, then its sum), in a fixed order.
// The results are deterministic for a given thread count (the library's own blocking may depend on
// it, unlike the loops').
// Memory: out, grad_x (zeros from fresh pages), grad_adj, one [kWindowBlock, R, L] buffer; the
// library's own packing buffers.
#include "ops/cpu/window_graph_conv_gemm.h"

#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "ops/cpu/gemm_route.h"
#include "ops/cpu/huge_pages.h"
#include "ops/cpu/window_graph_conv_shape.h"
#include "ops/window_graph_conv.h"

namespace keypointops {
namespace {

constexpr int64_t kWindowBlock = 16;

// Shape (dilation 1) and the windows whose slots are all valid, t in [t0, t1) (consecutive; t0 == t1:
// none).
struct Windows : Shape {
  int64_t t0 = 0, t1 = 0;

  Windows(const at::Tensor& x, const at::Tensor& adj, int64_t window_, int64_t stride_)
      : Shape(x, adj, window_, 1, stride_) {
    int64_t t = 0;
    while (t < To && !full(t)) ++t;
    t0 = t1 = t;
    while (t1 < To && full(t1)) ++t1;
  }

  bool full(int64_t t) const {
    const SlotRange s = slots(t);
    return s.lo == 0 && s.hi == window;
  }

  // Windows t0 + i, i in [i0, i0 + n), of clip b: [n, L, C] over x's storage.
  at::Tensor full_windows(const at::Tensor& x, int64_t b, int64_t i0, int64_t n) const {
    const int64_t first = b * T + start(t0 + i0);
    return x.as_strided({n, L, C}, {stride * N * C, C, 1}, x.storage_offset() + first * N * C);
  }
  // Frames [f, f + k) of clip b as rows: [k * N, C].
  at::Tensor frames(const at::Tensor& x, int64_t b, int64_t f, int64_t k) const {
    return x.select(0, b).narrow(0, f, k).reshape({k * N, C});
  }
};

// adj of clip b as [T', R, L] (a stride-0 view over t for shared and per-sample adj).
at::Tensor clip_adj(const at::Tensor& adj, int64_t b, int64_t To) {
  if (adj.dim() == 4) return adj.select(0, b);
  const at::Tensor a = adj.dim() == 3 ? adj.select(0, b) : adj;
  return a.unsqueeze(0).expand({To, a.size(0), a.size(1)});
}

// grad_x[b] ([T, N, C], zeros) of clip b with stride 1 and one [R, L] matrix a for all windows;
// g = grad_out[b] ([T', R, C]).
void grad_x_windowed(const Windows& s, const at::Tensor& g, const at::Tensor& a, at::Tensor grad_x_b) {
  // Frames read by every slot: t = f + pad - w in [0, T') for all w.
  const int64_t f0 = std::max<int64_t>(0, s.window - 1 - s.pad);
  const int64_t f1 = std::min(s.T, s.To - s.pad);
  if (f1 > f0) {
    std::vector<at::Tensor> blocks;  // A_w^T for w = window - 1 .. 0: the windows' t order
    for (int64_t w = s.window - 1; w >= 0; --w) blocks.push_back(a.narrow(1, w * s.N, s.N).t());
    const at::Tensor stacked = at::cat(blocks, 1);  // [N, window R]
    const int64_t n = f1 - f0, first = f0 + s.pad - (s.window - 1);
    const at::Tensor windows = g.as_strided({n, s.window * s.R, s.C}, {s.R * s.C, s.C, 1},
                                            g.storage_offset() + first * s.R * s.C);
    auto out = grad_x_b.narrow(0, f0, n);
    at::bmm_out(out, stacked.unsqueeze(0).expand({n, s.N, s.window * s.R}), windows);
  }
  for (int64_t f = 0; f < s.T; ++f) {
    if (f >= f0 && f < f1) continue;
    auto target = grad_x_b.select(0, f);
    for (int64_t w = 0; w < s.window; ++w) {
      const int64_t t = window_reading_frame(f, w, s.To, s.window, 1, 1);
      if (t >= 0) target.addmm_(a.narrow(1, w * s.N, s.N).t(), g.select(0, t));
    }
  }
}

}  // namespace

bool window_graph_conv_takes_library(const at::Tensor& x, int64_t dilation) {
  const auto dtype = x.scalar_type();
  return dilation == 1 && (dtype == at::kFloat || dtype == at::kDouble) &&
         active_gemm_route() == GemmRoute::LIBRARY;
}

at::Tensor window_graph_conv_library(const at::Tensor& x, const at::Tensor& adj, int64_t window,
                                     int64_t stride) {
  const Windows s(x, adj, window, stride);
  auto out = at::empty({s.B, s.To, s.R, s.C}, x.options());
  if (out.numel() == 0) return out;
  populate_huge_pages(out);
  for (int64_t b = 0; b < s.B; ++b) {
    const at::Tensor a = clip_adj(adj, b, s.To);
    const at::Tensor out_b = out.select(0, b);
    if (s.t1 > s.t0) {
      auto out_full = out_b.narrow(0, s.t0, s.t1 - s.t0);
      at::bmm_out(out_full, a.narrow(0, s.t0, s.t1 - s.t0), s.full_windows(x, b, 0, s.t1 - s.t0));
    }
    for (int64_t t = 0; t < s.To; ++t) {
      if (t >= s.t0 && t < s.t1) continue;
      const SlotRange slots = s.slots(t);
      auto out_t = out_b.select(0, t);
      if (slots.hi == slots.lo) {
        out_t.zero_();
        continue;
      }
      const int64_t k = slots.hi - slots.lo;
      at::mm_out(out_t, a.select(0, t).narrow(1, slots.lo * s.N, k * s.N),
                 s.frames(x, b, s.start(t) + slots.lo, k));
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward_library(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& adj, int64_t window,
    int64_t stride, bool compute_grad_x, bool compute_grad_adj) {
  const Windows s(x, adj, window, stride);
  auto grad_x = compute_grad_x ? zeros_from_fresh_pages(x.sizes(), x.options(), at::MemoryFormat::Contiguous)
                               : at::empty({0}, x.options());
  // (zeros: the per-slot products accumulate into it; the windowed ones overwrite their frames)
  auto grad_adj = compute_grad_adj ? at::zeros(adj.sizes(), adj.options()) : at::empty({0}, adj.options());
  if (x.numel() == 0 || s.To == 0) return {grad_x, grad_adj};
  const bool per_window = adj.dim() == 4;
  auto block = at::empty({std::min(kWindowBlock, s.t1 - s.t0), s.R, s.L}, adj.options());
  for (int64_t b = 0; b < s.B; ++b) {
    const at::Tensor a = clip_adj(adj, b, s.To);
    const at::Tensor g = grad_out.select(0, b);  // [T', R, C]
    if (compute_grad_x && s.stride == 1 && !per_window) {
      grad_x_windowed(s, g, a.select(0, 0), grad_x.select(0, b));
    } else if (compute_grad_x) {
      for (int64_t w = 0; w < s.window; ++w) {
        // windows t whose slot w reads a frame: 0 <= t * stride - pad + w < T
        const int64_t lo = std::max<int64_t>(0, (s.pad - w + s.stride - 1) / s.stride);
        const int64_t last = s.T - 1 + s.pad - w;
        const int64_t hi = last < 0 ? 0 : std::min(s.To, last / s.stride + 1);
        if (hi <= lo) continue;
        const int64_t n = hi - lo, first = b * s.T + s.start(lo) + w;
        auto target = grad_x.as_strided({n, s.N, s.C}, {s.stride * s.N * s.C, s.C, 1},
                                        grad_x.storage_offset() + first * s.N * s.C);
        target.baddbmm_(a.narrow(0, lo, n).narrow(2, w * s.N, s.N).transpose(1, 2), g.narrow(0, lo, n));
      }
    }
    if (!compute_grad_adj) continue;
    // grad_adj's [R, L] target of window t: its own, the clip's, or the shared one.
    auto target = [&](int64_t t) { return per_window ? grad_adj.select(0, b).select(0, t)
                                          : adj.dim() == 3 ? grad_adj.select(0, b) : grad_adj; };
    for (int64_t i0 = 0; i0 < s.t1 - s.t0; i0 += kWindowBlock) {
      const int64_t n = std::min(kWindowBlock, s.t1 - s.t0 - i0);
      const int64_t t = s.t0 + i0;
      const auto windows = s.full_windows(x, b, i0, n).transpose(1, 2);  // [n, C, L]
      if (per_window) {
        auto out = grad_adj.select(0, b).narrow(0, t, n);
        at::bmm_out(out, g.narrow(0, t, n), windows);
      } else {
        auto part = block.narrow(0, 0, n);
        at::bmm_out(part, g.narrow(0, t, n), windows);
        target(t).add_(part.sum(0));
      }
    }
    for (int64_t t = 0; t < s.To; ++t) {
      if (t >= s.t0 && t < s.t1) continue;
      const SlotRange slots = s.slots(t);
      if (slots.hi == slots.lo) continue;
      const int64_t k = slots.hi - slots.lo;
      target(t).narrow(1, slots.lo * s.N, k * s.N)
          .addmm_(g.select(0, t), s.frames(x, b, s.start(t) + slots.lo, k).t());
    }
  }
  return {grad_x, grad_adj};
}

}  // namespace keypointops
