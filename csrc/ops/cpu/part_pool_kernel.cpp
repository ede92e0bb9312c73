// part_pool CPU kernel.
//
// Images run in parallel, one thread per image.  For image b, with S = H * W:
//   r = (groups @ heatmaps[b]) / temperature   [P, S]   (identity groups: the heatmap rows)
//   lse[q] = logsumexp_s r[q, s],  p = exp(r - lse)      in a per-thread [P, S] buffer
//   out[b] = p @ F[b]^T                                   one BLAS GEMM over S (at::mm_out)
// F[b] is the [C, S] matrix of the image read in place: row-major for NCHW features, column-major
// for channels_last ones; BLAS takes either, so the features are never copied or transposed.
// Backward recomputes p from the saved lse, then per image
//   grad_features[b] = dout[b]^T @ p                      a GEMM written into grad_features' layout
//   grad_r = p * (dout[b] @ F[b] - rowsum(dout[b] * out[b])) / temperature     a GEMM + epilogue
//   grad_heatmaps[b] = groups^T @ grad_r,   grad_groups += grad_r @ heatmaps[b]^T
// (grad_groups from per-image partials summed in image order: bitwise deterministic).
// Memory: forward out [B, P, C] and lse [B, P]; backward grad_features, grad_heatmaps and a [B, P, J]
// grad_groups partial; two [P, S] buffers per thread.  Nothing of size [B, P, C, H, W].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "ops/part_pool.h"

namespace keypointops {
namespace {

// [B, C, H, W] as [B, C, S] matrices BLAS reads in place (unit stride along S or along C): a view of
// NCHW and channels_last tensors; other layouts are copied.
at::Tensor image_matrices(const at::Tensor& t) {
  const int64_t C = t.size(1), S = t.size(2) * t.size(3);
  auto m = t.reshape({t.size(0), C, S});
  const bool rows = m.stride(2) == 1 && m.stride(1) >= S;
  const bool cols = m.stride(1) == 1 && m.stride(2) >= C;
  return rows || cols ? m : m.contiguous();
}

// The [rows, cols] matrix at data with the given strides, as a tensor that owns nothing and needs
// no autograd (safe to hand to at::mm_out from the worker threads).
template <typename scalar_t>
at::Tensor matrix(const scalar_t* data, int64_t rows, int64_t cols, int64_t row_stride,
                  int64_t col_stride, const at::TensorOptions& options) {
  return at::from_blob(const_cast<scalar_t*>(data), {rows, cols}, {row_stride, col_stride}, options);
}

// A fresh output of several MiB is first written by this op: on Linux, transparent huge pages for
// its 2 MiB-aligned interior turn ~512 page faults per MiB into one per 2 MiB (PyTorch's allocator
// does the same for every large allocation under THP_MEM_ALLOC_ENABLE=1).  A hint: failure is harmless.
void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + fresh.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

// The logits of one image, r [P, S] = (groups @ hm) / temperature, from hm [J, S] and groups [P, J]
// (nullptr: the identity).
template <typename scalar_t>
void image_logits(const scalar_t* hm, const scalar_t* groups, int64_t P, int64_t J, int64_t S,
                  scalar_t temperature, scalar_t* r) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  const Vec t_v(temperature);
  for (int64_t q = 0; q < P; ++q) {
    for (int64_t s = 0; s < S; s += VL) {
      const int64_t n = std::min(VL, S - s);
      Vec logit(0);
      if (groups == nullptr) {
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

// lse[q] = log(sum_s exp(r[q, s])), computed as max + log(sum exp(r - max)).
template <typename scalar_t>
void row_log_sum_exp(const scalar_t* r, int64_t P, int64_t S, scalar_t* lse) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t q = 0; q < P; ++q) {
    const scalar_t* row = r + q * S;
    const scalar_t row_max = at::vec::reduce_all<scalar_t>(
        [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, row, S);
    const Vec max_v(row_max);
    const scalar_t sum = at::vec::map_reduce_all<scalar_t>(
        [&](Vec x) { return (x - max_v).exp(); }, [](Vec a, Vec b) { return a + b; }, row, S);
    lse[q] = row_max + std::log(sum);
  }
}

// The probabilities p = exp(r - lse), in place over r [P, S].
template <typename scalar_t>
void row_probabilities(scalar_t* r, int64_t P, int64_t S, const scalar_t* lse) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t q = 0; q < P; ++q) {
    const Vec lse_v(lse[q]);
    at::vec::map<scalar_t>([&](Vec x) { return (x - lse_v).exp(); }, r + q * S, r + q * S, S);
  }
}

// grad_r = p * (grad_p - rowsum(dout * out)) / temperature, in place over grad_p [P, S], for one image.
template <typename scalar_t>
void logits_gradient(const scalar_t* p, const scalar_t* dout, const scalar_t* out, int64_t P,
                     int64_t C, int64_t S, scalar_t temperature, scalar_t* grad_p) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t q = 0; q < P; ++q) {
    const scalar_t delta = at::vec::map2_reduce_all<scalar_t>(
        [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, dout + q * C,
        out + q * C, C);
    const Vec delta_v(delta), t_v(temperature);
    at::vec::map2<scalar_t>([&](Vec pv, Vec g) { return pv * (g - delta_v) / t_v; }, grad_p + q * S,
                            p + q * S, grad_p + q * S, S);
  }
}

// grad_heatmaps[b] = groups^T @ grad_r ([J, S]; identity groups: grad_r) and, with grad_groups
// non-null, grad_groups [P, J] = grad_r @ hm^T, for one image.
template <typename scalar_t>
void heatmap_gradients(const scalar_t* grad_r, const scalar_t* hm, const scalar_t* groups, int64_t P,
                       int64_t J, int64_t S, scalar_t* grad_hm, scalar_t* grad_groups) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t VL = Vec::size();
  if (grad_hm != nullptr) {
    if (groups == nullptr) {
      std::copy(grad_r, grad_r + P * S, grad_hm);
    } else {
      for (int64_t j = 0; j < J; ++j) {
        for (int64_t s = 0; s < S; s += VL) {
          const int64_t n = std::min(VL, S - s);
          Vec acc(0);
          for (int64_t q = 0; q < P; ++q) {
            acc = at::vec::fmadd(Vec(groups[q * J + j]), Vec::loadu(grad_r + q * S + s, n), acc);
          }
          acc.store(grad_hm + j * S + s, n);
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

void check_cpu_dtype(const at::Tensor& features) {
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble,
              "part_pool: the CPU kernel takes float32 or float64 features, got ",
              features.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> part_pool_cpu(const at::Tensor& features_in,
                                                 const at::Tensor& heatmaps_in,
                                                 const std::optional<at::Tensor>& groups_in,
                                                 double temperature) {
  const int64_t P = check_part_pool_args(features_in, heatmaps_in, groups_in, temperature);
  check_cpu_dtype(features_in);
  const int64_t B = features_in.size(0), C = features_in.size(1), J = heatmaps_in.size(1);
  const int64_t S = features_in.size(2) * features_in.size(3);
  const auto features = image_matrices(features_in);
  const auto heatmaps = heatmaps_in.contiguous();
  const auto groups = groups_in.has_value() ? groups_in->contiguous() : at::Tensor();
  auto out = at::empty({B, P, C}, features.options());
  auto lse = at::empty({B, P}, features.options());
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "part_pool_cpu", [&] {
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const scalar_t* hp = heatmaps.data_ptr<scalar_t>();
    const scalar_t* gp = groups.defined() ? groups.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    const int64_t f_batch = features.stride(0), f_c = features.stride(1), f_s = features.stride(2);
    const auto options = features.options();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> probs(P * S);
      const auto p = matrix(probs.data(), P, S, S, 1, options);
      for (int64_t b = begin; b < end; ++b) {
        image_logits<scalar_t>(hp + b * J * S, gp, P, J, S, static_cast<scalar_t>(temperature),
                               probs.data());
        row_log_sum_exp<scalar_t>(probs.data(), P, S, lp + b * P);
        row_probabilities<scalar_t>(probs.data(), P, S, lp + b * P);
        auto out_b = matrix(op + b * P * C, P, C, C, 1, options);
        at::mm_out(out_b, p, matrix(fp + b * f_batch, S, C, f_s, f_c, options));
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> part_pool_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& features_in, const at::Tensor& heatmaps_in,
    const std::optional<at::Tensor>& groups_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    double temperature, std::array<bool, 3> output_mask) {
  const int64_t P = check_part_pool_args(features_in, heatmaps_in, groups_in, temperature);
  check_part_pool_backward_args(grad_out_in, features_in, out_in, lse_in, P);
  check_cpu_dtype(features_in);
  const int64_t B = features_in.size(0), C = features_in.size(1), J = heatmaps_in.size(1);
  const int64_t H = features_in.size(2), W = features_in.size(3), S = H * W;
  const bool need_features = output_mask[0], need_heatmaps = output_mask[1];
  const bool need_groups = output_mask[2] && groups_in.has_value();
  const auto features = image_matrices(features_in);
  const auto heatmaps = heatmaps_in.contiguous();
  const auto groups = groups_in.has_value() ? groups_in->contiguous() : at::Tensor();
  const auto grad_out = grad_out_in.contiguous();
  const auto out = out_in.contiguous();
  const auto lse = lse_in.contiguous();
  const auto options = features.options();
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
  if (need_groups) grad_groups_partial = at::empty({B, P, J}, options);
  AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "part_pool_backward_cpu", [&] {
    const scalar_t* fp = features.data_ptr<scalar_t>();
    const scalar_t* hp = heatmaps.data_ptr<scalar_t>();
    const scalar_t* gp = groups.defined() ? groups.data_ptr<scalar_t>() : nullptr;
    const scalar_t* dp = grad_out.data_ptr<scalar_t>();
    const scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* lp = lse.data_ptr<scalar_t>();
    const auto t = static_cast<scalar_t>(temperature);
    const int64_t f_batch = features.stride(0), f_c = features.stride(1), f_s = features.stride(2);
    scalar_t* gfp = need_features ? grad_features.data_ptr<scalar_t>() : nullptr;
    const auto gf_view = need_features ? grad_features.view({B, C, S}) : at::Tensor();
    scalar_t* ghp = need_heatmaps ? grad_heatmaps.data_ptr<scalar_t>() : nullptr;
    scalar_t* ggp = grad_groups_partial.defined() ? grad_groups_partial.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> probs(P * S), grad_logits(need_logits ? P * S : 0);
      const auto p = matrix(probs.data(), P, S, S, 1, options);
      for (int64_t b = begin; b < end; ++b) {
        image_logits<scalar_t>(hp + b * J * S, gp, P, J, S, t, probs.data());
        row_probabilities<scalar_t>(probs.data(), P, S, lp + b * P);
        const auto dout_b = matrix(dp + b * P * C, P, C, C, 1, options);
        if (need_features) {
          auto grad_f_b = matrix(gfp + b * gf_view.stride(0), C, S, gf_view.stride(1),
                                 gf_view.stride(2), options);
          at::mm_out(grad_f_b, dout_b.t(), p);
        }
        if (!need_logits) continue;
        auto grad_r = matrix(grad_logits.data(), P, S, S, 1, options);
        at::mm_out(grad_r, dout_b, matrix(fp + b * f_batch, C, S, f_c, f_s, options));
        logits_gradient<scalar_t>(probs.data(), dp + b * P * C, op + b * P * C, P, C, S, t,
                                  grad_logits.data());
        heatmap_gradients<scalar_t>(grad_logits.data(), hp + b * J * S, gp, P, J, S,
                                    ghp ? ghp + b * J * S : nullptr, ggp ? ggp + b * P * J : nullptr);
      }
    });
    if (ggp != nullptr) {  // the per-image partials summed in image order
      grad_groups = at::zeros({P, J}, options);
      scalar_t* dst = grad_groups.data_ptr<scalar_t>();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < P * J; ++i) dst[i] += ggp[b * P * J + i];
      }
    }
  });
  return {grad_features, grad_heatmaps, grad_groups};
}

}  // namespace

TORCH_LIBRARY_IMPL(keypointops, CPU, m) {
  m.impl("part_pool", &part_pool_cpu);
  m.impl("part_pool_backward", &part_pool_backward_cpu);
}

}  // namespace keypointops
