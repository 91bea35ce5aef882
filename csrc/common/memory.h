// Page-fault cost of fresh outputs. Kernels that fill a large, freshly allocated output first ask
// Linux for transparent huge pages on it (madvise MADV_HUGEPAGE; effective when THP is in
// "madvise" or "always" mode): first-touch faults then come per 2 MiB instead of per 4 KiB, which
// on VMs dominates the cost of writing e.g. a 256 MiB permuted activation. This is the same
// advice torch's own allocator gives under THP_MEM_ALLOC_ENABLE=1. PYFAST_THP=0 turns it off.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyfast {

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("PYFAST_THP");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// Advises huge pages for the whole 2 MiB pages inside [data, data + bytes) when the range covers
// at least 4 of them. Purely advisory: failures are ignored and the contents are unchanged.
inline void advise_huge_pages(void* data, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{1} << 21;
  if (data == nullptr || bytes < 4 * kHuge || !huge_pages_enabled()) return;
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace pyfast
