// Backing large kernel outputs with transparent huge pages.
//
// A fresh multi-megabyte output is mmapped by the allocator and first touched by the
// kernel, so every 4 KiB page faults; on a VM that costs as much as writing the data.
// Asking for huge pages before the first write (what PyTorch's THP_MEM_ALLOC_ENABLE=1
// does for every allocation) cuts the faults 512-fold. Linux only; a no-op elsewhere or
// where the kernel declines.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace d3f {

inline void advise_huge_pages(const at::Tensor& fresh_output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kPage = 4096, kHuge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(fresh_output.data_ptr());
  const uintptr_t end = start + uintptr_t(fresh_output.nbytes());
  const uintptr_t first = (start + kPage - 1) & ~(kPage - 1), last = end & ~(kPage - 1);
  if (last > first && last - first >= 2 * kHuge) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)fresh_output;
#endif
}

}  // namespace d3f
