// msg_pass CUDA kernels.
//
// Lane groups: L lanes own one row slice, each lane VEC consecutive channels (VEC = 16 bytes of x
// when C and every pointer allow, else 1), L = the power of two covering C / VEC, at most 32 (a
// lane loops over further channel chunks).  A row of C = 64 float32 is one coalesced 256-byte
// access of 16 lanes with 16-byte loads.
// Forward: one group per destination node v walks col[rowptr[v]:rowptr[v+1]], issuing the gathers
// of kForwardUnroll edges before using any (memory-level parallelism), and folds them into an
// online softmax per channel with one exp per element, m = relu(x_u) + eps, over the shift message
// M (the m of the largest logit t m so far), A centred on M (A = sum w (m - M)):
//   d = t (m - M), w = exp(-|d|);  d > 0 (new largest): A = (A + (M - m) Z) w, Z = Z w + 1, M = m;
//   else Z += w, A += w (m - M)   (the first message: Z = 1, A = 0, M = m).
// The exponent is t times an exact-sign difference, never t m - t M: that form has the rounding
// error ulp(t m) in the exponent, and contracted into one fused multiply-add (as nvcc does) its
// exponent is the product's rounding error, which overflows exp to inf and out to inf / inf = NaN.
// out = M + A / Z (equal messages give out = M exactly, a sharp softmax M + a small term, so that
// backward's m_u - out_v is accurate); M (row_max) and Z (row_sum) are saved for backward in the accumulation dtype (float32
// for half, bfloat16 and float32 x; float64 for float64).
// Bytes the forward must move (each destination gathers its sources' rows once):
//   E*C*sizeof(x) gathered + E*8 (col) + (N+1)*8 (rowptr) read, N*C*(sizeof(x) + 2*sizeof(acc)) written.
// N = 1M, E = 5M, C = 64, float32: 1.28 GB + 40 MB + 8 MB + 768 MB = 2.10 GB; the kernel's time is
// this traffic over the device's memory bandwidth (the gathers are the random-access part).
// Edge features add E*C*sizeof(x) (the edge rows, gathered through perm) + E*8 (perm) read.
// Backward: one group per kNodesPerGroup consecutive source nodes u walks their outgoing edges
// u -> v (transposed CSR; for_each_target, shared with the power mean), gathering row_max,
// row_sum, grad_out and out of v:
//   w = exp(t (m_u - M_v)) grad_out_v / Z_v,  d = m_u - out_v (centred: no cancellation of two large
//   terms at a sharp softmax),
//   grad_m_u = sum_v (w + w t d),  grad_t += m_u sum_v w d,  grad_x_u = grad_m_u [x_u > 0]
//   (aggr "softmax_sg", PyG's semi-gradient softmax: the weights are constants, grad_m_u = sum_v w).
// Every grad_x row has one writer; each group writes its grad_t partial to its own row of
// [num_groups, C] and a second kernel sums the rows in a fixed order: no atomics, deterministic.
// Edge features (edge_attr [E, C] in the caller's edge order, kEdge): the message of CSR position k
// is relu(x[col[k]] + edge_attr[perm[k]]) + eps, the edge row gathered in place through the
// permutation (no permuted copy), with half the forward unroll (two rows in flight per edge).
// Backward takes the message and its mask per edge, g = (w + w t d) [x_u + e > 0]:
// grad_x_u = sum g, grad_edge_attr[perm_t[k]] = g (one writer per edge row: the group that owns
// its source), grad_t += sum w d m.
// Memory: forward out, row_max, row_sum ([N, C] each); backward grad_x [N, C], the grad_t partials
// [ceil(N / kNodesPerGroup), C] and with edge features grad_edge_attr [E, C] (the gradient of that
// input); no other tensor of size E x C.
// Power mean and mean (aggr "powermean", p = t, runtime flag `power`; aggr "mean"): the same lane
// groups; forward sums c^p with c = clamp(m, lo, hi) (m for the mean) over a destination's valid
// edges, stores out = clamp(y, lo, hi)^(1/p) (y for the mean) with y = sum / deg (0 without
// edges) and saves y (as row_max) and deg (as row_sum).  Backward, per source group as above,
// gathers y_v, deg_v and grad_out_v of each target and forms its factor
//   q_v = grad_out_v Y^(1/p) / (p Y) [lo <= y_v <= hi] / deg_v   (Y = clamp(y_v); grad_out_v / deg_v
//   for the mean),
// then g = q_v p c^p / c [lo <= m <= hi] [x_u + e > 0] (q_v [x_u + e > 0] for the mean), grad_x_u =
// sum g, grad_p += q_v c^p ln c per edge and grad_out_u out_u ln(Y_u) (-1/p^2) for u as a target.
// Memory as for the softmax (y and deg in place of row_max and row_sum).
// Index contents are validated on the CPU only (Graph): here rowptr entries are clamped to [0, E]
// and edges whose node index lies outside [0, N), or whose edge id lies outside [0, E), are skipped,
// so bad indices never read out of range.
// Occupancy: at most 168 registers per thread (165: the 16-byte bfloat16 backwards with grad_t
// (grad_p) and edge features on sm_90; up to 157 for the other edge-feature backward instances,
// 48-128 for most others), so 1 block of 256 threads per SM in the vectorised edge-feature
// backward instances and 2 in the others.
// Local memory: at most 32 bytes per thread, where ptxas spills (4-16 bytes) in the scalar float64
// softmax backward with grad_t, the vectorised 16-bit backwards with grad_t (grad_p) and edge
// features, and the vectorised bfloat16 forward on sm_90 (bench/results/cuda-resources.md).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "ops/cuda/kernels.h"
#include "ops/msg_pass.h"

namespace keypointops {
namespace {

constexpr int kThreads = 256;
constexpr int kForwardUnroll = 8;      // gathered rows in flight per lane (forward: 1 row per edge)
// Edges in flight per lane in backward (4 rows per edge): 4, or 2 for 8-wide (16-bit) vectors
// whose float32 row_max / row_sum packs would otherwise take most of the register file.
template <int VEC>
constexpr int kBackwardUnroll = VEC >= 8 ? 2 : 4;
constexpr int64_t kNodesPerGroup = 32;  // backward: source nodes per group (one grad_t partial row)
constexpr int kSumChannels = 32;       // grad_t sum: channels per block (one warp wide) ...
constexpr int kSumSlices = 16;         // ... times row slices per block

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

__device__ __forceinline__ float exp_acc(float v) { return __expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return ::exp(v); }

__device__ __forceinline__ float pow_acc(float base, float exponent) { return __powf(base, exponent); }
__device__ __forceinline__ double pow_acc(double base, double exponent) { return ::pow(base, exponent); }
__device__ __forceinline__ float log_acc(float v) { return __logf(v); }
__device__ __forceinline__ double log_acc(double v) { return ::log(v); }

template <typename acc_t>
__device__ __forceinline__ acc_t clamp_acc(acc_t v, acc_t lo, acc_t hi) {
  return fmin(fmax(v, lo), hi);
}

template <typename acc_t>
__device__ __forceinline__ acc_t message(acc_t x, acc_t eps) {
  return (x > acc_t(0) ? x : acc_t(0)) + eps;
}

// [rowptr[node], rowptr[node + 1]) clamped to [0, num_edges]: an empty range if rowptr is bad.
__device__ __forceinline__ void edge_range(const int64_t* rowptr, int64_t node, int64_t num_edges,
                                           int64_t& begin, int64_t& end) {
  begin = rowptr[node];
  end = rowptr[node + 1];
  begin = begin < 0 ? 0 : (begin > num_edges ? num_edges : begin);
  end = end > num_edges ? num_edges : end;
}

// col[e] if e < end and it lies in [0, num_nodes), else -1 (an edge to skip).
__device__ __forceinline__ int64_t checked_node(const int64_t* col, int64_t e, int64_t end,
                                                int64_t num_nodes) {
  const int64_t node = e < end ? col[e] : -1;
  return node >= 0 && node < num_nodes ? node : -1;
}

// The edge id perm[e] when e is an edge to use (node >= 0) and the id lies in [0, num_edges), else
// -1; without edge features (perm == nullptr) the edge is used as it is (0).
__device__ __forceinline__ int64_t checked_edge(const int64_t* perm, int64_t e, int64_t node,
                                                int64_t num_edges) {
  if (node < 0) return -1;
  if (perm == nullptr) return 0;
  const int64_t id = perm[e];
  return id >= 0 && id < num_edges ? id : -1;
}

// The node col[e] and (kEdge) edge id perm[e] of CSR position e, or node -1 for a position to skip
// (past end, or an index out of range).
template <bool kEdge>
__device__ __forceinline__ int64_t checked_position(const int64_t* col, const int64_t* perm, int64_t e,
                                                    int64_t end, int64_t num_nodes, int64_t num_edges,
                                                    int64_t& id) {
  const int64_t node = checked_node(col, e, end, num_nodes);
  id = checked_edge(kEdge ? perm : nullptr, e, node, num_edges);
  return id < 0 ? -1 : node;
}

// The rows of the messages at CSR positions e0 .. e0 + kUnroll - 1 (all issued before any is used):
// the source rows of x, with kEdge the edge rows; u[k] = -1 for a position to skip.
template <bool kEdge, int VEC, int kUnroll, typename scalar_t>
__device__ __forceinline__ void gather_messages(
    const scalar_t* __restrict__ x, const int64_t* __restrict__ col, const scalar_t* __restrict__ edge_attr,
    const int64_t* __restrict__ perm, int64_t e0, int64_t e_end, int64_t num_nodes, int64_t num_edges,
    int64_t channels, int64_t c, Pack<scalar_t, VEC> (&rows)[kUnroll], Pack<scalar_t, VEC> (&edge_rows)[kUnroll],
    int64_t (&u)[kUnroll]) {
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    int64_t id;
    u[k] = checked_position<kEdge>(col, perm, e0 + k, e_end, num_nodes, num_edges, id);
    if (u[k] >= 0) rows[k] = load_pack<VEC>(x + u[k] * channels + c);
    if (kEdge && u[k] >= 0) edge_rows[k] = load_pack<VEC>(edge_attr + id * channels + c);
  }
}

// The forward's walk over destination node v (one lane group of 1 << lanes_log2 lanes per node): for
// each of the lane's channel chunks c, begin(c), then update(j, m) with the message m of channel c + j
// of each of v's in-edges in CSR order (positions to skip left out, the rows of kUnroll edges gathered
// before any is used), then end(v, c, count), count the messages taken.  The aggregation's state lives
// in the caller's lambdas; a caller that ignores count pays nothing for it (the counter is dead code).
template <bool kEdge, int VEC, typename scalar_t, typename Begin, typename Update, typename End>
__device__ __forceinline__ void for_each_message(
    const scalar_t* __restrict__ x, const int64_t* __restrict__ rowptr, const int64_t* __restrict__ col,
    const scalar_t* __restrict__ edge_attr, const int64_t* __restrict__ perm, at::opmath_type<scalar_t> eps,
    int64_t num_nodes, int64_t num_edges, int64_t channels, int lanes_log2, Begin&& begin, Update&& update,
    End&& end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t v = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> lanes_log2;
  if (v >= num_nodes) return;
  const int lane = threadIdx.x & ((1 << lanes_log2) - 1);
  int64_t e_begin, e_end;
  edge_range(rowptr, v, num_edges, e_begin, e_end);
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < channels; c += int64_t{VEC} << lanes_log2) {
    begin(c);
    int64_t count = 0;
    constexpr int kUnroll = kEdge ? kForwardUnroll / 2 : kForwardUnroll;
    for (int64_t e0 = e_begin; e0 < e_end; e0 += kUnroll) {
      Pack<scalar_t, VEC> rows[kUnroll], edge_rows[kUnroll];
      int64_t u[kUnroll];
      gather_messages<kEdge>(x, col, edge_attr, perm, e0, e_end, num_nodes, num_edges, channels, c, rows,
                             edge_rows, u);
#pragma unroll
      for (int k = 0; k < kUnroll; ++k) {
        if (u[k] < 0) continue;
        ++count;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t in = static_cast<acc_t>(rows[k].v[j]);
          if constexpr (kEdge) in += static_cast<acc_t>(edge_rows[k].v[j]);
          update(j, message(in, eps));
        }
      }
    }
    end(v, c, count);
  }
}

// Backward's prefetch: the targets v[k] (transposed CSR) and (kEdge) edge ids id[k] of positions
// e0 .. e0 + kUnroll - 1, v[k] = -1 for a position to skip; for each target load_target(k, i) loads
// the target's rows (i = v[k] * channels + c: what each aggregation saved), and with kEdge the edge
// row.  All loads are issued before any is used.
template <bool kEdge, int VEC, int kUnroll, typename scalar_t, typename LoadTarget>
__device__ __forceinline__ void gather_targets(
    const int64_t* __restrict__ col_t, const scalar_t* __restrict__ edge_attr, const int64_t* __restrict__ perm_t,
    int64_t e0, int64_t e_end, int64_t num_nodes, int64_t num_edges, int64_t channels, int64_t c,
    int64_t (&v)[kUnroll], int64_t (&id)[kUnroll], Pack<scalar_t, VEC> (&edge_rows)[kUnroll],
    LoadTarget&& load_target) {
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    v[k] = checked_position<kEdge>(col_t, perm_t, e0 + k, e_end, num_nodes, num_edges, id[k]);
    if (v[k] >= 0) {
      load_target(k, v[k] * channels + c);
      if constexpr (kEdge) edge_rows[k] = load_pack<VEC>(edge_attr + id[k] * channels + c);
    }
  }
}

// The backward's walk over the sources of one lane group (kNodesPerGroup consecutive source nodes
// u, 1 << lanes_log2 lanes): for each of the lane's channel chunks c, begin(c); for each source u,
// source(u, c), then target(k, edge_row, edge_index) for each out-edge of u in transposed-CSR order
// (positions to skip left out; k < kBackwardUnroll is the slot in which load_target(k, i) loaded
// that target's rows, all kBackwardUnroll targets loaded before any is used; edge_row is the
// edge's row of edge_attr with kEdge and edge_index = id * channels + c its offset there), then
// end_source(u, c); after the sources, end(group, c).  The gradients' state lives in the caller's
// lambdas.
template <bool kEdge, int VEC, typename scalar_t, typename Begin, typename Source, typename LoadTarget,
          typename Target, typename EndSource, typename End>
__device__ __forceinline__ void for_each_target(
    const int64_t* __restrict__ rowptr_t, const int64_t* __restrict__ col_t,
    const scalar_t* __restrict__ edge_attr, const int64_t* __restrict__ perm_t, int64_t num_nodes,
    int64_t num_edges, int64_t channels, int lanes_log2, Begin&& begin, Source&& source,
    LoadTarget&& load_target, Target&& target, EndSource&& end_source, End&& end) {
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) >> lanes_log2;
  const int64_t u_begin = group * kNodesPerGroup;
  if (u_begin >= num_nodes) return;
  const int64_t u_end = u_begin + kNodesPerGroup < num_nodes ? u_begin + kNodesPerGroup : num_nodes;
  const int lane = threadIdx.x & ((1 << lanes_log2) - 1);
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < channels; c += int64_t{VEC} << lanes_log2) {
    begin(c);
    for (int64_t u = u_begin; u < u_end; ++u) {
      source(u, c);
      int64_t e_begin, e_end;
      edge_range(rowptr_t, u, num_edges, e_begin, e_end);
      constexpr int kUnroll = kBackwardUnroll<VEC>;
      for (int64_t e0 = e_begin; e0 < e_end; e0 += kUnroll) {
        Pack<scalar_t, VEC> edge_rows[kUnroll];
        int64_t v[kUnroll], id[kUnroll];
        gather_targets<kEdge>(col_t, edge_attr, perm_t, e0, e_end, num_nodes, num_edges, channels, c, v, id,
                              edge_rows, load_target);
#pragma unroll
        for (int k = 0; k < kUnroll; ++k) {
          if (v[k] >= 0) target(k, edge_rows[k], id[k] * channels + c);
        }
      }
      end_source(u, c);
    }
    end(group, c);
  }
}

// One step of the online softmax of (M, Z, A) with message m at inverse temperature t; Z = 0
// before the first message.
template <typename acc_t>
__device__ __forceinline__ void online_softmax_step(acc_t t, acc_t m, acc_t& M, acc_t& Z, acc_t& A) {
  const acc_t d = Z > acc_t(0) ? t * (m - M) : std::numeric_limits<acc_t>::infinity();
  const acc_t w = exp_acc(-fabs(d));
  if (d > acc_t(0)) {
    A = (A + (M - m) * Z) * w;
    Z = Z * w + acc_t(1);
    M = m;
  } else {
    Z += w;
    A += w * (m - M);
  }
}

template <typename scalar_t, int VEC, bool kEdge>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ x, const int64_t* __restrict__ rowptr,
    const int64_t* __restrict__ col, const scalar_t* __restrict__ edge_attr,
    const int64_t* __restrict__ perm, const at::opmath_type<scalar_t>* __restrict__ t,
    at::opmath_type<scalar_t> eps, int64_t num_nodes, int64_t num_edges, int64_t channels,
    int lanes_log2, scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ row_max,
    at::opmath_type<scalar_t>* __restrict__ row_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t t_c[VEC], M[VEC], Z[VEC], A[VEC];
  // Set by each message rather than read from count: the flag costs no instruction per message, the
  // 64-bit count two.
  bool any_edge;
  for_each_message<kEdge, VEC>(
      x, rowptr, col, edge_attr, perm, eps, num_nodes, num_edges, channels, lanes_log2,
      [&](int64_t c) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          t_c[j] = t[c + j];
          M[j] = acc_t(0);
          Z[j] = acc_t(0);
          A[j] = acc_t(0);
        }
        any_edge = false;
      },
      [&](int j, acc_t m) {
        any_edge = true;
        online_softmax_step(t_c[j], m, M[j], Z[j], A[j]);
      },
      [&](int64_t v, int64_t c, int64_t) {
        Pack<scalar_t, VEC> out_pack;
        Pack<acc_t, VEC> max_pack, sum_pack;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {  // no incoming edge: out 0, and M = 0, Z = 1 as the CPU kernel
          out_pack.v[j] = static_cast<scalar_t>(any_edge ? M[j] + A[j] / Z[j] : acc_t(0));
          max_pack.v[j] = any_edge ? M[j] : acc_t(0);
          sum_pack.v[j] = any_edge ? Z[j] : acc_t(1);
        }
        const int64_t i = v * channels + c;
        store_pack(out + i, out_pack);
        store_pack(row_max + i, max_pack);
        store_pack(row_sum + i, sum_pack);
      });
}

template <typename scalar_t, int VEC, bool kGradT, bool kEdge>
__global__ void __launch_bounds__(kThreads) backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ out, const at::opmath_type<scalar_t>* __restrict__ row_max,
    const at::opmath_type<scalar_t>* __restrict__ row_sum, const int64_t* __restrict__ rowptr_t,
    const int64_t* __restrict__ col_t, const scalar_t* __restrict__ edge_attr,
    const int64_t* __restrict__ perm_t, const at::opmath_type<scalar_t>* __restrict__ t,
    at::opmath_type<scalar_t> eps, int64_t num_nodes, int64_t num_edges, int64_t channels,
    int lanes_log2, bool semi_grad, scalar_t* __restrict__ grad_x,
    at::opmath_type<scalar_t>* __restrict__ grad_t_partial, scalar_t* __restrict__ grad_edge_attr) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = kBackwardUnroll<VEC>;
  acc_t t_c[VEC], weight_t[VEC], grad_t[VEC];              // per channel chunk
  Pack<scalar_t, VEC> x_u;                                 // per source
  acc_t m[VEC], grad_m[VEC], grad_t_u[VEC];
  Pack<acc_t, VEC> max_v[kUnroll], sum_v[kUnroll];         // per target slot
  Pack<scalar_t, VEC> grad_v[kUnroll], out_v[kUnroll];
  for_each_target<kEdge, VEC>(
      rowptr_t, col_t, edge_attr, perm_t, num_nodes, num_edges, channels, lanes_log2,
      [&](int64_t c) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          t_c[j] = t[c + j];
          weight_t[j] = semi_grad ? acc_t(0) : t_c[j];  // t in the derivative of the weights
          grad_t[j] = acc_t(0);
        }
      },
      [&](int64_t u, int64_t c) {
        x_u = load_pack<VEC>(x + u * channels + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          m[j] = message(static_cast<acc_t>(x_u.v[j]), eps);
          grad_m[j] = acc_t(0);
          grad_t_u[j] = acc_t(0);
        }
      },
      [&](int k, int64_t i) {
        max_v[k] = load_pack<VEC>(row_max + i);
        sum_v[k] = load_pack<VEC>(row_sum + i);
        grad_v[k] = load_pack<VEC>(grad_out + i);
        out_v[k] = load_pack<VEC>(out + i);
      },
      [&](int k, const Pack<scalar_t, VEC>& edge_row, int64_t edge_index) {
        Pack<scalar_t, VEC> grad_edge;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t m_e = m[j], in = acc_t(0);
          if constexpr (kEdge) {
            in = static_cast<acc_t>(x_u.v[j]) + static_cast<acc_t>(edge_row.v[j]);
            m_e = message(in, eps);
          }
          const acc_t w = exp_acc(t_c[j] * (m_e - max_v[k].v[j])) *
                          static_cast<acc_t>(grad_v[k].v[j]) / sum_v[k].v[j];
          const acc_t d = m_e - static_cast<acc_t>(out_v[k].v[j]);
          if constexpr (kEdge) {
            const acc_t g = in > acc_t(0) ? w + w * weight_t[j] * d : acc_t(0);
            grad_edge.v[j] = static_cast<scalar_t>(g);
            grad_m[j] += g;
            if constexpr (kGradT) grad_t_u[j] += w * d * m_e;
          } else {
            grad_m[j] += w + w * weight_t[j] * d;
            if constexpr (kGradT) grad_t_u[j] += w * d;
          }
        }
        if constexpr (kEdge) store_pack(grad_edge_attr + edge_index, grad_edge);
      },
      [&](int64_t u, int64_t c) {
        Pack<scalar_t, VEC> grad_pack;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {  // with edge features the mask and m are already per edge
          grad_pack.v[j] = static_cast<scalar_t>(kEdge || static_cast<acc_t>(x_u.v[j]) > acc_t(0)
                                                     ? grad_m[j] : acc_t(0));
          if constexpr (kGradT) grad_t[j] += kEdge ? grad_t_u[j] : grad_t_u[j] * m[j];
        }
        store_pack(grad_x + u * channels + c, grad_pack);
      },
      [&](int64_t group, int64_t c) {
        if constexpr (kGradT) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) grad_t_partial[group * channels + c + j] = grad_t[j];
        }
      });
}

template <typename scalar_t, int VEC, bool kEdge>
__global__ void __launch_bounds__(kThreads) power_mean_forward_kernel(
    const scalar_t* __restrict__ x, const int64_t* __restrict__ rowptr,
    const int64_t* __restrict__ col, const scalar_t* __restrict__ edge_attr,
    const int64_t* __restrict__ perm, const at::opmath_type<scalar_t>* __restrict__ p, bool power,
    at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi,
    int64_t num_nodes, int64_t num_edges, int64_t channels, int lanes_log2, scalar_t* __restrict__ out,
    at::opmath_type<scalar_t>* __restrict__ mean, at::opmath_type<scalar_t>* __restrict__ degree) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t p_c[VEC], S[VEC];
  for_each_message<kEdge, VEC>(
      x, rowptr, col, edge_attr, perm, eps, num_nodes, num_edges, channels, lanes_log2,
      [&](int64_t c) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          p_c[j] = p[c + j];
          S[j] = acc_t(0);
        }
      },
      [&](int j, acc_t m) { S[j] += power ? pow_acc(clamp_acc(m, lo, hi), p_c[j]) : m; },
      [&](int64_t v, int64_t c, int64_t count) {
        const acc_t deg = static_cast<acc_t>(count);
        Pack<scalar_t, VEC> out_pack;
        Pack<acc_t, VEC> mean_pack, degree_pack;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {  // no incoming edge: mean 0
          const acc_t y = count > 0 ? S[j] / deg : acc_t(0);
          out_pack.v[j] = static_cast<scalar_t>(power ? pow_acc(clamp_acc(y, lo, hi), acc_t(1) / p_c[j]) : y);
          mean_pack.v[j] = y;
          degree_pack.v[j] = deg;
        }
        const int64_t i = v * channels + c;
        store_pack(out + i, out_pack);
        store_pack(mean + i, mean_pack);
        store_pack(degree + i, degree_pack);
      });
}

template <typename scalar_t, int VEC, bool kGradT, bool kEdge>
__global__ void __launch_bounds__(kThreads) power_mean_backward_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ x,
    const at::opmath_type<scalar_t>* __restrict__ mean, const at::opmath_type<scalar_t>* __restrict__ degree,
    const int64_t* __restrict__ rowptr_t, const int64_t* __restrict__ col_t,
    const scalar_t* __restrict__ edge_attr, const int64_t* __restrict__ perm_t,
    const at::opmath_type<scalar_t>* __restrict__ p, bool power, at::opmath_type<scalar_t> eps,
    at::opmath_type<scalar_t> lo, at::opmath_type<scalar_t> hi, int64_t num_nodes, int64_t num_edges,
    int64_t channels, int lanes_log2, scalar_t* __restrict__ grad_x,
    at::opmath_type<scalar_t>* __restrict__ grad_p_partial, scalar_t* __restrict__ grad_edge_attr) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kUnroll = kBackwardUnroll<VEC>;
  acc_t p_c[VEC], grad_p[VEC];                          // per channel chunk
  Pack<scalar_t, VEC> x_u;                              // per source
  acc_t grad_m[VEC];
  Pack<acc_t, VEC> mean_v[kUnroll], degree_v[kUnroll];  // per target slot
  Pack<scalar_t, VEC> grad_v[kUnroll];
  for_each_target<kEdge, VEC>(
      rowptr_t, col_t, edge_attr, perm_t, num_nodes, num_edges, channels, lanes_log2,
      [&](int64_t c) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          p_c[j] = p[c + j];
          grad_p[j] = acc_t(0);
        }
      },
      [&](int64_t u, int64_t c) {
        x_u = load_pack<VEC>(x + u * channels + c);
#pragma unroll
        for (int j = 0; j < VEC; ++j) grad_m[j] = acc_t(0);
      },
      [&](int k, int64_t i) {
        if (power) mean_v[k] = load_pack<VEC>(mean + i);
        degree_v[k] = load_pack<VEC>(degree + i);
        grad_v[k] = load_pack<VEC>(grad_out + i);
      },
      [&](int k, const Pack<scalar_t, VEC>& edge_row, int64_t edge_index) {
        Pack<scalar_t, VEC> grad_edge;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc_t in = static_cast<acc_t>(x_u.v[j]);
          if constexpr (kEdge) in += static_cast<acc_t>(edge_row.v[j]);
          // A target holds this edge: its degree is at least 1.
          acc_t q = static_cast<acc_t>(grad_v[k].v[j]) / fmax(degree_v[k].v[j], acc_t(1));
          acc_t g = in > acc_t(0) ? q : acc_t(0);
          if (power) {
            const acc_t y = mean_v[k].v[j];
            const acc_t Y = clamp_acc(y, lo, hi);
            q = y >= lo && y <= hi ? q * pow_acc(Y, acc_t(1) / p_c[j]) / (p_c[j] * Y) : acc_t(0);
            const acc_t m = message(in, eps);
            const acc_t cm = clamp_acc(m, lo, hi);
            const acc_t cp = pow_acc(cm, p_c[j]);
            g = in > acc_t(0) && m >= lo && m <= hi ? q * p_c[j] * cp / cm : acc_t(0);
            if constexpr (kGradT) grad_p[j] += cm > acc_t(0) ? q * cp * log_acc(cm) : acc_t(0);
          }
          if constexpr (kEdge) grad_edge.v[j] = static_cast<scalar_t>(g);
          grad_m[j] += g;
        }
        if constexpr (kEdge) store_pack(grad_edge_attr + edge_index, grad_edge);
      },
      [&](int64_t u, int64_t c) {
        Pack<scalar_t, VEC> grad_pack;
#pragma unroll
        for (int j = 0; j < VEC; ++j) grad_pack.v[j] = static_cast<scalar_t>(grad_m[j]);
        store_pack(grad_x + u * channels + c, grad_pack);
        if constexpr (kGradT) {  // u as a target: d out_u / d p = out_u ln(Y_u) (-1 / p^2)
          const Pack<acc_t, VEC> mean_u = load_pack<VEC>(mean + u * channels + c);
          const Pack<scalar_t, VEC> grad_u = load_pack<VEC>(grad_out + u * channels + c);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const acc_t Y = clamp_acc(mean_u.v[j], lo, hi);
            if (Y > acc_t(0)) {
              grad_p[j] -= static_cast<acc_t>(grad_u.v[j]) * pow_acc(Y, acc_t(1) / p_c[j]) * log_acc(Y) /
                           (p_c[j] * p_c[j]);
            }
          }
        }
      },
      [&](int64_t group, int64_t c) {
        if constexpr (kGradT) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) grad_p_partial[group * channels + c + j] = grad_p[j];
        }
      });
}

// grad_t[c] = sum_r partial[r, c]: thread (c, slice) sums the rows slice, slice + kSumSlices, ...
// in order, then the kSumSlices slice sums are added in order.  Deterministic.
template <typename acc_t>
__global__ void __launch_bounds__(kSumChannels * kSumSlices) sum_partials_kernel(
    const acc_t* __restrict__ partial, int64_t rows, int64_t channels, acc_t* __restrict__ grad_t) {
  __shared__ acc_t slice_sums[kSumSlices][kSumChannels];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kSumChannels + threadIdx.x;
  acc_t sum = acc_t(0);
  if (c < channels) {
    for (int64_t r = threadIdx.y; r < rows; r += kSumSlices) sum += partial[r * channels + c];
  }
  slice_sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    acc_t total = acc_t(0);
#pragma unroll
    for (int i = 0; i < kSumSlices; ++i) total += slice_sums[i][threadIdx.x];
    grad_t[c] = total;
  }
}

// log2 of the lanes per group: the power of two covering channels / vec, at most 32.
int group_lanes_log2(int64_t channels, int vec) {
  const int64_t columns = (channels + vec - 1) / vec;
  int lanes_log2 = 0;
  while (lanes_log2 < 5 && (int64_t{1} << lanes_log2) < columns) ++lanes_log2;
  return lanes_log2;
}

// True when every row of every tensor starts on a boundary of vec elements.
bool rows_aligned(int64_t channels, int vec, std::initializer_list<const at::Tensor*> tensors) {
  if (channels % vec != 0) return false;
  for (const auto* tensor : tensors) {
    if (reinterpret_cast<uintptr_t>(tensor->data_ptr()) % (vec * tensor->element_size()) != 0) {
      return false;
    }
  }
  return true;
}

int64_t num_blocks(int64_t groups, int lanes_log2) {
  const int64_t blocks = ((groups << lanes_log2) + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "msg_pass: too many nodes for one launch (",
              groups, " lane groups)");
  return blocks;
}

// Calls launch(std::integral_constant<int, VEC>) with VEC = 16 bytes of scalar_t, or 1.
template <typename scalar_t, typename Launch>
void with_vector_width(bool vectorize, Launch&& launch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  if (vectorize) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass_cuda(
    const at::Tensor& x_in, const at::Tensor& rowptr_in, const at::Tensor& col_in,
    const at::Tensor& rowptr_t, const at::Tensor& col_t, const at::Tensor& t_in, double eps,
    const c10::optional<at::Tensor>& edge_attr_in, const c10::optional<at::Tensor>& perm_in,
    const c10::optional<at::Tensor>& perm_t, c10::string_view aggr_name, double clamp_min,
    double clamp_max) {
  const MsgPassAggr aggr = parse_msg_pass_aggr(aggr_name);
  check_msg_pass_forward_args(x_in, rowptr_in, col_in, rowptr_t, col_t, t_in);
  check_msg_pass_edge_args(x_in, edge_attr_in, perm_in, col_in.numel(), "perm");
  check_msg_pass_edge_args(x_in, edge_attr_in, perm_t, col_in.numel(), "perm_t");
  const bool with_edges = edge_attr_in.has_value();
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto x = x_in.contiguous();
  const auto rowptr = rowptr_in.contiguous();
  const auto col = col_in.contiguous();
  const auto t = t_in.contiguous();
  const auto edge_attr = with_edges ? edge_attr_in->contiguous() : at::Tensor();
  const auto perm = with_edges ? perm_in->contiguous() : at::Tensor();
  auto out = at::empty({N, C}, x.options());
  auto row_max = at::empty({N, C}, t.options());
  auto row_sum = at::empty({N, C}, t.options());
  if (N == 0 || C == 0) return {out, row_max, row_sum};
  const int64_t E = col.numel();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msg_pass_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorize = with_edges ? rows_aligned(C, kVec, {&x, &out, &row_max, &row_sum, &edge_attr})
                                      : rows_aligned(C, kVec, {&x, &out, &row_max, &row_sum});
    const int lanes_log2 = group_lanes_log2(C, vectorize ? kVec : 1);
    const int64_t blocks = num_blocks(N, lanes_log2);
    with_vector_width<scalar_t>(vectorize, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      if (aggr == MsgPassAggr::kPowerMean || aggr == MsgPassAggr::kMean) {
        const auto kernel = with_edges ? power_mean_forward_kernel<scalar_t, VEC, true>
                                       : power_mean_forward_kernel<scalar_t, VEC, false>;
        kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
            with_edges ? edge_attr.data_ptr<scalar_t>() : nullptr,
            with_edges ? perm.data_ptr<int64_t>() : nullptr, t.data_ptr<acc_t>(),
            aggr == MsgPassAggr::kPowerMean, static_cast<acc_t>(eps), static_cast<acc_t>(clamp_min),
            static_cast<acc_t>(clamp_max), N, E, C, lanes_log2, out.data_ptr<scalar_t>(),
            row_max.data_ptr<acc_t>(), row_sum.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const auto kernel = with_edges ? forward_kernel<scalar_t, VEC, true> : forward_kernel<scalar_t, VEC, false>;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), rowptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(),
          with_edges ? edge_attr.data_ptr<scalar_t>() : nullptr,
          with_edges ? perm.data_ptr<int64_t>() : nullptr,
          t.data_ptr<acc_t>(), static_cast<acc_t>(eps), N, E, C, lanes_log2,
          out.data_ptr<scalar_t>(), row_max.data_ptr<acc_t>(), row_sum.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, row_max, row_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const at::Tensor& row_max_in, const at::Tensor& row_sum_in, const at::Tensor& rowptr_t_in,
    const at::Tensor& col_t_in, const at::Tensor& t_in, double eps, bool compute_grad_t,
    const c10::optional<at::Tensor>& edge_attr_in, const c10::optional<at::Tensor>& perm_t_in,
    c10::string_view aggr_name, double clamp_min, double clamp_max) {
  const MsgPassAggr aggr = parse_msg_pass_aggr(aggr_name);
  const bool semi_grad = aggr == MsgPassAggr::kSoftmaxSemiGrad;
  // The mean has no parameter; the semi-gradient softmax's weights are constants (no gradient for t).
  compute_grad_t = compute_grad_t && aggr != MsgPassAggr::kMean && !semi_grad;
  check_msg_pass_backward_args(grad_out_in, x_in, out_in, row_max_in, row_sum_in, rowptr_t_in,
                               col_t_in, t_in);
  check_msg_pass_edge_args(x_in, edge_attr_in, perm_t_in, col_t_in.numel(), "perm_t");
  const bool with_edges = edge_attr_in.has_value();
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto grad_out = grad_out_in.contiguous();
  const auto x = x_in.contiguous();
  const auto out = out_in.contiguous();
  const auto row_max = row_max_in.contiguous();
  const auto row_sum = row_sum_in.contiguous();
  const auto rowptr_t = rowptr_t_in.contiguous();
  const auto col_t = col_t_in.contiguous();
  const auto t = t_in.contiguous();
  const auto edge_attr = with_edges ? edge_attr_in->contiguous() : at::Tensor();
  const auto perm_t = with_edges ? perm_t_in->contiguous() : at::Tensor();
  auto grad_x = at::empty({N, C}, x.options());
  // Every row of an edge whose id appears in perm_t is written; zeros cover the rest.
  auto grad_edge_attr = with_edges ? at::zeros({col_t.numel(), C}, x.options()) : at::empty({0}, x.options());
  if (N == 0 || C == 0) return {grad_x, at::zeros_like(t), grad_edge_attr};
  // grad_t is all zeros unless asked for.
  auto grad_t = compute_grad_t ? at::empty({C}, t.options()) : at::zeros({C}, t.options());
  const int64_t E = col_t.numel();
  const int64_t num_groups = (N + kNodesPerGroup - 1) / kNodesPerGroup;
  auto grad_t_partial = at::empty({compute_grad_t ? num_groups : 0, C}, t.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msg_pass_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vectorize =
        with_edges ? rows_aligned(C, kVec, {&grad_out, &x, &out, &row_max, &row_sum, &grad_x, &edge_attr,
                                            &grad_edge_attr})
                   : rows_aligned(C, kVec, {&grad_out, &x, &out, &row_max, &row_sum, &grad_x});
    const int lanes_log2 = group_lanes_log2(C, vectorize ? kVec : 1);
    const int64_t blocks = num_blocks(num_groups, lanes_log2);
    with_vector_width<scalar_t>(vectorize, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      if (aggr == MsgPassAggr::kPowerMean || aggr == MsgPassAggr::kMean) {
        const auto kernel =
            compute_grad_t ? (with_edges ? power_mean_backward_kernel<scalar_t, VEC, true, true>
                                         : power_mean_backward_kernel<scalar_t, VEC, true, false>)
                           : (with_edges ? power_mean_backward_kernel<scalar_t, VEC, false, true>
                                         : power_mean_backward_kernel<scalar_t, VEC, false, false>);
        kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), row_max.data_ptr<acc_t>(),
            row_sum.data_ptr<acc_t>(), rowptr_t.data_ptr<int64_t>(), col_t.data_ptr<int64_t>(),
            with_edges ? edge_attr.data_ptr<scalar_t>() : nullptr,
            with_edges ? perm_t.data_ptr<int64_t>() : nullptr, t.data_ptr<acc_t>(),
            aggr == MsgPassAggr::kPowerMean, static_cast<acc_t>(eps), static_cast<acc_t>(clamp_min),
            static_cast<acc_t>(clamp_max), N, E, C, lanes_log2, grad_x.data_ptr<scalar_t>(),
            compute_grad_t ? grad_t_partial.data_ptr<acc_t>() : nullptr,
            with_edges ? grad_edge_attr.data_ptr<scalar_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      const auto kernel = compute_grad_t ? (with_edges ? backward_kernel<scalar_t, VEC, true, true>
                                                       : backward_kernel<scalar_t, VEC, true, false>)
                                         : (with_edges ? backward_kernel<scalar_t, VEC, false, true>
                                                       : backward_kernel<scalar_t, VEC, false, false>);
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
          row_max.data_ptr<acc_t>(), row_sum.data_ptr<acc_t>(), rowptr_t.data_ptr<int64_t>(),
          col_t.data_ptr<int64_t>(), with_edges ? edge_attr.data_ptr<scalar_t>() : nullptr,
          with_edges ? perm_t.data_ptr<int64_t>() : nullptr, t.data_ptr<acc_t>(),
          static_cast<acc_t>(eps), N, E, C, lanes_log2, semi_grad, grad_x.data_ptr<scalar_t>(),
          compute_grad_t ? grad_t_partial.data_ptr<acc_t>() : nullptr,
          with_edges ? grad_edge_attr.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (compute_grad_t) {
      const dim3 block(kSumChannels, kSumSlices);
      sum_partials_kernel<acc_t><<<(C + kSumChannels - 1) / kSumChannels, block, 0, stream>>>(
          grad_t_partial.data_ptr<acc_t>(), num_groups, C, grad_t.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_x, grad_t, grad_edge_attr};
}

KEYPOINTOPS_DEFINED_AS_DECLARED(msg_pass_cuda);
KEYPOINTOPS_DEFINED_AS_DECLARED(msg_pass_backward_cuda);

}  // namespace keypointops
