// CPU kernels of pyfast.gp on raw pointers. Semantics: pyfast/gp/grid.py (KroneckerGrid).
#pragma once

#include <cstdint>

namespace pyfast::cpu {

// The eigenvalues of K_1 (x) ... (x) K_D + noise I on a row-major grid, never stored:
//   L[i_1, ..., i_D] = noise + lam_1[i_1] * ... * lam_D[i_D]   (products left to right).
// lams[d] points at the n_d float64 eigenvalues of factor d (D >= 1 factors, sizes[d] = n_d).
struct KronSpectrum {
  const double* const* lams;
  const std::int64_t* sizes;
  int D;
  double noise;
};

// z[i, b] *= L[i]^power (power -1 or -0.5) for z (N, cols) contiguous, N = prod n_d, in place.
// dtype: kFloat32 or kFloat64 (the scale is computed in float64 and rounded to z's type).
void gp_scale_by_spectrum(int dtype, void* z, std::int64_t cols, const KronSpectrum& spectrum, double power);

// sum_i log L[i] in float64, all L[i] > 0 (checked by the caller).
double gp_log_spectrum_sum(const KronSpectrum& spectrum);

// out = Q diag(L^power) Q^T x with Q = Q_1 (x) ... (x) Q_D on the row-major grid `sizes` (D modes);
// x, out (N, cols) contiguous (x == out allowed: in place); q[d], qt[d]: Q_d and Q_d^T, (n_d, n_d)
// row-major. rotate_in / rotate_out select the halves: Q^T x (scaled by L^power when `spectrum` is
// given, power -1 or -0.5), Q x, or both. float32 / float64; needs AVX2 + FMA.
bool gp_kron_eigen_apply_available();
void gp_kron_eigen_apply(int dtype, const void* x, void* out, std::int64_t cols, const void* const* q,
                         const void* const* qt, const std::int64_t* sizes, int D, bool rotate_in, bool rotate_out,
                         const KronSpectrum* spectrum, double power);

}  // namespace pyfast::cpu
