#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace keypointops {

// Device-agnostic argument checks of keypoint_gather: shapes, dtypes and devices of keypoints,
// valid and roi_sizes ([B, K, 2] box sides (x, y) per keypoint, or none: the scalar roi_size)
// against features ([B, C, H, W] = features_size, on `device`), and the scalars.
void check_keypoint_gather_args(at::IntArrayRef features_size, c10::Device device,
                                const at::Tensor& keypoints, const std::optional<at::Tensor>& valid,
                                const std::optional<at::Tensor>& roi_sizes, double spatial_scale,
                                double roi_size, int64_t sampling_ratio, int64_t output_size);

// check_keypoint_gather_args for backward, and grad_out [B, K * S * S, C] on the same device.
void check_keypoint_gather_backward_args(const at::Tensor& grad_out, at::IntArrayRef features_size,
                                         const at::Tensor& keypoints,
                                         const std::optional<at::Tensor>& valid,
                                         const std::optional<at::Tensor>& roi_sizes,
                                         double spatial_scale, double roi_size,
                                         int64_t sampling_ratio, int64_t output_size);

// True when features are laid out channels_last and not also contiguous (both hold when C == 1
// or H == W == 1): the kernels then read [B, H, W, C] and write the gradient that way.
bool uses_channels_last(const at::Tensor& features);

// C++ entry points (go through the dispatcher, like torch.ops.keypointops.*).
at::Tensor keypoint_gather(const at::Tensor& features, const at::Tensor& keypoints,
                           const std::optional<at::Tensor>& valid,
                           const std::optional<at::Tensor>& roi_sizes, double spatial_scale,
                           double roi_size, int64_t sampling_ratio, bool aligned,
                           int64_t output_size);
at::Tensor keypoint_gather_backward(const at::Tensor& grad_out, const at::Tensor& keypoints,
                                    const std::optional<at::Tensor>& valid,
                                    const std::optional<at::Tensor>& roi_sizes,
                                    c10::SymIntArrayRef features_size, bool channels_last,
                                    double spatial_scale, double roi_size, int64_t sampling_ratio,
                                    bool aligned, int64_t output_size);

}  // namespace keypointops
