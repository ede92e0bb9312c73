// keypoint_gather CPU kernel.
//
// For each keypoint (image b, keypoint k) the RoIAlign sample grid is reduced once to separable
// per-axis weights (ops/keypoint_gather_sampling.h): a few rows and columns of the map, whose
// products, with 1/count folded in, are the taps (pixel offset, weight) of that keypoint.  Every
// channel then reuses the same taps:
//   forward   out[b, k, c] = sum_taps weight * features[b, c, pixel]     (written node-major)
//   backward  grad[b, c, pixel] += weight * grad_out[b, k, c]            (k ascending)
// Two layouts are read in place: contiguous NCHW (a channel plane apart per channel: taps are
// software-prefetched a few channels ahead) and channels_last (a pixel's channels are contiguous:
// vectorised over channels with at::vec).  Other strides are copied to NCHW first.
// Forward runs in parallel over (image, keypoint).  Backward runs in parallel over (image, channel
// block): each task zeroes its own slice of the gradient and scatters every keypoint of the image
// into it in order, so there are no data races and the result is bitwise deterministic (it does not
// depend on the thread count either).
// Memory: the output [B, K, C] and the gradient [B, C, H, W]; per task a few tap buffers of at most
// H * W entries (about 4 for a small box); no [B*K, C, ...] intermediate.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops/keypoint_gather.h"
#include "ops/keypoint_gather_sampling.h"

namespace keypointops {
namespace {

constexpr int64_t kPrefetchChannels = 8;  // NCHW: prefetch the taps this many channel planes ahead
constexpr int64_t kMinChannelBlock = 64;  // backward: smallest channel block per task

struct GatherParams {
  int64_t B, C, H, W, K, point_dims;
  double scale, half_size;
  int64_t sampling_ratio;
  bool aligned;
};

// The taps of one keypoint: offsets of the pixels it touches (in pixels, row-major over H x W) and
// their weights, the per-axis weights multiplied and divided by the sample count.
template <typename T>
struct KeypointTaps {
  std::vector<int64_t> offset;
  std::vector<T> weight;
  std::vector<T> row_weight, col_weight;

  // Fills the taps of the keypoint at (x, y); false when it touches no pixel.
  bool compute(T x, T y, const GatherParams& p) {
    offset.clear();
    weight.clear();
    const auto half = static_cast<T>(p.half_size), scale = static_cast<T>(p.scale);
    const BoxAxis<T> ay = box_axis(y, half, scale, p.aligned, p.sampling_ratio, p.H);
    const BoxAxis<T> ax = box_axis(x, half, scale, p.aligned, p.sampling_ratio, p.W);
    int64_t row0, row1, col0, col1;
    axis_range(ay, p.H, row0, row1);
    axis_range(ax, p.W, col0, col1);
    if (row0 > row1 || col0 > col1) return false;
    const T inv_count = inverse_sample_count(ay, ax);
    row_weight.clear();
    col_weight.clear();
    for (int64_t r = row0; r <= row1; ++r) row_weight.push_back(axis_weight(ay, p.H, r) * inv_count);
    for (int64_t q = col0; q <= col1; ++q) col_weight.push_back(axis_weight(ax, p.W, q));
    for (int64_t r = row0; r <= row1; ++r) {
      for (int64_t q = col0; q <= col1; ++q) {
        const T w = row_weight[r - row0] * col_weight[q - col0];
        if (w == T(0)) continue;
        offset.push_back(r * p.W + q);
        weight.push_back(w);
      }
    }
    return !offset.empty();
  }

  bool compute(const GatherParams& p, const T* keypoints, const bool* valid, int64_t b, int64_t k) {
    const int64_t n = b * p.K + k;
    if (valid != nullptr && !valid[n]) return false;
    return compute(keypoints[n * p.point_dims], keypoints[n * p.point_dims + 1], p);
  }
};

// out[c] = sum_t w_t * image[c * HW + offset_t], image = features[b] in NCHW.
template <typename scalar_t>
void gather_nchw(const scalar_t* image, int64_t C, int64_t HW, const KeypointTaps<scalar_t>& taps,
                 scalar_t* out) {
  const int64_t* off = taps.offset.data();
  const scalar_t* w = taps.weight.data();
  const int64_t num_taps = static_cast<int64_t>(taps.offset.size());
  for (int64_t c = 0; c < C; ++c) {
    if (c + kPrefetchChannels < C) {
      const scalar_t* ahead = image + (c + kPrefetchChannels) * HW;
      for (int64_t t = 0; t < num_taps; ++t) __builtin_prefetch(ahead + off[t]);
    }
    const scalar_t* plane = image + c * HW;
    scalar_t acc = 0;
    for (int64_t t = 0; t < num_taps; ++t) acc += w[t] * plane[off[t]];
    out[c] = acc;
  }
}

// out[c] = sum_t w_t * image[offset_t * C + c], image = features[b] in channels_last.
template <typename scalar_t>
void gather_channels_last(const scalar_t* image, int64_t C, const KeypointTaps<scalar_t>& taps,
                          scalar_t* out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const int64_t num_taps = static_cast<int64_t>(taps.offset.size());
  for (int64_t c = 0; c < C; c += VL) {
    const int64_t n = std::min(VL, C - c);
    Vec acc(0);
    for (int64_t t = 0; t < num_taps; ++t) {
      acc = at::vec::fmadd(Vec(taps.weight[t]), Vec::loadu(image + taps.offset[t] * C + c, n), acc);
    }
    acc.store(out + c, n);
  }
}

// grad[c * HW + offset_t] += w_t * grad_out[c] for c in [c0, c1), grad = grad_features[b] in NCHW.
template <typename scalar_t>
void scatter_nchw(const scalar_t* grad_out, int64_t c0, int64_t c1, int64_t HW,
                  const KeypointTaps<scalar_t>& taps, scalar_t* grad) {
  const int64_t* off = taps.offset.data();
  const scalar_t* w = taps.weight.data();
  const int64_t num_taps = static_cast<int64_t>(taps.offset.size());
  for (int64_t c = c0; c < c1; ++c) {
    if (c + kPrefetchChannels < c1) {
      scalar_t* ahead = grad + (c + kPrefetchChannels) * HW;
      for (int64_t t = 0; t < num_taps; ++t) __builtin_prefetch(ahead + off[t], 1);
    }
    scalar_t* plane = grad + c * HW;
    const scalar_t g = grad_out[c];
    for (int64_t t = 0; t < num_taps; ++t) plane[off[t]] += w[t] * g;
  }
}

// grad[offset_t * C + c] += w_t * grad_out[c] for c in [c0, c1), grad = grad_features[b] in
// channels_last.
template <typename scalar_t>
void scatter_channels_last(const scalar_t* grad_out, int64_t c0, int64_t c1, int64_t C,
                           const KeypointTaps<scalar_t>& taps, scalar_t* grad) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const int64_t num_taps = static_cast<int64_t>(taps.offset.size());
  for (int64_t t = 0; t < num_taps; ++t) {
    const Vec w(taps.weight[t]);
    scalar_t* pixel = grad + taps.offset[t] * C;
    for (int64_t c = c0; c < c1; c += VL) {
      const int64_t n = std::min(VL, c1 - c);
      at::vec::fmadd(w, Vec::loadu(grad_out + c, n), Vec::loadu(pixel + c, n)).store(pixel + c, n);
    }
  }
}

GatherParams make_params(at::IntArrayRef features_size, const at::Tensor& keypoints,
                         double spatial_scale, double roi_size, int64_t sampling_ratio,
                         bool aligned) {
  return {features_size[0], features_size[1], features_size[2], features_size[3],
          keypoints.size(1), keypoints.size(2), spatial_scale, roi_size * 0.5, sampling_ratio,
          aligned};
}

void check_cpu_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "keypoint_gather: the CPU kernel takes "
              "float32 or float64 ", name, ", got ", dtype);
}

at::Tensor keypoint_gather_cpu(const at::Tensor& features_in, const at::Tensor& keypoints_in,
                               const std::optional<at::Tensor>& valid_in, double spatial_scale,
                               double roi_size, int64_t sampling_ratio, bool aligned) {
  check_keypoint_gather_args(features_in.sizes(), features_in.device(), keypoints_in, valid_in,
                             spatial_scale, roi_size, sampling_ratio);
  check_cpu_dtype(features_in.scalar_type(), "features");
  const bool channels_last = uses_channels_last(features_in);
  const auto features = channels_last ? features_in : features_in.contiguous();
  const auto keypoints = keypoints_in.to(features.scalar_type()).contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const GatherParams p = make_params(features.sizes(), keypoints, spatial_scale, roi_size,
                                     sampling_ratio, aligned);
  auto out = at::empty({p.B, p.K, p.C}, features.options());
  if (out.numel() == 0) return out;
  const int64_t HW = p.H * p.W;
  const int64_t grain = std::max<int64_t>(1, 2048 / p.C);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "keypoint_gather_cpu", [&] {
    const scalar_t* fp = features.const_data_ptr<scalar_t>();
    const scalar_t* kp = keypoints.const_data_ptr<scalar_t>();
    const bool* vp = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.B * p.K, grain, [&](int64_t begin, int64_t end) {
      KeypointTaps<scalar_t> taps;
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / p.K, k = n % p.K;
        scalar_t* out_row = op + n * p.C;
        if (!taps.compute(p, kp, vp, b, k)) {
          std::fill(out_row, out_row + p.C, scalar_t(0));
        } else if (channels_last) {
          gather_channels_last(fp + b * HW * p.C, p.C, taps, out_row);
        } else {
          gather_nchw(fp + b * p.C * HW, p.C, HW, taps, out_row);
        }
      }
    });
  });
  return out;
}

at::Tensor keypoint_gather_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& keypoints_in,
                                        const std::optional<at::Tensor>& valid_in,
                                        at::IntArrayRef features_size, bool channels_last,
                                        double spatial_scale, double roi_size,
                                        int64_t sampling_ratio, bool aligned) {
  check_keypoint_gather_args(features_size, grad_out_in.device(), keypoints_in, valid_in,
                             spatial_scale, roi_size, sampling_ratio);
  check_cpu_dtype(grad_out_in.scalar_type(), "grad_out");
  const GatherParams p = make_params(features_size, keypoints_in, spatial_scale, roi_size,
                                     sampling_ratio, aligned);
  TORCH_CHECK(grad_out_in.dim() == 3 && grad_out_in.size(0) == p.B && grad_out_in.size(1) == p.K &&
                  grad_out_in.size(2) == p.C,
              "keypoint_gather_backward: grad_out must be [B, K, C] = [", p.B, ", ", p.K, ", ", p.C,
              "], got ", grad_out_in.sizes());
  const auto grad_out = grad_out_in.contiguous();
  const auto keypoints = keypoints_in.to(grad_out.scalar_type()).contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  auto grad = at::empty(features_size, grad_out.options().memory_format(
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  const int64_t HW = p.H * p.W;
  // Channel blocks: enough tasks for the threads when there are few images.
  const int64_t wanted = (4 * at::get_num_threads() + p.B - 1) / p.B;
  const int64_t num_blocks = std::clamp<int64_t>(wanted, 1, (p.C + kMinChannelBlock - 1) / kMinChannelBlock);
  const int64_t block = (p.C + num_blocks - 1) / num_blocks;
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "keypoint_gather_backward_cpu", [&] {
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* kp = keypoints.const_data_ptr<scalar_t>();
    const bool* vp = valid.defined() ? valid.const_data_ptr<bool>() : nullptr;
    scalar_t* grad_p = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, p.B * num_blocks, 1, [&](int64_t begin, int64_t end) {
      KeypointTaps<scalar_t> taps;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / num_blocks;
        const int64_t c0 = task % num_blocks * block, c1 = std::min(p.C, c0 + block);
        scalar_t* image = grad_p + b * p.C * HW;
        if (channels_last) {
          for (int64_t pixel = 0; pixel < HW; ++pixel) {
            std::fill(image + pixel * p.C + c0, image + pixel * p.C + c1, scalar_t(0));
          }
        } else {
          std::fill(image + c0 * HW, image + c1 * HW, scalar_t(0));
        }
        for (int64_t k = 0; k < p.K; ++k) {
          if (!taps.compute(p, kp, vp, b, k)) continue;
          const scalar_t* g = gp + (b * p.K + k) * p.C;
          if (channels_last) {
            scatter_channels_last(g, c0, c1, p.C, taps, image);
          } else {
            scatter_nchw(g, c0, c1, HW, taps, image);
          }
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(keypointops, CPU, m) {
  m.impl("keypoint_gather", &keypoint_gather_cpu);
  m.impl("keypoint_gather_backward", &keypoint_gather_backward_cpu);
}

}  // namespace keypointops
