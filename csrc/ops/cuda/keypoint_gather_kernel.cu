// keypoint_gather CUDA kernels.
//
// A node is a keypoint's box (output_size S = 1) or one of its S x S bins (node k * S * S +
// py * S + px, ops/keypoint_gather_sampling.h); below "keypoint" means node.
// One block per (image b, tile of kThreads channels); thread = channel, so the lanes of a warp
// read consecutive channels (coalesced on channels_last features and on the [B, K, C] rows of
// out / grad_out).  The block walks the image's keypoints in groups of kWarps: warp w reduces the
// RoIAlign sample grid of keypoint k0 + w to separable weights -- lane j the weight of row
// row0 + j and of column col0 + j (ops/keypoint_gather_sampling.h, 1/count folded in) -- into
// shared memory, once for every channel of the tile; then each thread applies the group's taps
// (row weight x column weight) to its channel.  Boxes wider than kTile pixels are walked in
// kTile x kTile tiles.
// Forward: out[b, k, c] = sum over taps of weight * features[b, c, pixel]; features are read in
// place with their strides (contiguous, channels_last or other).
// Backward: the thread of channel c is the only writer of grad[b, c, :, :]; it adds its keypoints'
// taps in a fixed order (groups, tiles, keypoints, taps) with atomicAdd, which need not wait for
// a read, and since no other thread touches those addresses the result is deterministic.
// float16 / bfloat16 accumulate in float32 (backward into a float32 gradient, converted at the end).
// Memory: out [B, K * S * S, C]; the gradient [B, C, H, W] (+ its float32 buffer for reduced precision);
// shared memory kWarps * 2 * kTile weights per block; nothing per sample or per (keypoint, channel).
// Occupancy: at most 96 registers per thread (the float64 instances; 72-80 for float32 and 16-bit),
// so 5 blocks of 128 threads fit an SM's 65,536 registers.
// Local memory: at most 16 bytes per thread, where ptxas spills a register or two of the keypoint
// walk (float64 and some 16-bit and float32 instances; bench/results/cuda-resources.md).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

#include "ops/cuda/kernels.h"
#include "ops/keypoint_gather.h"
#include "ops/keypoint_gather_sampling.h"

namespace keypointops {
namespace {

constexpr int kThreads = 128;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kTile = kWarpSize;  // rows / columns of one tile: one per lane

struct Sampling {
  int64_t K, C, H, W, point_dims, sampling_ratio;  // K: nodes per image, keypoints * S * S
  int64_t keypoints, S;                             // keypoints per image, bins per axis
  double scale, half_size;
  bool aligned;
};

struct Strides {
  int64_t b, c, h, w;
};

// The box of one keypoint and the tiles of pixels its samples touch.
template <typename acc_t>
struct KeypointBox {
  BoxAxis<acc_t> y, x;
  int64_t row0, row1, col0, col1;
  acc_t inv_count;
  int col_tiles, tiles;  // tiles == 0: the keypoint contributes nothing
};

// The weights of one tile of a keypoint, in shared memory.
template <typename acc_t>
struct TileWeights {
  acc_t row[kTile];
  acc_t col[kTile];
  int64_t row0, col0;
  int rows, cols;  // rows == 0: nothing in this slot
};

// The box of node `node` (b * K + k over all images' nodes); sizes: [B, keypoints, 2] box sides
// (x, y) per keypoint, or null (s.half_size for all).
template <typename acc_t>
__device__ KeypointBox<acc_t> keypoint_box(const acc_t* keypoints, const bool* valid,
                                           const acc_t* sizes, int64_t node, const Sampling& s) {
  KeypointBox<acc_t> box{};
  box.tiles = 0;
  const int64_t bins = s.S * s.S, n = node / bins, bin = node % bins;
  if (valid != nullptr && !valid[n]) return box;
  const auto half = static_cast<acc_t>(s.half_size), scale = static_cast<acc_t>(s.scale);
  const acc_t half_x = sizes != nullptr ? sizes[2 * n] * acc_t(0.5) : half;
  const acc_t half_y = sizes != nullptr ? sizes[2 * n + 1] * acc_t(0.5) : half;
  box.y = bin_axis(box_axis(keypoints[n * s.point_dims + 1], half_y, scale, s.aligned,
                            s.sampling_ratio, s.H),
                   bin / s.S, s.S, s.sampling_ratio);
  box.x = bin_axis(box_axis(keypoints[n * s.point_dims], half_x, scale, s.aligned,
                            s.sampling_ratio, s.W),
                   bin % s.S, s.S, s.sampling_ratio);
  axis_range(box.y, s.H, box.row0, box.row1);
  axis_range(box.x, s.W, box.col0, box.col1);
  if (box.row0 > box.row1 || box.col0 > box.col1) return box;
  box.inv_count = inverse_sample_count(box.y, box.x);
  box.col_tiles = static_cast<int>((box.col1 - box.col0) / kTile + 1);
  box.tiles = static_cast<int>((box.row1 - box.row0) / kTile + 1) * box.col_tiles;
  return box;
}

// Warp-wide: the weights of tile `tile` of `box` into `out` (lane j computes row / column j).
template <typename acc_t>
__device__ void fill_tile(const KeypointBox<acc_t>& box, int tile, int lane, const Sampling& s,
                          TileWeights<acc_t>& out) {
  const int64_t row0 = box.row0 + static_cast<int64_t>(tile / box.col_tiles) * kTile;
  const int64_t col0 = box.col0 + static_cast<int64_t>(tile % box.col_tiles) * kTile;
  const int64_t rows_left = box.row1 + 1 - row0, cols_left = box.col1 + 1 - col0;
  const int rows = rows_left < kTile ? static_cast<int>(rows_left) : kTile;
  const int cols = cols_left < kTile ? static_cast<int>(cols_left) : kTile;
  if (lane < rows) out.row[lane] = axis_weight(box.y, s.H, row0 + lane) * box.inv_count;
  if (lane < cols) out.col[lane] = axis_weight(box.x, s.W, col0 + lane);
  if (lane == 0) {
    out.row0 = row0;
    out.col0 = col0;
    out.rows = rows;
    out.cols = cols;
  }
}

// The block-wide walk shared by forward and backward.  For every group of kWarps keypoints:
// start(j) once per keypoint slot, then for each tile round visit(j, tile weights) for the slots
// that have a tile in that round, then finish(j).  Slot j is keypoint k0 + j.
template <typename acc_t, typename Start, typename Visit, typename Finish>
__device__ void walk_keypoints(const acc_t* keypoints, const bool* valid, const acc_t* sizes,
                               int64_t b, const Sampling& s, const Start& start, const Visit& visit,
                               const Finish& finish) {
  __shared__ TileWeights<acc_t> tiles[kWarps];
  __shared__ int tile_counts[kWarps];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  for (int64_t k0 = 0; k0 < s.K; k0 += kWarps) {
    KeypointBox<acc_t> box{};
    box.tiles = 0;
    if (k0 + warp < s.K) box = keypoint_box(keypoints, valid, sizes, b * s.K + k0 + warp, s);
    if (lane == 0) tile_counts[warp] = box.tiles;
    __syncthreads();
    int rounds = 0;
#pragma unroll
    for (int j = 0; j < kWarps; ++j) rounds = max(rounds, tile_counts[j]);
#pragma unroll
    for (int j = 0; j < kWarps; ++j) start(j, k0 + j);
    for (int round = 0; round < rounds; ++round) {
      if (round < box.tiles) {
        fill_tile(box, round, lane, s, tiles[warp]);
      } else if (lane == 0) {
        tiles[warp].rows = 0;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kWarps; ++j) {
        if (tiles[j].rows > 0) visit(j, tiles[j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < kWarps; ++j) finish(j, k0 + j);
    __syncthreads();  // tile_counts is rewritten by the next group
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    keypoint_gather_forward_kernel(const scalar_t* __restrict__ features, Strides fs,
                                   const acc_t* __restrict__ keypoints,
                                   const bool* __restrict__ valid, const acc_t* __restrict__ sizes,
                                   Sampling s, int64_t channel_tiles,
                                   scalar_t* __restrict__ out) {
  const int64_t b = blockIdx.x / channel_tiles;
  const int64_t c = (blockIdx.x % channel_tiles) * kThreads + threadIdx.x;
  const bool active = c < s.C;
  const scalar_t* image = features + b * fs.b + (active ? c : 0) * fs.c;
  acc_t acc[kWarps];
  walk_keypoints<acc_t>(
      keypoints, valid, sizes, b, s, [&](int j, int64_t) { acc[j] = acc_t(0); },
      [&](int j, const TileWeights<acc_t>& tw) {
        if (!active) return;
        for (int r = 0; r < tw.rows; ++r) {
          const scalar_t* row = image + (tw.row0 + r) * fs.h + tw.col0 * fs.w;
          for (int q = 0; q < tw.cols; ++q) {
            const acc_t w = tw.row[r] * tw.col[q];
            if (w != acc_t(0)) acc[j] += w * static_cast<acc_t>(row[q * fs.w]);
          }
        }
      },
      [&](int j, int64_t k) {
        if (active && k < s.K) out[(b * s.K + k) * s.C + c] = static_cast<scalar_t>(acc[j]);
      });
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    keypoint_gather_backward_kernel(const scalar_t* __restrict__ grad_out,
                                    const acc_t* __restrict__ keypoints,
                                    const bool* __restrict__ valid,
                                    const acc_t* __restrict__ sizes, Sampling s,
                                    int64_t channel_tiles, Strides gs, acc_t* __restrict__ grad) {
  const int64_t b = blockIdx.x / channel_tiles;
  const int64_t c = (blockIdx.x % channel_tiles) * kThreads + threadIdx.x;
  const bool active = c < s.C;
  acc_t* image = grad + b * gs.b + (active ? c : 0) * gs.c;
  acc_t g[kWarps];
  walk_keypoints<acc_t>(
      keypoints, valid, sizes, b, s,
      [&](int j, int64_t k) {
        g[j] = active && k < s.K ? static_cast<acc_t>(grad_out[(b * s.K + k) * s.C + c]) : acc_t(0);
      },
      [&](int j, const TileWeights<acc_t>& tw) {
        if (!active) return;
        for (int r = 0; r < tw.rows; ++r) {
          acc_t* row = image + (tw.row0 + r) * gs.h + tw.col0 * gs.w;
          for (int q = 0; q < tw.cols; ++q) {
            const acc_t w = tw.row[r] * tw.col[q];
            if (w != acc_t(0)) atomicAdd(row + q * gs.w, w * g[j]);
          }
        }
      },
      [](int, int64_t) {});
}

Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Blocks of a launch over (image, channel tile).
int64_t num_blocks(int64_t images, int64_t channel_tiles) {
  const int64_t blocks = images * channel_tiles;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "keypoint_gather: B * ceil(C / ",
              kThreads, ") must fit a CUDA grid, got ", blocks, " blocks");
  return blocks;
}

Sampling make_sampling(at::IntArrayRef features_size, const at::Tensor& keypoints,
                       double spatial_scale, double roi_size, int64_t sampling_ratio,
                       bool aligned, int64_t output_size) {
  const int64_t K = keypoints.size(1);
  return {K * output_size * output_size, features_size[1], features_size[2], features_size[3],
          keypoints.size(2), sampling_ratio, K, output_size, spatial_scale, roi_size * 0.5,
          aligned};
}

// roi_sizes in the accumulation dtype, contiguous; undefined when the scalar roi_size applies.
at::Tensor sizes_as(const std::optional<at::Tensor>& roi_sizes, at::ScalarType dtype) {
  return roi_sizes.has_value() ? roi_sizes->to(dtype).contiguous() : at::Tensor();
}

void check_cuda_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "keypoint_gather: the CUDA kernel takes float32, float64, float16 or bfloat16 ", name,
              ", got ", dtype);
}

}  // namespace

at::Tensor keypoint_gather_cuda(const at::Tensor& features, const at::Tensor& keypoints_in,
                                const std::optional<at::Tensor>& valid_in,
                                const std::optional<at::Tensor>& roi_sizes, double spatial_scale,
                                double roi_size, int64_t sampling_ratio, bool aligned,
                                int64_t output_size) {
  check_keypoint_gather_args(features.sizes(), features.device(), keypoints_in, valid_in, roi_sizes,
                             spatial_scale, roi_size, sampling_ratio, output_size);
  check_cuda_dtype(features.scalar_type(), "features");
  const c10::cuda::CUDAGuard device_guard(features.device());
  const int64_t B = features.size(0);
  const Sampling s = make_sampling(features.sizes(), keypoints_in, spatial_scale, roi_size,
                                   sampling_ratio, aligned, output_size);
  auto out = at::empty({B, s.K, s.C}, features.options());
  if (out.numel() == 0) return out;
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const int64_t channel_tiles = (s.C + kThreads - 1) / kThreads;
  const int64_t blocks = num_blocks(B, channel_tiles);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(),
                                  "keypoint_gather_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto keypoints = keypoints_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const auto sizes = sizes_as(roi_sizes, c10::CppTypeToScalarType<acc_t>::value);
    keypoint_gather_forward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        features.const_data_ptr<scalar_t>(), strides_of(features), keypoints.const_data_ptr<acc_t>(),
        valid.defined() ? valid.const_data_ptr<bool>() : nullptr,
        sizes.defined() ? sizes.const_data_ptr<acc_t>() : nullptr, s, channel_tiles,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor keypoint_gather_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& keypoints_in,
                                         const std::optional<at::Tensor>& valid_in,
                                         const std::optional<at::Tensor>& roi_sizes,
                                         at::IntArrayRef features_size, bool channels_last,
                                         double spatial_scale, double roi_size,
                                         int64_t sampling_ratio, bool aligned,
                                         int64_t output_size) {
  check_keypoint_gather_backward_args(grad_out_in, features_size, keypoints_in, valid_in, roi_sizes,
                                      spatial_scale, roi_size, sampling_ratio, output_size);
  check_cuda_dtype(grad_out_in.scalar_type(), "grad_out");
  const c10::cuda::CUDAGuard device_guard(grad_out_in.device());
  const int64_t B = features_size[0];
  const Sampling s = make_sampling(features_size, keypoints_in, spatial_scale, roi_size,
                                   sampling_ratio, aligned, output_size);
  const auto grad_out = grad_out_in.contiguous();
  const auto valid = valid_in.has_value() ? valid_in->contiguous() : at::Tensor();
  const auto acc_type = at::toOpMathType(grad_out.scalar_type());
  const auto memory_format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto grad = at::empty(features_size, grad_out.options().dtype(acc_type).memory_format(memory_format));
  grad.zero_();
  if (grad.numel() == 0 || s.K == 0) return grad.to(grad_out.scalar_type());
  const int64_t channel_tiles = (s.C + kThreads - 1) / kThreads;
  const int64_t blocks = num_blocks(B, channel_tiles);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "keypoint_gather_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto keypoints = keypoints_in.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const auto sizes = sizes_as(roi_sizes, c10::CppTypeToScalarType<acc_t>::value);
    keypoint_gather_backward_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        grad_out.const_data_ptr<scalar_t>(), keypoints.const_data_ptr<acc_t>(),
        valid.defined() ? valid.const_data_ptr<bool>() : nullptr,
        sizes.defined() ? sizes.const_data_ptr<acc_t>() : nullptr, s, channel_tiles,
        strides_of(grad), grad.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad.to(grad_out.scalar_type());
}

KEYPOINTOPS_DEFINED_AS_DECLARED(keypoint_gather_cuda);
KEYPOINTOPS_DEFINED_AS_DECLARED(keypoint_gather_backward_cuda);

}  // namespace keypointops
