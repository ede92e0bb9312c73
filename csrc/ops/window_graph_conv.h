#pragma once
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <tuple>

namespace keypointops {

// Device-agnostic argument checks shared by the CPU and CUDA kernels: x [B, T, N, C], adj [L, L],
// [B, L, L] or [B, T, L, L] with L = window * N, window odd and positive, dilation positive, same
// dtype and device.
void check_window_graph_conv_args(const at::Tensor& x, const at::Tensor& adj, int64_t window,
                                  int64_t dilation);

// grad_out must be [B, T, L, C] with x's dtype and device.
void check_window_graph_conv_grad_out(const at::Tensor& grad_out, const at::Tensor& x,
                                      int64_t window);

// Window slot w of output frame t reads frame t - pad + w * dilation; slots outside [0, T) read
// zeros.  The slots that read a frame inside [0, T) form one range [lo, hi).
inline int64_t window_pad(int64_t window, int64_t dilation) { return (window - 1) * dilation / 2; }

struct SlotRange {
  int64_t lo, hi;
};

// The slots w of output frame t whose frame t - pad + w * dilation lies in [0, T).
inline SlotRange slots_in_range(int64_t t, int64_t frames, int64_t window, int64_t dilation) {
  const int64_t pad = window_pad(window, dilation);
  const int64_t lo = pad > t ? (pad - t + dilation - 1) / dilation : 0;
  const int64_t hi = std::min(window, (frames - 1 - t + pad) / dilation + 1);
  return {lo, std::max(lo, hi)};
}

// The slots w whose window reads frame f: output frame t = f + pad - w * dilation lies in [0, T).
inline SlotRange slots_reading_frame(int64_t f, int64_t frames, int64_t window, int64_t dilation) {
  const int64_t pad = window_pad(window, dilation);
  const int64_t excess = f + pad - (frames - 1);  // w * dilation >= excess keeps t < T
  const int64_t lo = excess > 0 ? (excess + dilation - 1) / dilation : 0;
  const int64_t hi = std::min(window, (f + pad) / dilation + 1);
  return {lo, std::max(lo, hi)};
}

// grad_adj is summed over work units of consecutive windows r = b * T + t, each unit into its own
// [L, L] target: one window (per-window adj, adj_dim 4), one sample (per-sample adj, adj_dim 3) or
// a chunk of at most max_chunks of a shared adj (adj_dim 2), whose partial sums are added
// afterwards in a fixed order.
struct AdjGradUnits {
  int64_t windows_per_unit, units;
};

inline AdjGradUnits adj_grad_units(int64_t adj_dim, int64_t batch, int64_t frames,
                                   int64_t max_chunks) {
  const int64_t windows = batch * frames;
  if (windows == 0) return {1, 0};
  const int64_t per_unit = adj_dim == 4   ? 1
                           : adj_dim == 3 ? frames
                                          : (windows + max_chunks - 1) / max_chunks;
  return {per_unit, (windows + per_unit - 1) / per_unit};
}

// C++ entry points (go through the dispatcher, like torch.ops.keypointops.*).
at::Tensor window_graph_conv(const at::Tensor& x, const at::Tensor& adj, int64_t window,
                             int64_t dilation);
std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& adj, int64_t window,
    int64_t dilation, bool compute_grad_x, bool compute_grad_adj);

}  // namespace keypointops
