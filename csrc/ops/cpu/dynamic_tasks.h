#pragma once
// Tasks handed to the threads one at a time.
//
// at::parallel_for gives each thread one fixed range: on a shared machine a thread that is
// descheduled then holds up the whole op by its whole share.  Here every thread of the team takes
// the next task from an atomic counter until none is left, so a stalled thread delays the op by at
// most one task.  Which thread runs a task does not change what the task computes, so kernels whose
// tasks own disjoint outputs stay bitwise deterministic.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace keypointops {

// Runs worker(task) for every task in [0, tasks), where each thread gets its own worker from
// make_worker() (a callable holding that thread's scratch state).
template <typename MakeWorker>
void for_each_task(int64_t tasks, const MakeWorker& make_worker) {
  if (tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tasks);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto worker = make_worker();
    for (int64_t task = next++; task < tasks; task = next++) worker(task);
  });
}

}  // namespace keypointops
