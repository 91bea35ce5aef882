// Scaling by powers of the Kronecker eigenvalues L = noise + lam_1 (x) ... (x) lam_D, computed per
// row of the (N / n_D, n_D) grid view (shared by gp_scale_by_spectrum and gp_kron_eigen_apply).
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/gp/gp.h"

namespace pyfast::cpu {

class SpectrumScaler {
 public:
  // power: -1 or -0.5.
  SpectrumScaler(const KronSpectrum& spectrum, double power);

  // Rows [first, first + count) of the (N / n_D, n_D) view, each n_D points of `cols` values,
  // stored contiguously at z: z *= L^power.
  template <typename T>
  void scale(T* z, std::int64_t first, std::int64_t count, std::int64_t cols) const;

  std::int64_t rows() const { return static_cast<std::int64_t>(lead_.size()); }
  std::int64_t row_points() const { return n_; }

 private:
  std::vector<double> lead_;  // prod_{d < D-1} lam_d[i_d] per row
  const double* last_;
  std::int64_t n_;
  double noise_;
  bool root_;
};

}  // namespace pyfast::cpu
