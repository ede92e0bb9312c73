#pragma once
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <tuple>

namespace keypointops {

// Device-agnostic argument checks shared by the CPU and CUDA kernels: x [B, T, N, C], adj
// [R, L], [B, R, L] or [B, T', R, L] with L = window * N and R = S * L (S >= 1 stacked scales),
// window, dilation and stride positive, same dtype and device.
void check_window_graph_conv_args(const at::Tensor& x, const at::Tensor& adj, int64_t window,
                                  int64_t dilation, int64_t stride);

// grad_out must be [B, T', R, C] with x's dtype and device.
void check_window_graph_conv_grad_out(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& adj, int64_t window, int64_t dilation,
                                      int64_t stride);

// The windows are those of nn.Unfold (MS-G3D's UnfoldTemporalWindows) over the frames padded by
// pad zeros on both sides: window t' starts at padded frame t' * stride, so its slot w reads frame
// t' * stride - pad + w * dilation (zeros outside [0, T)), and there are
// T' = floor((T + 2 pad - (window - 1) dilation - 1) / stride) + 1 of them (0 when the padded
// clip is shorter than one window).  Odd windows with stride 1: T' = T, window t centred on t.
C10_HOST_DEVICE inline int64_t window_pad(int64_t window, int64_t dilation) {
  return (window - 1) * dilation / 2;
}

inline int64_t window_count(int64_t frames, int64_t window, int64_t dilation, int64_t stride) {
  const int64_t reach = frames + 2 * window_pad(window, dilation) - (window - 1) * dilation;
  return reach <= 0 ? 0 : (reach - 1) / stride + 1;
}

struct SlotRange {
  int64_t lo, hi;
};

// The slots w of window t whose frame t * stride - pad + w * dilation lies in [0, T): one range.
inline SlotRange slots_in_range(int64_t t, int64_t frames, int64_t window, int64_t dilation,
                                int64_t stride) {
  const int64_t start = t * stride - window_pad(window, dilation);
  const int64_t lo = start < 0 ? (-start + dilation - 1) / dilation : 0;
  const int64_t last = frames - 1 - start;  // slots with w * dilation <= last
  const int64_t hi = last < 0 ? 0 : std::min(window, last / dilation + 1);
  return {lo, std::max(lo, hi)};
}

// The window t whose slot w reads frame f (t * stride = f + pad - w * dilation), or -1 if none
// of the `windows` windows does.
C10_HOST_DEVICE inline int64_t window_reading_frame(int64_t f, int64_t w, int64_t windows,
                                                    int64_t window, int64_t dilation,
                                                    int64_t stride) {
  const int64_t start = f + window_pad(window, dilation) - w * dilation;
  if (start < 0 || start % stride != 0 || start / stride >= windows) return -1;
  return start / stride;
}

// grad_adj is summed over work units of consecutive windows r = b * T' + t, each unit into its own
// [R, L] target: one window (per-window adj, adj_dim 4), one sample (per-sample adj, adj_dim 3) or
// a chunk of at most max_chunks of a shared adj (adj_dim 2), whose partial sums are added
// afterwards in a fixed order.
struct AdjGradUnits {
  int64_t windows_per_unit, units;
};

inline AdjGradUnits adj_grad_units(int64_t adj_dim, int64_t batch, int64_t windows_per_sample,
                                   int64_t max_chunks) {
  const int64_t windows = batch * windows_per_sample;
  if (windows == 0) return {1, 0};
  const int64_t per_unit = adj_dim == 4   ? 1
                           : adj_dim == 3 ? windows_per_sample
                                          : (windows + max_chunks - 1) / max_chunks;
  return {per_unit, (windows + per_unit - 1) / per_unit};
}

// C++ entry points (go through the dispatcher, like torch.ops.keypointops.*).
at::Tensor window_graph_conv(const at::Tensor& x, const at::Tensor& adj, int64_t window,
                             int64_t dilation, int64_t stride);
std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& adj, int64_t window,
    int64_t dilation, int64_t stride, bool compute_grad_x, bool compute_grad_adj);

}  // namespace keypointops
