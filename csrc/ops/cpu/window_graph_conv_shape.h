#pragma once
// The sizes of one window_graph_conv call, shared by its CPU routes (the loops of
// window_graph_conv_kernel.cpp and the GEMM library's of window_graph_conv_gemm.cpp).
#include <ATen/core/Tensor.h>

#include "ops/window_graph_conv.h"

namespace keypointops {

struct Shape {
  int64_t B, T, N, C, window, dilation, stride, pad, L;
  int64_t To, R;                   // windows per sample T', adj rows R = S * L
  int64_t adj_batch, adj_windows;  // adj as [adj_batch, adj_windows, R, L]: 1 or B, 1 or T'

  Shape(const at::Tensor& x, const at::Tensor& adj, int64_t window_, int64_t dilation_,
        int64_t stride_)
      : B(x.size(0)), T(x.size(1)), N(x.size(2)), C(x.size(3)), window(window_),
        dilation(dilation_), stride(stride_), pad(window_pad(window_, dilation_)),
        L(window_ * x.size(2)), To(window_count(x.size(1), window_, dilation_, stride_)),
        R(adj.size(-2)), adj_batch(adj.dim() >= 3 ? adj.size(0) : 1),
        adj_windows(adj.dim() == 4 ? adj.size(1) : 1) {}

  int64_t adj_offset(int64_t b, int64_t t) const {
    return ((adj_batch == 1 ? 0 : b) * adj_windows + (adj_windows == 1 ? 0 : t)) * R * L;
  }
  // First frame of window t (may be negative: padding).
  int64_t start(int64_t t) const { return t * stride - pad; }
  // The slots of window t whose frame lies in the clip.
  SlotRange slots(int64_t t) const { return slots_in_range(t, T, window, dilation, stride); }
};

}  // namespace keypointops
