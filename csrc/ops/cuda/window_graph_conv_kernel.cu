// window_graph_conv CUDA kernels: shared-memory tiled small GEMMs whose gathered operand is read
// straight from x (zero where the frame of a window slot is outside [0, T)).
//
// Slot w of window t (t < T') reads frame t * stride - pad + w * dilation; window node
// j = w * N + n; adj_bt is [R, L] (R = S * L: S stacked scales, x read once for all of them).
// - forward, one block per (window (b, t), 64 rows i, 64 channels c):
//     out[b, t, i, c] = sum_j adj_bt[i, j] * x[b, frame(t, j), j % N, c]
// - grad_x, one block per (frame (b, f), 64 nodes n, 64 channels c), over the slots w whose window
//     t = (f + pad - w * dilation) / stride exists (one writer per element: deterministic, no
//     atomics): grad_x[b, f, n, c] = sum_w sum_i adj_bt[i, wN + n] * grad_out[b, t, i, c]
// - grad_adj, one block per (unit, 64 rows i, 64 columns j), summing over the windows of the unit
//     and the channels grad_out[b, t, i, c] * x[b, frame(t, j), j % N, c].  A unit is one window
//     (per-window adj), one sample (per-sample adj) or a chunk of windows (shared adj: the
//     [chunks, R, L] partials are then summed by at::sum, deterministic).
// 256 threads per block, each accumulating a 4 x 4 micro-tile (rows ty + 16 r, columns tx + 16 s)
// over k-steps of 16 staged in shared memory; float32 accumulation for half/bfloat16 (float64 for
// float64).  Memory: the outputs, plus the [chunks, R, L] partials of a shared adj's gradient.
// Occupancy: at most 128 registers per thread (float64: 78-114; 48-64 for float32 and 16-bit), so
// at least 2 blocks of 256 threads per SM.
// Local memory: at most 8 bytes per thread, where ptxas spills in grad_x (float32 and 16-bit:
// 4-8 bytes; bench/results/cuda-resources.md).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "ops/cuda/kernels.h"
#include "ops/window_graph_conv.h"

namespace keypointops {
namespace {

constexpr int kTile = 64;     // rows and columns of a block's output tile
constexpr int kTileK = 16;    // reduction step staged in shared memory
constexpr int kThreads = 256;  // 16 x 16 threads
constexpr int kMicro = 4;      // 4 x 4 outputs per thread
constexpr int64_t kSharedAdjChunks = 256;  // partial sums of a shared adj's gradient

template <typename acc_t>
struct TileStorage {
  acc_t a[kTileK][kTile + 1];  // a[k][m]; +1 keeps the k-fast stores free of bank conflicts
  acc_t b[kTileK][kTile + 1];  // b[k][n]
};

// acc[r][s] += sum_{k < k_size} A(m, k) * B(k, n) for m = ty + 16 r, n = tx + 16 s, where
// load_a(m, k) and load_b(k, n) return the operands (0 outside the matrices).  kAKFast / kBKFast:
// whether consecutive threads load consecutive k (the operand is contiguous along k in memory)
// rather than consecutive m / n.
template <bool kAKFast, bool kBKFast, typename acc_t, typename LoadA, typename LoadB>
__device__ __forceinline__ void accumulate_tile(int64_t k_size, const LoadA& load_a,
                                                const LoadB& load_b, TileStorage<acc_t>& tile,
                                                acc_t (&acc)[kMicro][kMicro]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  for (int64_t k0 = 0; k0 < k_size; k0 += kTileK) {
    for (int e = threadIdx.x; e < kTile * kTileK; e += kThreads) {
      const int ka = kAKFast ? e % kTileK : e / kTile;
      const int m = kAKFast ? e / kTileK : e % kTile;
      tile.a[ka][m] = load_a(m, k0 + ka);
      const int kb = kBKFast ? e % kTileK : e / kTile;
      const int n = kBKFast ? e / kTileK : e % kTile;
      tile.b[kb][n] = load_b(k0 + kb, n);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      acc_t a[kMicro], b[kMicro];
#pragma unroll
      for (int r = 0; r < kMicro; ++r) a[r] = tile.a[k][ty + 16 * r];
#pragma unroll
      for (int s = 0; s < kMicro; ++s) b[s] = tile.b[k][tx + 16 * s];
#pragma unroll
      for (int r = 0; r < kMicro; ++r) {
#pragma unroll
        for (int s = 0; s < kMicro; ++s) acc[r][s] += a[r] * b[s];
      }
    }
    __syncthreads();
  }
}

// x[b, start + (j / N) * dilation, j % N, c] for window node j of the window whose first frame
// is start = t * stride - pad (x_b = x[b]), 0 outside the matrix (j >= L or c >= C) or when the
// frame is outside [0, T).
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t window_node(const scalar_t* x_b, int64_t start, int64_t j,
                                             int64_t c, int64_t T, int64_t N, int64_t C, int64_t L,
                                             int64_t dilation) {
  if (j >= L || c >= C) return acc_t(0);
  const int64_t frame = start + (j / N) * dilation;
  if (frame < 0 || frame >= T) return acc_t(0);
  return static_cast<acc_t>(x_b[(frame * N + j % N) * C + c]);
}

// out[(m0 + ty + 16 r) * ld + n0 + tx + 16 s] = acc[r][s], inside the rows x cols matrix.
template <typename acc_t, typename out_t>
__device__ __forceinline__ void store_tile(const acc_t (&acc)[kMicro][kMicro], out_t* out,
                                           int64_t ld, int64_t m0, int64_t n0, int64_t rows,
                                           int64_t cols) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < kMicro; ++r) {
    const int64_t m = m0 + ty + 16 * r;
#pragma unroll
    for (int s = 0; s < kMicro; ++s) {
      const int64_t n = n0 + tx + 16 * s;
      if (m < rows && n < cols) out[m * ld + n] = static_cast<out_t>(acc[r][s]);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ adj,
               scalar_t* __restrict__ out, int64_t T, int64_t To, int64_t N, int64_t C, int64_t L,
               int64_t R, int64_t pad, int64_t dilation, int64_t stride, int64_t adj_sample_stride,
               int64_t adj_window_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ TileStorage<acc_t> tile;
  const int64_t window_id = blockIdx.x, b = window_id / To, t = window_id % To;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kTile;
  const scalar_t* a_bt = adj + b * adj_sample_stride + t * adj_window_stride;
  const scalar_t* x_b = x + b * T * N * C;
  const auto load_a = [&](int m, int64_t j) -> acc_t {
    const int64_t i = i0 + m;
    return i < R && j < L ? static_cast<acc_t>(a_bt[i * L + j]) : acc_t(0);
  };
  const auto load_b = [&](int64_t j, int n) -> acc_t {
    return window_node<acc_t>(x_b, t * stride - pad, j, c0 + n, T, N, C, L, dilation);
  };
  acc_t acc[kMicro][kMicro] = {};
  accumulate_tile<true, false>(L, load_a, load_b, tile, acc);
  store_tile(acc, out + window_id * R * C, C, i0, c0, R, C);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
grad_x_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ adj,
              scalar_t* __restrict__ grad_x, int64_t T, int64_t To, int64_t N, int64_t C,
              int64_t L, int64_t R, int64_t window, int64_t pad, int64_t dilation, int64_t stride,
              int64_t adj_sample_stride, int64_t adj_window_stride) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ TileStorage<acc_t> tile;
  const int64_t frame_id = blockIdx.x, b = frame_id / T, f = frame_id % T;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.z) * kTile;
  acc_t acc[kMicro][kMicro] = {};
  for (int64_t w = 0; w < window; ++w) {
    // The window whose slot w reads frame f; uniform over the block: no divergent barrier.
    const int64_t t = window_reading_frame(f, w, To, window, dilation, stride);
    if (t < 0) continue;
    const scalar_t* a_bt = adj + b * adj_sample_stride + t * adj_window_stride + w * N;
    const scalar_t* g_bt = grad_out + (b * To + t) * R * C;
    const auto load_a = [&](int m, int64_t i) -> acc_t {  // adj_bt[i, wN + n], transposed
      const int64_t n = n0 + m;
      return n < N && i < R ? static_cast<acc_t>(a_bt[i * L + n]) : acc_t(0);
    };
    const auto load_b = [&](int64_t i, int n) -> acc_t {
      const int64_t c = c0 + n;
      return i < R && c < C ? static_cast<acc_t>(g_bt[i * C + c]) : acc_t(0);
    };
    accumulate_tile<false, false>(R, load_a, load_b, tile, acc);
  }
  store_tile(acc, grad_x + frame_id * N * C, C, n0, c0, N, C);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
grad_adj_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
                at::opmath_type<scalar_t>* __restrict__ targets, int64_t T, int64_t To, int64_t N,
                int64_t C, int64_t L, int64_t R, int64_t pad, int64_t dilation, int64_t stride,
                int64_t windows, int64_t windows_per_unit) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ TileStorage<acc_t> tile;
  const int64_t unit = blockIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * kTile;
  acc_t acc[kMicro][kMicro] = {};
  const int64_t end = (unit + 1) * windows_per_unit;
  const int64_t last = end < windows ? end : windows;
  for (int64_t window_id = unit * windows_per_unit; window_id < last; ++window_id) {
    const int64_t b = window_id / To, t = window_id % To;
    const scalar_t* g_bt = grad_out + window_id * R * C;
    const scalar_t* x_b = x + b * T * N * C;
    const auto load_a = [&](int m, int64_t c) -> acc_t {
      const int64_t i = i0 + m;
      return i < R && c < C ? static_cast<acc_t>(g_bt[i * C + c]) : acc_t(0);
    };
    const auto load_b = [&](int64_t c, int n) -> acc_t {
      return window_node<acc_t>(x_b, t * stride - pad, j0 + n, c, T, N, C, L, dilation);
    };
    accumulate_tile<true, true>(C, load_a, load_b, tile, acc);
  }
  store_tile(acc, targets + unit * R * L, L, i0, j0, R, L);
}

unsigned int tiles(int64_t size) { return static_cast<unsigned int>((size + kTile - 1) / kTile); }

// The tile grids put windows / frames / units on x and tiles of rows, nodes, channels and columns
// on y and z, which the hardware caps at 65535 blocks.
void check_grid_yz(int64_t rows, int64_t cols, const char* what) {
  constexpr int64_t kMaxGridYZ = 65535;
  TORCH_CHECK(tiles(rows) <= kMaxGridYZ && tiles(cols) <= kMaxGridYZ,
              "window_graph_conv: the CUDA kernel takes ", what, " of at most ", kMaxGridYZ * kTile,
              ", got ", rows, " and ", cols);
}

void check_cuda_inputs(const at::Tensor& x, int64_t blocks_x) {
  TORCH_CHECK(x.is_cuda(), "window_graph_conv: the CUDA kernel takes CUDA tensors, got ",
              x.device());
  TORCH_CHECK(blocks_x <= std::numeric_limits<int>::max(), "window_graph_conv: ", blocks_x,
              " windows (or frames) is more than one CUDA launch takes");
}

}  // namespace

at::Tensor window_graph_conv_cuda(const at::Tensor& x_in, const at::Tensor& adj_in, int64_t window,
                                  int64_t dilation, int64_t stride) {
  check_window_graph_conv_args(x_in, adj_in, window, dilation, stride);
  const int64_t B = x_in.size(0), T = x_in.size(1), N = x_in.size(2), C = x_in.size(3);
  const int64_t L = window * N, R = adj_in.size(-2);
  const int64_t To = window_count(T, window, dilation, stride);
  check_cuda_inputs(x_in, B * To);
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto adj = adj_in.contiguous();
  auto out = at::empty({B, To, R, C}, x.options());
  if (out.numel() == 0) return out;
  const int64_t sample_stride = adj.dim() >= 3 ? adj.stride(0) : 0;
  const int64_t window_stride = adj.dim() == 4 ? adj.stride(1) : 0;
  check_grid_yz(R, C, "R = S * window * N and C");
  const dim3 grid(static_cast<unsigned int>(B * To), tiles(R), tiles(C));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_graph_conv_cuda",
                                  [&] {
    forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), adj.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, To, N, C, L,
        R, window_pad(window, dilation), dilation, stride, sample_stride, window_stride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> window_graph_conv_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& adj_in, int64_t window,
    int64_t dilation, int64_t stride, bool compute_grad_x, bool compute_grad_adj) {
  check_window_graph_conv_args(x_in, adj_in, window, dilation, stride);
  check_window_graph_conv_grad_out(grad_out_in, x_in, adj_in, window, dilation, stride);
  const int64_t B = x_in.size(0), T = x_in.size(1), N = x_in.size(2), C = x_in.size(3);
  const int64_t L = window * N, R = adj_in.size(-2);
  const int64_t To = window_count(T, window, dilation, stride), windows = B * To;
  check_cuda_inputs(x_in, std::max(windows, B * T));
  c10::cuda::CUDAGuard guard(x_in.device());
  const auto grad_out = grad_out_in.contiguous();
  const auto x = x_in.contiguous();
  const auto adj = adj_in.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t pad = window_pad(window, dilation);

  auto grad_x = compute_grad_x ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (compute_grad_x && grad_x.numel() > 0) {
    const int64_t sample_stride = adj.dim() >= 3 ? adj.stride(0) : 0;
    const int64_t window_stride = adj.dim() == 4 ? adj.stride(1) : 0;
    check_grid_yz(N, C, "N and C");
    const dim3 grid(static_cast<unsigned int>(B * T), tiles(N), tiles(C));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "window_graph_conv_grad_x_cuda", [&] {
      grad_x_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), adj.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), T,
          To, N, C, L, R, window, pad, dilation, stride, sample_stride, window_stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  auto grad_adj = at::empty({0}, adj.options());
  if (compute_grad_adj && windows == 0) {  // zeros (also B of them for a [B, R, L] adj and T' = 0)
    grad_adj = at::zeros(adj.sizes(), adj.options());
  } else if (compute_grad_adj) {
    const AdjGradUnits work = adj_grad_units(adj.dim(), B, To, kSharedAdjChunks);
    const int64_t per_unit = work.windows_per_unit, units = work.units;
    const auto acc_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
    auto targets = at::zeros({units, R, L}, acc_options);
    if (units > 0 && L > 0 && C > 0) {
      check_grid_yz(R, L, "R = S * window * N and L = window * N");
      const dim3 grid(static_cast<unsigned int>(units), tiles(R), tiles(L));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                      "window_graph_conv_grad_adj_cuda", [&] {
        grad_adj_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
            targets.data_ptr<at::opmath_type<scalar_t>>(), T, To, N, C, L, R, pad, dilation, stride,
            windows, per_unit);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    grad_adj = (adj.dim() == 2 ? targets.sum(0) : targets).reshape(adj.sizes());
    grad_adj = grad_adj.to(adj.scalar_type());
  }
  return {grad_x, grad_adj};
}

KEYPOINTOPS_DEFINED_AS_DECLARED(window_graph_conv_cuda);
KEYPOINTOPS_DEFINED_AS_DECLARED(window_graph_conv_backward_cuda);

}  // namespace keypointops
