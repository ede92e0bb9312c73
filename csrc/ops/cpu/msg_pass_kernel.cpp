// msg_pass CPU kernel.
//
// Forward, per destination v and channel, over the sources u = col[rowptr[v]:rowptr[v+1]] with
// m_u = relu(x_u) + eps: a first pass finds the shift message M_v, the m_u of the largest logit
// t * m_u (the largest m_u for t >= 0, the smallest for t < 0), then one pass sums, with the
// exponent t * (m_u - M_v) <= 0 (independent exps, so they pipeline),
//   Z = sum_u exp(t * (m_u - M_v)),   A = sum_u exp(t * (m_u - M_v)) * (m_u - M_v),   out = M_v + A / Z
// (centred on M_v: equal messages give out = M_v exactly, and a sharp softmax out = M_v + a small
// term, so that backward's m_u - out_v is accurate).
// The exponent is the product of t and an exact-sign difference, not t * m_u - t * M_v: that form
// loses all accuracy for large t * m (its rounding error is ulp(t * m)), and a compiler that fuses
// it into one multiply-add turns the exponent into the product's rounding error (NaN from
// inf / inf).  The source rows stay in L1 between the two passes.  M and Z are saved for backward
// (as row_max and row_sum).
// Backward first packs per-target factors (M_v, q_v = grad_out_v / Z_v, out_v), then per source u
// over its outgoing edges u -> v (the transposed CSR), with w = exp(t * (m_u - M_v)) q_v and the
// centred message d = m_u - out_v (no cancellation of two large terms at a sharp softmax):
//   grad_m_u = sum_v (w + w * t * d),   grad_t += m_u * sum_v w * d,
// grad_x_u = grad_m_u * (x_u > 0).  Every row of grad_x has one writer; grad_t is summed per chunk
// and the chunk partials in chunk order, so backward is bitwise deterministic.
// Work is split into chunks of about kChunkWork (edges + nodes) that do not depend on the thread
// count, so a hub node costs one chunk and threads stay balanced by edge count; calls under
// kParallelWork updates run on the calling thread.
// Rows gathered at random are software-prefetched two nodes ahead; large fresh buffers are advised
// onto transparent huge pages (ops/cpu/huge_pages.h).
// Edge features (edge_attr [E, C], in the caller's edge order): the message of CSR position k is
// m_k = relu(x[col[k]] + edge_attr[perm[k]]) + eps, the edge row read in place through the
// permutation (no permuted copy).  Backward then takes the mask and message per edge:
//   g_k = (w + w t d) [x_u + e_k > 0],  grad_x_u = sum_k g_k,  grad_edge_attr[perm_t[k]] = g_k,
//   grad_t += sum_k w d m_k
// over the transposed positions k of the edges leaving u; each edge's gradient row has one writer
// (the source that owns it), so it stays deterministic without atomics.
// Memory: forward out, row_max, row_sum ([N, C] each); backward the packed factors [N, 3, C],
// grad_x [N, C] and [num_chunks, C] grad_t partials, and grad_edge_attr [E, C] (the gradient of
// the [E, C] input itself); no other tensor of size E x C.  Channels are vectorised with at::vec
// (AVX2 when built).
// Power mean (aggr "powermean", p = t per channel, clamp bounds lo <= hi) and mean (aggr "mean"):
// forward sums, per destination v, c_k^p over the incoming positions k with c_k = clamp(m_k, lo,
// hi) (c_k = m_k for the mean), y_v = sum / deg_v (0 without edges) and
//   out_v = clamp(y_v, lo, hi)^(1/p)      (out_v = y_v for the mean);
// y and deg are saved for backward (as row_max and row_sum).  Backward packs one factor per target,
// with Y = clamp(y_v) and torch's clamp gradient mask [lo <= y_v <= hi],
//   q_v = grad_out_v * Y^(1/p) / (p Y) * [lo <= y_v <= hi] / deg_v     (grad_out_v / deg_v for the mean),
// then per source u over its outgoing positions k -> v:
//   g_k = q_v p c_k^p / c_k [lo <= m_k <= hi] [x_u + e_k > 0],   grad_x_u = sum_k g_k,
//   grad_p += sum_k q_v c_k^p ln c_k,  and for u as a target  grad_p += grad_out_u out_u ln(Y_u) (-1/p^2)
// (the mean: g_k = q_v [x_u + e_k > 0], no grad_p).  Without edge features the message is the
// source's, so only sum_k q_v is gathered per source.  Memory: forward out, y, deg [N, C];
// backward q [N, C], grad_x and the grad_p partials (grad_edge_attr with edge features).
// float16 / bfloat16 x: x, edge_attr, out, grad_out, grad_x and grad_edge_attr are 16-bit in
// memory, widened on load, and every sum above runs in float32 (ops/cpu/reduced_precision.h); t,
// row_max, row_sum, the packed factors and grad_t are float32, as for float32 x.  Their softmax
// weights take an inline exp of relative error under 4e-7 instead of Sleef's out-of-line one
// (softmax_exp below).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#if defined(CPU_CAPABILITY_DEFAULT)  // the build that registers the op with torch (below)
#include <torch/library.h>
#endif

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "ops/cpu/cpu_capability.h"
#include "ops/cpu/huge_pages.h"
#include "ops/cpu/prefetch.h"
#include "ops/cpu/reduced_precision.h"
#include "ops/msg_pass.h"

namespace keypointops {
namespace CPU_CAPABILITY {  // this build's capability (ops/cpu/cpu_capability.h)
namespace {

constexpr int64_t kChunkWork = 1 << 14;
// Below this many (edge + node) x channel updates (tens of microseconds of work) a call runs on the
// calling thread: starting a parallel region costs more than it saves there.  Above it, a
// KMPNet training batch's graph (32 clips x 8 frames x 17 joints, C = 64: 1.4M updates) gains
// from the second core, also while the cores are shared with other work.
constexpr int64_t kParallelWork = int64_t{1} << 16;
constexpr int64_t kPrefetchNodes = 2;   // prefetch the rows gathered this many nodes ahead
constexpr int64_t kPrefetchEdges = 16;  // ... for at most this many edges of that node
constexpr int64_t kPrefetchBytes = 1024;  // ... and at most this many bytes of each row

// Software prefetch of the rows base[idx[e]] (rows of row_elems elements) for e in [begin, end):
// the gathered rows are random, so the hardware prefetcher cannot find them.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* base, const int64_t* idx, int64_t begin, int64_t end,
                          int64_t row_elems) {
  const int64_t bytes = std::min<int64_t>(row_elems * sizeof(scalar_t), kPrefetchBytes);
  for (int64_t e = begin; e < std::min(end, begin + kPrefetchEdges); ++e) {
    const char* row = reinterpret_cast<const char*>(base + idx[e] * row_elems);
    for (int64_t off = 0; off < bytes; off += 64) prefetch_line(row + off);
  }
}

// Prefetch of the message rows of destination v: its sources' rows of x and (kEdge) its edge rows.
template <bool kEdge, typename scalar_t>
inline void prefetch_messages(const scalar_t* x, const int64_t* col, const scalar_t* edge_attr,
                              const int64_t* perm, const int64_t* rowptr, int64_t v, int64_t C) {
  prefetch_rows(x, col, rowptr[v], rowptr[v + 1], C);
  if constexpr (kEdge) prefetch_rows(edge_attr, perm, rowptr[v], rowptr[v + 1], C);
}

// Grain for at::parallel_for over `items` pieces of a call of `work` updates: all of them (run
// inline) for small calls, else one.
int64_t grain_for(int64_t work, int64_t items) { return work < kParallelWork ? std::max<int64_t>(items, 1) : 1; }

// Calls fn(std::bool_constant<flags>...) with each runtime flag as a compile-time constant, so
// that fn can pass them on as template arguments: one instance of fn's body per combination.
template <typename Fn>
inline void with_flags(const Fn& fn) {
  fn();
}
template <typename Fn, typename... Flags>
inline void with_flags(const Fn& fn, bool first, Flags... rest) {
  const auto bind_first = [&](auto first_flag) {
    with_flags([&](auto... rest_flags) { fn(first_flag, rest_flags...); }, rest...);
  };
  if (first) {
    bind_first(std::true_type{});
  } else {
    bind_first(std::false_type{});
  }
}

// Node boundaries 0 = b_0 < b_1 < ... < b_k = N, each chunk holding about kChunkWork of
// (in-degree + 1) summed over its nodes.
std::vector<int64_t> balanced_chunks(const int64_t* rowptr, int64_t num_nodes) {
  const int64_t total = rowptr[num_nodes] + num_nodes;
  const int64_t num_chunks = std::max<int64_t>(1, (total + kChunkWork - 1) / kChunkWork);
  std::vector<int64_t> bounds{0};
  for (int64_t i = 1; i < num_chunks; ++i) {
    const int64_t target = total * i / num_chunks;
    int64_t lo = bounds.back(), hi = num_nodes;  // first v with rowptr[v] + v >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (rowptr[mid] + mid < target) lo = mid + 1; else hi = mid;
    }
    if (lo > bounds.back() && lo < num_nodes) bounds.push_back(lo);
  }
  bounds.push_back(num_nodes);
  return bounds;
}

// relu(x_row + edge_row) + eps for channels [c, c + n) in acc_t (edge_row only with kEdge).
template <bool kEdge, typename scalar_t>
inline AccVec<scalar_t> edge_message(const scalar_t* x_row, const scalar_t* edge_row, int64_t n,
                                     const AccVec<scalar_t>& eps) {
  AccVec<scalar_t> in = load_acc(x_row, n);
  if constexpr (kEdge) in = in + load_acc(edge_row, n);
  return at::vec::maximum(in, AccVec<scalar_t>(0)) + eps;
}

// exp of a softmax exponent t (m - M) <= 0.  float32 / float64 x: at::vec's exp (Sleef, within
// 1 ulp, an out-of-line call around which the loop's live vectors are spilled to the stack).
// float16 / bfloat16 x, whose results are rounded to 8 or 11 significant bits: at::vec's inline
// exp_u20, relative error under 4e-7 for exponents down to -86 and 0 below ln(FLT_MIN) (values
// under 1.2e-38, beside the largest weight exp(0) = 1 in every sum), with NaN passed through
// (exp_u20 alone turns NaN into a finite value).
template <typename scalar_t>
inline AccVec<scalar_t> softmax_exp(const AccVec<scalar_t>& z) {
  if constexpr (is_reduced_precision<scalar_t>) {
    return AccVec<scalar_t>::blendv(z.exp_u20(), z, z != z);
  } else {
    return z.exp();
  }
}

template <typename scalar_t, bool kEdge>
void forward_nodes(const scalar_t* x, const int64_t* rowptr, const int64_t* col,
                   const acc_t<scalar_t>* t, const scalar_t* edge_attr, const int64_t* perm,
                   acc_t<scalar_t> eps, int64_t C, int64_t v_begin, int64_t v_end, scalar_t* out,
                   acc_t<scalar_t>* row_max, acc_t<scalar_t>* row_sum) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const Vec zero(0), eps_v(eps), neg_inf(-std::numeric_limits<acc>::infinity());
  const Vec pos_inf(std::numeric_limits<acc>::infinity());
  for (int64_t v = v_begin; v < v_end; ++v) {
    const int64_t e_begin = rowptr[v], e_end = rowptr[v + 1];
    if (v + kPrefetchNodes < v_end) {
      prefetch_messages<kEdge>(x, col, edge_attr, perm, rowptr, v + kPrefetchNodes, C);
    }
    scalar_t* out_v = out + v * C;
    acc* max_v = row_max + v * C;
    acc* sum_v = row_sum + v * C;
    if (e_begin == e_end) {
      std::fill(out_v, out_v + C, scalar_t(0));
      std::fill(max_v, max_v + C, acc(0));
      std::fill(sum_v, sum_v + C, acc(1));
      continue;
    }
    for (int64_t c = 0; c < C; c += VL) {
      const int64_t n = std::min(VL, C - c);
      const Vec t_c = Vec::loadu(t + c, n);
      Vec largest = neg_inf, smallest = pos_inf;
      for (int64_t e = e_begin; e < e_end; ++e) {
        const Vec m = edge_message<kEdge>(x + col[e] * C + c, kEdge ? edge_attr + perm[e] * C + c : nullptr,
                                          n, eps_v);
        largest = at::vec::maximum(largest, m);
        smallest = at::vec::minimum(smallest, m);
      }
      const Vec M = Vec::blendv(smallest, largest, t_c >= zero);
      Vec Z = zero, A = zero;  // the exps are independent of each other: they pipeline
      for (int64_t e = e_begin; e < e_end; ++e) {
        const Vec m = edge_message<kEdge>(x + col[e] * C + c, kEdge ? edge_attr + perm[e] * C + c : nullptr,
                                          n, eps_v);
        const Vec d = m - M;
        const Vec w = softmax_exp<scalar_t>(t_c * d);
        Z = Z + w;
        A = at::vec::fmadd(w, d, A);
      }
      store_acc<scalar_t>(M + A / Z, out_v + c, n);
      M.store(max_v + c, n);
      Z.store(sum_v + c, n);
    }
  }
}

// Packs the per-target factors of every edge weight for the targets v_begin..v_end into
// factors[v] = (M_v, q_v = grad_out_v / Z_v, out_v), [N, 3, C]: the edge loop below then reads one
// contiguous block per edge and divides nothing.
template <typename scalar_t>
void pack_target_factors(const scalar_t* grad_out, const scalar_t* out, const acc_t<scalar_t>* row_max,
                         const acc_t<scalar_t>* row_sum, int64_t C, int64_t v_begin, int64_t v_end,
                         acc_t<scalar_t>* factors) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  for (int64_t v = v_begin; v < v_end; ++v) {
    acc* f = factors + v * 3 * C;
    for (int64_t c = 0; c < C; c += VL) {
      const int64_t n = std::min(VL, C - c), i = v * C + c;
      const Vec q = load_acc(grad_out + i, n) / Vec::loadu(row_sum + i, n);
      Vec::loadu(row_max + i, n).store(f + c, n);
      q.store(f + C + c, n);
      load_acc(out + i, n).store(f + 2 * C + c, n);
    }
  }
}

// With w = exp(t (m_u - M_v)) q_v and d = m_u - out_v:
// grad_m_u = sum_{u->v} (w + w t d),   grad_t += m_u * sum_{u->v} w d
// (with kEdge the message, its mask and so grad_t's m are per edge; see the file header).
// semi_grad (PyG's semi-gradient softmax: the weights as constants) drops the w t d term.
template <typename scalar_t, bool kGradT, bool kEdge>
void backward_nodes(const scalar_t* x, const acc_t<scalar_t>* factors, const int64_t* rowptr_t,
                    const int64_t* col_t, const acc_t<scalar_t>* t, const scalar_t* edge_attr,
                    const int64_t* perm_t, acc_t<scalar_t> eps, int64_t C, int64_t u_begin,
                    int64_t u_end, bool semi_grad, scalar_t* grad_x, acc_t<scalar_t>* grad_t_partial,
                    scalar_t* grad_edge_attr) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const Vec zero(0), eps_v(eps);
  for (int64_t u = u_begin; u < u_end; ++u) {
    if (u + kPrefetchNodes < u_end) {
      prefetch_rows(factors, col_t, rowptr_t[u + kPrefetchNodes], rowptr_t[u + kPrefetchNodes + 1],
                    3 * C);
      if constexpr (kEdge) {
        prefetch_rows(edge_attr, perm_t, rowptr_t[u + kPrefetchNodes],
                      rowptr_t[u + kPrefetchNodes + 1], C);
      }
    }
    for (int64_t c = 0; c < C; c += VL) {
      const int64_t n = std::min(VL, C - c);
      const Vec t_c = Vec::loadu(t + c, n);
      const Vec weight_t = semi_grad ? zero : t_c;   // t in the derivative of the weights
      const Vec x_u = load_acc(x + u * C + c, n);
      const Vec m = at::vec::maximum(x_u, zero) + eps_v;
      Vec GM = zero, GT = zero;
      for (int64_t e = rowptr_t[u]; e < rowptr_t[u + 1]; ++e) {
        const acc* f = factors + col_t[e] * 3 * C + c;
        if constexpr (kEdge) {
          const Vec in = x_u + load_acc(edge_attr + perm_t[e] * C + c, n);
          const Vec m_e = at::vec::maximum(in, zero) + eps_v;
          const Vec w = softmax_exp<scalar_t>(t_c * (m_e - Vec::loadu(f, n))) * Vec::loadu(f + C, n);
          const Vec d = m_e - Vec::loadu(f + 2 * C, n);
          const Vec g = Vec::blendv(zero, at::vec::fmadd(w * weight_t, d, w), in > zero);
          store_acc<scalar_t>(g, grad_edge_attr + perm_t[e] * C + c, n);
          GM = GM + g;
          if constexpr (kGradT) GT = at::vec::fmadd(w * d, m_e, GT);
        } else {
          const Vec w = softmax_exp<scalar_t>(t_c * (m - Vec::loadu(f, n))) * Vec::loadu(f + C, n);
          const Vec d = m - Vec::loadu(f + 2 * C, n);
          GM = at::vec::fmadd(w * weight_t, d, GM + w);
          if constexpr (kGradT) GT = at::vec::fmadd(w, d, GT);
        }
      }
      if constexpr (kEdge) {
        store_acc<scalar_t>(GM, grad_x + u * C + c, n);
        if constexpr (kGradT) (Vec::loadu(grad_t_partial + c, n) + GT).store(grad_t_partial + c, n);
      } else {
        store_acc<scalar_t>(Vec::blendv(zero, GM, x_u > zero), grad_x + u * C + c, n);
        if constexpr (kGradT) {
          (Vec::loadu(grad_t_partial + c, n) + GT * m).store(grad_t_partial + c, n);
        }
      }
    }
  }
}

// base^exponent for base >= 0 as exp(exponent ln base), not Sleef's pow: that pow carries its
// logarithm in extended precision, which costs more than the exp and log together and buys
// accuracy the sums above do not keep (here the relative error is about |exponent ln base| ulp).
template <typename Vec>
inline Vec power(const Vec& base, const Vec& exponent) {
  return (exponent * base.log()).exp();
}

// Power-mean / mean forward of the destinations v_begin..v_end (see the file header): out, y and
// the in-degree.
template <typename scalar_t, bool kEdge, bool kPower>
void power_mean_forward_nodes(const scalar_t* x, const int64_t* rowptr, const int64_t* col,
                              const acc_t<scalar_t>* p, const scalar_t* edge_attr, const int64_t* perm,
                              acc_t<scalar_t> eps, acc_t<scalar_t> lo, acc_t<scalar_t> hi, int64_t C,
                              int64_t v_begin, int64_t v_end, scalar_t* out, acc_t<scalar_t>* mean,
                              acc_t<scalar_t>* degree) {
  using acc = acc_t<scalar_t>;
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const Vec zero(0), one(1), eps_v(eps), lo_v(lo), hi_v(hi);
  for (int64_t v = v_begin; v < v_end; ++v) {
    const int64_t e_begin = rowptr[v], e_end = rowptr[v + 1];
    if (v + kPrefetchNodes < v_end) {
      prefetch_messages<kEdge>(x, col, edge_attr, perm, rowptr, v + kPrefetchNodes, C);
    }
    const acc deg = static_cast<acc>(e_end - e_begin);
    const Vec inv_deg(e_end > e_begin ? acc(1) / deg : acc(0));
    for (int64_t c = 0; c < C; c += VL) {
      const int64_t n = std::min(VL, C - c);
      const Vec p_c = Vec::loadu(p + c, n);
      Vec S = zero;
      for (int64_t e = e_begin; e < e_end; ++e) {
        const Vec m = edge_message<kEdge>(x + col[e] * C + c, kEdge ? edge_attr + perm[e] * C + c : nullptr,
                                          n, eps_v);
        if constexpr (kPower) {
          S = S + power(at::vec::clamp(m, lo_v, hi_v), p_c);
        } else {
          S = S + m;
        }
      }
      const Vec y = S * inv_deg;
      if constexpr (kPower) {
        store_acc<scalar_t>(power(at::vec::clamp(y, lo_v, hi_v), one / p_c), out + v * C + c, n);
      } else {
        store_acc<scalar_t>(y, out + v * C + c, n);
      }
      y.store(mean + v * C + c, n);
      Vec(deg).store(degree + v * C + c, n);
    }
  }
}

// The per-target factor q_v of the power mean (the mean) for v_begin..v_end (see the file header).
template <typename scalar_t, bool kPower>
void pack_power_mean_factors(const scalar_t* grad_out, const acc_t<scalar_t>* mean,
                             const acc_t<scalar_t>* degree, const acc_t<scalar_t>* p, acc_t<scalar_t> lo,
                             acc_t<scalar_t> hi, int64_t C, int64_t v_begin, int64_t v_end,
                             acc_t<scalar_t>* factors) {
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const Vec zero(0), one(1), lo_v(lo), hi_v(hi);
  for (int64_t v = v_begin; v < v_end; ++v) {
    for (int64_t c = 0; c < C; c += VL) {
      const int64_t n = std::min(VL, C - c), i = v * C + c;
      const Vec deg = Vec::loadu(degree + i, n);
      Vec q = load_acc(grad_out + i, n) / Vec::blendv(deg, one, deg == zero);
      if constexpr (kPower) {
        const Vec p_c = Vec::loadu(p + c, n);
        const Vec y = Vec::loadu(mean + i, n);
        const Vec Y = at::vec::clamp(y, lo_v, hi_v);
        q = Vec::blendv(zero, q * power(Y, one / p_c) / (p_c * Y), (y >= lo_v) & (y <= hi_v));
      }
      q.store(factors + i, n);
    }
  }
}

// Power-mean (mean) backward of the sources u_begin..u_end over their outgoing positions (see the
// file header); kGradT adds the chunk's grad_p to grad_p_partial.
template <typename scalar_t, bool kGradT, bool kEdge, bool kPower>
void power_mean_backward_nodes(const scalar_t* grad_out, const scalar_t* x, const acc_t<scalar_t>* mean,
                               const acc_t<scalar_t>* factors, const int64_t* rowptr_t, const int64_t* col_t,
                               const acc_t<scalar_t>* p, const scalar_t* edge_attr, const int64_t* perm_t,
                               acc_t<scalar_t> eps, acc_t<scalar_t> lo, acc_t<scalar_t> hi, int64_t C,
                               int64_t u_begin, int64_t u_end, scalar_t* grad_x,
                               acc_t<scalar_t>* grad_p_partial, scalar_t* grad_edge_attr) {
  using Vec = AccVec<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const Vec zero(0), one(1), eps_v(eps), lo_v(lo), hi_v(hi);
  // d c^p / d in (in = x_u + e) over c^p at the clamped message c, and grad_p's ln c.
  const auto message_grad = [&](const Vec& in, const Vec& p_c, Vec& cp, Vec& log_c) {
    const Vec m = at::vec::maximum(in, zero) + eps_v;
    if constexpr (!kPower) return Vec::blendv(zero, one, in > zero);
    const Vec c = at::vec::clamp(m, lo_v, hi_v);
    const Vec ln_c = c.log();
    cp = (p_c * ln_c).exp();
    if constexpr (kGradT) log_c = Vec::blendv(ln_c, zero, c == zero);  // 0^p ln 0 -> 0, as torch
    return Vec::blendv(zero, p_c * cp / c, (in > zero) & (m >= lo_v) & (m <= hi_v));
  };
  for (int64_t u = u_begin; u < u_end; ++u) {
    if (u + kPrefetchNodes < u_end) {
      prefetch_rows(factors, col_t, rowptr_t[u + kPrefetchNodes], rowptr_t[u + kPrefetchNodes + 1], C);
      if constexpr (kEdge) {
        prefetch_rows(edge_attr, perm_t, rowptr_t[u + kPrefetchNodes],
                      rowptr_t[u + kPrefetchNodes + 1], C);
      }
    }
    for (int64_t c = 0; c < C; c += VL) {
      const int64_t n = std::min(VL, C - c);
      const Vec p_c = kPower ? Vec::loadu(p + c, n) : one;
      const Vec x_u = load_acc(x + u * C + c, n);
      Vec cp = one, log_c = zero, GX = zero, GP = zero;
      if constexpr (kEdge) {
        for (int64_t e = rowptr_t[u]; e < rowptr_t[u + 1]; ++e) {
          const Vec q = Vec::loadu(factors + col_t[e] * C + c, n);
          const Vec g = q * message_grad(x_u + load_acc(edge_attr + perm_t[e] * C + c, n), p_c, cp, log_c);
          store_acc<scalar_t>(g, grad_edge_attr + perm_t[e] * C + c, n);
          GX = GX + g;
          if constexpr (kGradT && kPower) GP = at::vec::fmadd(q * cp, log_c, GP);
        }
      } else {
        Vec Q = zero;
        for (int64_t e = rowptr_t[u]; e < rowptr_t[u + 1]; ++e) Q = Q + Vec::loadu(factors + col_t[e] * C + c, n);
        GX = Q * message_grad(x_u, p_c, cp, log_c);
        if constexpr (kGradT && kPower) GP = Q * cp * log_c;
      }
      store_acc<scalar_t>(GX, grad_x + u * C + c, n);
      if constexpr (kGradT && kPower) {
        // u as a target: d out_u / d p = out_u ln(Y_u) (-1 / p^2), out_u = Y_u^(1/p).
        const Vec Y = at::vec::clamp(Vec::loadu(mean + u * C + c, n), lo_v, hi_v);
        const Vec ln_Y = Y.log();
        const Vec log_Y = Vec::blendv(ln_Y, zero, Y == zero);
        const Vec direct = load_acc(grad_out + u * C + c, n) * (ln_Y / p_c).exp() * log_Y / (p_c * p_c);
        (Vec::loadu(grad_p_partial + c, n) + GP - direct).store(grad_p_partial + c, n);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass_cpu(
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
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto x = x_in.contiguous();
  const auto rowptr = rowptr_in.contiguous();
  const auto col = col_in.contiguous();
  const auto t = t_in.contiguous();
  check_csr_cpu(rowptr, col, N, "rowptr", "col");
  const auto edge_attr = with_edges ? edge_attr_in->contiguous() : at::Tensor();
  const auto perm = with_edges ? perm_in->contiguous() : at::Tensor();
  if (with_edges) check_perm_cpu(perm, "perm");
  auto out = at::empty({N, C}, x.options());
  auto row_max = at::empty({N, C}, t.options());
  auto row_sum = at::empty({N, C}, t.options());
  for (const auto* fresh : {&out, &row_max, &row_sum}) advise_huge_pages(*fresh);
  if (N == 0 || C == 0) return {out, row_max, row_sum};
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  const auto chunks = balanced_chunks(rp, N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msg_pass_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* cp = col.data_ptr<int64_t>();
    const acc* tp = t.data_ptr<acc>();
    scalar_t* op = out.data_ptr<scalar_t>();
    acc* mp = row_max.data_ptr<acc>();
    acc* sp = row_sum.data_ptr<acc>();
    const int64_t num_chunks = static_cast<int64_t>(chunks.size()) - 1;
    const scalar_t* ep = with_edges ? edge_attr.data_ptr<scalar_t>() : nullptr;
    const int64_t* pp = with_edges ? perm.data_ptr<int64_t>() : nullptr;
    const int64_t work = (col.numel() * (with_edges ? 2 : 1) + N) * C;
    const auto e = static_cast<acc>(eps);
    const auto lo = static_cast<acc>(clamp_min), hi = static_cast<acc>(clamp_max);
    at::parallel_for(0, num_chunks, grain_for(work, num_chunks), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (aggr == MsgPassAggr::kPowerMean || aggr == MsgPassAggr::kMean) {
          with_flags([&](auto edge_flag, auto power_flag) {
            power_mean_forward_nodes<scalar_t, edge_flag, power_flag>(
                xp, rp, cp, tp, ep, pp, e, lo, hi, C, chunks[k], chunks[k + 1], op, mp, sp);
          }, with_edges, aggr == MsgPassAggr::kPowerMean);
        } else {
          with_flags([&](auto edge_flag) {
            forward_nodes<scalar_t, edge_flag>(xp, rp, cp, tp, ep, pp, e, C, chunks[k], chunks[k + 1], op, mp, sp);
          }, with_edges);
        }
      }
    });
  });
  return {out, row_max, row_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> msg_pass_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& out_in,
    const at::Tensor& row_max_in, const at::Tensor& row_sum_in, const at::Tensor& rowptr_t_in,
    const at::Tensor& col_t_in, const at::Tensor& t_in, double eps, bool compute_grad_t,
    const c10::optional<at::Tensor>& edge_attr_in, const c10::optional<at::Tensor>& perm_t_in,
    c10::string_view aggr_name, double clamp_min, double clamp_max) {
  const MsgPassAggr aggr = parse_msg_pass_aggr(aggr_name);
  const bool semi_grad = aggr == MsgPassAggr::kSoftmaxSemiGrad;
  compute_grad_t = compute_grad_t && !semi_grad;  // the weights are constants: no gradient for t
  check_msg_pass_backward_args(grad_out_in, x_in, out_in, row_max_in, row_sum_in, rowptr_t_in,
                               col_t_in, t_in);
  check_msg_pass_edge_args(x_in, edge_attr_in, perm_t_in, col_t_in.numel(), "perm_t");
  const bool with_edges = edge_attr_in.has_value();
  const int64_t N = x_in.size(0), C = x_in.size(1);
  const auto grad_out = grad_out_in.contiguous();
  const auto x = x_in.contiguous();
  const auto out = out_in.contiguous();
  const auto row_max = row_max_in.contiguous();
  const auto row_sum = row_sum_in.contiguous();
  const auto rowptr_t = rowptr_t_in.contiguous();
  const auto col_t = col_t_in.contiguous();
  const auto t = t_in.contiguous();
  check_csr_cpu(rowptr_t, col_t, N, "rowptr_t", "col_t");
  const auto edge_attr = with_edges ? edge_attr_in->contiguous() : at::Tensor();
  const auto perm_t = with_edges ? perm_t_in->contiguous() : at::Tensor();
  if (with_edges) check_perm_cpu(perm_t, "perm_t");
  auto grad_x = at::empty({N, C}, x.options());
  auto grad_edge_attr = with_edges ? at::empty({col_t.numel(), C}, x.options()) : at::empty({0}, x.options());
  if (N == 0 || C == 0) return {grad_x, at::zeros_like(t), grad_edge_attr};
  const int64_t* rp = rowptr_t.data_ptr<int64_t>();
  const auto chunks = balanced_chunks(rp, N);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size()) - 1;
  auto grad_t_partial = at::zeros({compute_grad_t ? num_chunks : 1, C}, t.options());
  // Per target: q for the power mean and the mean, (M, q, out) for the softmax.
  const bool mean_aggr = aggr == MsgPassAggr::kPowerMean || aggr == MsgPassAggr::kMean;
  auto factors = at::empty(mean_aggr ? at::IntArrayRef{N, C} : at::IntArrayRef{N, 3, C}, t.options());
  advise_huge_pages(grad_x);
  advise_huge_pages(factors);
  if (with_edges) advise_huge_pages(grad_edge_attr);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "msg_pass_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t* cp = col_t.data_ptr<int64_t>();
    const acc* tp = t.data_ptr<acc>();
    acc* fp = factors.data_ptr<acc>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    acc* gtp = grad_t_partial.data_ptr<acc>();
    const auto e = static_cast<acc>(eps);
    const scalar_t* ep = with_edges ? edge_attr.data_ptr<scalar_t>() : nullptr;
    const int64_t* pp = with_edges ? perm_t.data_ptr<int64_t>() : nullptr;
    scalar_t* gep = with_edges ? grad_edge_attr.data_ptr<scalar_t>() : nullptr;
    const int64_t work = (col_t.numel() * (with_edges ? 3 : 1) + N) * C;
    if (aggr == MsgPassAggr::kPowerMean || aggr == MsgPassAggr::kMean) {
      const bool power = aggr == MsgPassAggr::kPowerMean;
      const auto lo = static_cast<acc>(clamp_min), hi = static_cast<acc>(clamp_max);
      const scalar_t* gop = grad_out.data_ptr<scalar_t>();
      const acc* mp = row_max.data_ptr<acc>();
      at::parallel_for(0, N, std::max<int64_t>(1024, grain_for(work, N)), [&](int64_t begin, int64_t end) {
        with_flags([&](auto power_flag) {
          pack_power_mean_factors<scalar_t, power_flag>(gop, mp, row_sum.data_ptr<acc>(), tp, lo, hi, C, begin, end, fp);
        }, power);
      });
      at::parallel_for(0, num_chunks, grain_for(work, num_chunks), [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          acc* partial = compute_grad_t ? gtp + k * C : nullptr;
          // The mean has no parameter: its grad_t stays zero, and (grad_t, mean) builds no kernel.
          with_flags([&](auto grad_t_flag, auto edge_flag, auto power_flag) {
            if constexpr (grad_t_flag && !power_flag) {
              TORCH_INTERNAL_ASSERT(false, "msg_pass_backward: the mean has no grad_t");
            } else {
              power_mean_backward_nodes<scalar_t, grad_t_flag, edge_flag, power_flag>(
                  gop, xp, mp, fp, rp, cp, tp, ep, pp, e, lo, hi, C, chunks[k], chunks[k + 1], gxp, partial, gep);
            }
          }, power && compute_grad_t, with_edges, power);
        }
      });
      return;
    }
    at::parallel_for(0, N, std::max<int64_t>(1024, grain_for(work, N)), [&](int64_t begin, int64_t end) {
      pack_target_factors<scalar_t>(grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                    row_max.data_ptr<acc>(), row_sum.data_ptr<acc>(), C,
                                    begin, end, fp);
    });
    at::parallel_for(0, num_chunks, grain_for(work, num_chunks), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        acc* partial = compute_grad_t ? gtp + k * C : nullptr;
        with_flags([&](auto grad_t_flag, auto edge_flag) {
          backward_nodes<scalar_t, grad_t_flag, edge_flag>(
              xp, fp, rp, cp, tp, ep, pp, e, C, chunks[k], chunks[k + 1], semi_grad, gxp, partial, gep);
        }, compute_grad_t, with_edges);
      }
    });
  });
  // Sum of the chunk partials in chunk order (a sequential loop: bitwise reproducible).
  auto grad_t = at::zeros_like(t);
  if (compute_grad_t) {
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "msg_pass_grad_t_sum", [&] {
      const scalar_t* gtp = grad_t_partial.data_ptr<scalar_t>();
      scalar_t* dst = grad_t.data_ptr<scalar_t>();
      for (int64_t k = 0; k < num_chunks; ++k) {
        for (int64_t c = 0; c < C; ++c) dst[c] += gtp[k * C + c];
      }
    });
  }
  return {grad_x, grad_t, grad_edge_attr};
}

}  // namespace
}  // namespace CPU_CAPABILITY

KEYPOINTOPS_CPU_KERNEL(msg_pass, CPU_CAPABILITY::msg_pass_cpu)
KEYPOINTOPS_CPU_KERNEL(msg_pass_backward, CPU_CAPABILITY::msg_pass_backward_cpu)

#if defined(CPU_CAPABILITY_DEFAULT)  // one registration, for every capability's build
TORCH_LIBRARY_IMPL(keypointops, CPU, m) {
  m.impl("msg_pass", KEYPOINTOPS_CPU_DISPATCH(msg_pass, CPU_CAPABILITY::msg_pass_cpu));
  m.impl("msg_pass_backward", KEYPOINTOPS_CPU_DISPATCH(msg_pass_backward, CPU_CAPABILITY::msg_pass_backward_cpu));
}
#endif

}  // namespace keypointops
