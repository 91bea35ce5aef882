// The AVX2 + FMA register tile shared by pyfast's CPU GEMMs (float32 and float64): 6 broadcast
// rows x 2 vectors (16 floats or 8 doubles) held in 12 accumulators. Per k, two vector loads and
// six broadcasts feed 12 FMAs, so the loop runs at the FMA rate when its operands are in cache.
#pragma once

#include <cstdint>

#include "common/cpu_features.h"

#ifdef PYFAST_X86
namespace pyfast {

template <typename T>
struct Avx2;

template <>
struct Avx2<float> {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  PYFAST_AVX2 static Vec zero() { return _mm256_setzero_ps(); }
  PYFAST_AVX2 static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  PYFAST_AVX2 static Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  PYFAST_AVX2 static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  PYFAST_AVX2 static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
};

template <>
struct Avx2<double> {
  using Vec = __m256d;
  static constexpr int kLanes = 4;
  PYFAST_AVX2 static Vec zero() { return _mm256_setzero_pd(); }
  PYFAST_AVX2 static Vec load(const double* p) { return _mm256_loadu_pd(p); }
  PYFAST_AVX2 static Vec broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  PYFAST_AVX2 static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_pd(a, b, c); }
  PYFAST_AVX2 static void store(double* p, Vec v) { _mm256_storeu_pd(p, v); }
};

constexpr int kTileRows = 6;
// Columns of a full tile: two vectors.
template <typename T>
constexpr int kTileCols = 2 * Avx2<T>::kLanes;

// acc[i][t] (+)= sum_k B(i, k) * P[k][t] for i < 6, t < Vecs * lanes, acc rows kTileCols<T> apart,
// with B(i, k) = b[i * rs + k * ks] for i < nb (rows past nb repeat the last one: computed, never
// to be stored) and P[k] at p + k * ps; `accumulate` adds to acc instead of overwriting it.
template <typename T, int Vecs>
PYFAST_AVX2 void gemm_tile(const T* b, std::int64_t rs, std::int64_t nb, std::int64_t ks, const T* p, std::int64_t ps,
                           std::int64_t depth, bool accumulate, T* acc) {
  static_assert(Vecs == 1 || Vecs == 2);
  using V = Avx2<T>;
  constexpr int L = V::kLanes;
  // Named accumulators: an array of vectors makes GCC keep them in memory across iterations.
  auto c00 = V::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  auto c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  if (accumulate) {
    c00 = V::load(acc + 0 * L), c01 = V::load(acc + 1 * L), c10 = V::load(acc + 2 * L);
    c11 = V::load(acc + 3 * L), c20 = V::load(acc + 4 * L), c21 = V::load(acc + 5 * L);
    c30 = V::load(acc + 6 * L), c31 = V::load(acc + 7 * L), c40 = V::load(acc + 8 * L);
    c41 = V::load(acc + 9 * L), c50 = V::load(acc + 10 * L), c51 = V::load(acc + 11 * L);
  }
  const auto row = [&](std::int64_t i) { return b + (i < nb ? i : nb - 1) * rs; };
  const T *b0 = row(0), *b1 = row(1), *b2 = row(2), *b3 = row(3), *b4 = row(4), *b5 = row(5);
  std::int64_t at = 0;
  for (std::int64_t kk = 0; kk < depth; ++kk, at += ks, p += ps) {
    const auto p0 = V::load(p), p1 = Vecs == 2 ? V::load(p + L) : p0;
    auto v = V::broadcast(b0 + at);
    c00 = V::fma(v, p0, c00);
    if constexpr (Vecs == 2) c01 = V::fma(v, p1, c01);
    v = V::broadcast(b1 + at);
    c10 = V::fma(v, p0, c10);
    if constexpr (Vecs == 2) c11 = V::fma(v, p1, c11);
    v = V::broadcast(b2 + at);
    c20 = V::fma(v, p0, c20);
    if constexpr (Vecs == 2) c21 = V::fma(v, p1, c21);
    v = V::broadcast(b3 + at);
    c30 = V::fma(v, p0, c30);
    if constexpr (Vecs == 2) c31 = V::fma(v, p1, c31);
    v = V::broadcast(b4 + at);
    c40 = V::fma(v, p0, c40);
    if constexpr (Vecs == 2) c41 = V::fma(v, p1, c41);
    v = V::broadcast(b5 + at);
    c50 = V::fma(v, p0, c50);
    if constexpr (Vecs == 2) c51 = V::fma(v, p1, c51);
  }
  V::store(acc + 0 * L, c00), V::store(acc + 1 * L, c01), V::store(acc + 2 * L, c10);
  V::store(acc + 3 * L, c11), V::store(acc + 4 * L, c20), V::store(acc + 5 * L, c21);
  V::store(acc + 6 * L, c30), V::store(acc + 7 * L, c31), V::store(acc + 8 * L, c40);
  V::store(acc + 9 * L, c41), V::store(acc + 10 * L, c50), V::store(acc + 11 * L, c51);
}

}  // namespace pyfast
#endif
