#pragma once
// The CUDA kernels' entry points (defined in ops/cuda/*_kernel.cu, registered with torch's
// dispatcher in ops/cuda/register_cuda.cpp).  Each .cu file includes this header and ends with
// KEYPOINTOPS_DEFINED_AS_DECLARED for its entry points: a definition whose signature drifted from
// its declaration would be a second overload (and the declared function left undefined until the
// library fails to load), so the check makes it a compile error (nvcc: "cannot determine which
// instance of overloaded function ... is intended"; the static_assert's message does not print).
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>

// After f's definition: &f names one function only if that definition is the declaration here.
#define KEYPOINTOPS_DEFINED_AS_DECLARED(f) \
  static_assert(sizeof(decltype(&f)) > 0, #f " must be defined with its signature in ops/cuda/kernels.h")

namespace keypointops {

at::Tensor keypoint_gather_cuda(const at::Tensor& features, const at::Tensor& keypoints_in,
                                const std::optional<at::Tensor>& valid_in,
                                const std::optional<at::Tensor>& roi_sizes, double spatial_scale,
                                double roi_size, int64_t sampling_ratio, bool aligned,
                                int64_t output_size);
at::Tensor keypoint_gather_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& keypoints_in,
                                         const std::optional<at::Tensor>& valid_in,
                                         const std::optional<at::Tensor>& roi_sizes,
                                         at::IntArrayRef features_size, bool channels_last,
                                         double spatial_scale, double roi_size,
                                         int64_t sampling_ratio, bool aligned,
                                         int64_t output_size);

std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass_cuda(
    const at::Tensor& x_in, const at::Tensor& rowptr_in, const at::Tensor& col_in,
    const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& t_in, double eps,
    const c10::optional<at::Tensor>& edge_attr_in, const c10::optional<at::Tensor>& perm_in,
    const c10::optional<at::Tensor>& perm_t, c10::string_view aggr_name, double clamp_min,
    double clamp_max);
std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const at::Tensor& row_max_in, const at::Tensor& row_sum_in, const at::Tensor& rowptr_t_in,
    const at::Tensor& col_t_in, const at::Tensor& t_in, double eps, bool compute_grad_t,
    const c10::optional<at::Tensor>& edge_attr_in, const c10::optional<at::Tensor>& perm_t_in,
    c10::string_view aggr_name, double clamp_min, double clamp_max);

at::Tensor part_pool_cuda(const at::Tensor& features_in, const at::Tensor& heatmaps_in,
                          const std::optional<at::Tensor>& groups_in, double temperature);
std::tuple<at::Tensor, at::Tensor, at::Tensor> part_pool_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& features_in, const at::Tensor& heatmaps_in,
    const std::optional<at::Tensor>& groups_in, double temperature, std::array<bool, 3> output_mask);

at::Tensor window_graph_conv_cuda(const at::Tensor& x_in, const at::Tensor& adj_in, int64_t window,
                                  int64_t dilation, int64_t stride);
std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& adj_in, int64_t window,
    int64_t dilation, int64_t stride, bool compute_grad_x, bool compute_grad_adj);

}  // namespace keypointops
