#pragma once
// Large fresh CPU buffers: transparent huge pages, and zeros from the kernel's zero-filled pages.
//
// A fresh buffer of many MiB costs one page fault per 4 KiB on its first write, which on the CPUs
// here is slower than the kernels that fill it.  Advising its 2 MiB-aligned interior onto huge pages
// turns ~512 faults per MiB into one per 2 MiB, as PyTorch's own allocator does for every large
// allocation under THP_MEM_ALLOC_ENABLE=1.  A hint: it has no effect off Linux, and failure is harmless.
// A large buffer that must start as zeros and is then written sparsely (a scattered gradient) is
// mapped anonymously instead, as calloc does: the kernel hands out its pages already zeroed, on
// first touch, so the buffer costs no zero-fill pass of its own (and a page nobody writes stays the
// shared zero page).  Such a mapping is reported to torch's memory profiler like an allocation of
// the CPU allocator, so that profiles and peak-memory measurements count it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/Allocator.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace keypointops {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// Advises the 2 MiB-aligned interior of `fresh` onto huge pages and returns its [first, last)
// addresses (first == last when the tensor spans no whole huge page).
inline std::pair<uintptr_t, uintptr_t> advise_interior(const at::Tensor& fresh) {
  const auto begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = std::max(first, (begin + fresh.nbytes()) & ~(kHugePage - 1));
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  return {first, last};
}
#endif

// Call on a tensor the kernel is about to write for the first time.
inline void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  advise_interior(fresh);
#endif
}

// advise_huge_pages, then fault the advised interior in now, from the calling thread
// (MADV_POPULATE_WRITE): for a buffer that a kernel's threads then write side by side.  Threads
// that first-touch the same 2 MiB page, or fault huge pages at the same time, wait on each other
// (docs/benchmarks.md: slower than on 4 KiB pages); one thread faulting the pages in before them
// zeroes each once, at a streaming write's speed.  The zeroing is serial, so a buffer over
// kPopulateMaxBytes is only advised (its serial zeroing costs more than the threads' waits); a hint
// like the advice, without effect where the kernel lacks MADV_POPULATE_WRITE.
constexpr size_t kPopulateMaxBytes = size_t{64} << 20;

inline void populate_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
#if defined(MADV_POPULATE_WRITE)
  const auto [first, last] = advise_interior(fresh);
  if (last > first && fresh.nbytes() <= kPopulateMaxBytes) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
  }
#else
  advise_interior(fresh);
#endif
#endif
}

// A zero CPU tensor of `sizes` in `memory_format`.  From kHugePage bytes on (Linux), its memory is a
// fresh anonymous mapping whose 2 MiB-aligned interior is advised onto huge pages, unmapped when
// the tensor is freed; below that, or where the mapping fails, a zero-filled at::empty.
inline at::Tensor zeros_from_fresh_pages(at::IntArrayRef sizes, const at::TensorOptions& options,
                                         at::MemoryFormat memory_format) {
  const auto layout = at::empty(sizes, options.device(at::kMeta).memory_format(memory_format));
  const size_t bytes = layout.nbytes();
#if defined(__linux__)
  if (bytes >= kHugePage) {
    const size_t length = bytes + kHugePage;  // room to start on a huge-page boundary
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const uintptr_t aligned = (reinterpret_cast<uintptr_t>(base) + kHugePage - 1) & ~(kHugePage - 1);
      void* data = reinterpret_cast<void*>(aligned);
#if defined(MADV_HUGEPAGE)
      madvise(data, bytes & ~(kHugePage - 1), MADV_HUGEPAGE);
#endif
      const auto nbytes = static_cast<int64_t>(bytes);
      // The allocator's running totals are not known here: 0, as for memory outside any pool.
      if (c10::memoryProfilingEnabled()) c10::reportMemoryUsageToProfiler(data, nbytes, 0, 0, c10::Device(c10::kCPU));
      return at::from_blob(data, sizes, layout.strides(), [base, length, nbytes](void* ptr) {
        if (c10::memoryProfilingEnabled()) c10::reportMemoryUsageToProfiler(ptr, -nbytes, 0, 0, c10::Device(c10::kCPU));
        munmap(base, length);
      }, options.device(at::kCPU));
    }
  }
#endif
  return at::empty(sizes, options.memory_format(memory_format)).zero_();
}

}  // namespace keypointops
