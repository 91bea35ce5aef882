// OpenMP loops over index ranges. Work below `grain` items runs on the calling thread, and chunk
// boundaries never depend on timing, so reductions over fixed chunks are deterministic.
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
// An OpenMP pragma that disappears (without -Wunknown-pragmas noise) when built without OpenMP.
#define PYFAST_OMP(directive) _Pragma(#directive)
#else
#define PYFAST_OMP(directive)
#endif

namespace pyfast {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// f(begin, end) over contiguous pieces of [0, n), one per thread, each at least `grain` long.
template <typename F>
void parallel_for(std::int64_t n, std::int64_t grain, F&& f) {
  if (n <= 0) return;
  const std::int64_t pieces = std::min<std::int64_t>(max_threads(), (n + grain - 1) / std::max<std::int64_t>(grain, 1));
  if (pieces <= 1) {
    f(std::int64_t{0}, n);
    return;
  }
  const std::int64_t step = (n + pieces - 1) / pieces;
PYFAST_OMP(omp parallel for schedule(static) num_threads(static_cast<int>(pieces)))
  for (std::int64_t p = 0; p < pieces; ++p) {
    const std::int64_t begin = p * step;
    const std::int64_t end = std::min(n, begin + step);
    if (begin < end) f(begin, end);
  }
}

// f(chunk, begin, end) over the fixed chunks [c * chunk_size, (c + 1) * chunk_size) of [0, n).
template <typename F>
void parallel_chunks(std::int64_t n, std::int64_t chunk_size, F&& f) {
  const std::int64_t chunks = (n + chunk_size - 1) / chunk_size;
PYFAST_OMP(omp parallel for schedule(static) if (chunks > 1))
  for (std::int64_t c = 0; c < chunks; ++c) {
    f(c, c * chunk_size, std::min(n, (c + 1) * chunk_size));
  }
}

}  // namespace pyfast
