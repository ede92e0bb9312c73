#pragma once
// Transparent huge pages for large fresh CPU buffers.
//
// A fresh buffer of many MiB costs one page fault per 4 KiB on its first write, which on the CPUs
// here is slower than the kernels that fill it.  Advising its 2 MiB-aligned interior onto huge pages
// turns ~512 faults per MiB into one per 2 MiB, as PyTorch's own allocator does for every large
// allocation under THP_MEM_ALLOC_ENABLE=1.  A hint: it has no effect off Linux, and failure is harmless.
#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace keypointops {

// Call on a tensor the kernel is about to write for the first time.
inline void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t{2} << 20;
  const auto begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + fresh.nbytes()) & ~(kHugePage - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
}

}  // namespace keypointops
