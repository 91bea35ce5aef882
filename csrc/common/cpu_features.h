// Run-time CPU feature checks for kernels compiled for an instruction set beyond the build's
// baseline. A function marked PYFAST_AVX2 may use AVX2 + FMA intrinsics; call it only when
// has_avx2() is true. PYFAST_X86 is defined where those intrinsics exist at all.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PYFAST_X86 1
#define PYFAST_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace pyfast {

#ifdef PYFAST_X86
inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
inline bool has_avx2() { return false; }
#endif

// Runs f() with its body compiled for AVX2 + FMA where this CPU has them: plain loops (exp_vec, row
// reductions) then vectorize 8 floats wide with fused multiply-adds. f must be a lambda marked
// PYFAST_INLINE, and the helpers it calls inline ones, so that they are inlined into (and compiled
// with the target of) run_avx2.
#define PYFAST_INLINE __attribute__((always_inline))
#ifdef PYFAST_X86
template <typename F>
PYFAST_AVX2 void run_avx2(F& f) {
  f();
}
template <typename F>
void run_widest(F&& f) {
  if (has_avx2()) {
    run_avx2(f);
  } else {
    f();
  }
}
#else
template <typename F>
void run_widest(F&& f) {
  f();
}
#endif

}  // namespace pyfast
