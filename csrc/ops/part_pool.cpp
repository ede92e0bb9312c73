// part_pool: argument checks shared by every device, and the C++ dispatcher entry points.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include "ops/part_pool.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace keypointops {

int64_t check_part_pool_args(const at::Tensor& features, const at::Tensor& heatmaps,
                             const std::optional<at::Tensor>& groups, double temperature) {
  TORCH_CHECK(features.dim() == 4, "part_pool: features must be [B, C, H, W], got ", features.sizes());
  TORCH_CHECK(heatmaps.dim() == 4, "part_pool: heatmaps must be [B, J, H, W], got ", heatmaps.sizes());
  TORCH_CHECK(features.is_floating_point(), "part_pool: features must be floating point, got ",
              features.scalar_type());
  TORCH_CHECK(heatmaps.size(0) == features.size(0) && heatmaps.size(2) == features.size(2) &&
                  heatmaps.size(3) == features.size(3),
              "part_pool: heatmaps [B, J, H, W] must match the batch and spatial sizes of features ",
              features.sizes(), ", got ", heatmaps.sizes());
  TORCH_CHECK(features.size(2) * features.size(3) > 0, "part_pool: features and heatmaps must have "
              "H * W > 0, got ", features.sizes());
  TORCH_CHECK(heatmaps.scalar_type() == features.scalar_type(), "part_pool: heatmaps must have the "
              "dtype of features (", features.scalar_type(), "), got ", heatmaps.scalar_type());
  TORCH_CHECK(heatmaps.device() == features.device(), "part_pool: features (", features.device(),
              ") and heatmaps (", heatmaps.device(), ") must be on the same device");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "part_pool: temperature must be a "
              "finite number > 0, got ", temperature);
  if (!groups.has_value()) return heatmaps.size(1);
  const auto& g = *groups;
  TORCH_CHECK(g.dim() == 2 && g.size(1) == heatmaps.size(1), "part_pool: groups must be [P, J] = "
              "[P, ", heatmaps.size(1), "], got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == features.scalar_type(), "part_pool: groups must have the dtype of "
              "features (", features.scalar_type(), "), got ", g.scalar_type());
  TORCH_CHECK(g.device() == features.device(), "part_pool: features (", features.device(),
              ") and groups (", g.device(), ") must be on the same device");
  return g.size(0);
}

void check_part_pool_backward_args(const at::Tensor& grad_out, const at::Tensor& features,
                                   int64_t parts) {
  const std::vector<int64_t> out_shape{features.size(0), parts, features.size(1)};
  TORCH_CHECK(grad_out.sizes() == out_shape && grad_out.scalar_type() == features.scalar_type() &&
                  grad_out.device() == features.device(),
              "part_pool_backward: grad_out must be [B, P, C] = ", out_shape, " of ",
              features.scalar_type(), " on ", features.device(), ", got ", grad_out.sizes(), " of ",
              grad_out.scalar_type(), " on ", grad_out.device());
}

at::Tensor part_pool(const at::Tensor& features, const at::Tensor& heatmaps,
                     const std::optional<at::Tensor>& groups, double temperature) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keypointops::part_pool", "")
                       .typed<decltype(part_pool)>();
  return op.call(features, heatmaps, groups, temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> part_pool_backward(
    const at::Tensor& grad_out, const at::Tensor& features, const at::Tensor& heatmaps,
    const std::optional<at::Tensor>& groups, double temperature, std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keypointops::part_pool_backward", "")
                       .typed<decltype(part_pool_backward)>();
  return op.call(grad_out, features, heatmaps, groups, temperature, output_mask);
}

}  // namespace keypointops
