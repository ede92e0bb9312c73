// keypoint_gather: argument checks shared by every device, and the C++ dispatcher entry points.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include "ops/keypoint_gather.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace keypointops {

void check_keypoint_gather_args(at::IntArrayRef features_size, c10::Device device,
                                const at::Tensor& keypoints, const std::optional<at::Tensor>& valid,
                                const std::optional<at::Tensor>& roi_sizes, double spatial_scale,
                                double roi_size, int64_t sampling_ratio, int64_t output_size) {
  TORCH_CHECK(features_size.size() == 4, "keypoint_gather: features must be [B, C, H, W], got ",
              features_size.size(), " dims");
  const int64_t B = features_size[0], H = features_size[2], W = features_size[3];
  TORCH_CHECK(H > 0 && W > 0, "keypoint_gather: features must have a non-empty H x W map, got ",
              features_size);
  TORCH_CHECK(keypoints.dim() == 3 && keypoints.size(0) == B &&
                  (keypoints.size(2) == 2 || keypoints.size(2) == 3),
              "keypoint_gather: keypoints must be [B, K, 2] or [B, K, 3] with B = ", B, ", got ",
              keypoints.sizes());
  TORCH_CHECK(keypoints.is_floating_point(), "keypoint_gather: keypoints must be floating point, got ",
              keypoints.scalar_type());
  TORCH_CHECK(keypoints.device() == device, "keypoint_gather: features (", device,
              ") and keypoints (", keypoints.device(), ") must be on the same device");
  if (valid.has_value()) {
    TORCH_CHECK(valid->dim() == 2 && valid->size(0) == B && valid->size(1) == keypoints.size(1),
                "keypoint_gather: valid must be [B, K] = [", B, ", ", keypoints.size(1), "], got ",
                valid->sizes());
    TORCH_CHECK(valid->scalar_type() == at::kBool, "keypoint_gather: valid must be bool, got ",
                valid->scalar_type());
    TORCH_CHECK(valid->device() == device, "keypoint_gather: features (", device, ") and valid (",
                valid->device(), ") must be on the same device");
  }
  if (roi_sizes.has_value()) {
    TORCH_CHECK(roi_sizes->dim() == 3 && roi_sizes->size(0) == B &&
                    roi_sizes->size(1) == keypoints.size(1) && roi_sizes->size(2) == 2,
                "keypoint_gather: roi_sizes must be [B, K, 2] = [", B, ", ", keypoints.size(1),
                ", 2], got ", roi_sizes->sizes());
    TORCH_CHECK(roi_sizes->is_floating_point(), "keypoint_gather: roi_sizes must be floating "
                "point, got ", roi_sizes->scalar_type());
    TORCH_CHECK(roi_sizes->device() == device, "keypoint_gather: features (", device,
                ") and roi_sizes (", roi_sizes->device(), ") must be on the same device");
  }
  TORCH_CHECK(output_size > 0, "keypoint_gather: output_size must be positive, got ", output_size);
  TORCH_CHECK(std::isfinite(spatial_scale) && spatial_scale > 0,
              "keypoint_gather: spatial_scale must be finite and positive, got ", spatial_scale);
  TORCH_CHECK(std::isfinite(roi_size) && roi_size >= 0,
              "keypoint_gather: roi_size must be finite and >= 0, got ", roi_size);
  TORCH_CHECK(roi_size * spatial_scale < 1e6, "keypoint_gather: roi_size * spatial_scale must be "
              "below 1e6 feature pixels, got ", roi_size * spatial_scale);
  TORCH_CHECK(sampling_ratio == -1 || sampling_ratio > 0,
              "keypoint_gather: sampling_ratio must be -1 (adaptive) or positive, got ",
              sampling_ratio);
}

void check_keypoint_gather_backward_args(const at::Tensor& grad_out, at::IntArrayRef features_size,
                                         const at::Tensor& keypoints,
                                         const std::optional<at::Tensor>& valid,
                                         const std::optional<at::Tensor>& roi_sizes,
                                         double spatial_scale, double roi_size,
                                         int64_t sampling_ratio, int64_t output_size) {
  check_keypoint_gather_args(features_size, grad_out.device(), keypoints, valid, roi_sizes,
                             spatial_scale, roi_size, sampling_ratio, output_size);
  const int64_t nodes = keypoints.size(1) * output_size * output_size;
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == features_size[0] &&
                  grad_out.size(1) == nodes && grad_out.size(2) == features_size[1],
              "keypoint_gather_backward: grad_out must be [B, K * S * S, C] = [", features_size[0],
              ", ", nodes, ", ", features_size[1], "], got ", grad_out.sizes());
}

bool uses_channels_last(const at::Tensor& features) {
  return features.dim() == 4 && !features.is_contiguous() &&
         features.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor keypoint_gather(const at::Tensor& features, const at::Tensor& keypoints,
                           const std::optional<at::Tensor>& valid,
                           const std::optional<at::Tensor>& roi_sizes, double spatial_scale,
                           double roi_size, int64_t sampling_ratio, bool aligned,
                           int64_t output_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keypointops::keypoint_gather", "")
                       .typed<decltype(keypoint_gather)>();
  return op.call(features, keypoints, valid, roi_sizes, spatial_scale, roi_size, sampling_ratio,
                 aligned, output_size);
}

at::Tensor keypoint_gather_backward(const at::Tensor& grad_out, const at::Tensor& keypoints,
                                    const std::optional<at::Tensor>& valid,
                                    const std::optional<at::Tensor>& roi_sizes,
                                    c10::SymIntArrayRef features_size, bool channels_last,
                                    double spatial_scale, double roi_size, int64_t sampling_ratio,
                                    bool aligned, int64_t output_size) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("keypointops::keypoint_gather_backward", "")
                       .typed<decltype(keypoint_gather_backward)>();
  return op.call(grad_out, keypoints, valid, roi_sizes, features_size, channels_last, spatial_scale,
                 roi_size, sampling_ratio, aligned, output_size);
}

}  // namespace keypointops
