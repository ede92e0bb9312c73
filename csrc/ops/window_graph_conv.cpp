// window_graph_conv: argument checks shared by every device, and the C++ dispatcher entry points.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include "ops/window_graph_conv.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <vector>

namespace keypointops {

void check_window_graph_conv_args(const at::Tensor& x, const at::Tensor& adj, int64_t window,
                                  int64_t dilation, int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "window_graph_conv: x must be [B, T, N, C], got ", x.dim(), " dims");
  TORCH_CHECK(x.is_floating_point(), "window_graph_conv: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(window > 0, "window_graph_conv: window must be positive, got ", window);
  TORCH_CHECK(dilation > 0, "window_graph_conv: dilation must be positive, got ", dilation);
  TORCH_CHECK(stride > 0, "window_graph_conv: stride must be positive, got ", stride);
  const int64_t L = window * x.size(2);
  const int64_t rows = adj.dim() >= 2 ? adj.size(-2) : -1;
  const bool stacked = L == 0 ? rows == 0 : rows > 0 && rows % L == 0;
  TORCH_CHECK(adj.dim() >= 2 && adj.dim() <= 4 && adj.size(-1) == L && stacked,
              "window_graph_conv: adj must be [R, L], [B, R, L] or [B, T', R, L] with L = window * N "
              "= ", L, " and R = S * L (S stacked scales), got ", adj.sizes());
  TORCH_CHECK(adj.dim() < 3 || adj.size(0) == x.size(0), "window_graph_conv: adj holds ",
              adj.size(0), " samples but x holds B = ", x.size(0));
  const int64_t windows = window_count(x.size(1), window, dilation, stride);
  TORCH_CHECK(adj.dim() < 4 || adj.size(1) == windows, "window_graph_conv: adj holds ",
              adj.size(1), " windows per sample but x's T = ", x.size(1), " frames make T' = ",
              windows);
  TORCH_CHECK(adj.scalar_type() == x.scalar_type(), "window_graph_conv: adj (", adj.scalar_type(),
              ") must have the dtype of x (", x.scalar_type(), ")");
  TORCH_CHECK(adj.device() == x.device(), "window_graph_conv: x (", x.device(), ") and adj (",
              adj.device(), ") must be on the same device");
}

void check_window_graph_conv_grad_out(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& adj, int64_t window, int64_t dilation,
                                      int64_t stride) {
  const std::vector<int64_t> expected{x.size(0), window_count(x.size(1), window, dilation, stride),
                                      adj.size(-2), x.size(3)};
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(expected), "window_graph_conv_backward: grad_out "
              "must be [B, T', R, C] = ", at::IntArrayRef(expected), ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              "window_graph_conv_backward: grad_out (", grad_out.scalar_type(), ", ",
              grad_out.device(), ") must match x (", x.scalar_type(), ", ", x.device(), ")");
}

at::Tensor window_graph_conv(const at::Tensor& x, const at::Tensor& adj, int64_t window,
                             int64_t dilation, int64_t stride) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keypointops::window_graph_conv", "")
                       .typed<decltype(window_graph_conv)>();
  return op.call(x, adj, window, dilation, stride);
}

std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& adj, int64_t window,
    int64_t dilation, int64_t stride, bool compute_grad_x, bool compute_grad_adj) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keypointops::window_graph_conv_backward", "")
                       .typed<decltype(window_graph_conv_backward)>();
  return op.call(grad_out, x, adj, window, dilation, stride, compute_grad_x, compute_grad_adj);
}

}  // namespace keypointops
