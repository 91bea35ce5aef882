// Per-row helpers shared by the MoE CPU kernels: load a row into the accumulation type and the
// softmax statistics max / sum exp(z - max).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/half.h"
#include "common/parallel.h"
#include "common/vec_math.h"

namespace pyfast::cpu {

constexpr int kMaxExperts = 512;
constexpr int kMaxTopK = 16;

// The per-row scratch arrays bound the sizes. ops.py guarantees them; the kernels check before any
// thread starts (pybind11 turns the exception into a Python ValueError). k = 0: no top-k involved.
inline void check_row_sizes(const char* what, std::int64_t experts, int k = 0) {
  const bool bad_k = k != 0 && (k < 1 || k > kMaxTopK || k > experts);
  if (experts < 1 || experts > kMaxExperts || bad_k) {
    throw std::invalid_argument(std::string(what) + ": needs 1 <= experts <= " + std::to_string(kMaxExperts) +
                                (k ? " and 1 <= k <= min(experts, " + std::to_string(kMaxTopK) + ")" : std::string()) +
                                ", got experts=" + std::to_string(experts) + (k ? ", k=" + std::to_string(k) : ""));
  }
}

// Rows per thread for per-row kernels over (tokens, experts): ~32K elements amortize a fork.
inline std::int64_t row_grain(std::int64_t experts) { return std::max<std::int64_t>(1, 32768 / std::max<std::int64_t>(experts, 1)); }

template <typename T>
inline void load_row(const T* row, std::int64_t n, acc_t<T>* out) {
  for (std::int64_t i = 0; i < n; ++i) out[i] = to_acc(row[i]);
}

// out = row / temperature, divided (not multiplied by 1 / temperature) to round as the reference.
template <typename T>
inline void load_row(const T* row, std::int64_t n, acc_t<T> temperature, acc_t<T>* out) {
  for (std::int64_t i = 0; i < n; ++i) out[i] = to_acc(row[i]) / temperature;
}

// A simd max reduction: one compare chain per lane instead of one serial chain.
template <typename A>
inline A row_max(const A* z, std::int64_t n) {
  A m = z[0];
PYFAST_OMP(omp simd reduction(max : m))
  for (std::int64_t i = 1; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

template <typename A>
inline A sum_exp(const A* z, std::int64_t n, A shift) {
  A s = 0;
PYFAST_OMP(omp simd reduction(+ : s))
  for (std::int64_t i = 0; i < n; ++i) s += exp_vec(z[i] - shift);
  return s;
}

template <typename A>
inline A sigmoid(A z) {
  return A(1) / (A(1) + exp_vec(-z));
}

template <typename T>
inline bool row_finite(const T* row, std::int64_t n) {
  bool finite = true;
  for (std::int64_t i = 0; i < n; ++i) finite &= std::isfinite(to_acc(row[i]));
  return finite;
}

}  // namespace pyfast::cpu
