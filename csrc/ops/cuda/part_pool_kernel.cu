// part_pool CUDA kernels.
//
// Forward: (1) one block per (image, part) computes the logits r = (groups @ heatmaps) / temperature
// over the S = H*W pixels, their max and sum (block reductions) and the softmax p [B, P, S];
// (2) out = p @ F^T, one block per (image, 64 channels, 4..32 parts) walking the pixels in
// tiles of 32 through shared memory: every feature element is read from global memory once (P <= 32).
// Backward saves nothing but the inputs: (1) recomputes p as forward does (max, exp, sum, divide),
// not from a saved log-sum-exp, whose float32 rounding (ulp(lse)) exp(r - lse) would carry into every
// probability of the row (relative 1e-5 at logits of a few hundred, a sharp softmax); (3) grad_features =
// p^T @ dout in tiles of 64 channels x 32 pixels, written once in the features' layout (NCHW or
// channels_last, coalesced either way); (4) grad_p = dout @ F in tiles of 32 parts x 32 pixels over
// all channels (the features read once more); (5) per row delta = rowsum(p * grad_p) and
// grad_r = p * (grad_p - delta) / temperature (the softmax backward of autograd: at a saturated
// softmax the two terms at the dominant pixel are the same rounded number and cancel exactly, where
// rowsum(dout * out), equal in exact arithmetic, is a differently rounded dot product and would
// leave noise of ulp(|dout| |F|) / temperature); grad_heatmaps = groups^T @ grad_r and
// grad_groups = sum_b grad_r @ heatmaps^T are small GEMMs (ATen).  Every output element is summed
// by one thread in a fixed order: deterministic.
// Memory: p and grad_r [B, P, S], in the accumulation type (float for
// half / bfloat16 / float, double for double); nothing of size [B, P, C, H, W].
// Occupancy: at most 128 registers per thread (float64 weighted sums of 8 parts per thread; 48-89
// for the other instances), so at least 2 blocks of 256 threads per SM.
// Local memory: at most 20 bytes per thread, where ptxas spills in the weighted-sum and grad-logits
// instances (a few registers of their tile loops; bench/results/cuda-resources.md).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "ops/cuda/kernels.h"
#include "ops/part_pool.h"

namespace keypointops {
namespace {

constexpr int kThreads = 256;
constexpr int kTileC = 64;     // channels per tile
constexpr int kTileS = 32;     // pixels per tile
constexpr int kMaxTileP = 32;  // parts per tile
constexpr int64_t kMaxGridYZ = 65535;

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

// Reduces one value per thread over the block (kThreads threads); every thread gets the result.
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op, T* scratch /* [kThreads / 32] */) {
  for (int offset = 16; offset > 0; offset /= 2) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = value;
  __syncthreads();
  value = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) value = op(value, scratch[w]);
  __syncthreads();  // scratch is reused by the next reduction
  return value;
}

// Walks the kTileC x kTileS feature tile at (c0, s0) of one image, store(c, s, value) for each element
// (0 outside the map); consecutive threads take consecutive elements along the contiguous dimension
// (pixels for NCHW, channels for channels_last), so the global reads coalesce.
template <bool kPixelsContiguous, typename acc_t, typename scalar_t, typename Store>
__device__ __forceinline__ void load_feature_tile(const scalar_t* f, int64_t f_c, int64_t f_s,
                                                  int64_t c0, int64_t s0, int64_t C, int64_t S,
                                                  Store store) {
  for (int i = threadIdx.x; i < kTileC * kTileS; i += kThreads) {
    const int s = kPixelsContiguous ? i % kTileS : i / kTileC;
    const int c = kPixelsContiguous ? i / kTileS : i % kTileC;
    const bool inside = c0 + c < C && s0 + s < S;
    store(c, s, inside ? static_cast<acc_t>(f[(c0 + c) * f_c + (s0 + s) * f_s]) : acc_t(0));
  }
}

// tile[r][k] = src[(row0 + r) * cols + col0 + k] for r < kRows, k < kCols of a row-major
// [rows, cols] matrix (0 outside it); consecutive threads read consecutive columns.
template <int kRows, int kCols, typename acc_t, typename T>
__device__ __forceinline__ void load_rows_tile(acc_t (*tile)[kCols], const T* src, int64_t row0,
                                               int64_t col0, int64_t rows, int64_t cols) {
  for (int i = threadIdx.x; i < kRows * kCols; i += kThreads) {
    const int r = i / kCols, k = i % kCols;
    tile[r][k] = row0 + r < rows && col0 + k < cols ? static_cast<acc_t>(src[(row0 + r) * cols + col0 + k])
                                                    : acc_t(0);
  }
}

// One block per row (image b, part q) of probs [B * P, S]: the logits (identity: groups is the
// identity and not read; J = 0 with groups gives zero logits), then the softmax.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) probabilities_kernel(
    const scalar_t* __restrict__ heatmaps, bool identity, const scalar_t* __restrict__ groups,
    int64_t P, int64_t J,
    int64_t S, acc_t temperature, acc_t* __restrict__ probs) {
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t b = row / P, q = row % P;
  const scalar_t* hm = heatmaps + b * J * S;
  acc_t* p = probs + row * S;
  acc_t local_max = -std::numeric_limits<acc_t>::infinity();
  for (int64_t s = threadIdx.x; s < S; s += kThreads) {  // each thread keeps its own pixels below
    acc_t logit = 0;
    if (identity) {
      logit = static_cast<acc_t>(hm[q * S + s]);
    } else {
      for (int64_t j = 0; j < J; ++j) {
        logit += static_cast<acc_t>(groups[q * J + j]) * static_cast<acc_t>(hm[j * S + s]);
      }
    }
    logit /= temperature;
    p[s] = logit;
    local_max = MaxOp()(local_max, logit);
  }
  const acc_t row_max = block_reduce(local_max, MaxOp(), scratch);
  acc_t local_sum = 0;
  for (int64_t s = threadIdx.x; s < S; s += kThreads) {
    const acc_t e = exp_of(p[s] - row_max);
    p[s] = e;
    local_sum += e;
  }
  const acc_t row_sum = block_reduce(local_sum, SumOp(), scratch);
  for (int64_t s = threadIdx.x; s < S; s += kThreads) p[s] /= row_sum;
}

// out[b, q, c] = sum_s p[b, q, s] * F[b, c, s].  Block: image blockIdx.x, channels
// blockIdx.y * 64 + [0, 64), parts blockIdx.z * kTileP + [0, kTileP), kTileP = 4 * kPartsPerThread.
// Thread: channel tid % 64, parts tid / 64 + 4 i.  Feature tiles [32 pixels][64 channels] are loaded
// along the contiguous dimension (pixels for NCHW, channels for channels_last).
template <typename scalar_t, typename acc_t, int kPartsPerThread, bool kPixelsContiguous>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(
    const scalar_t* __restrict__ features, int64_t f_b, int64_t f_c, int64_t f_s,
    const acc_t* __restrict__ probs, int64_t P, int64_t C, int64_t S, scalar_t* __restrict__ out) {
  constexpr int kGroups = kThreads / kTileC;
  constexpr int kTileP = kGroups * kPartsPerThread;
  __shared__ acc_t f_tile[kTileS][kTileC + 1];
  __shared__ acc_t p_tile[kTileP][kTileS];
  const int64_t b = blockIdx.x, c0 = int64_t(blockIdx.y) * kTileC, q0 = int64_t(blockIdx.z) * kTileP;
  const int channel = threadIdx.x % kTileC, group = threadIdx.x / kTileC;
  const scalar_t* f = features + b * f_b;
  const acc_t* p = probs + b * P * S;
  acc_t acc[kPartsPerThread];
#pragma unroll
  for (int i = 0; i < kPartsPerThread; ++i) acc[i] = 0;
  for (int64_t s0 = 0; s0 < S; s0 += kTileS) {
    load_feature_tile<kPixelsContiguous, acc_t>(f, f_c, f_s, c0, s0, C, S,
                                                [&](int c, int s, acc_t v) { f_tile[s][c] = v; });
    load_rows_tile<kTileP, kTileS>(p_tile, p, q0, s0, P, S);
    __syncthreads();
#pragma unroll 8
    for (int s = 0; s < kTileS; ++s) {
      const acc_t fv = f_tile[s][channel];
#pragma unroll
      for (int i = 0; i < kPartsPerThread; ++i) acc[i] += p_tile[group + kGroups * i][s] * fv;
    }
    __syncthreads();
  }
  const int64_t c = c0 + channel;
  if (c >= C) return;
#pragma unroll
  for (int i = 0; i < kPartsPerThread; ++i) {
    const int64_t q = q0 + group + kGroups * i;
    if (q < P) out[(b * P + q) * C + c] = static_cast<scalar_t>(acc[i]);
  }
}

// grad_features[b, c, s] = sum_q dout[b, q, c] * p[b, q, s].  Block: image blockIdx.x, pixels
// blockIdx.y * 32 + [0, 32), channels blockIdx.z * 64 + [0, 64); parts in chunks of 32.  Thread, 8
// outputs: NCHW output: pixel tid % 32, channels tid / 32 + 8 i; channels_last output: channel
// tid % 64, pixels tid / 64 + 4 i (consecutive threads write consecutive addresses).
template <typename scalar_t, typename acc_t, bool kPixelsContiguous>
__global__ void __launch_bounds__(kThreads) grad_features_kernel(
    const scalar_t* __restrict__ grad_out, const acc_t* __restrict__ probs, int64_t P, int64_t C,
    int64_t S, scalar_t* __restrict__ grad_features, int64_t g_b, int64_t g_c, int64_t g_s) {
  constexpr int kOutputs = kTileC * kTileS / kThreads;
  constexpr int kStride = kPixelsContiguous ? kThreads / kTileS : kThreads / kTileC;
  __shared__ acc_t dout_tile[kMaxTileP][kTileC];
  __shared__ acc_t p_tile[kMaxTileP][kTileS];
  const int64_t b = blockIdx.x, s0 = int64_t(blockIdx.y) * kTileS, c0 = int64_t(blockIdx.z) * kTileC;
  const int lane = kPixelsContiguous ? threadIdx.x % kTileS : threadIdx.x % kTileC;
  const int first = kPixelsContiguous ? threadIdx.x / kTileS : threadIdx.x / kTileC;
  const scalar_t* dout = grad_out + b * P * C;
  const acc_t* p = probs + b * P * S;
  acc_t acc[kOutputs];
#pragma unroll
  for (int i = 0; i < kOutputs; ++i) acc[i] = 0;
  for (int64_t q0 = 0; q0 < P; q0 += kMaxTileP) {
    load_rows_tile<kMaxTileP, kTileC>(dout_tile, dout, q0, c0, P, C);
    load_rows_tile<kMaxTileP, kTileS>(p_tile, p, q0, s0, P, S);
    __syncthreads();
    const int parts = static_cast<int>(P - q0 < kMaxTileP ? P - q0 : kMaxTileP);
    for (int q = 0; q < parts; ++q) {
      if (kPixelsContiguous) {
        const acc_t pv = p_tile[q][lane];
#pragma unroll
        for (int i = 0; i < kOutputs; ++i) acc[i] += dout_tile[q][first + kStride * i] * pv;
      } else {
        const acc_t dv = dout_tile[q][lane];
#pragma unroll
        for (int i = 0; i < kOutputs; ++i) acc[i] += p_tile[q][first + kStride * i] * dv;
      }
    }
    __syncthreads();
  }
  scalar_t* g = grad_features + b * g_b;
#pragma unroll
  for (int i = 0; i < kOutputs; ++i) {
    const int64_t s = s0 + (kPixelsContiguous ? lane : first + kStride * i);
    const int64_t c = c0 + (kPixelsContiguous ? first + kStride * i : lane);
    if (s < S && c < C) g[c * g_c + s * g_s] = static_cast<scalar_t>(acc[i]);
  }
}

// The softmax backward of one row of [B * P, S] per block, in place over grad_logits:
// grad_r = p * (grad_p - delta) / temperature with delta = sum_s p * grad_p.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) softmax_backward_kernel(const acc_t* __restrict__ probs,
                                                                    int64_t S, acc_t temperature,
                                                                    acc_t* __restrict__ grad_logits) {
  __shared__ acc_t scratch[kThreads / 32];
  const acc_t* p = probs + int64_t(blockIdx.x) * S;
  acc_t* g = grad_logits + int64_t(blockIdx.x) * S;
  acc_t sum = 0;
  for (int64_t s = threadIdx.x; s < S; s += kThreads) sum += p[s] * g[s];
  const acc_t delta = block_reduce(sum, SumOp(), scratch);
  for (int64_t s = threadIdx.x; s < S; s += kThreads) g[s] = p[s] * (g[s] - delta) / temperature;
}

// grad_p[b, q, s] = sum_c dout[b, q, c] * F[b, c, s].
// Block: image blockIdx.x, pixels blockIdx.y * 32 + [0, 32), parts blockIdx.z * 32 + [0, 32);
// channels in tiles of 64.  Thread: pixel tid % 32, parts tid / 32 + 8 i (i < 4).
template <typename scalar_t, typename acc_t, bool kPixelsContiguous>
__global__ void __launch_bounds__(kThreads) grad_logits_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ features, int64_t f_b,
    int64_t f_c, int64_t f_s, int64_t P, int64_t C, int64_t S, acc_t* __restrict__ grad_logits) {
  constexpr int kGroups = kThreads / kTileS;
  constexpr int kParts = kMaxTileP / kGroups;
  __shared__ acc_t f_tile[kTileC][kTileS + 1];
  __shared__ acc_t dout_tile[kMaxTileP][kTileC];
  const int64_t b = blockIdx.x, s0 = int64_t(blockIdx.y) * kTileS, q0 = int64_t(blockIdx.z) * kMaxTileP;
  const int pixel = threadIdx.x % kTileS, group = threadIdx.x / kTileS;
  const scalar_t* f = features + b * f_b;
  const scalar_t* dout = grad_out + b * P * C;
  acc_t acc[kParts];
#pragma unroll
  for (int i = 0; i < kParts; ++i) acc[i] = 0;
  for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
    load_feature_tile<kPixelsContiguous, acc_t>(f, f_c, f_s, c0, s0, C, S,
                                                [&](int c, int s, acc_t v) { f_tile[c][s] = v; });
    load_rows_tile<kMaxTileP, kTileC>(dout_tile, dout, q0, c0, P, C);
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTileC; ++c) {
      const acc_t fv = f_tile[c][pixel];
#pragma unroll
      for (int i = 0; i < kParts; ++i) acc[i] += dout_tile[group + kGroups * i][c] * fv;
    }
    __syncthreads();
  }
  const int64_t s = s0 + pixel;
  if (s >= S) return;
#pragma unroll
  for (int i = 0; i < kParts; ++i) {
    const int64_t q = q0 + group + kGroups * i;
    if (q >= P) continue;
    grad_logits[(b * P + q) * S + s] = acc[i];
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The tile grids put the image on x and channel / pixel / part tiles on y and z (at most 65535).
void check_grid(int64_t C, int64_t S) {
  TORCH_CHECK(ceil_div(C, kTileC) <= kMaxGridYZ && ceil_div(S, kTileS) <= kMaxGridYZ,
              "part_pool: the CUDA kernel takes at most ", kMaxGridYZ * kTileC, " channels and ",
              kMaxGridYZ * kTileS, " pixels, got C = ", C, " and H * W = ", S);
}

template <typename scalar_t, typename acc_t>
void launch_probabilities(const at::Tensor& heatmaps, const at::Tensor& groups, int64_t P,
                          double temperature, const at::Tensor& probs, cudaStream_t stream) {
  const int64_t B = heatmaps.size(0), J = heatmaps.size(1), S = heatmaps.size(2) * heatmaps.size(3);
  probabilities_kernel<scalar_t, acc_t><<<B * P, kThreads, 0, stream>>>(
      heatmaps.data_ptr<scalar_t>(), !groups.defined(),
      groups.defined() ? groups.data_ptr<scalar_t>() : nullptr, P, J,
      S, static_cast<acc_t>(temperature), probs.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, int kPartsPerThread>
void launch_weighted_sum(const at::Tensor& features, const at::Tensor& probs, const at::Tensor& out,
                         cudaStream_t stream) {
  const int64_t B = features.size(0), C = features.size(1), S = features.size(2), P = probs.size(1);
  constexpr int64_t kTileP = (kThreads / kTileC) * kPartsPerThread;
  TORCH_CHECK(ceil_div(P, kTileP) <= kMaxGridYZ, "part_pool: too many parts for the CUDA kernel: ", P);
  const dim3 grid(B, ceil_div(C, kTileC), ceil_div(P, kTileP));
  if (features.stride(2) == 1) {
    weighted_sum_kernel<scalar_t, acc_t, kPartsPerThread, true><<<grid, kThreads, 0, stream>>>(
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2),
        probs.data_ptr<acc_t>(), P, C, S, out.data_ptr<scalar_t>());
  } else {
    weighted_sum_kernel<scalar_t, acc_t, kPartsPerThread, false><<<grid, kThreads, 0, stream>>>(
        features.data_ptr<scalar_t>(), features.stride(0), features.stride(1), features.stride(2),
        probs.data_ptr<acc_t>(), P, C, S, out.data_ptr<scalar_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// [B, C, H, W] as [B, C, S]: a view of NCHW and channels_last tensors (the kernels take any strides).
at::Tensor image_matrices(const at::Tensor& t) {
  return t.reshape({t.size(0), t.size(1), t.size(2) * t.size(3)});
}

}  // namespace

at::Tensor part_pool_cuda(const at::Tensor& features_in, const at::Tensor& heatmaps_in,
                          const std::optional<at::Tensor>& groups_in, double temperature) {
  const int64_t P = check_part_pool_args(features_in, heatmaps_in, groups_in, temperature);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const int64_t B = features_in.size(0), C = features_in.size(1);
  const int64_t S = features_in.size(2) * features_in.size(3);
  check_grid(C, S);
  const auto features = image_matrices(features_in);
  const auto heatmaps = heatmaps_in.contiguous();
  const auto groups = groups_in.has_value() ? groups_in->contiguous() : at::Tensor();
  const auto acc_type = at::toOpMathType(features.scalar_type());
  auto out = at::empty({B, P, C}, features.options());
  if (B == 0 || P == 0) return out;
  auto probs = at::empty({B, P, S}, features.options().dtype(acc_type));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "part_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_probabilities<scalar_t, acc_t>(heatmaps, groups, P, temperature, probs, stream);
    if (C == 0) return;
    if (P <= 4) {
      launch_weighted_sum<scalar_t, acc_t, 1>(features, probs, out, stream);
    } else if (P <= 8) {
      launch_weighted_sum<scalar_t, acc_t, 2>(features, probs, out, stream);
    } else if (P <= 16) {
      launch_weighted_sum<scalar_t, acc_t, 4>(features, probs, out, stream);
    } else {
      launch_weighted_sum<scalar_t, acc_t, 8>(features, probs, out, stream);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> part_pool_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& features_in, const at::Tensor& heatmaps_in,
    const std::optional<at::Tensor>& groups_in, double temperature, std::array<bool, 3> output_mask) {
  const int64_t P = check_part_pool_args(features_in, heatmaps_in, groups_in, temperature);
  check_part_pool_backward_args(grad_out_in, features_in, P);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const int64_t B = features_in.size(0), C = features_in.size(1), J = heatmaps_in.size(1);
  const int64_t H = features_in.size(2), W = features_in.size(3), S = H * W;
  check_grid(C, S);
  const bool need_features = output_mask[0], need_heatmaps = output_mask[1];
  const bool need_groups = output_mask[2] && groups_in.has_value();
  const auto features = image_matrices(features_in);
  const auto heatmaps = heatmaps_in.contiguous();
  const auto groups = groups_in.has_value() ? groups_in->contiguous() : at::Tensor();
  const auto grad_out = grad_out_in.contiguous();
  const auto options = features.options();
  const auto acc_options = options.dtype(at::toOpMathType(features.scalar_type()));
  at::Tensor grad_features = at::empty({0}, options), grad_heatmaps = at::empty({0}, options);
  at::Tensor grad_groups = at::empty({0}, options);
  if (need_features) {  // channels_last features get a channels_last gradient, others NCHW
    const bool channels_last =
        features_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !features_in.is_contiguous();
    grad_features = at::empty({B, C, H, W}, options.memory_format(
        channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  }
  if (B == 0 || P == 0) {
    if (need_features) grad_features.zero_();
    if (need_heatmaps) grad_heatmaps = at::zeros({B, J, H, W}, options);
    if (need_groups) grad_groups = at::zeros({P, J}, options);
    return {grad_features, grad_heatmaps, grad_groups};
  }
  const bool need_logits = need_heatmaps || need_groups;
  auto probs = at::empty({B, P, S}, acc_options);
  auto grad_logits = need_logits ? at::empty({B, P, S}, acc_options) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "part_pool_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_probabilities<scalar_t, acc_t>(heatmaps, groups, P, temperature, probs, stream);
    if (need_features && C > 0) {
      const auto g = grad_features.view({B, C, S});
      const dim3 grid(B, ceil_div(S, kTileS), ceil_div(C, kTileC));
      if (g.stride(2) == 1) {
        grad_features_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(), P, C, S,
            g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2));
      } else {
        grad_features_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), probs.data_ptr<acc_t>(), P, C, S,
            g.data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!need_logits) return;
    TORCH_CHECK(ceil_div(P, kMaxTileP) <= kMaxGridYZ, "part_pool: too many parts for the CUDA kernel: ", P);
    const dim3 grid(B, ceil_div(S, kTileS), ceil_div(P, kMaxTileP));
    if (features.stride(2) == 1) {
      grad_logits_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(), features.stride(0),
          features.stride(1), features.stride(2), P, C, S, grad_logits.data_ptr<acc_t>());
    } else {
      grad_logits_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), features.data_ptr<scalar_t>(), features.stride(0),
          features.stride(1), features.stride(2), P, C, S, grad_logits.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    softmax_backward_kernel<acc_t><<<B * P, kThreads, 0, stream>>>(
        probs.data_ptr<acc_t>(), S, static_cast<acc_t>(temperature), grad_logits.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // The small [P, J]-sized products of grad_r [B, P, S] with groups and heatmaps (cuBLAS).
  if (need_heatmaps) {
    const auto grad_hm = groups.defined() ? at::matmul(groups.to(acc_options.dtype()).t(), grad_logits)
                                          : grad_logits;
    grad_heatmaps = grad_hm.to(options.dtype()).view({B, J, H, W});
  }
  if (need_groups) {
    const auto hm = heatmaps.view({B, J, S}).to(acc_options.dtype());
    grad_groups = at::matmul(grad_logits, hm.transpose(1, 2)).sum(0).to(options.dtype());
  }
  return {grad_features, grad_heatmaps, grad_groups};
}

KEYPOINTOPS_DEFINED_AS_DECLARED(part_pool_cuda);
KEYPOINTOPS_DEFINED_AS_DECLARED(part_pool_backward_cuda);

}  // namespace keypointops
