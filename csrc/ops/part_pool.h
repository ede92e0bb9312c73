#pragma once
#include <ATen/core/Tensor.h>
#include <array>
#include <optional>
#include <tuple>

namespace keypointops {

// Device-agnostic argument checks shared by the CPU and CUDA kernels (ranks, sizes, dtypes, devices,
// temperature).  Returns the number of parts P.
int64_t check_part_pool_args(const at::Tensor& features, const at::Tensor& heatmaps,
                             const std::optional<at::Tensor>& groups, double temperature);

// The extra check of backward: grad_out [B, P, C] of the features' dtype, on the features' device.
void check_part_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& features,
                                   int64_t parts);

// C++ entry points (go through the dispatcher, like torch.ops.keypointops.*).
at::Tensor part_pool(const at::Tensor& features, const at::Tensor& heatmaps,
                     const std::optional<at::Tensor>& groups, double temperature);
std::tuple<at::Tensor, at::Tensor, at::Tensor> part_pool_backward(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& heatmaps,
    const std::optional<at::Tensor>& groups, double temperature, std::array<bool, 3> output_mask);

}  // namespace keypointops
