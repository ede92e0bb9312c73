#pragma once
// window_graph_conv on the GEMM library's route (ops/cpu/gemm_route.h): float32 / float64 and
// dilation 1, where every window's valid slots are consecutive frames, i.e. consecutive rows of x.
#include <ATen/core/Tensor.h>

#include <tuple>

namespace keypointops {

// Whether window_graph_conv's CPU kernel takes the library route for x and dilation.
bool window_graph_conv_takes_library(const at::Tensor& x, int64_t dilation);

// x [B, T, N, C] contiguous, adj in x's dtype, contiguous ([R, L], [B, R, L] or [B, T', R, L]).
at::Tensor window_graph_conv_library(const at::Tensor& x, const at::Tensor& adj, int64_t window,
                                     int64_t stride);

std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward_library(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& adj, int64_t window,
    int64_t stride, bool compute_grad_x, bool compute_grad_adj);

}  // namespace keypointops
