// rank_stats CPU kernel: per-query re-ID ranking statistics (first true-match rank, AP, INP) of a
// [Q, G] distance matrix under the MARS / torchreid rules, without sorting any row.
//
// For query q with pid p and camera c, the gallery items are
//   true matches   pid == p, camera != c          (M of them, found through the pid-sorted gallery)
//   removed        pid == p, camera == c; pid == -1 (junk)
//   negatives      everything else.
// Items are ordered by (distance, gallery index), the order of a stable argsort.  AP, INP and the
// CMC need only the rank of each true match among the kept items, not a sorted row:
//   rank_k = (non-junk items before match k) - (removed same-pid items before it),
//   AP = mean_k (k + 1) / (rank_k + 1),   INP = M / (rank_{M-1} + 1),   first = rank_0
// (first = -1 when M = 0: the query is skipped).  The matches are sorted; each count of non-junk
// items before a match is one vectorised compare-and-count pass over the row (at::vec), the
// removed items are few and compared one by one.  Above kMaxCountedMatches matches a query's row
// is sorted instead (a frame-level gallery): the cost stays O(G log G) per query.
// Cost: O(G log G) once (pid sort), then O(G * M / vector width) per query, or O(G log G) for
// queries with many matches; one read of the distance matrix per pass, the row stays in L2.
// Memory: outputs [Q] and a [G] non-junk mask; per thread the matches (and a [G] order when sorting).
// Queries run in parallel in tasks of several rows (dynamic_tasks.h); each writes only its own
// outputs (deterministic).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator ATen headers (ATen/ops/*.h) only, not ATen/ATen.h
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#if defined(CPU_CAPABILITY_DEFAULT)  // the build that registers the op with torch (below)
#include <torch/library.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <vector>

#include "ops/cpu/cpu_capability.h"
#include "ops/cpu/dynamic_tasks.h"

namespace keypointops {
namespace CPU_CAPABILITY {  // this build's capability (ops/cpu/cpu_capability.h)
namespace {

constexpr int64_t kMaxCountedMatches = 128;

template <typename scalar_t>
struct Item {
  scalar_t dist;
  int64_t index;
};

// Whether (da, ia) ranks before (db, ib).
template <typename scalar_t>
inline bool before(scalar_t da, int64_t ia, scalar_t db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

template <typename scalar_t>
inline bool item_before(const Item<scalar_t>& a, const Item<scalar_t>& b) {
  return before(a.dist, a.index, b.dist, b.index);
}

// Sum over j in [begin, end) of keep[j] * (row[j] < t), or (row[j] <= t) when inclusive.
template <typename scalar_t>
scalar_t count_below(const scalar_t* row, const scalar_t* keep, int64_t begin, int64_t end, scalar_t t,
                     bool inclusive) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Vec threshold(t);
  Vec acc(0);
  int64_t j = begin;
  for (; j + Vec::size() <= end; j += Vec::size()) {
    const Vec d = Vec::loadu(row + j);
    acc = at::vec::fmadd(inclusive ? d.le(threshold) : d.lt(threshold), Vec::loadu(keep + j), acc);
  }
  scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](const Vec& a, const Vec& b) { return a + b; }, acc);
  for (; j < end; ++j) sum += keep[j] * static_cast<scalar_t>(inclusive ? row[j] <= t : row[j] < t);
  return sum;
}

// d - d is 0 for a finite d and NaN for NaN or an infinity: one vectorised pass.
template <typename scalar_t>
bool all_finite(const scalar_t* row, int64_t n) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec acc(0);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec d = Vec::loadu(row + j);
    acc = acc + (d - d);
  }
  scalar_t sum = at::vec::vec_reduce_all<scalar_t>([](const Vec& a, const Vec& b) { return a + b; }, acc);
  for (; j < n; ++j) sum += row[j] - row[j];
  return sum == 0;
}

struct QueryStats {
  int64_t first;
  double ap, inp;
};

// From the ranks of the M true matches, in order.
template <typename Ranks>
QueryStats stats_of(int64_t m, const Ranks& rank_of) {
  double precision_sum = 0;
  int64_t first = 0, rank = 0;
  for (int64_t k = 0; k < m; ++k) {
    rank = rank_of(k);
    if (k == 0) first = rank;
    precision_sum += static_cast<double>(k + 1) / static_cast<double>(rank + 1);
  }
  return {first, precision_sum / static_cast<double>(m), static_cast<double>(m) / static_cast<double>(rank + 1)};
}

template <typename scalar_t>
void rank_stats_rows(const scalar_t* dist, const int64_t* q_pids, const int64_t* q_camids,
                     const int64_t* g_pids, const int64_t* g_camids, const std::vector<int64_t>& by_pid,
                     const std::vector<scalar_t>& keep, int64_t num_gallery, int64_t num_queries,
                     int64_t* first, double* ap, double* inp, std::atomic<bool>& finite) {
  constexpr int64_t kRowsPerTask = 8;
  const auto pid_less = [&](int64_t index, int64_t pid) { return g_pids[index] < pid; };
  for_each_task((num_queries + kRowsPerTask - 1) / kRowsPerTask, [&] {
    return [&, matches = std::vector<Item<scalar_t>>(), removed = std::vector<Item<scalar_t>>(),
            order = std::vector<int64_t>()](int64_t task) mutable {
      const int64_t end = std::min(num_queries, (task + 1) * kRowsPerTask);
      for (int64_t q = task * kRowsPerTask; q < end; ++q) {
        const scalar_t* row = dist + q * num_gallery;
        const int64_t pid = q_pids[q];
        matches.clear();
        removed.clear();
        if (pid != -1) {
          auto it = std::lower_bound(by_pid.begin(), by_pid.end(), pid, pid_less);
          for (; it != by_pid.end() && g_pids[*it] == pid; ++it) {
            (g_camids[*it] != q_camids[q] ? matches : removed).push_back({row[*it], *it});
          }
        }
        if (!all_finite(row, num_gallery)) finite.store(false, std::memory_order_relaxed);
        const int64_t m = static_cast<int64_t>(matches.size());
        QueryStats stats{-1, 0, 0};
        if (m > kMaxCountedMatches) {
          order.resize(num_gallery);
          std::iota(order.begin(), order.end(), 0);
          std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return before(row[a], a, row[b], b); });
          std::vector<int64_t>& ranks = order;  // reused: ranks of the matches fill its front
          int64_t kept = 0, found = 0;
          for (int64_t i = 0; i < num_gallery; ++i) {
            const int64_t j = order[i];
            if (g_pids[j] == -1 || (g_pids[j] == pid && g_camids[j] == q_camids[q])) continue;
            if (g_pids[j] == pid) ranks[found++] = kept;
            ++kept;
          }
          stats = stats_of(m, [&](int64_t k) { return ranks[k]; });
        } else if (m > 0) {
          std::sort(matches.begin(), matches.end(), item_before<scalar_t>);
          stats = stats_of(m, [&](int64_t k) {
            const auto& match = matches[k];
            const auto non_junk = static_cast<int64_t>(
                count_below(row, keep.data(), 0, match.index, match.dist, true) +
                count_below(row, keep.data(), match.index + 1, num_gallery, match.dist, false));
            int64_t removed_before = 0;
            for (const auto& item : removed) removed_before += item_before(item, match);
            return non_junk - removed_before;
          });
        }
        first[q] = stats.first, ap[q] = stats.ap, inp[q] = stats.inp;
      }
    };
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rank_stats_cpu(const at::Tensor& dist, const at::Tensor& q_pids,
                                                              const at::Tensor& q_camids, const at::Tensor& g_pids,
                                                              const at::Tensor& g_camids) {
  TORCH_CHECK(dist.dim() == 2, "rank_stats: dist must be [Q, G], got ", dist.sizes());
  TORCH_CHECK(dist.scalar_type() == at::kFloat || dist.scalar_type() == at::kDouble,
              "rank_stats: dist must be float32 or float64, got ", dist.scalar_type());
  const int64_t num_queries = dist.size(0), num_gallery = dist.size(1);
  for (const auto& [name, ids, size] : {std::tuple{"q_pids", &q_pids, num_queries},
                                        std::tuple{"q_camids", &q_camids, num_queries},
                                        std::tuple{"g_pids", &g_pids, num_gallery},
                                        std::tuple{"g_camids", &g_camids, num_gallery}}) {
    TORCH_CHECK(ids->dim() == 1 && ids->size(0) == size && ids->scalar_type() == at::kLong,
                "rank_stats: ", name, " must be int64 [", size, "], got ", ids->scalar_type(), " ",
                ids->sizes());
    TORCH_CHECK(ids->device().is_cpu(), "rank_stats: ", name, " must be on the CPU");
  }
  const at::Tensor d = dist.contiguous(), qp = q_pids.contiguous(), qc = q_camids.contiguous();
  const at::Tensor gp = g_pids.contiguous(), gc = g_camids.contiguous();
  const int64_t* gp_data = gp.data_ptr<int64_t>();
  std::vector<int64_t> by_pid(num_gallery);
  std::iota(by_pid.begin(), by_pid.end(), 0);
  std::stable_sort(by_pid.begin(), by_pid.end(), [&](int64_t a, int64_t b) { return gp_data[a] < gp_data[b]; });

  at::Tensor first = at::empty({num_queries}, qp.options());
  at::Tensor ap = at::empty({num_queries}, qp.options().dtype(at::kDouble));
  at::Tensor inp = at::empty_like(ap);
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "rank_stats_cpu", [&] {
    std::vector<scalar_t> keep(num_gallery);
    for (int64_t j = 0; j < num_gallery; ++j) keep[j] = gp_data[j] != -1;
    rank_stats_rows(d.data_ptr<scalar_t>(), qp.data_ptr<int64_t>(), qc.data_ptr<int64_t>(), gp_data,
                    gc.data_ptr<int64_t>(), by_pid, keep, num_gallery, num_queries, first.data_ptr<int64_t>(),
                    ap.data_ptr<double>(), inp.data_ptr<double>(), finite);
  });
  TORCH_CHECK_VALUE(finite.load(), "rank_stats: distmat must be finite (it holds NaN or infinity)");
  return {first, ap, inp};
}

}  // namespace
}  // namespace CPU_CAPABILITY

KEYPOINTOPS_CPU_KERNEL(rank_stats, CPU_CAPABILITY::rank_stats_cpu)

#if defined(CPU_CAPABILITY_DEFAULT)  // one registration, for every capability's build
TORCH_LIBRARY_IMPL(keypointops, CPU, m) {
  m.impl("rank_stats", KEYPOINTOPS_CPU_DISPATCH(rank_stats, CPU_CAPABILITY::rank_stats_cpu));
}
#endif

}  // namespace keypointops
