// part_pool CPU kernel.
//
// Images run in parallel, one thread per image.  For image b, with S = H * W:
//   r = (groups @ heatmaps[b]) / temperature   [P, S]   (identity groups: the heatmap rows)
//   p = softmax_s(r)                                      in a per-thread [P, S] buffer
//   out[b] = p @ F[b]^T                                   a GEMM over S
// (NCHW: the parts that fill whole vectors from p^T [S, P - P % VL], register tiles of feature rows
// x part vectors with no horizontal sums; the last P % VL parts as dot products against the same
// tile of feature rows, so that F is read once.  The tiles of 96 feature rows gather their outputs in
// a [P, 96] buffer, copied to out[b] as contiguous runs: transposed stores straight into out[b], P
// rows C elements apart, fall into one L1 set at C = 2048 and evict each other.)
// F[b] is the [C, S] matrix of the image read in place, NCHW (rows contiguous along S) or
// channels_last (contiguous along C): the features are never copied or transposed.
// Backward saves nothing but the inputs: it recomputes p as forward does (max, exp, sum, divide;
// bitwise the forward's p), not from a saved log-sum-exp, whose float32 rounding (ulp(lse)) exp(r - lse)
// would carry into every probability of the row (relative 1e-5 at logits of a few hundred, a sharp
// softmax); then per image
//   grad_features[b] = dout[b]^T @ p                      a GEMM written into grad_features' layout
//   grad_p = dout[b] @ F[b],  grad_r = p * (grad_p - rowsum(p * grad_p)) / temperature   a GEMM + epilogue
// (the softmax backward of autograd: at a saturated softmax the two terms at the dominant pixel are
// the same rounded number and cancel exactly; rowsum(dout * out), equal in exact arithmetic, is a
// differently rounded dot product and leaves noise of ulp(|dout| |F|) / temperature there)
//   grad_heatmaps[b] = groups^T @ grad_r,   grad_groups += grad_r @ heatmaps[b]^T
// (grad_groups from per-image partials summed in image order: bitwise deterministic).
// The GEMMs are register-blocked at::vec loops, one thread per image: BLAS called from inside
// at::parallel_for nests OpenMP teams (oversubscribing the cores).
// Why not BLAS from outside the image loop (p of every image materialised as [B, P, S], then
// at::bmm on the features' strided view, the softmax and the heatmap gradients fused around it):
// with AVX2 (MKL's sgemm) that is slower in forward (at P = 17 and P = 3) and in backward for few
// parts (P = 3: a product with 3 rows leaves BLAS's register tiles mostly empty), and no faster in
// backward at P = 17.  The loops here read each feature row once with the parts' accumulators in
// registers, in every instruction-set build (the AVX-512 balance: docs/benchmarks.md); where the
// CPU's GEMM is wider still (AMX) the balance may differ and has not been measured.
// Each GEMM reads the features once (one read in forward, one in backward) and writes
// grad_features once.
// Memory: forward out [B, P, C]; backward grad_features, grad_heatmaps and a [B, P, J] grad_groups
// partial; per thread two [P, S] buffers (forward: p and p^T) and, in the NCHW forward, a [P, 96]
// block of outputs.  Nothing of size [B, P, C, H, W].
// float16 / bfloat16: features, heatmaps, grad_out and the outputs are 16-bit in memory; p, the
// logits, their gradients and every GEMM accumulator are float32 (ops/cpu/reduced_precision.h).
// Each thread widens what its image reuses (heatmaps [J, S], grad_out [P, C]) once into float32
// buffers.  The NCHW forward is bound by its FMAs, not by memory: with AVX2 and below its tiles
// broadcast bfloat16 features in place (a bfloat16 is the high half of its float32: one broadcast
// load and an AND per element, no widening pass) and its dot products widen them in registers;
// float16 features (and bfloat16 ones in the AVX512 build: BroadcastSource), and F in the other
// GEMMs, are widened a block at a time (a few rows, or a chunk of rows x 2 vectors) into a small
// float32 buffer that stays in L1, so the inner loops are the float32 ones; each output element is
// rounded once, when stored.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/bit_cast.h>
#if defined(CPU_CAPABILITY_DEFAULT)  // the build that registers the op with torch (below)
#include <torch/library.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ops/cpu/cpu_capability.h"
#include "ops/cpu/huge_pages.h"
#include "ops/cpu/prefetch.h"
#include "ops/cpu/reduced_precision.h"
#include "ops/part_pool.h"

namespace keypointops {
namespace CPU_CAPABILITY {  // this build's capability (ops/cpu/cpu_capability.h)
namespace {

// [B, C, H, W] as [B, C, S] matrices with unit stride along S (NCHW) or along C (channels_last):
// a view of such tensors; other layouts are copied.
at::Tensor image_matrices(const at::Tensor& t) {
  auto m = t.reshape({t.size(0), t.size(1), t.size(2) * t.size(3)});
  return m.stride(2) == 1 || m.stride(1) == 1 ? m : m.contiguous();
}

// f(std::integral_constant<int, n>{}) for a runtime n in [1, N]: picks a register-tile size.
template <int N, typename F>
void with_count(int64_t n, const F& f) {
  if constexpr (N > 1) {
    if (n < N) return with_count<N - 1>(n, f);
  }
  f(std::integral_constant<int, N>{});
}

// One MR x (NV vectors) tile of Y (+)= A @ Z with A[m, k] = A[m * a_m + k * a_k] broadcast and the
// rows of Z (stride ldz) loaded as vectors; with kTail the last vector holds only `tail` columns.
// A and Z are in the accumulation dtype; Y may be 16-bit (widened on load, rounded on store).
template <typename Y_t, int MR, int NV, bool kTail, typename Z_t = acc_t<Y_t>>
void broadcast_tile(int64_t K, int64_t tail, const acc_t<Y_t>* A, int64_t a_m, int64_t a_k,
                    const Z_t* Z, int64_t ldz, Y_t* Y, int64_t ldy, bool accumulate) {
  using Vec = AccVec<Y_t>;
  constexpr int64_t VL = Vec::size();
  const auto width = [tail](int j) { return kTail && j == NV - 1 ? tail : VL; };
  Vec acc[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) {
      acc[i][j] = accumulate ? load_acc(Y + i * ldy + j * VL, width(j)) : Vec(0);
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec z[NV];
    for (int j = 0; j < NV; ++j) z[j] = Vec::loadu(Z + k * ldz + j * VL, width(j));
    for (int i = 0; i < MR; ++i) {
      const Vec a(A[i * a_m + k * a_k]);
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(a, z[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) store_acc(acc[i][j], Y + i * ldy + j * VL, width(j));
  }
}

// Y[m, n] (+)= sum_k A[m * a_m + k * a_k] * Z[k * ldz + n] for m < M, n < N (Y row stride ldy).
// Column blocks outside, row blocks inside and K in chunks, so that the Z block in use stays in L1;
// the next Z block is prefetched (it streams from memory).  A 16-bit Y takes K in one chunk, so that
// each element is rounded once (the callers' K with a 16-bit Y: P or S, a Z block that fits L1).
// A 16-bit Z block is widened once into z_block and then read by every row block.
template <typename Z_t, typename Y_t>
void gemm_broadcast(int64_t M, int64_t N, int64_t K, const acc_t<Y_t>* A, int64_t a_m, int64_t a_k,
                    const Z_t* Z, int64_t ldz, Y_t* Y, int64_t ldy, bool accumulate,
                    std::vector<acc_t<Z_t>>& z_block) {
  constexpr int64_t VL = AccVec<Y_t>::size();
  constexpr int kRows = 4, kVectors = 2;
  constexpr int64_t kBlock = kVectors * VL;
  const int64_t kChunk = is_reduced_precision<Y_t> ? std::max<int64_t>(K, 1) : 64;
  if (K == 0 && !accumulate) {
    for (int64_t m = 0; m < M; ++m) std::fill(Y + m * ldy, Y + m * ldy + N, Y_t(0));
  }
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, K - k0);
    for (int64_t n0 = 0; n0 < N; n0 += kBlock) {
      const int64_t next_k = n0 + kBlock < N ? k0 : k0 + kChunk;
      const int64_t next_n = n0 + kBlock < N ? n0 + kBlock : 0;
      for (int64_t k = next_k; k < std::min(next_k + kChunk, K); ++k) {
        prefetch_line(Z + k * ldz + next_n);
        prefetch_line(Z + k * ldz + std::min(next_n + kBlock, N) - 1);
      }
      const int64_t nb = std::min<int64_t>(kBlock, N - n0);
      const int64_t nv = (nb + VL - 1) / VL, tail = nb - (nv - 1) * VL;
      int64_t z_ld = ldz;
      const acc_t<Z_t>* z_in = block_in_acc(Z + k0 * ldz + n0, kc, nb, z_ld, z_block);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const acc_t<Y_t>* a = A + m0 * a_m + k0 * a_k;
        const acc_t<Z_t>* z = z_in;
        Y_t* y = Y + m0 * ldy + n0;
        const bool acc = accumulate || k0 > 0;
        with_count<kRows>(std::min<int64_t>(kRows, M - m0), [&](auto rows) {
          with_count<kVectors>(nv, [&](auto vectors) {
            constexpr int MR = decltype(rows)::value, NV = decltype(vectors)::value;
            if (tail == VL) {
              broadcast_tile<Y_t, MR, NV, false>(kc, tail, a, a_m, a_k, z, z_ld, y, ldy, acc);
            } else {
              broadcast_tile<Y_t, MR, NV, true>(kc, tail, a, a_m, a_k, z, z_ld, y, ldy, acc);
            }
          });
        });
      }
    }
  }
}

// Register tile of the dot products: rows of A x rows of Z.
constexpr int kDotRows = 3, kDotCols = 3;

// One MR x NR tile of Y = A @ Z^T: dot products of rows of A and rows of Z, both contiguous along K;
// A in the accumulation dtype, Z in it or 16-bit (widened as it is loaded); Y may be 16-bit.
template <typename Y_t, int MR, int NR, typename Z_t = acc_t<Y_t>, typename scalar_t = acc_t<Y_t>>
void dot_tile(int64_t K, const scalar_t* A, int64_t lda, const Z_t* Z, int64_t ldz, Y_t* Y,
              int64_t ldy) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  Vec acc[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = Vec(0);
  }
  const auto step = [&](int64_t k, int64_t n) {  // loadu zero-fills the lanes past n
    Vec z[NR];
    for (int j = 0; j < NR; ++j) z[j] = load_acc(Z + j * ldz + k, n);
    for (int i = 0; i < MR; ++i) {
      const Vec a = Vec::loadu(A + i * lda + k, n);
      for (int j = 0; j < NR; ++j) acc[i][j] = at::vec::fmadd(a, z[j], acc[i][j]);
    }
  };
  int64_t k = 0;
  for (; k + VL <= K; k += VL) step(k, VL);
  if (k < K) step(k, K - k);
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      Y[i * ldy + j] = static_cast<Y_t>(at::vec::vec_reduce_all<scalar_t>(
          [](Vec& x, Vec& y) { return x + y; }, acc[i][j]));
    }
  }
}

// Y[m, n] = sum_k A[m * lda + k] * Z[n * ldz + k] for m < M, n < N (Y row stride ldy).
// Rows of Z outside (prefetched one block ahead: they stream from memory), rows of A inside.
// A is in the accumulation dtype; 16-bit rows of Z are widened a block at a time into z_rows.
template <typename Z_t, typename Y_t>
void gemm_dot(int64_t M, int64_t N, int64_t K, const acc_t<Y_t>* A, int64_t lda, const Z_t* Z,
              int64_t ldz, Y_t* Y, int64_t ldy, std::vector<acc_t<Z_t>>& z_rows) {
  constexpr int kRows = kDotRows, kCols = kDotCols;
  constexpr int64_t kLine = 64 / sizeof(Z_t);
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    for (int64_t n = n0 + kCols; n < std::min<int64_t>(n0 + 2 * kCols, N); ++n) {
      for (int64_t k = 0; k < K; k += kLine) prefetch_line(Z + n * ldz + k);
    }
    const int64_t block = std::min<int64_t>(kCols, N - n0);
    int64_t z_ld = ldz;
    const acc_t<Z_t>* z = block_in_acc(Z + n0 * ldz, block, K, z_ld, z_rows);
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      with_count<kRows>(std::min<int64_t>(kRows, M - m0), [&](auto rows) {
        with_count<kCols>(block, [&](auto cols) {
          dot_tile<Y_t, decltype(rows)::value, decltype(cols)::value>(
              K, A + m0 * lda, lda, z, z_ld, Y + m0 * ldy + n0, ldy);
        });
      });
    }
  }
}

// Rows of Y^T (columns of Y) per chunk in gemm_transposed: a multiple of every tile's row count
// (8, 6 and 4).  The chunk's outputs [N + D, kChunk] (6.5 KiB at 17 parts) stay in L1.
constexpr int64_t kChunk = 96;

// The dtype in which gemm_transposed's tiles broadcast the elements of A: float32 and float64 in
// place; float16 widened a tile at a time into a buffer first; bfloat16 in place (broadcast_acc)
// with AVX2 and below, widened like float16 with AVX-512.  An AVX-512 FMA takes its broadcast
// operand straight from memory (one instruction per element and part vector for float32), where a
// bfloat16 broadcast in place costs a load and an AND more per element; at 17 parts the AVX-512
// tile has one part vector (16 lanes), so those are two extra instructions per FMA, while one
// widening pass costs three per 16 elements.
template <typename T>
using BroadcastSource = std::conditional_t<std::is_same_v<T, c10::Half>
#if defined(CPU_CAPABILITY_AVX512)
                                               || std::is_same_v<T, c10::BFloat16>
#endif
                                           , acc_t<T>, T>;

// *p in the accumulation dtype, broadcast to every lane; with kAfterFirst, p[-1] is readable too.
// A bfloat16 is the high half of its float32, so the 32 bits at p - 1 (little-endian: p[0] above
// p[-1]) with the low half cleared are *p as a float32: one broadcast load and one AND per element,
// where widening the rows into a buffer first costs a vector store per 8 elements (the 16-bit
// forward's bottleneck beside the FMAs).  The first element of a row (p[-1] may lie outside the
// tensor) widens the scalar.
template <bool kAfterFirst, typename T>
inline AccVec<T> broadcast_acc(const T* p) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if constexpr (kAfterFirst && std::is_same_v<T, c10::BFloat16>) {
    static_assert(sizeof(float) == 2 * sizeof(T), "a bfloat16 is half a float32");
    float pair;
    std::memcpy(&pair, p - 1, sizeof(pair));
    return AccVec<T>(pair) & AccVec<T>(c10::bit_cast<float>(0xffff0000u));
  }
#endif
  return AccVec<T>(static_cast<acc_t<T>>(*p));
}

// One MR x (NV vectors) tile of Y^T, Y[n, m] = sum_k A[m * lda + k] * Zt[k * ldz + n]: the MR rows
// of A (contiguous along K, BroadcastSource dtype) broadcast one element at a time, Zt's rows loaded
// as vectors; the tile is stored transposed into Y (row stride ldy: the chunk buffer), its first
// `cols` columns only.
template <int MR, int NV, typename A_t, typename scalar_t = acc_t<A_t>>
void transposed_tile(int64_t K, int64_t cols, const A_t* __restrict__ A, int64_t lda,
                     const scalar_t* __restrict__ Zt, int64_t ldz, scalar_t* __restrict__ Y, int64_t ldy) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  // Fully unrolled loops over the tile, so that the accumulators stay in registers.
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec(0);
  }
  const auto step = [&](int64_t k, auto after_first) {
    Vec z[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) z[j] = Vec::loadu(Zt + k * ldz + j * VL);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const Vec a = broadcast_acc<decltype(after_first)::value>(A + i * lda + k);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(a, z[j], acc[i][j]);
    }
  };
  if (K > 0) step(0, std::false_type{});
  for (int64_t k = 1; k < K; ++k) step(k, std::true_type{});
  scalar_t lanes[MR * NV * VL];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j].store(lanes + i * NV * VL + j * VL);
  }
  for (int i = 0; i < MR; ++i) {
    for (int64_t n = 0; n < cols; ++n) Y[n * ldy + i] = lanes[i * NV * VL + n];
  }
}

// Y[n, m] = sum_k A[m * lda + k] * Zt[k * ldz + n] for m < M, n < N, i.e. Y = Z @ A^T with Z given
// transposed (Zt [K, ldz], ldz a multiple of the vector length covering N, padded lanes ignored),
// and with the same rows of A the D more rows of Y, Y[N + d, m] = sum_k Zd[d * K + k] A[m * lda + k]
// for d < D (Zd [D, K] not transposed: the parts that do not fill a vector, as dot products).
// For a small N (the parts) against a long streamed A (the feature rows): each row of A is read once
// from memory, Zt stays in L1, and a column block of up to 3 vectors of Zt lives in registers.
// The tiles of a chunk of kChunk rows of A are stored transposed into `chunk`, a float32
// (accumulation dtype) buffer of the calling thread reused from image to image, which is then
// copied to Y's N + D rows as runs of kChunk contiguous elements, rounded a vector at a time when
// Y is 16-bit: storing each tile transposed straight into Y writes
// a few elements into each of N + D rows ldy apart, and at ldy = 2048 floats (a multiple of 4 KiB)
// those lines all fall into one L1 set and evict one another before they are complete.
// Zt and Zd are in the accumulation dtype; bfloat16 rows of A are read in place (broadcast_acc, and
// widened in registers by the dot products), float16 rows are widened a tile at a time into a_rows
// (before the tile broadcasts their elements; the dot products read the same widened tile).
template <typename A_t, typename Y_t>
void gemm_transposed(int64_t M, int64_t N, int64_t K, const A_t* A, int64_t lda,
                     const acc_t<Y_t>* Zt, int64_t ldz, int64_t D, const acc_t<Y_t>* Zd, Y_t* Y,
                     int64_t ldy, std::vector<acc_t<A_t>>& a_rows, std::vector<acc_t<Y_t>>& chunk) {
  using scalar_t = acc_t<Y_t>;
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  constexpr int kVectors = 3;
  constexpr int64_t kLine = 64 / sizeof(A_t);
  chunk.resize((N + D) * kChunk);  // Y[:, c0 : c0 + kChunk], in the accumulation dtype
  for (int64_t c0 = 0; c0 < M; c0 += kChunk) {
    const int64_t rows = std::min(kChunk, M - c0);
    for (int64_t n0 = 0; n0 < N; n0 += kVectors * VL) {
      const int64_t cols = std::min<int64_t>(kVectors * VL, N - n0);
      with_count<kVectors>((cols + VL - 1) / VL, [&](auto vectors) {
        // As many rows as 16 vector registers hold: MR * NV accumulators, NV loads, one broadcast.
        constexpr int NV = decltype(vectors)::value, kRows = NV == 1 ? 8 : NV == 2 ? 6 : 4;
        static_assert(kChunk % kRows == 0, "a chunk holds whole tiles");
        for (int64_t m0 = c0; m0 < c0 + rows; m0 += kRows) {
          const int64_t ahead = std::min<int64_t>(m0 + 2 * kRows, M);  // rows two tiles ahead: from memory
          for (int64_t m = std::min<int64_t>(m0 + kRows, ahead); m < ahead; ++m) {
            for (int64_t k = 0; k < K; k += kLine) prefetch_line(A + m * lda + k);
          }
          const int64_t block = std::min<int64_t>(kRows, c0 + rows - m0);
          int64_t a_ld = lda;
          const BroadcastSource<A_t>* a;
          if constexpr (std::is_same_v<BroadcastSource<A_t>, A_t>) {
            a = A + m0 * lda;
          } else {
            a = block_in_acc(A + m0 * lda, block, K, a_ld, a_rows);
          }
          scalar_t* y = chunk.data() + (m0 - c0);
          if (n0 == 0) {  // the D dot-product rows first (after the tile, float32 runs slower)
            for (int64_t d0 = 0; d0 < D; d0 += kDotRows) {
              for (int64_t r = 0; r < block; r += kDotCols) {
                with_count<kDotRows>(std::min<int64_t>(kDotRows, D - d0), [&](auto d_rows) {
                  with_count<kDotCols>(std::min<int64_t>(kDotCols, block - r), [&](auto a_cols) {
                    dot_tile<scalar_t, decltype(d_rows)::value, decltype(a_cols)::value, BroadcastSource<A_t>>(
                        K, Zd + d0 * K, K, a + r * a_ld, a_ld, y + (N + d0) * kChunk + r, kChunk);
                  });
                });
              }
            }
          }
          with_count<kRows>(block, [&](auto tile_rows) {
            transposed_tile<decltype(tile_rows)::value, NV>(K, cols, a, a_ld, Zt + n0, ldz,
                                                            y + n0 * kChunk, kChunk);
          });
        }
      });
    }
    for (int64_t n = 0; n < N + D; ++n) {
      for (int64_t m = 0; m < rows; m += VL) {
        const int64_t width = std::min(VL, rows - m);
        store_acc(Vec::loadu(chunk.data() + n * kChunk + m, width), Y + n * ldy + c0 + m, width);
      }
    }
  }
}

// The logits of one image, r [P, S] = (groups @ hm) / temperature, from hm [J, S] and groups [P, J]
// (identity: groups is the identity and not read; J = 0 with groups gives zero logits).
template <typename scalar_t>
void image_logits(const scalar_t* hm, bool identity, const scalar_t* groups, int64_t P, int64_t J,
                  int64_t S, scalar_t temperature, scalar_t* r) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const Vec t_v(temperature);
  for (int64_t q = 0; q < P; ++q) {
    for (int64_t s = 0; s < S; s += VL) {
      const int64_t n = std::min(VL, S - s);
      Vec logit(0);
      if (identity) {
        logit = Vec::loadu(hm + q * S + s, n);
      } else {
        for (int64_t j = 0; j < J; ++j) {
          logit = at::vec::fmadd(Vec(groups[q * J + j]), Vec::loadu(hm + j * S + s, n), logit);
        }
      }
      (logit / t_v).store(r + q * S + s, n);
    }
  }
}

// Softmax of every row of r [P, S], in place: p = exp(r - max) / sum.
template <typename scalar_t>
void row_softmax(scalar_t* r, int64_t P, int64_t S) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t q = 0; q < P; ++q) {
    scalar_t* row = r + q * S;
    const scalar_t row_max = at::vec::reduce_all<scalar_t>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, row, S);
    const Vec max_v(row_max);
    at::vec::map<scalar_t>([&](Vec x) { return (x - max_v).exp(); }, row, row, S);
    const scalar_t sum = at::vec::reduce_all<scalar_t>([](Vec& a, Vec& b) { return a + b; }, row, S);
    const Vec sum_v(sum);
    at::vec::map<scalar_t>([&](Vec x) { return x / sum_v; }, row, row, S);
  }
}

// grad_r = p * (grad_p - rowsum(p * grad_p)) / temperature, in place over grad_p [P, S], for one image.
template <typename scalar_t>
void logits_gradient(const scalar_t* p, int64_t P, int64_t S, scalar_t temperature, scalar_t* grad_p) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t q = 0; q < P; ++q) {
    const scalar_t delta = at::vec::map2_reduce_all<scalar_t>(
        [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, p + q * S,
        grad_p + q * S, S);
    const Vec delta_v(delta), t_v(temperature);
    at::vec::map2<scalar_t>([&](Vec pv, Vec g) { return pv * (g - delta_v) / t_v; }, grad_p + q * S,
                            p + q * S, grad_p + q * S, S);
  }
}

// grad_heatmaps[b] = groups^T @ grad_r ([J, S]; identity groups: grad_r; possibly 16-bit) and,
// with grad_groups non-null, grad_groups [P, J] = grad_r @ hm^T, for one image.
template <typename hm_t, typename scalar_t = acc_t<hm_t>>
void heatmap_gradients(const scalar_t* grad_r, const scalar_t* hm, bool identity, const scalar_t* groups,
                       int64_t P, int64_t J, int64_t S, hm_t* grad_hm, scalar_t* grad_groups) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  if (grad_hm != nullptr) {
    if (identity) {
      for (int64_t i = 0; i < P * S; i += VL) {
        store_acc(Vec::loadu(grad_r + i, std::min(VL, P * S - i)), grad_hm + i, std::min(VL, P * S - i));
      }
    } else {
      for (int64_t j = 0; j < J; ++j) {
        for (int64_t s = 0; s < S; s += VL) {
          const int64_t n = std::min(VL, S - s);
          Vec acc(0);
          for (int64_t q = 0; q < P; ++q) {
            acc = at::vec::fmadd(Vec(groups[q * J + j]), Vec::loadu(grad_r + q * S + s, n), acc);
          }
          store_acc(acc, grad_hm + j * S + s, n);
        }
      }
    }
  }
  if (grad_groups != nullptr) {
    for (int64_t q = 0; q < P; ++q) {
      for (int64_t j = 0; j < J; ++j) {
        grad_groups[q * J + j] = at::vec::map2_reduce_all<scalar_t>(
            [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, grad_r + q * S,
            hm + j * S, S);
      }
    }
  }
}

at::Tensor part_pool_cpu(const at::Tensor& features_in, const at::Tensor& heatmaps_in,
                         const std::optional<at::Tensor>& groups_in, double temperature) {
  const int64_t P = check_part_pool_args(features_in, heatmaps_in, groups_in, temperature);
  const int64_t B = features_in.size(0), C = features_in.size(1), J = heatmaps_in.size(1);
  const int64_t S = features_in.size(2) * features_in.size(3);
  const auto features = image_matrices(features_in);
  const auto heatmaps = heatmaps_in.contiguous();
  const auto acc_type = at::toOpMathType(features.scalar_type());
  const auto groups = groups_in.has_value() ? groups_in->to(acc_type).contiguous() : at::Tensor();
  auto out = at::empty({B, P, C}, features.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "part_pool_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const scalar_t* hp = heatmaps.data_ptr<scalar_t>();
    const bool identity = !groups.defined();
    const acc* gp = identity ? nullptr : groups.data_ptr<acc>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t f_batch = features.stride(0), f_c = features.stride(1), f_s = features.stride(2);
    constexpr int64_t VL = AccVec<scalar_t>::size();
    const int64_t p_vectors = P / VL * VL;  // the parts that fill whole vectors
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> probs(P * S), probs_t(f_s == 1 ? S * p_vectors : 0), hm_acc, f_rows, out_block;
      for (int64_t b = begin; b < end; ++b) {
        image_logits<acc>(in_acc(hp + b * J * S, J * S, hm_acc), identity, gp, P, J, S,
                          static_cast<acc>(temperature), probs.data());
        row_softmax<acc>(probs.data(), P, S);
        const scalar_t* f = fp + b * f_batch;
        if (f_s == 1) {  // NCHW: out[q, c] = p[q, :] . F[c, :]
          // Whole vectors of parts against the feature rows, from p^T (no horizontal sums); the
          // last P % VL parts as dot products (padding them to a vector would waste more lanes).
          for (int64_t q = 0; q < p_vectors; ++q) {
            for (int64_t s = 0; s < S; ++s) probs_t[s * p_vectors + q] = probs[q * S + s];
          }
          // With fewer parts than a vector, all of them as dot products.
          if (p_vectors > 0) {
            gemm_transposed<scalar_t, scalar_t>(C, p_vectors, S, f, f_c, probs_t.data(), p_vectors,
                                                P - p_vectors, probs.data() + p_vectors * S,
                                                op + b * P * C, C, f_rows, out_block);
          } else {
            gemm_dot<scalar_t, scalar_t>(P, C, S, probs.data(), S, f, f_c, op + b * P * C, C, f_rows);
          }
        } else {         // channels_last: out[q, :] = sum_s p[q, s] F[s, :]
          gemm_broadcast<scalar_t, scalar_t>(P, C, S, probs.data(), S, 1, f, f_s, op + b * P * C, C, false,
                                             f_rows);
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> part_pool_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& features_in, const at::Tensor& heatmaps_in,
    const std::optional<at::Tensor>& groups_in, double temperature, std::array<bool, 3> output_mask) {
  const int64_t P = check_part_pool_args(features_in, heatmaps_in, groups_in, temperature);
  check_part_pool_backward_args(grad_out_in, features_in, P);
  const int64_t B = features_in.size(0), C = features_in.size(1), J = heatmaps_in.size(1);
  const int64_t H = features_in.size(2), W = features_in.size(3), S = H * W;
  const bool need_features = output_mask[0], need_heatmaps = output_mask[1];
  const bool need_groups = output_mask[2] && groups_in.has_value();
  const auto features = image_matrices(features_in);
  const auto heatmaps = heatmaps_in.contiguous();
  const auto options = features.options();
  const auto acc_options = options.dtype(at::toOpMathType(features.scalar_type()));
  const auto groups = groups_in.has_value() ? groups_in->to(acc_options.dtype()).contiguous() : at::Tensor();
  const auto grad_out = grad_out_in.contiguous();
  const bool need_logits = need_heatmaps || need_groups;
  at::Tensor grad_features = at::empty({0}, options), grad_heatmaps = at::empty({0}, options);
  at::Tensor grad_groups = at::empty({0}, options), grad_groups_partial;
  if (need_features) {
    // channels_last features get a channels_last gradient (as autograd expects), others NCHW.
    const bool channels_last =
        features_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !features_in.is_contiguous();
    grad_features = at::empty({B, C, H, W}, options.memory_format(
        channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    advise_huge_pages(grad_features);
  }
  if (need_heatmaps) grad_heatmaps = at::empty({B, J, H, W}, options);
  if (need_groups) grad_groups_partial = at::empty({B, P, J}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "part_pool_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const scalar_t* hp = heatmaps.data_ptr<scalar_t>();
    const bool identity = !groups.defined();
    const acc* gp = identity ? nullptr : groups.data_ptr<acc>();
    const scalar_t* dp = grad_out.data_ptr<scalar_t>();
    const auto t = static_cast<acc>(temperature);
    const int64_t f_batch = features.stride(0), f_c = features.stride(1), f_s = features.stride(2);
    scalar_t* gfp = need_features ? grad_features.data_ptr<scalar_t>() : nullptr;
    // grad_features as [B, C, S]: strides (C*S, S, 1) or, channels_last, (S*C, 1, C).
    const int64_t gf_c = need_features ? grad_features.stride(1) : 0;
    const int64_t gf_s = need_features ? grad_features.stride(3) : 0;
    scalar_t* ghp = need_heatmaps ? grad_heatmaps.data_ptr<scalar_t>() : nullptr;
    acc* ggp = need_groups ? grad_groups_partial.data_ptr<acc>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> probs(P * S), grad_logits(need_logits ? P * S : 0), hm_acc, dout_acc, f_rows;
      for (int64_t b = begin; b < end; ++b) {
        const acc* hm = in_acc(hp + b * J * S, J * S, hm_acc);
        image_logits<acc>(hm, identity, gp, P, J, S, t, probs.data());
        row_softmax<acc>(probs.data(), P, S);
        const acc* dout = in_acc(dp + b * P * C, P * C, dout_acc);
        const scalar_t* f = fp + b * f_batch;
        if (need_features) {
          scalar_t* grad_f = gfp + b * C * S;
          if (gf_s == 1) {  // NCHW: grad_f[c, :] = sum_q dout[q, c] p[q, :]
            gemm_broadcast<acc, scalar_t>(C, S, P, dout, 1, C, probs.data(), S, grad_f, gf_c, false, dout_acc);
          } else {          // channels_last: grad_f[s, :] = sum_q p[q, s] dout[q, :]
            gemm_broadcast<acc, scalar_t>(S, C, P, probs.data(), 1, S, dout, C, grad_f, gf_s, false, dout_acc);
          }
        }
        if (!need_logits) continue;
        if (f_s == 1) {  // NCHW: grad_p[q, :] = sum_c dout[q, c] F[c, :]
          gemm_broadcast<scalar_t, acc>(P, S, C, dout, C, 1, f, f_c, grad_logits.data(), S, false, f_rows);
        } else {         // channels_last: grad_p[q, s] = dout[q, :] . F[s, :]
          gemm_dot<scalar_t, acc>(P, S, C, dout, C, f, f_s, grad_logits.data(), S, f_rows);
        }
        logits_gradient<acc>(probs.data(), P, S, t, grad_logits.data());
        heatmap_gradients<scalar_t>(grad_logits.data(), hm, identity, gp, P, J, S,
                                    ghp ? ghp + b * J * S : nullptr, need_groups ? ggp + b * P * J : nullptr);
      }
    });
    if (need_groups) {  // the per-image partials summed in image order ([P, J] zeros for B = 0)
      auto sum = at::zeros({P, J}, acc_options);
      acc* dst = sum.data_ptr<acc>();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < P * J; ++i) dst[i] += ggp[b * P * J + i];
      }
      grad_groups = sum.to(options.dtype());
    }
  });
  return {grad_features, grad_heatmaps, grad_groups};
}

}  // namespace
}  // namespace CPU_CAPABILITY

KEYPOINTOPS_CPU_KERNEL(part_pool, CPU_CAPABILITY::part_pool_cpu)
KEYPOINTOPS_CPU_KERNEL(part_pool_backward, CPU_CAPABILITY::part_pool_backward_cpu)

#if defined(CPU_CAPABILITY_DEFAULT)  // one registration, for every capability's build
TORCH_LIBRARY_IMPL(keypointops, CPU, m) {
  m.impl("part_pool", KEYPOINTOPS_CPU_DISPATCH(part_pool, CPU_CAPABILITY::part_pool_cpu));
  m.impl("part_pool_backward", KEYPOINTOPS_CPU_DISPATCH(part_pool_backward, CPU_CAPABILITY::part_pool_backward_cpu));
}
#endif

}  // namespace keypointops
